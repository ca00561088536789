"""Many clients on one machine: peak memory and seconds per round against the number of clients.

Each point is a fresh process (`atlasfl run`, fedavg-task) with N clients of which a fixed number
is sampled per round, `federation.resident_clients` set to that sample (the others' state on
disk), evaluation only after the last round (the training rounds are what should not grow with
N). Printed per point: clients, sampled, peak RSS, set-up seconds (data, partitions, clients),
seconds per training round; then the fit of seconds per round over N (a slope near 0: the cost
follows the sample, not the population) and the memory bound of issue 18: backbone + sampled x
one client's state x 1.2 + the fixed overhead of the smallest run.

    python bench/scale.py --model tiny-bert --clients 20 100 200 500 1000 --sampled 20
    python bench/scale.py --model minilm --clients 20 200 --sampled 20

The first N should equal the sample (every client trains): its overhead is the fixed one.
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


def run(model: str, clients: int, sampled: int, rounds: int, samples: int, out: Path,
        extra: list[str]) -> dict:
    tasks = ["sst2", "mrpc", "cola", "qnli"]
    name = f"{model}-{clients}"
    cmd = [sys.executable, "-m", "atlasfl.cli", "run", "--method", "fedavg-task", "--model", model,
           "--tasks", *tasks, "--clients-per-task", str(clients // len(tasks)), "--samples",
           str(samples), "--eval-samples", "50", "--rounds", str(rounds), "--no-progress",
           "--out", str(out), "--run-name", name,
           "--set", f"federation.fraction={sampled / clients}",
           "--set", f"federation.resident_clients={sampled}",
           "--set", f"federation.eval_every={rounds}", "--set", "train.threads=1",
           *[arg for item in extra for arg in ("--set", item)]]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    total = time.perf_counter() - start
    summary = json.loads((out / name / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / name / "rounds.jsonl").read_text().splitlines()]
    train_rounds = [sum(r.get("train_seconds", 0.0) for r in rows if r["round"] == k)
                    for k in range(1, rounds)]  # the last round also evaluates everyone
    return {"clients": summary["num_clients"], "sampled": sampled,
            "peak_mb": summary["peak_rss_mb"], "total_s": total,
            "loop_s": summary["wall_seconds"], "cpu_wall": summary["cpu_utilisation"],
            "train_round_s": float(np.mean(train_rounds)),
            "client_state_mb": _client_state_mb(out / name)}


def _client_state_mb(run: Path) -> float:
    """The largest client state (adapter + head + optimizer moments) in the run's checkpoint."""
    from safetensors import safe_open

    latest = sorted((run / "checkpoints").glob("round-*"))[-1]
    sizes: dict[str, int] = {}
    with safe_open(str(latest / "state.safetensors"), "pt") as f:  # clients in memory
        for key in f.keys():
            if key.startswith("client/"):
                t = f.get_tensor(key)
                cid = key.split("/")[1]
                sizes[cid] = sizes.get(cid, 0) + t.numel() * t.element_size()
    for part in latest.glob("client-*.safetensors"):  # clients spilled to disk
        with safe_open(str(part), "pt") as f:
            sizes[part.stem] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                                   for k in f.keys())
    return max(sizes.values()) / 2**20


def _backbone_mb(model: str) -> float:
    from atlasfl.models.registry import load_backbone

    backbone = load_backbone(model)
    return sum(p.numel() * p.element_size() for p in backbone.model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-bert")
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 200, 500, 1000])
    parser.add_argument("--sampled", type=int, default=20, help="clients trained per round")
    parser.add_argument("--fraction", type=float, help="sample this share instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16, help="rows per client")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every point (e.g. train.mmap_threshold_kb=128)")
    args = parser.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            sampled = max(1, round(n * args.fraction)) if args.fraction else args.sampled
            p = run(args.model, n, sampled, args.rounds, args.samples, Path(tmp), args.set)
            points.append(p)
            print(f"{p['clients']:>5} clients, {p['sampled']:>3} sampled: peak RSS "
                  f"{p['peak_mb']:7.0f} MiB, process {p['total_s']:6.1f} s, loop "
                  f"{p['loop_s']:6.1f} s (cpu/wall {p['cpu_wall']:.2f}), training round "
                  f"{p['train_round_s']:6.2f} s, one client's state "
                  f"{p['client_state_mb']:.3f} MiB", flush=True)
    backbone = _backbone_mb(args.model)
    smallest = min(points, key=lambda p: p["clients"])
    overhead = smallest["peak_mb"] - backbone - smallest["sampled"] * smallest["client_state_mb"]
    print(f"memory bound (issue 18): backbone {backbone:.1f} MiB + sampled x client state x 1.2 "
          f"+ fixed overhead {overhead:.0f} MiB (the smallest run's peak less its backbone and "
          f"clients)")
    for p in points:
        bound = backbone + p["sampled"] * p["client_state_mb"] * 1.2 + overhead
        print(f"{p['clients']:>5} clients: peak {p['peak_mb']:.0f} MiB, bound {bound:.0f} MiB, "
              f"{'within' if p['peak_mb'] <= bound else 'OVER'}")
    if len(points) > 1:
        slope, base = np.polyfit([p["clients"] for p in points],
                                 [p["train_round_s"] for p in points], 1)
        print(f"seconds per training round = {base:.2f} + {slope * 1000:.3f} per 1000 clients")
        mslope, mbase = np.polyfit([p["clients"] for p in points],
                                   [p["peak_mb"] for p in points], 1)
        print(f"peak RSS = {mbase:.0f} MiB + {mslope * 1000:.1f} MiB per 1000 clients")


if __name__ == "__main__":
    main()
