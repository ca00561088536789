"""Many clients on one machine: peak memory and seconds per round against the number of clients.

Each point is a fresh process (`atlasfl run`, fedavg-task) with N clients of which a fixed number
is sampled per round, `federation.resident_clients` set to that sample (the others' state on
disk), evaluation only after the last round (the training rounds are what should not grow with
N). Printed per point: clients, sampled, peak RSS, set-up seconds (data, partitions, clients),
seconds per training round; then the fit of seconds per round over N (a slope near 0: the cost
follows the sample, not the population) and the memory bound of issue 18: backbone + sampled x
one client's state x 1.2 + the fixed overhead of the smallest run.

    python bench/scale.py --model tiny-bert --clients 100 200 500 1000 --sampled 20
    python bench/scale.py --model minilm --clients 200 --fraction 0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run(model: str, clients: int, sampled: int, rounds: int, samples: int, out: Path) -> dict:
    tasks = ["sst2", "mrpc", "cola", "qnli"]
    name = f"{model}-{clients}"
    cmd = [sys.executable, "-m", "atlasfl.cli", "run", "--method", "fedavg-task", "--model", model,
           "--tasks", *tasks, "--clients-per-task", str(clients // len(tasks)), "--samples",
           str(samples), "--eval-samples", "50", "--rounds", str(rounds), "--no-progress",
           "--out", str(out), "--run-name", name,
           "--set", f"federation.fraction={sampled / clients}",
           "--set", f"federation.resident_clients={sampled}",
           "--set", f"federation.eval_every={rounds}", "--set", "train.threads=1"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    summary = json.loads((out / name / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / name / "rounds.jsonl").read_text().splitlines()]
    train_rounds = [sum(r.get("train_seconds", 0.0) for r in rows if r["round"] == k)
                    for k in range(1, rounds)]  # the last round also evaluates everyone
    return {"clients": summary["num_clients"], "sampled": sampled,
            "peak_mb": summary["peak_rss_mb"], "total_s": total,
            "loop_s": summary["wall_seconds"], "train_round_s": float(np.mean(train_rounds))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 200, 500, 1000])
    parser.add_argument("--sampled", type=int, default=20, help="clients trained per round")
    parser.add_argument("--fraction", type=float, help="sample this share instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="rows per client")
    args = parser.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            sampled = max(1, round(n * args.fraction)) if args.fraction else args.sampled
            p = run(args.model, n, sampled, args.rounds, args.samples, Path(tmp))
            points.append(p)
            print(f"{p['clients']:>5} clients, {p['sampled']:>3} sampled: peak RSS "
                  f"{p['peak_mb']:7.0f} MiB, process {p['total_s']:6.1f} s, loop "
                  f"{p['loop_s']:6.1f} s, training round {p['train_round_s']:6.2f} s", flush=True)
    if len(points) > 1:
        slope, base = np.polyfit([p["clients"] for p in points],
                                 [p["train_round_s"] for p in points], 1)
        print(f"seconds per training round = {base:.2f} + {slope * 1000:.3f} per 1000 clients")
        mslope, mbase = np.polyfit([p["clients"] for p in points],
                                   [p["peak_mb"] for p in points], 1)
        print(f"peak RSS = {mbase:.0f} MiB + {mslope * 1000:.1f} MiB per 1000 clients")


if __name__ == "__main__":
    main()
