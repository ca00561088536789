"""One report from run folders: Markdown, CSV and LaTeX tables, figures, and what was left out.

``write_report`` is what ``atlasfl report`` and ``atlasfl compare`` call. It reads the folders
only (``atlasfl.report.runs``), never the training code, so it runs where the runs were copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from atlasfl.report.figures import draw_figures
from atlasfl.report.runs import RunRecord, find_runs
from atlasfl.report.tables import (
    Table,
    arms,
    comparison_table,
    latex,
    markdown,
    method_table,
    status_table,
    to_csv,
)


def report_tables(records: Sequence[RunRecord], vs: str | None = None) -> dict[str, Table]:
    """The tables of a report, by file name: methods (metric, accuracy), paired comparisons.

    Every table shows the local test (each client's own rows) and the global test (the task's
    shared rows) side by side; the paired comparisons come once for each.
    """
    finished = [r for r in records if r.status == "finished"]
    tables: dict[str, Table] = {}
    if finished:
        tables["methods"] = method_table(records)
        tables["methods_accuracy"] = method_table(records, score="accuracy")
        grouped = arms(records)
        base = vs if vs is not None else ("atlas" if "atlas" in grouped else None)
        if base is not None and len(grouped) > 1:
            tables["paired_local"] = comparison_table(records, base, key="local_metric")
            tables["paired_global"] = comparison_table(records, base, key="global_metric")
    left_out = status_table(records)
    if left_out is not None:
        tables["not_finished"] = left_out
    return tables


def write_report(paths: Sequence[str | Path], out: Path, *, vs: str | None = None,
                 figures: bool = True) -> str:
    """Write ``out/report.md``, ``out/tables/*.{md,csv,tex}`` and ``out/figures/*``.

    Returns the Markdown report (tables, then the figures written and those skipped, and why).
    """
    records = find_runs(paths)
    tables = report_tables(records, vs)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    parts = [f"# Report of {len(records)} runs "
             f"({sum(r.status == 'finished' for r in records)} finished)\n"]
    for name, table in tables.items():
        text = markdown(table)
        parts.append(text)
        (out / "tables" / f"{name}.md").write_text(text)
        (out / "tables" / f"{name}.csv").write_text(to_csv(table))
        (out / "tables" / f"{name}.tex").write_text(latex(table))
    if figures:
        written, skipped = draw_figures(records, out / "figures")
        lines = [f"- `{p.relative_to(out)}`" for p in written if p.suffix == ".png"]
        parts.append("### Figures (PNG at 300 DPI, and PDF)\n\n" + "\n".join(lines + [
            f"- {line}" for line in skipped]) + "\n")
    report = "\n".join(parts)
    (out / "report.md").write_text(report)
    return report
