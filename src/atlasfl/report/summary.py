"""Summarize a run's evaluation: per task (mean over its clients) and the average over tasks.

Every score comes twice, side by side: ``global_*`` on the task's shared test rows (what a model
knows of the whole task) and ``local_*`` on each client's own held-out rows (the personalised
score); ``val_metric`` is on the clients' validation rows, the only ones choices are made on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from statistics import mean
from typing import Any

SCORES = ("global_metric", "global_accuracy", "local_metric", "local_accuracy", "val_metric")
ACCURACY = ("global_accuracy", "local_accuracy")  # absent for regression tasks


def _average(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The unweighted mean over tasks of each score; accuracies over the tasks that have them."""
    out: dict[str, float] = {}
    for key in SCORES:
        having = [t[key] for t in tasks.values() if key in t]
        if having and (key in ACCURACY or len(having) == len(tasks)):
            out[key] = mean(having)
    return out


def summarize(rows: list[dict[str, Any]], references: dict[str, dict[str, dict[str, float]]],
              metric_names: dict[str, str]) -> dict[str, Any]:
    """Per-task means of one evaluation's client rows, their average, and the references.

    Args:
        rows: one row per client from the evaluation reported (``task`` and the ``SCORES`` it
            has).
        references: per task, what constant predictions score (``majority``, ``own_majority``;
            ``atlasfl.data.metrics.reference_scores``).
        metric_names: per task, the name of its primary metric.
    """
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if "global_metric" in row:  # a client whose evaluation failed (a Flower node): no scores
            by_task[row["task"]].append(row)
    tasks: dict[str, dict[str, Any]] = {}
    for task, mine in by_task.items():
        entry: dict[str, Any] = {"clients": len(mine), "metric_name": metric_names[task]}
        for key in SCORES:
            if all(key in r for r in mine):
                entry[key] = mean(r[key] for r in mine)
        tasks[task] = entry
    refs: dict[str, Any] = {}
    for name in ("majority", "own_majority"):
        per_task = {t: references[t][name] for t in tasks}
        refs[name] = {"tasks": per_task, "average": _average(per_task)}
    return {"tasks": tasks, "average": _average(tasks), "references": refs}


def average_val(rows: Sequence[dict[str, Any]]) -> float | None:
    """An evaluation's average validation metric (mean over tasks of the clients' mean).

    None when a client of the evaluation has no validation score (not evaluated, or no rows).
    """
    by_task: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if "val_metric" not in row:
            return None
        by_task[row["task"]].append(row["val_metric"])
    return mean(mean(v) for v in by_task.values()) if by_task else None


def best_evaluation(history: Sequence[Sequence[dict[str, Any]]]) -> int | None:
    """Index (into ``history``) of the evaluated round with the best average validation metric.

    The earliest such round on ties; None when no round has validation scores. Test rows play
    no part: early stopping and the reported round are chosen on validation only.
    """
    best, best_value = None, -float("inf")
    for i, rows in enumerate(history):
        value = average_val(rows)
        if value is not None and value > best_value:
            best, best_value = i, value
    return best


def stop_early(history: Sequence[Sequence[dict[str, Any]]], patience: int) -> bool:
    """Whether ``patience`` (> 0) evaluations have passed since the best validation metric."""
    best = best_evaluation(history)
    if patience <= 0 or best is None:
        return False
    later = sum(average_val(rows) is not None for rows in history[best + 1:])
    return later >= patience
