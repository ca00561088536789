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


def best_rows(history: Sequence[Sequence[dict[str, Any]]]) -> dict[int, int]:
    """Per client, the index (into ``history``) of its evaluation best on its validation rows.

    The earliest on ties; a client never scored on validation rows is left out. Test rows play
    no part: early stopping and the rows reported are chosen on validation only, client by
    client (a pooled ``centralized`` trainer per task stops on its own task's rows).
    """
    best: dict[int, tuple[int, float]] = {}
    for i, rows in enumerate(history):
        for row in rows:
            value = row.get("val_metric")
            if value is not None and (row["client"] not in best
                                      or value > best[row["client"]][1]):
                best[row["client"]] = (i, value)
    return {client: i for client, (i, _) in best.items()}


def stop_early(history: Sequence[Sequence[dict[str, Any]]], patience: int) -> bool:
    """Whether every client has had ``patience`` (> 0) evaluations since its best one."""
    best = best_rows(history)
    if patience <= 0 or not best:
        return False
    since = dict.fromkeys(best, 0)
    for i, rows in enumerate(history):
        for row in rows:
            if row["client"] in best and i > best[row["client"]] and "val_metric" in row:
                since[row["client"]] += 1
    return min(since.values()) >= patience


def reported_rows(history: Sequence[Sequence[dict[str, Any]]], patience: int
                  ) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The client rows a summary reports, and the round (from 1) each comes from.

    Without early stopping (``patience`` 0) the last round's, which is always evaluated; with
    it, each client's evaluation best on its validation rows (``best_rows``), the model early
    stopping keeps.
    """
    last = len(history) - 1
    best = best_rows(history) if patience > 0 else {}
    rows = [next((r for r in history[best[row["client"]]] if r["client"] == row["client"]), row)
            if row["client"] in best else row for row in history[last]]
    return rows, {row["client"]: best.get(row["client"], last) + 1 for row in history[last]}
