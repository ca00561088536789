"""Hyperparameter sweep for configs/quick.yaml: which settings make learning visible.

Runs every (overrides, method) pair of a grid in one process and prints one line per run:
average accuracy of local / fedavg-task / fedavg vs the majority class. Grids are JSON lists
of ``{"dotted.key": value}`` dicts. ``--shard i/n`` runs every n-th pair (parallel processes).

    python bench/tune_quick.py --grid '[{"train.lr": 0.002}]' --methods local fedavg-task
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from atlasfl.config import from_dict, from_yaml
from atlasfl.engine import build_experiment, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--grid", default="[{}]", help="JSON list of override dicts, or @file")
    parser.add_argument("--methods", nargs="+", default=["local", "fedavg-task"])
    parser.add_argument("--set", nargs="*", default=[], help="base overrides key=value (JSON)")
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = from_dict(from_yaml(args.config))
    fixed = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    index, count = map(int, args.shard.split("/"))
    grid = json.loads(open(args.grid[1:]).read() if args.grid.startswith("@") else args.grid)
    jobs = [(g, m) for g in grid for m in ([g["method"]] if "method" in g else args.methods)]
    for overrides, method in jobs[index::count]:
        cfg = base.replace(**{**fixed, **overrides, "method": method, "progress": False})
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            summary = run_experiment(build_experiment(cfg)).summary
        except Exception:  # one broken setting must not lose the rest of the sweep
            traceback.print_exc()
            continue
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        avg = summary["average"]
        row = {"overrides": overrides, "method": method, "seed": cfg.seed,
               "avg_accuracy": avg["accuracy"], "avg_metric": avg["metric"],
               "majority_accuracy": avg["majority_accuracy"],
               "tasks": {t: round(v["accuracy"], 4) for t, v in summary["tasks"].items()},
               "wall_s": round(wall, 1), "cpu_over_wall": round(cpu / wall, 2),
               "device": summary["device"]}
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
