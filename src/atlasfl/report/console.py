"""Plain-text tables of run summaries."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """Per task (mean over clients): local and global metric side by side, and the references.

    ``local``: each client's own held-out rows; ``global``: the task's shared test rows;
    ``own maj.``: each client predicting its own majority class, on its local test; ``maj.``:
    the task's majority class, on the shared test rows.
    """
    refs = summary.get("references", {})
    own = refs.get("own_majority", {}).get("tasks", {})
    task_major = refs.get("majority", {}).get("tasks", {})
    lines = [f"{'task':<10}{'clients':>8}  {'metric':<9}{'local':>7}{'global':>8}{'val':>8}"
             f"{'own maj.':>10}{'maj.':>8}"]

    def line(name: str, clients: str, metric: str, row: dict[str, Any], own_row: dict[str, Any],
             major: dict[str, Any]) -> str:
        return (f"{name:<10}{clients:>8}  {metric:<9}{_fmt(row.get('local_metric'))}"
                f"{_fmt(row.get('global_metric')):>8}{_fmt(row.get('val_metric')):>8}"
                f"{_fmt(own_row.get('local_metric')):>10}{_fmt(major.get('global_metric')):>8}")

    for task, row in summary["tasks"].items():
        lines.append(line(task, str(row["clients"]), row["metric_name"], row, own.get(task, {}),
                          task_major.get(task, {})))
    lines.append(line("average", "", "", summary["average"],
                      refs.get("own_majority", {}).get("average", {}),
                      refs.get("majority", {}).get("average", {})))
    chosen = sorted(set(summary.get("reported_rounds", {}).values()))
    if chosen and chosen != [summary.get("rounds")]:
        lines.append(f"(early stopping on validation: {summary['rounds_run']} rounds run, each "
                     f"client's best round reported: {', '.join(map(str, chosen))})")
    return "\n".join(lines)
