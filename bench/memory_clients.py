"""Peak RSS against the number of clients in one process, per allocator and padding setting.

Each point is a fresh process (`atlasfl run`, fedavg-task, all-MiniLM-L6-v2, one round, every
client trains once) whose summary reports its peak RSS. For each setting the script fits peak RSS
= fixed + slope x clients over the client counts and compares the slope with one client's own
state (adapter + head + their AdamW moments, fp32): issue 15 asks for slope <= 1.2 x state.
Settings (each pins precision, length buckets and padding): the defaults before issue 15 (fp32,
no buckets, dynamic padding), with `train.mmap_threshold_kb=128` (allocations above it mmapped
and returned when freed) or with padded lengths in multiples of 16; bf16 autocast with padding
to 16, with length buckets of 8 batches, and with both (today's defaults on a bf16 CPU).

    python bench/memory_clients.py --clients 12 48 96 --samples 64 \
        --jsonl bench/results/memory_clients_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# every setting pins the three speed keys, so a row means the same whatever today's defaults are
BEFORE = ["--set", "train.precision=fp32", "--set", "train.length_bucket=0",
          "--set", "train.pad_multiple=1"]  # the defaults before issue 15
BF16 = ["--set", "train.precision=bf16"]
SETTINGS = {
    "before": BEFORE,
    "before+mmap128k": [*BEFORE, "--set", "train.mmap_threshold_kb=128"],
    "before+pad16": [*BEFORE, "--set", "train.pad_multiple=16"],
    "bf16+pad16": [*BF16, "--set", "train.length_bucket=0", "--set", "train.pad_multiple=16"],
    "bf16+bucket8": [*BF16, "--set", "train.length_bucket=8", "--set", "train.pad_multiple=1"],
    # today's defaults where auto is bf16 (a CPU with bf16 fast paths, or CUDA)
    "bf16+bucket8+pad16": [*BF16, "--set", "train.length_bucket=8",
                           "--set", "train.pad_multiple=16"],
}


def run(clients: int, extra: list[str], samples: int, out: Path) -> dict:
    tasks = ["sst2", "mrpc", "cola", "qnli"]
    per_task = max(1, clients // len(tasks))
    name = f"c{clients}-{abs(hash(tuple(extra))) % 10**6}"
    cmd = [sys.executable, "-m", "atlasfl.cli", "run", "--method", "fedavg-task", "--model",
           "minilm", "--tasks", *tasks, "--clients-per-task", str(per_task), "--samples",
           str(samples), "--eval-samples", "50", "--rounds", "1", "--no-progress", "--out",
           str(out), "--run-name", name, "--set", "train.threads=1", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads((out / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", nargs="+", type=int, default=[12, 48, 96])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--jsonl", type=Path, help="append one row per run to this file")
    args = parser.parse_args()
    # one client's own state: LoRA r=8 on query/value of 6 blocks (384 wide) + a 2-way head,
    # each with AdamW's two moments, fp32
    adapter = 6 * 2 * 8 * (384 + 384)
    state_mb = 3 * (adapter + 2 * 384 + 2) * 4 / 1e6
    print(f"one client's state (adapter, head, AdamW moments): {state_mb:.2f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            peaks = []
            for n in args.clients:
                summary = run(n, SETTINGS[setting], args.samples, Path(tmp))
                peaks.append(summary["peak_rss_mb"])
                if args.jsonl:
                    with args.jsonl.open("a") as fh:
                        fh.write(json.dumps({"setting": setting, "clients": summary["num_clients"],
                                             "samples": args.samples,
                                             "peak_rss_mb": summary["peak_rss_mb"],
                                             "wall_seconds": summary["wall_seconds"]}) + "\n")
                print(f"{setting:>16} {summary['num_clients']:>4} clients: peak RSS "
                      f"{summary['peak_rss_mb']:7.0f} MiB, {summary['wall_seconds']:6.1f} s",
                      flush=True)
            slope, fixed = np.polyfit(args.clients, peaks, 1)
            print(f"{setting:>16} fit: {fixed:.0f} MiB + {slope:.2f} MiB per client "
                  f"({slope * 2**20 / 1e6 / state_mb:.1f} x the state)", flush=True)


if __name__ == "__main__":
    main()
