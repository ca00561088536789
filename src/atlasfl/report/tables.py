"""Tables from finished runs: per method across seeds, paired comparisons; Markdown, CSV, LaTeX.

Runs are grouped into *arms*: the method, plus every setting in which runs of that method differ
(so a sweep's points and two partitions stay apart), but never the seed. An arm's cells are
mean ± SD across its seeds (the table says so) with n; every score is shown twice, on each
client's local test and on the task's shared test rows; the references (the task's majority
class, each client's own majority class) lead every table. The "client SD" column is the SD of
the local metric across a task's clients within a run (how far personalisation spreads them),
averaged over tasks and seeds. MB = 10^6 bytes.
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


def cell(s: Spread | None, digits: int = 3) -> str:
    """A table cell: ``mean ± SD`` across seeds (the SD left out for one seed), or empty."""
    if s is None:
        return ""
    return f"{s.mean:.{digits}f}" + ("" if s.sd is None else f" ± {s.sd:.{digits}f}")


def _over(runs: Sequence[RunRecord], get) -> Spread | None:
    return _spread_of([get(r.summary) for r in runs])


SD_NOTE = "± is the SD across seeds (n seeds), not an interval"


def client_sd(summary: dict[str, Any], task: str, key: str = "local_metric") -> float:
    """SD of ``key`` across the clients of ``task`` in one run (0 with one client)."""
    values = [c[key] for c in summary["clients"] if c["task"] == task and key in c]
    if not all(math.isfinite(v) for v in values):
        return math.nan
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _data_setting(record: RunRecord) -> str:
    """The run's data settings (``data.*``): runs with the same ones share their references."""
    flat = _flat(_complete(record.config))
    return repr(sorted((k, repr(v)) for k, v in flat.items() if k.startswith("data.")))


def reference_rows(records: Sequence[RunRecord], tasks: Sequence[str], score: str
                   ) -> list[tuple[str, int, list[Spread | None]]]:
    """Rows of constant predictions (``summary["references"]``), per data setting, over seeds.

    A reference depends on the data only (the partition, the rows), not on the method, so the
    runs of one data setting and seed all carry the same one: one per seed is used. Cells:
    per task local then global, then the averages, as ``method_table`` lays them out.
    """
    finished = [r for r in records if r.status == "finished"]
    settings: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for record in finished:
        settings[_data_setting(record)].setdefault(record.seed, _summary(record))
    varying = _varying_data(finished) if len(settings) > 1 else []
    out = []
    for setting, by_seed in settings.items():
        example = next(r for r in finished if _data_setting(r) == setting)
        flat = _flat(_complete(example.config))
        suffix = " ".join(f"{k.rsplit('.', 1)[-1]}={_text(flat.get(k))}" for k in varying)
        for name, label in (("majority", "majority class (task's)"),
                            ("own_majority", "majority class (each client's own)")):
            refs = [s.get("references", {}).get(name) for s in by_seed.values()]
            if any(r is None for r in refs):
                continue

            cells = [_spread_of([r["tasks"].get(t, {}).get(f"{side}_{score}") for r in refs])
                     for t in tasks for side in ("local", "global")]
            cells += [_spread_of([r["average"].get(f"{side}_{score}") for r in refs])
                      for side in ("local", "global")]
            out.append((f"{label} {suffix}".strip(), len(refs), cells))
    return out


def _spread_of(values: Sequence[float | None]) -> Spread | None:
    present = [v for v in values if v is not None]
    return spread(present) if present and len(present) == len(values) else None


def _varying_data(records: Sequence[RunRecord]) -> list[str]:
    flats = [_flat(_complete(r.config)) for r in records]
    keys = sorted({k for f in flats for k in f if k.startswith("data.")})
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def method_table(records: Sequence[RunRecord], *, score: str = "metric") -> Table:
    """Per arm: each task's local and global ``score`` (metric or accuracy), averages, bytes.

    Local: each client's own held-out rows (the personalised score); global: the task's shared
    test rows. The reference rows (majority classes) come first.
    """
    grouped = arms(records)
    if not grouped:
        raise AtlasError("no finished run to report")
    first = next(iter(grouped.values()))[0].summary
    assert first is not None
    tasks = list(first["tasks"])
    names = {t: "accuracy" if score == "accuracy" else first["tasks"][t]["metric_name"]
             for t in tasks}
    header = ["method", "n", *(f"{t} {names[t]} {side}" for t in tasks
                               for side in ("local", "global")),
              f"avg {score} local", f"avg {score} global", "val metric", "client SD local",
              "MB up", "MB down", "wall s", "peak MB"]
    rows = [[label, str(n), *map(cell, cells), "", "", "", "", "", ""]
            for label, n, cells in reference_rows(records, tasks, score)]
    for label, runs in grouped.items():
        sds = [client_sd(_summary(r), t) for r in runs for t in tasks]
        rows.append([
            label, str(len(runs)),
            *(cell(_over(runs, lambda s, t=t, side=side:
                          s["tasks"].get(t, {}).get(f"{side}_{score}")))
              for t in tasks for side in ("local", "global")),
            cell(_over(runs, lambda s: s["average"].get(f"local_{score}"))),
            cell(_over(runs, lambda s: s["average"].get(f"global_{score}"))),
            cell(_over(runs, lambda s: s["average"].get("val_metric"))),
            f"{statistics.fmean(sds):.3f}" if sds else "",
            cell(_over(runs, lambda s: s["bytes_up"] / 1e6), 2),
            cell(_over(runs, lambda s: s["bytes_down"] / 1e6), 2),
            cell(_over(runs, lambda s: s["wall_seconds"]), 0),
            cell(_over(runs, lambda s: s.get("peak_rss_mb")), 0)])
    what = "metric" if score == "metric" else "accuracy"
    return Table(f"Per method, {what} on each client's local test and on the task's shared "
                 f"test rows, mean over seeds ({SD_NOTE})", header, rows,
                 f"local: each client's own held-out rows (data.test_fraction), never trained "
                 f"on or used to choose; global: the task's shared test rows (GLUE dev). {SD_NOTE}."
                 f" client SD: SD of the local metric across a task's clients, mean over tasks "
                 f"and seeds. MB = 10^6 bytes.")


def comparisons(records: Sequence[RunRecord], vs: str, *, key: str = "local_metric"
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


WILCOXON_MIN_N = 6  # with fewer pairs the exact two-sided signed-rank p is never below 0.05


def comparison_table(records: Sequence[RunRecord], vs: str, *, key: str = "local_metric"
                     ) -> Table:
    """``comparisons`` as a table: difference, 95% t interval, paired t p, Wilcoxon p, d.

    The exact Wilcoxon p is shown only from ``WILCOXON_MIN_N`` pairs on: below that it cannot
    reach 0.05 whatever the data, and printing it would read as evidence of no effect.
    """

    def num(value: float | None, digits: int = 3) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    rows = []
    for label, p in comparisons(records, vs, key=key).items():
        ci = "" if p.ci_low is None else f"[{p.ci_low:+.3f}, {p.ci_high:+.3f}]"
        wilcoxon = num(p.wilcoxon_p) if p.n >= WILCOXON_MIN_N else f"n < {WILCOXON_MIN_N}"
        rows.append([label, str(p.n), f"{p.mean_diff:+.3f}", ci, num(p.t_p), wilcoxon,
                     num(p.cohens_d, 2), f"{p.wins}/{p.n}"])
    where = {"local_metric": "local test", "global_metric": "global test",
             "val_metric": "validation"}.get(key, key)
    return Table(f"Paired over seeds: each method minus `{vs}`, average metric on the {where}",
                 ["method", "n", "difference", "95% CI", "paired t p", "Wilcoxon p",
                  "Cohen's d", "seeds better"], rows,
                 f"difference: mean over seeds of (method - {vs}); 95% CI: Student's t with n-1 "
                 f"degrees of freedom; Wilcoxon signed-rank (exact) shown from "
                 f"{WILCOXON_MIN_N} seeds on (below, it cannot reach p < 0.05); d = mean / SD "
                 f"of the differences.")


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
