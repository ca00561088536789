"""Every method on quick.yaml over seeds, IID and label skew, and on medium.yaml (issue 30).

Every run is a folder under ``--out`` made by ``atlasfl.engine.grid.run_grid`` (a finished run
is skipped, an interrupted one resumed), so the grid fills over several sessions and parallel
shards (``--shard i/n``; give each process one thread: OMP_NUM_THREADS=1). Each method runs with
the config's ``method_settings`` (its learning rate chosen on validation rows, bench/tune.py).

    python bench/atlas.py run --partition iid --seeds 0 1 2 3 4 --shard 0/2
    python bench/atlas.py export --partition iid      # rows -> bench/results/quick_iid/
    python bench/atlas.py report --partition iid      # atlasfl report of the exported rows
    python bench/atlas.py headline --partition iid    # the README's table (--seeds: only those)
    python bench/atlas.py run --partition medium --seeds 0 --methods atlas   # medium.yaml

``export`` keeps, per finished run, its resolved config and its summary (clients' scores
included), one JSON line each, in one file per method (``bench/results/quick_iid/atlas.jsonl``:
a method added later is a new file, and no file grows with the number of methods): the rows are
committed, so ``report`` rebuilds the run folders
from them in a temporary folder and writes the same report as ``atlasfl report`` (local and
global test side by side, the references, paired differences against ``atlas``) without
rerunning anything, and ``run`` in a later session rebuilds the finished ones first, so the
grid goes on where the exported rows end (``run_grid`` checks each against its point's
config). ``--out`` folders need not survive the session.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import from_yaml, parse_overrides
from atlasfl.engine.grid import run_grid
from atlasfl.report import find_runs, write_report
from atlasfl.report.stats import Paired, spread
from atlasfl.report.tables import cell, arms, comparisons, reference_rows
from atlasfl.runfiles import CONFIG_FILE, SUMMARY_FILE
from atlasfl.strategies import METHODS

# the methods of the README's tables: every method, each at the learning rate chosen on its
# validation rows (quick.yaml's method_settings, from bench/results/tune_quick_iid.jsonl); a
# method added to atlasfl methods needs its tuning rows and its entry there before it runs
# (tests/test_bench_scripts.py checks both configs against the rows)
STUDY = list(METHODS)

ROOT = Path(__file__).resolve().parents[1]
# a setting's config and the stem of its committed rows (bench/results/<stem>.jsonl)
PARTITIONS = {"iid": (ROOT / "configs" / "quick.yaml", "quick_iid"),
              "dirichlet": (ROOT / "configs" / "quick-dirichlet.yaml", "quick_dirichlet"),
              "medium": (ROOT / "configs" / "medium.yaml", "medium_iid")}
CLIENT_KEYS = ("client", "task", "local_metric", "local_accuracy", "global_metric",
               "global_accuracy", "val_metric", "device")


def _out(args: argparse.Namespace) -> Path:
    return Path(args.out) / args.partition


def cmd_run(args: argparse.Namespace) -> None:
    methods = list(STUDY) if args.methods == ["all"] else args.methods
    points = [{"method": m, "seed": s} for s in args.seeds for m in methods]
    index, count = map(int, args.shard.split("/"))
    fixed = {**parse_overrides(args.set), "progress": False}
    rows = _rows(args)
    if rows.is_dir():  # runs of an earlier session: their folders, so the grid skips them
        restored = rebuild(rows, _out(args), missing_only=True)
        if restored:
            print(f"{restored} finished runs restored from {rows}", file=sys.stderr)
    run_grid(from_yaml(PARTITIONS[args.partition][0]), points[index::count], _out(args),
             fixed=fixed)


def _rows(args: argparse.Namespace) -> Path:
    stem = PARTITIONS[args.partition][1]
    return Path(args.rows or ROOT / "bench" / "results" / stem)


def cmd_export(args: argparse.Namespace) -> None:
    rows = _rows(args)
    count = export(_out(args), rows)
    print(f"{count} runs -> {rows}/<method>.jsonl", file=sys.stderr)


def export(runs: Path, rows: Path) -> int:
    """Every finished run under ``runs`` as one JSON line, its config and its summary (clients'
    scores only), in ``rows/<method>.jsonl``; the folder then holds these runs and no others.
    Returns how many runs were written."""
    by_method: dict[str, list[str]] = {}
    for summary_file in sorted(runs.glob(f"*/{SUMMARY_FILE}")):
        summary = json.loads(summary_file.read_text())
        summary["clients"] = [{k: c[k] for k in CLIENT_KEYS if k in c}
                              for c in summary["clients"]]
        config = yaml.safe_load((summary_file.parent / CONFIG_FILE).read_text())
        by_method.setdefault(config["method"], []).append(json.dumps(
            {"run": summary_file.parent.name, "config": config, "summary": summary}))
    rows.mkdir(parents=True, exist_ok=True)
    for stale in rows.glob("*.jsonl"):
        stale.unlink()
    for method, lines in by_method.items():
        (rows / f"{method}.jsonl").write_text("".join(line + "\n" for line in lines))
    return sum(map(len, by_method.values()))


def rebuild(rows: Path, into: Path, *, missing_only: bool = False,
            seeds: Sequence[int] | None = None) -> int:
    """Run folders (config and summary) from exported rows (``export``'s folder); returns how
    many were written.

    ``missing_only``: leave a folder that exists (a run of this session) as it is. ``seeds``:
    only the runs of these seeds (all when None).
    """
    count = 0
    lines = [line for path in sorted(rows.glob("*.jsonl")) for line in
             path.read_text().splitlines()]
    for line in lines:
        row: dict[str, Any] = json.loads(line)
        folder = into / row["run"]
        if (missing_only and folder.exists()) or (seeds and row["config"]["seed"] not in seeds):
            continue
        folder.mkdir(parents=True)
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(row["config"], sort_keys=False))
        (folder / SUMMARY_FILE).write_text(json.dumps(row["summary"]))
        count += 1
    return count


def cmd_headline(args: argparse.Namespace) -> None:
    """The README's table: per method the average local and global metric (mean ± SD across
    seeds) and each paired against ``--vs`` (mean difference, 95% t interval, seeds better),
    the references first."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / args.partition
        rebuild(_rows(args), runs, seeds=args.seeds)
        records = find_runs([runs])
        grouped = arms(records)
        tasks = list(next(iter(grouped.values()))[0].summary["tasks"])  # type: ignore[index]
        print(f"| method | n | avg local metric | avg global metric | local minus `{args.vs}` "
              f"[95% CI] | global minus `{args.vs}` [95% CI] | seeds better (local/global) "
              f"| MB up |\n|---|---|---|---|---|---|---|---|")
        for label, n, cells in reference_rows(records, tasks, "metric"):
            print(f"| {label} | {n} | {cell(cells[-2])} | {cell(cells[-1])} | | | | |")
        diffs = {key: comparisons(records, args.vs, key=key)
                 for key in ("local_metric", "global_metric")}
        for label, mine in grouped.items():
            local = spread([r.summary["average"]["local_metric"] for r in mine])  # type: ignore
            glob = spread([r.summary["average"]["global_metric"] for r in mine])  # type: ignore
            up = spread([r.summary["bytes_up"] / 1e6 for r in mine])  # type: ignore[index]
            cols = [_difference(diffs[key].get(label)) for key in diffs]
            better = ", ".join(f"{diffs[k][label].wins} of {diffs[k][label].n}"
                               for k in diffs if label in diffs[k])
            name = f"**`{label}`**" if label == args.vs else f"`{label}`"
            print(f"| {name} | {len(mine)} | {cell(local)} | {cell(glob)} | {cols[0]} | "
                  f"{cols[1]} | {better} | {up.mean:.1f} |")
        print("\nmean ± SD across seeds; differences in points (x100), paired by seed, 95% t "
              "interval over seeds")


def _difference(d: Paired | None) -> str:
    """A paired difference in points: its mean, and its 95% t interval from two seeds on."""
    if d is None:
        return ""
    if d.ci_low is None or d.ci_high is None:
        return f"{100 * d.mean_diff:+.1f} (one seed)"
    return f"{100 * d.mean_diff:+.1f} [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}]"


def cmd_report(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / args.partition
        rebuild(_rows(args), runs, seeds=args.seeds)
        out = Path(args.report) if args.report else Path(tmp) / "report"
        print(write_report([runs], out, vs=args.vs, figures=bool(args.report)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "export", "report", "headline"):
        p = sub.add_parser(name)
        p.add_argument("--partition", choices=sorted(PARTITIONS), default="iid")
        p.add_argument("--out", default="runs/bench-atlas")
        p.add_argument("--rows", help="the folder of exported rows, a file per method "
                       "(default bench/results/quick_<partition>/, medium_iid/)")
        if name == "run":
            p.add_argument("--methods", nargs="+", default=["all"])
            p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
            p.add_argument("--shard", default="0/1", help="i/n: every n-th point from the i-th")
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                           help="a setting of every run (after method_settings)")
        if name in ("report", "headline"):
            p.add_argument("--vs", default="atlas")
            p.add_argument("--seeds", nargs="+", type=int,
                           help="only the rows of these seeds (default: every seed exported)")
        if name == "report":
            p.add_argument("--report", help="write the report folder (figures too) here")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    commands = {"run": cmd_run, "export": cmd_export, "report": cmd_report,
                "headline": cmd_headline}
    commands[args.command](args)


if __name__ == "__main__":
    main()
