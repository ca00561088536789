"""Peak RSS against the number of clients in one process, per allocator and padding setting.

Each point is a fresh process (`atlasfl run`, fedavg-task, all-MiniLM-L6-v2, one round, every
client trains once) whose summary reports its peak RSS. For each setting the script fits peak RSS
= fixed + slope x clients over the client counts and compares the slope with one client's own
state (adapter + head + their AdamW moments, fp32): issue 15 asks for slope <= 1.2 x state.
Settings: glibc's default heap, `train.mmap_threshold_kb` (allocations above it mmapped and
returned when freed), `train.pad_multiple` (padded lengths from a fixed set), both.

    python bench/memory_clients.py --clients 12 48 96 --samples 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SETTINGS = {
    "default": [],
    "mmap128k": ["--set", "train.mmap_threshold_kb=128"],
    "pad16": ["--set", "train.pad_multiple=16"],
    "mmap128k+pad16": ["--set", "train.mmap_threshold_kb=128", "--set", "train.pad_multiple=16"],
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
                print(f"{setting:>16} {summary['num_clients']:>4} clients: peak RSS "
                      f"{summary['peak_rss_mb']:7.0f} MiB, {summary['wall_seconds']:6.1f} s",
                      flush=True)
            slope, fixed = np.polyfit(args.clients, peaks, 1)
            print(f"{setting:>16} fit: {fixed:.0f} MiB + {slope:.2f} MiB per client "
                  f"({slope * 2**20 / 1e6 / state_mb:.1f} x the state)", flush=True)


if __name__ == "__main__":
    main()
