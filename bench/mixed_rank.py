"""Phase 2 on the quick setting: mixed-rank aggregation and heterogeneous vs homogeneous ranks.

Runs configs/quick.yaml (all-MiniLM-L6-v2, sst2/mrpc/cola/qnli x 3 clients, devices drawn from
the four built-in profiles) for each variant and seed, one process, one run after the other, and
prints average accuracy, total upload bytes and wall time per run, then per variant the mean over
seeds and the paired difference to the first variant (or to ``--vs``). All variants use rsLoRA
with alpha chosen so that rank 8 keeps quick.yaml's tuned scaling (alpha/sqrt(8) = 2) and group
by true task. ``hetlora-device`` is HetLoRA's setting (homolora's total shared by device
memory, so ranks differ between the clients of a task); the ``delta`` variants set
``ranks.update=delta``.

    python bench/mixed_rank.py --seeds 0 1 2 --out bench/results/mixed_rank_cpu.jsonl
    python bench/mixed_rank.py --table bench/results/mixed_rank_cpu.jsonl \
        --vs "hetlora-device zero-pad"   # table only, paired differences to one variant
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

from atlasfl.config import from_dict, from_yaml
from atlasfl.engine import build_experiment, run_experiment

BASE = {"model.lora.rslora": True, "model.lora.alpha": 2 * 8**0.5, "ranks.grouping": "task"}
DEVICE = {"ranks.budget": "device", "ranks.utility": "log", "ranks.r_max": 32}
VARIANTS = {
    "homolora stack": {"method": "homolora", "ranks.aggregation": "stack"},
    "hetlora zero-pad": {"method": "hetlora", "ranks.aggregation": "zero-pad"},
    "hetlora stack": {"method": "hetlora", "ranks.aggregation": "stack"},
    "hetlora svd": {"method": "hetlora", "ranks.aggregation": "svd"},
    "homolora zero-pad": {"method": "homolora", "ranks.aggregation": "zero-pad"},
    # HetLoRA's setting: ranks differ between clients (homolora's total upload, shared by memory)
    "hetlora-device zero-pad": {"method": "hetlora", **DEVICE, "ranks.aggregation": "zero-pad"},
    "hetlora-device stack": {"method": "hetlora", **DEVICE, "ranks.aggregation": "stack"},
    "hetlora-device svd": {"method": "hetlora", **DEVICE, "ranks.aggregation": "svd"},
}
# importance as each module's gradient spectrum (ranks.utility=spectrum) instead of its norm
VARIANTS |= {name.replace("hetlora", "hetlora-spectrum", 1).replace(
                 "hetlora-spectrum-device", "hetlora-device-spectrum"):
             {**VARIANTS[name], "ranks.utility": "spectrum"}
             for name in list(VARIANTS) if name.startswith("hetlora")}
# the server adds the clients' weighted change to its kept aggregate (ranks.update=delta)
VARIANTS |= {f"{name} delta": {**VARIANTS[name], "ranks.update": "delta"}
             for name in ("hetlora-device zero-pad", "hetlora-device stack",
                          "hetlora-device svd", "homolora stack")}


def run_one(config: str, variant: str, seed: int) -> dict:
    cfg = from_dict(from_yaml(config)).replace(
        **{**BASE, **VARIANTS[variant], "seed": seed, "progress": False})
    wall, cpu = time.perf_counter(), time.process_time()
    summary = run_experiment(build_experiment(cfg)).summary
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"variant": variant, "seed": seed, "avg_accuracy": summary["average"]["global_accuracy"],
            "avg_metric": summary["average"]["global_metric"],
            "tasks": {t: round(v["global_accuracy"], 4) for t, v in summary["tasks"].items()},
            "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
            "wall_s": round(wall, 1), "cpu_over_wall": round(cpu / wall, 2)}


def table(rows: list[dict], vs: str | None = None) -> None:
    """Per variant: seeds, mean and std of average accuracy, paired difference to ``vs``."""
    by = defaultdict(dict)
    for r in rows:
        by[r["variant"]][r["seed"]] = r
    first = vs or next(iter(by))
    if first not in by:
        raise SystemExit(f"--vs {first!r}: no rows of that variant; have {sorted(by)}")
    print(f"\nmean over seeds; paired difference to {first!r} over the seeds both ran")
    print(f"{'variant':<32}{'seeds':>6}{'avg acc':>9}{'std':>7}{'paired':>10}{'upload MB':>11}")
    for name, runs in by.items():
        accs = [r["avg_accuracy"] for r in runs.values()]
        paired = [runs[s]["avg_accuracy"] - by[first][s]["avg_accuracy"]
                  for s in runs if s in by[first]]
        diff = f"{statistics.mean(paired) * 100:+.1f} pt" if paired else "-"
        print(f"{name:<32}{len(accs):>6}{statistics.mean(accs):>9.3f}"
              f"{statistics.stdev(accs) if len(accs) > 1 else 0:>7.3f}{diff:>10}"
              f"{statistics.mean(r['bytes_up'] for r in runs.values()) / 1e6:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:3],
                        choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--table", help="only print the table of this JSONL file")
    parser.add_argument("--vs", choices=list(VARIANTS), help="paired differences to this variant")
    args = parser.parse_args()
    if args.table:
        table([json.loads(line) for line in open(args.table) if line.strip()], args.vs)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    for seed in args.seeds:  # seed-major: every variant of a seed before the next seed
        for variant in args.variants:
            row = run_one(args.config, variant, seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    table(rows, args.vs)


if __name__ == "__main__":
    main()
