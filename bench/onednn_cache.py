"""CPU time and peak RSS of quick.yaml's clients at several oneDNN primitive-cache capacities.

The capacity is read once per process, so each point is a fresh process (``--child``): it builds
quick.yaml's experiment at today's defaults (bf16 where fast), then trains and evaluates all 12
clients twice, one thread, and prints its process time and peak RSS. Capacities alternate in
order, ``--reps`` times; ``train.onednn_cache`` (0 here) leaves the environment to this script.

    python bench/onednn_cache.py --caps 0 256 64 8 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def child() -> None:
    import torch

    from atlasfl.client.training import evaluate, train_client
    from atlasfl.config import apply_overrides, from_dict, from_yaml
    from atlasfl.engine import build_experiment

    torch.set_num_threads(1)
    cfg = from_dict(apply_overrides(from_yaml("configs/quick.yaml"),
                                    ["progress=false", "train.onednn_cache=0"]))
    exp = build_experiment(cfg)
    rt = exp.runtime
    clients = [exp.clients[c] for c in sorted(exp.clients)]
    cpu, wall = time.process_time(), time.time()
    for rnd in range(2):
        for c in clients:
            train_client(rt.model, rt.binder, c, rt.train, epochs=1,
                         generator=torch.Generator().manual_seed(rnd), device=rt.device)
            evaluate(rt.model, rt.binder, c.adapter, c.head, rt.test_sets[c.task.name], c.task,
                     rt.train, device=rt.device)
    cpu, wall = time.process_time() - cpu, time.time() - wall
    print(json.dumps({"cpu_s": round(cpu, 1), "cpu_over_wall": round(cpu / wall, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", nargs="+", type=int, default=[0, 256, 64, 8],
                        help="primitives cached; 0: the libraries' default (1024)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child()
    print("| cache | CPU s (train + eval, 12 clients x 2) | cpu/wall | peak RSS MiB |")
    print("|---|---|---|---|")
    for _ in range(args.reps):
        for cap in args.caps:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
                env.pop(name, None)
                if cap > 0:
                    env[name] = str(cap)
            out = subprocess.run([sys.executable, __file__, "--child"], env=env, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {cap or 'default'} | {r['cpu_s']} | {r['cpu_over_wall']} | "
                  f"{r['peak_rss_mb']} |", flush=True)


if __name__ == "__main__":
    main()
