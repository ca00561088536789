"""Tables from finished runs: per method across seeds, paired comparisons; Markdown, CSV, LaTeX.

Runs are grouped into *arms*: the method, plus every setting in which runs of that method differ
(so a sweep's points and two partitions stay apart), but never the seed. An arm's cells are
mean ± SD across its seeds with n; the "client SD" column is the SD of the metric across a
task's clients within a run (how far personalisation spreads them), averaged over tasks and
seeds. MB = 10^6 bytes.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from atlasfl.config import complete_saved, from_dict, precision_ran
from atlasfl.errors import AtlasError
from atlasfl.report.runs import RunRecord
from atlasfl.report.stats import Paired, Spread, paired, spread

IGNORED = ("seed", "run_name", "out", "progress", "session.")  # never tell arms apart


@dataclass(frozen=True)
class Table:
    """A titled table of text cells, rendered by ``markdown``, ``to_csv`` and ``latex``."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def arms(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Finished runs grouped by arm label (``atlas``, ``atlas lam=0.5``), in a stable order.

    A label names the settings in which runs of its method differ (not the seed).

    Raises when one arm holds two runs of one seed (the same experiment given twice).
    """
    finished = [r for r in records if r.status == "finished"]
    flats = [_flat(_complete(r.config)) | _precision(r) for r in finished]
    varying: dict[str, list[str]] = {}  # per method: the settings its runs differ in
    for method in {r.method for r in finished}:
        mine = [f for r, f in zip(finished, flats, strict=True) if r.method == method]
        keys = sorted({k for f in mine for k in f})
        varying[method] = [k for k in keys if k != "method" and not k.startswith(IGNORED)
                           and len({repr(f.get(k)) for f in mine}) > 1]
    grouped: dict[str, list[RunRecord]] = defaultdict(list)
    for record, flat in zip(finished, flats, strict=True):
        extra = " ".join(f"{k.rsplit('.', 1)[-1]}={_text(flat.get(k))}"
                         for k in varying[record.method] if flat.get(k) is not None)
        label = f"{record.method} {extra}".strip()
        if any(r.seed == record.seed for r in grouped[label]):
            other = next(r for r in grouped[label] if r.seed == record.seed)
            raise AtlasError(f"{label}: two runs of seed {record.seed} ({other.path} and "
                             f"{record.path}); report them separately")
        grouped[label].append(record)
    return {label: sorted(grouped[label], key=lambda r: r.seed) for label in sorted(grouped)}


def _complete(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with today's defaults for keys added since it was written.

    Runs written before a key existed ran at its default: without this, an old and a new run of
    one experiment would land in two arms. A config this version cannot read is taken as saved.
    """
    try:
        return from_dict(complete_saved(config)).to_dict()
    except AtlasError:
        return config


def _precision(record: RunRecord) -> dict[str, Any]:
    """``train.precision`` as the run resolved it: ``auto`` is bf16 on some machines only.

    From the summary, or for a run from before summaries said, from its config and device
    (``precision_ran``). Runs in fp32 and bf16 are two arms, whatever their configs say.
    """
    summary = record.summary or {}
    asked = record.config.get("train", {}).get("precision", "auto")
    return {"train.precision": precision_ran(asked, str(summary.get("device", "cpu")),
                                             summary.get("precision"))}


def _summary(record: RunRecord) -> dict[str, Any]:
    if record.summary is None:  # internal: arms() keeps finished runs only
        raise RuntimeError(f"{record.path} has no summary")
    return record.summary


def _text(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def _cell(s: Spread | None, digits: int = 3) -> str:
    if s is None:
        return ""
    return f"{s.mean:.{digits}f}" + ("" if s.sd is None else f" ± {s.sd:.{digits}f}")


def _over(runs: Sequence[RunRecord], get) -> Spread | None:
    values = [get(r.summary) for r in runs]
    return spread(values) if values and all(v is not None for v in values) else None


def client_sd(summary: dict[str, Any], task: str, key: str = "metric") -> float:
    """SD of ``key`` across the clients of ``task`` in one run (0 with one client)."""
    values = [c[key] for c in summary["clients"] if c["task"] == task and key in c]
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values) if len(values) > 1 else 0.0


def method_table(records: Sequence[RunRecord], *, key: str = "metric") -> Table:
    """Per arm: each task's ``key`` (``metric``, ``accuracy``, ``own_metric``), averages, bytes."""
    grouped = arms(records)
    if not grouped:
        raise AtlasError("no finished run to report")
    first = next(iter(grouped.values()))[0].summary
    assert first is not None
    tasks = list(first["tasks"])
    acc_key = "own_accuracy" if key == "own_metric" else "accuracy"
    names = {t: "accuracy" if key == "accuracy" else first["tasks"][t]["metric_name"]
             for t in tasks}
    average = {"metric": "avg metric", "accuracy": "avg acc", "own_metric": "avg own metric"}
    header = ["method", "n", *(f"{t} {names[t]}" for t in tasks), average[key], "avg acc",
              "val metric", "client SD", "MB up", "MB down", "wall s", "peak MB"]
    rows = []
    if key in ("metric", "accuracy"):
        avg = first["average"]
        majority = "majority_metric" if key == "metric" else "majority_accuracy"
        rows.append(["majority class", "", *(f"{first['tasks'][t][majority]:.3f}"
                                             if majority in first["tasks"][t] else ""
                                             for t in tasks),
                     f"{avg[majority]:.3f}" if majority in avg else "",
                     f"{avg['majority_accuracy']:.3f}" if "majority_accuracy" in avg else "",
                     "", "", "", "", "", ""])
    for label, runs in grouped.items():
        sds = [client_sd(_summary(r), t, key) for r in runs for t in tasks]
        rows.append([
            label, str(len(runs)),
            *(_cell(_over(runs, lambda s, t=t: s["tasks"].get(t, {}).get(key))) for t in tasks),
            _cell(_over(runs, lambda s: s["average"].get(key))),
            _cell(_over(runs, lambda s: s["average"].get(acc_key))),
            _cell(_over(runs, lambda s: s["average"].get("val_metric"))),
            f"{statistics.fmean(sds):.3f}",
            _cell(_over(runs, lambda s: s["bytes_up"] / 1e6), 2),
            _cell(_over(runs, lambda s: s["bytes_down"] / 1e6), 2),
            _cell(_over(runs, lambda s: s["wall_seconds"]), 0),
            _cell(_over(runs, lambda s: s.get("peak_rss_mb")), 0)])
    scored = {"metric": "the tasks' shared test rows",
              "accuracy": "the tasks' shared test rows, accuracy of each task",
              "own_metric": "the test rows weighted to each client's own label mix"}[key]
    return Table(f"Per method on {scored}: mean ± SD across seeds (n)", header, rows,
                 "client SD: SD of the metric across a task's clients, mean over tasks and "
                 "seeds. MB = 10^6 bytes.")


def comparisons(records: Sequence[RunRecord], vs: str, *, key: str = "metric"
                ) -> dict[str, Paired]:
    """Each other arm minus arm ``vs`` on the average ``key``, paired by seed."""
    grouped = arms(records)
    if vs not in grouped:
        raise AtlasError(f"--vs {vs!r} is not among the arms: {', '.join(grouped)}")

    def by_seed(label: str) -> dict[int, float]:
        return {r.seed: r.summary["average"][key] for r in grouped[label]  # type: ignore[index]
                if key in r.summary["average"]}  # type: ignore[index]

    base = by_seed(vs)
    out = {}
    for label in grouped:
        if label != vs:
            result = paired(by_seed(label), base)
            if result is not None:
                out[label] = result
    return out


def comparison_table(records: Sequence[RunRecord], vs: str, *, key: str = "metric") -> Table:
    """``comparisons`` as a table: difference, 95% CI, paired t and Wilcoxon p, Cohen's d."""

    def num(value: float | None, digits: int = 3) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    rows = []
    for label, p in comparisons(records, vs, key=key).items():
        ci = "" if p.ci_low is None else f"[{p.ci_low:+.3f}, {p.ci_high:+.3f}]"
        rows.append([label, str(p.n), f"{p.mean_diff:+.3f}", ci, num(p.t_p), num(p.wilcoxon_p),
                     num(p.cohens_d, 2), f"{p.wins}/{p.n}"])
    return Table(f"Paired over seeds: each method minus `{vs}`, average {key}",
                 ["method", "n", "difference", "95% CI", "paired t p", "Wilcoxon p",
                  "Cohen's d", "seeds better"], rows,
                 "t interval with n-1 degrees of freedom; Wilcoxon signed-rank (exact for "
                 "small n) cannot reach p < 0.05 with fewer than 6 seeds; d = mean / SD of the "
                 "differences.")


def status_table(records: Sequence[RunRecord]) -> Table | None:
    """The runs that are not finished, and why; None when every run finished."""
    rows = [[str(r.path), r.status, r.problem or
             f"{len({row['round'] for row in r.rounds})} rounds written, no summary"]
            for r in records if r.status != "finished"]
    if not rows:
        return None
    return Table("Runs not in the statistics", ["run", "status", "why"], rows)


def markdown(table: Table) -> str:
    """The table in GitHub Markdown, its title above and its note below."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |",
             "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV (header row, then one row per line)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(table.header)
    writer.writerows(table.rows)
    return buffer.getvalue()


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
          "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
          "±": r"$\pm$", "`": ""}


def latex(table: Table) -> str:
    """The table as a booktabs ``tabular`` (needs the LaTeX package booktabs), with caption."""

    def esc(text: str) -> str:
        return "".join(_LATEX.get(ch, ch) for ch in text)

    spec = "l" + "r" * (len(table.header) - 1)
    lines = ["\\begin{table}[t]", "\\centering", "\\footnotesize",
             f"\\caption{{{esc(table.title)}}}", f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(esc(h) for h in table.header) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(c) for c in row) + " \\\\" for row in table.rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"
