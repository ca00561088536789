"""Plain-text tables of run summaries."""

from __future__ import annotations

from typing import Any


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def format_table(summary: dict[str, Any]) -> str:
    """Per-task table (mean over clients) with the average row and the majority-class reference."""
    lines = [f"{'task':<10}{'clients':>8}  {'metric':<9}{'value':>7}{'accuracy':>10}"
             f"{'majority acc':>14}"]
    for task, row in summary["tasks"].items():
        lines.append(f"{task:<10}{row['clients']:>8}  {row['metric_name']:<9}{_fmt(row['metric'])}"
                     f"{_fmt(row.get('accuracy')):>10}{_fmt(row.get('majority_accuracy')):>14}")
    avg = summary["average"]
    lines.append(f"{'average':<10}{'':>8}  {'':<9}{_fmt(avg['metric'])}"
                 f"{_fmt(avg.get('accuracy')):>10}{_fmt(avg.get('majority_accuracy')):>14}")
    return "\n".join(lines)
