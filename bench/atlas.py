"""ATLAS against its baselines and ablations on quick.yaml (issue 14's numbers).

Every run is a folder under ``--out`` made by ``atlasfl.engine.grid.run_grid`` (a finished run
is skipped, an interrupted one resumed), so the grid can be filled over several sessions and by
parallel shards (``--shard i/n``; give each process one thread: OMP_NUM_THREADS=1).

    python bench/atlas.py run --partition iid --methods local fedavg fedavg-task atlas --seeds 0 1 2
    python bench/atlas.py sweep --partition iid --lam 0 0.25 0.5 1 --seeds 0 1 2
    python bench/atlas.py report --partition iid          # tables from the finished folders
    python bench/atlas.py compare --partition iid --tag fast  # a --tag arm against the plain one
    python bench/atlas.py run --partition iid --methods atlas atlas-no-split --seeds 0 \
        --tag weak --set 'devices.custom=[{name: weak, memory_gb: 0.4}]' \
        --set 'devices.profiles=[weak, laptop-8gb]' --set ranks.on_infeasible=exclude

``report`` prints, per method, each task's metric and the average as mean +- SD across seeds
(n seeds), the SD across a task's clients (personalisation), the validation average, bytes; the
ablations as paired differences against ``atlas`` over seeds; and the lambda sweep with its
validation column, on which lambda is chosen (test rows are reported, never used to choose).
``compare`` pairs each run of a ``--tag`` arm with the untagged run of the same method and seed
(issue 15's precision table): per method the two averages and their difference, and over all
pairs the mean difference with its 95% interval and tests (``atlasfl.report.stats.paired``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from atlasfl.config import apply_overrides, from_yaml
from atlasfl.engine.grid import run_grid
from atlasfl.report.stats import paired
from atlasfl.report.tables import client_sd

PARTITIONS = {"iid": {}, "dirichlet": {"data.partition": "dirichlet", "data.alpha": 0.5}}
# Methods with a Laplacian step run the Dirichlet partition at the lambda chosen for it on the
# clients' validation splits (the sweep below; fixed in configs/quick-dirichlet.yaml).
CHOSEN = {"dirichlet": Path(__file__).resolve().parents[1] / "configs" / "quick-dirichlet.yaml"}


# The Phase 4 tables were run before issue 15 changed the speed defaults: fp32, no length
# buckets, dynamic padding. Pinned so that the folders resume and fill as they were started;
# --set overrides them (--tag fast --set train.precision=bf16 --set train.length_bucket=8 was
# issue 15's accuracy arm).
MEASURED_WITH = {"precision": "fp32", "length_bucket": 0, "pad_multiple": 1}


def _uses_laplacian(method: str) -> bool:
    return method == "mira" or (method.startswith("atlas") and method != "atlas-no-laplacian")
ABLATIONS = ["atlas-no-laplacian", "atlas-no-split", "atlas-homo-rank", "atlas-oracle-clusters"]


def _raw(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    raw = from_yaml(args.config)
    for key, value in PARTITIONS[args.partition].items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    if method is not None and _uses_laplacian(method) and args.partition in CHOSEN:
        raw["laplacian"] = from_yaml(CHOSEN[args.partition])["laplacian"]
    raw["progress"] = False
    raw.setdefault("train", {}).update(MEASURED_WITH)
    return apply_overrides(raw, args.set)


def _folder(args: argparse.Namespace) -> str:
    """The partition's folder; ``--tag`` names a variant (run with its ``--set`` overrides)."""
    return args.partition + (f"-{args.tag}" if args.tag else "")


def _shard(points: list[dict[str, Any]], shard: str) -> list[dict[str, Any]]:
    index, count = map(int, shard.split("/"))
    return points[index::count]


def cmd_run(args: argparse.Namespace) -> None:
    points = [{"method": m, "seed": s} for s in args.seeds for m in args.methods]
    for point in _shard(points, args.shard):
        run_grid(_raw(args, point["method"]), [point], Path(args.out) / _folder(args))


def cmd_sweep(args: argparse.Namespace) -> None:
    points = [{"laplacian.eta": args.eta, "laplacian.lam": lam, "seed": s}
              for s in args.seeds for lam in args.lam]
    raw = {**_raw(args), "method": args.method}
    run_grid(raw, _shard(points, args.shard), Path(args.out) / f"{_folder(args)}-sweep")


def _summaries(folder: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    out = {}
    for summary in sorted(folder.glob("*/summary.json")):
        name = summary.parent.name  # e.g. method=atlas_seed=0 or lam=0.5_seed=1
        key = tuple(part.split("=", 1)[1] for part in name.split("_"))
        out[key] = json.loads(summary.read_text())
    return out


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if not all(math.isfinite(v) for v in values):
        return "nan"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _export(args: argparse.Namespace) -> None:
    """One JSON line per finished run of this partition (table runs and sweep points)."""
    lines = []
    for folder in (_folder(args), f"{_folder(args)}-sweep"):
        for summary_file in sorted((Path(args.out) / folder).glob("*/summary.json")):
            s = json.loads(summary_file.read_text())
            lines.append(json.dumps({
                "partition": args.partition, "run": f"{folder}/{summary_file.parent.name}",
                "method": s["method"], "seed": s["seed"],
                "tasks": {t: {k: round(v, 4) for k, v in e.items() if isinstance(v, float)}
                          for t, e in s["tasks"].items()},
                "average": {k: round(v, 4) for k, v in s["average"].items()},
                "client_metrics": [[c["client"], c["task"], round(c["metric"], 4),
                                    *([round(c["own_metric"], 4)] if "own_metric" in c else [])]
                                   for c in s["clients"]],
                "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"],
                "wall_seconds": round(s["wall_seconds"], 1),
                "cpu_over_wall": round(s["cpu_utilisation"], 2)}))
    Path(args.jsonl).write_text("".join(line + "\n" for line in lines))
    print(f"{len(lines)} runs -> {args.jsonl}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> None:
    if args.jsonl:
        _export(args)
    runs = _summaries(Path(args.out) / _folder(args))
    if runs:
        _method_tables(args, runs, "metric")
        if all("own_metric" in x["average"] for x in runs.values()):
            print()
            _method_tables(args, runs, "own_metric")
    else:
        print(f"no finished method runs under {Path(args.out) / _folder(args)}")
    _sweep_table(args, runs)


def _method_tables(args: argparse.Namespace, runs: dict[tuple[str, ...], dict[str, Any]],
                   key: str) -> None:
    """``key`` "metric": the task's shared test rows; "own_metric": the same rows weighted to
    each client's own label mix (``atlasfl.data.metrics.label_mix_weights``)."""
    acc = "accuracy" if key == "metric" else "own_accuracy"
    methods = sorted({m for m, _ in runs}, key=lambda m: (m.startswith("atlas-"), m))
    tasks = list(next(iter(runs.values()))["tasks"])
    first = next(iter(runs.values()))
    names = ", ".join(f"{t} {first['tasks'][t]['metric_name']}" for t in tasks)
    scored = ("the shared test rows" if key == "metric"
              else "the test rows weighted to each client's own label mix")
    print(f"## {args.partition}, {scored}: mean ± SD across seeds (n), metric per task "
          f"({names})\n")
    print("| method | n | " + " | ".join(tasks) + " | avg metric | avg acc | val metric | "
          "client SD (mean over tasks) | MB up | wall s |")
    print("|" + "---|" * (len(tasks) + 8))
    if key == "metric":
        print("| majority class | | " + " | ".join(f"{first['tasks'][t]['majority_metric']:.3f}"
                                               for t in tasks)
              + f" | {first['average']['majority_metric']:.3f} | "
              f"{first['average'].get('majority_accuracy', 0):.3f} | | | | |")
    for m in methods:
        seeds = sorted(s for mm, s in runs if mm == m)
        ss = [runs[(m, s)] for s in seeds]
        cells = [_ms([x["tasks"][t][key] for x in ss]) for t in tasks]
        spread_sd = statistics.mean(client_sd(x, t, key) for x in ss for t in tasks)
        print(f"| `{m}` | {len(ss)} | " + " | ".join(cells)
              + f" | {_ms([x['average'][key] for x in ss])}"
              f" | {_ms([x['average'][acc] for x in ss])}"
              f" | {_ms([x['average'].get('val_metric', float('nan')) for x in ss])}"
              f" | {spread_sd:.3f} | {statistics.mean(x['bytes_up'] for x in ss) / 1e6:.1f}"
              f" | {statistics.mean(x['wall_seconds'] for x in ss):.0f} |")
    base = {s: runs[("atlas", s)] for mm, s in runs if mm == "atlas"}
    rows = []
    for m in [*ABLATIONS, *(m for m in methods if m not in ABLATIONS and m != "atlas")]:
        pairs = [(runs[(m, s)]["average"][key] - base[s]["average"][key])
                 for mm, s in runs if mm == m and s in base]
        if pairs:
            rows.append(f"| `{m}` | {len(pairs)} | {_ms(pairs)} | "
                        f"{sum(p > 0 for p in pairs)}/{len(pairs)} |")
    if rows:
        print(f"\nPaired over seeds: method minus `atlas`, average {key} (mean ± SD of the "
              "differences; seeds where the method is better)\n")
        print("| method | n | difference | better |\n|---|---|---|---|")
        print("\n".join(rows))


def _sweep_table(args: argparse.Namespace, runs: dict[tuple[str, ...], dict[str, Any]]) -> None:
    sweep = _summaries(Path(args.out) / f"{_folder(args)}-sweep")
    if sweep:
        print("\nLambda sweep (`atlas`): choose on the validation column\n")
        own = all("own_metric" in x["average"] for x in sweep.values())
        print("| eta | lambda | n | val metric | test avg metric | test avg acc |"
              + (" own-mix avg metric |" if own else "") + "\n|---|---|---|---|---|---|"
              + ("---|" if own else ""))
        for eta, lam in sorted({k[:2] for k in sweep}, key=lambda k: (k[0], float(k[1]))):
            ss = [v for k, v in sweep.items() if k[:2] == (eta, lam)]
            print(f"| {eta} | {lam} | {len(ss)} | "
                  f"{_ms([x['average']['val_metric'] for x in ss])} | "
                  f"{_ms([x['average']['metric'] for x in ss])} | "
                  f"{_ms([x['average']['accuracy'] for x in ss])} |"
                  + (f" {_ms([x['average']['own_metric'] for x in ss])} |" if own else ""))
        lap = _raw(args, "atlas").get("laplacian", {})  # the setting its atlas runs used
        for m in ("local", "atlas", "fedavg-cluster"):  # the ends the sweep interpolates between
            ss = [v for (mm, _), v in runs.items() if mm == m]
            if ss:
                cells = (f"`{m}` | " if m != "atlas" else
                         f"`atlas` ({lap.get('eta', 'auto')}) | {lap.get('lam', 1.0)}")
                print(f"| {cells} | {len(ss)} | "
                      f"{_ms([x['average'].get('val_metric', float('nan')) for x in ss])} | "
                      f"{_ms([x['average']['metric'] for x in ss])} | "
                      f"{_ms([x['average']['accuracy'] for x in ss])} |"
                      + (f" {_ms([x['average'].get('own_metric', float('nan')) for x in ss])} |"
                         if own else ""))


def cmd_compare(args: argparse.Namespace) -> None:
    """The ``--tag`` arm against the untagged arm of the partition, run for run."""
    if not args.tag:
        raise SystemExit("compare needs --tag: the arm compared with the untagged runs")
    plain = _summaries(Path(args.out) / args.partition)
    tagged = _summaries(Path(args.out) / _folder(args))
    common = sorted(k for k in tagged if k in plain)
    if not common:
        raise SystemExit(f"no method and seed finished in both {args.partition} and "
                         f"{_folder(args)} under {args.out}")
    methods = sorted({m for m, _ in common}, key=lambda m: (m.startswith("atlas-"), m))
    print(f"## {_folder(args)} against {args.partition}: average metric, run for run\n")
    print(f"| method | seeds | {args.partition} | {args.tag} | change (points) | "
          f"avg acc {args.partition} / {args.tag} |\n|---|---|---|---|---|---|")
    pooled: dict[int, tuple[float, float]] = {}
    seen: dict[tuple[str, float, float], str] = {}  # a run equal to another method's run
    for m in methods:
        seeds = [s for mm, s in common if mm == m]
        x = [plain[(m, s)]["average"] for s in seeds]
        y = [tagged[(m, s)]["average"] for s in seeds]
        runs = [(s, a["metric"], b["metric"]) for s, a, b in zip(seeds, x, y, strict=True)]
        twins = {seen.setdefault(run, m) for run in runs} - {m}
        note = f" (runs equal to `{'`, `'.join(sorted(twins))}`'s counted once)" if twins else ""
        for run in runs:
            if seen[run] == m:  # counted once: the first method with this exact pair
                pooled[len(pooled)] = run[1:]
        diffs = [100 * (b - a) for _, a, b in runs]
        print(f"| `{m}`{note} | {','.join(seeds)} | {statistics.mean(r[1] for r in runs):.3f} | "
              f"{statistics.mean(r[2] for r in runs):.3f} | {statistics.mean(diffs):+.1f} | "
              f"{statistics.mean(a['accuracy'] for a in x):.3f} / "
              f"{statistics.mean(b['accuracy'] for b in y):.3f} |")
    test = paired({i: 100 * b for i, (_, b) in pooled.items()},
                  {i: 100 * a for i, (a, _) in pooled.items()})
    assert test is not None  # pooled holds at least the first method's runs
    line = (f"\n{test.n} pairs (a run equal to another method's counted once): "
            f"mean change {test.mean_diff:+.2f} points")
    if test.ci_low is not None:
        line += (f", 95% CI {test.ci_low:+.2f} to {test.ci_high:+.2f}, paired t p = "
                 f"{_p(test.t_p)}, Wilcoxon p = {_p(test.wilcoxon_p)}, "
                 f"{args.tag} better in {test.wins}/{test.n}")
    print(line)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "sweep", "report", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--config", default="configs/quick.yaml")
        p.add_argument("--partition", choices=sorted(PARTITIONS), default="iid")
        p.add_argument("--out", default="runs/bench-atlas")
        p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        p.add_argument("--shard", default="0/1", help="i/n: every n-th point from the i-th")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override for every run (repeatable); use with --tag")
        p.add_argument("--tag", default="", help="a variant: its runs go to PARTITION-TAG")
        if name == "run":
            p.add_argument("--methods", nargs="+", default=[
                "local", "fedavg", "fedavg-task", "fedavg-cluster", "atlas", "mira", "fedsa"])
        if name == "report":
            p.add_argument("--jsonl", help="also write one JSON line per finished run here")
        if name == "sweep":
            p.add_argument("--method", default="atlas")
            p.add_argument("--lam", nargs="+", type=float, default=[0.0, 0.25, 0.5, 1.0])
            p.add_argument("--eta", default="auto", help="auto (1 / the largest eigenvalue of "
                           "the graph's Laplacian) or a number")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    commands = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report, "compare": cmd_compare}
    commands[args.command](args)


if __name__ == "__main__":
    main()
