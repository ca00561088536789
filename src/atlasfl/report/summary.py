"""Summarize a run's final evaluation: per task (mean over its clients) and the average."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any


def summarize(final_rows: list[dict[str, Any]], majority: dict[str, dict[str, float]],
              metric_names: dict[str, str]) -> dict[str, Any]:
    """Per-task means of the final round's client rows, and their unweighted average.

    Args:
        final_rows: one row per client from the last evaluated round (``task``, ``metric``,
            optional ``accuracy``, ``val_metric`` and ``own_metric``/``own_accuracy``: the test
            rows weighted to the client's own label mix, see ``label_mix_weights``).
        majority: per task, metrics of always predicting the training majority class.
        metric_names: per task, the name of its primary metric.
    """
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in final_rows:
        if "metric" in row:  # a client whose evaluation failed (a Flower node) has no scores
            by_task[row["task"]].append(row)
    tasks: dict[str, dict[str, Any]] = {}
    for task, rows in by_task.items():
        entry: dict[str, Any] = {"clients": len(rows), "metric_name": metric_names[task],
                                 "metric": mean(r["metric"] for r in rows),
                                 "majority_metric": majority[task]["metric"]}
        for key in ("val_metric", "own_metric", "own_accuracy"):  # validation; own label mix
            if all(key in r for r in rows):
                entry[key] = mean(r[key] for r in rows)
        if all("accuracy" in r for r in rows):
            entry["accuracy"] = mean(r["accuracy"] for r in rows)
            entry["majority_accuracy"] = majority[task]["accuracy"]
        tasks[task] = entry
    average: dict[str, float] = {
        "metric": mean(t["metric"] for t in tasks.values()),
        "majority_metric": mean(t["majority_metric"] for t in tasks.values()),
    }
    for key in ("val_metric", "own_metric"):
        if all(key in t for t in tasks.values()):
            average[key] = mean(t[key] for t in tasks.values())
    with_acc = [t for t in tasks.values() if "accuracy" in t]
    if with_acc:
        average["accuracy"] = mean(t["accuracy"] for t in with_acc)
        average["majority_accuracy"] = mean(t["majority_accuracy"] for t in with_acc)
        if all("own_accuracy" in t for t in with_acc):
            average["own_accuracy"] = mean(t["own_accuracy"] for t in with_acc)
    return {"tasks": tasks, "average": average}
