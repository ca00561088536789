"""A grid one after another against ``--jobs N``, and ``atlasfl tune`` against its full grid.

``jobs``: the same points run twice, into two folders: one after another in this process (each
run with all the cores as torch threads) and ``--jobs N`` (N runs at once, ``cores // N``
threads each). The points go in blocks of N, alternated A B B A so a change in the host's load
falls on both arms; each block logs wall time and ``process_time / wall`` (the parent's and its
children's CPU), and the throughput ratio is the arms' summed wall times.

    python bench/grid.py jobs --config configs/quick.yaml --methods local fedavg-task atlas \
        mira homolora --seeds 0 1 2 3 4 --jobs 2 --out runs/bench-grid

``ray``: the same points on a loopback Ray cluster (a head and ``--nodes`` one-CPU nodes),
timed, and each run's scores compared with the ``--jobs`` arm's (the same one torch thread per
run):

    python bench/grid.py ray --config configs/quick.yaml --methods local fedavg-task \
        --seeds 0 1 --out runs/bench-grid

``tune``: the validation metric ``atlasfl tune`` chose and its CPU seconds against the best
of a full grid of the same candidates (the grid's runs read from their folders, or from
``bench/tune.py``'s committed rows with ``--rows``):

    python bench/grid.py tune --tune runs/tune-atlas --rows bench/results/tune_quick_iid.jsonl \
        --method atlas

Figures only; nothing here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import from_yaml, parse_overrides
from atlasfl.engine.grid import run_grid
from atlasfl.engine.host import usable_cores
from atlasfl.engine.tune import process_seconds


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def cmd_jobs(args: argparse.Namespace) -> None:
    raw = from_yaml(args.config)
    fixed = {**parse_overrides(args.set), "progress": False}
    points = [{"method": m, "seed": s} for s in args.seeds for m in args.methods]
    blocks = [points[i:i + args.jobs] for i in range(0, len(points), args.jobs)]
    out = Path(args.out)
    walls = {"A": 0.0, "B": 0.0}
    print(f"{len(points)} points in {len(blocks)} blocks of {args.jobs}; {usable_cores()} cores; "
          f"A: one after another, B: --jobs {args.jobs}", flush=True)
    for k, block in enumerate(blocks):
        for arm in ("AB" if k % 2 == 0 else "BA"):
            start, cpu = time.perf_counter(), _cpu()
            if arm == "A":
                os.environ.pop("OMP_NUM_THREADS", None)  # all the cores for each run
                run_grid(raw, block, out / "sequential", fixed=fixed, name="A")
            else:
                run_grid(raw, block, out / f"jobs{args.jobs}", fixed=fixed, jobs=args.jobs,
                         name="B")
            wall = time.perf_counter() - start
            walls[arm] += wall
            print(f"block {k + 1}/{len(blocks)} {arm}: {wall:.0f} s wall, cpu/wall "
                  f"{(_cpu() - cpu) / wall:.2f}", flush=True)
    print(f"throughput of --jobs {args.jobs} over one after another: "
          f"{walls['A'] / walls['B']:.2f}x ({walls['A']:.0f} s vs {walls['B']:.0f} s)")
    _same(out, f"jobs{args.jobs}", "sequential")


def cmd_ray(args: argparse.Namespace) -> None:
    """The points on a loopback Ray cluster (a head without CPUs, ``--nodes`` nodes of one CPU
    each), timed, then compared with the folders of another arm (``--against``)."""
    from ray import cluster_utils

    raw = from_yaml(args.config)
    fixed = {**parse_overrides(args.set), "progress": False}
    points = [{"method": m, "seed": s} for s in args.seeds for m in args.methods]
    out = Path(args.out)
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        start, cpu = time.perf_counter(), _cpu()
        run_grid(raw, points, out / "ray", fixed=fixed, ray=cluster.address, name="ray")
        wall = time.perf_counter() - start
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
    print(f"{len(points)} points on {args.nodes} one-CPU nodes: {wall:.0f} s wall "
          f"(this process's cpu/wall {(_cpu() - cpu) / wall:.2f}: the work runs in Ray's "
          f"workers)")
    _same(out, "ray", args.against)


def _same(out: Path, arm: str, against: str) -> None:
    """Whether each point's summary scores equal those of another arm, to the last digit."""
    for run in sorted(p for p in (out / arm).iterdir() if (p / "summary.json").is_file()):
        a, b = (json.loads((out / d / run.name / "summary.json").read_text())
                for d in (arm, against))
        same = a["average"] == b["average"] and [
            {k: v for k, v in c.items() if not k.endswith("seconds")} for c in a["clients"]
        ] == [{k: v for k, v in c.items() if not k.endswith("seconds")} for c in b["clients"]]
        print(f"  {run.name}: {'the same scores as' if same else 'DIFFERENT scores from'} "
              f"{against}")


def _grid_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line]
    return [r for r in rows if r["point"].get("method") == args.method]


def cmd_tune(args: argparse.Namespace) -> None:
    tune = Path(args.tune)
    table = (tune / "tune.md").read_text()
    chosen = json.dumps(yaml.safe_load((tune / "chosen.yaml").read_text()))
    grid = _grid_rows(args)
    best = max(grid, key=lambda r: r["val_metric"])
    grid_cpu = sum(r["wall_seconds"] * r["cpu_over_wall"] for r in grid)
    tune_cpu = sum(process_seconds(d) for d in tune.iterdir() if d.is_dir())
    print(table)
    print(f"\nchosen by tune: {chosen}")
    print(f"full grid ({len(grid)} runs): best validation {best['val_metric']:.4f} at "
          f"{ {k: v for k, v in best['point'].items() if k not in ('method', 'seed')} }, "
          f"{grid_cpu:.0f} CPU-s")
    print(f"tune: {tune_cpu:.0f} CPU-s = {tune_cpu / grid_cpu:.0%} of the grid's")


def _points_args(parser: argparse.ArgumentParser) -> None:
    """The grid both arms run: a config, methods x seeds, settings, an output folder."""
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", required=True, help="the arms' folder (ray: the jobs run's)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    jobs = sub.add_parser("jobs")
    _points_args(jobs)
    jobs.add_argument("--jobs", type=int, default=2)
    ray = sub.add_parser("ray")
    _points_args(ray)
    ray.add_argument("--nodes", type=int, default=2)
    ray.add_argument("--against", default="jobs2", help="the arm compared with (default jobs2)")
    tune = sub.add_parser("tune")
    tune.add_argument("--tune", required=True, help="the atlasfl tune folder")
    tune.add_argument("--rows", required=True, help="bench/tune.py rows of the full grid")
    tune.add_argument("--method", required=True)
    args = parser.parse_args(argv)
    {"jobs": cmd_jobs, "ray": cmd_ray, "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
