"""Phase 1 on real data: how well do gradient fingerprints recover the clients' tasks?

For each setting and seed: all-MiniLM-L6-v2, 3 clients per task with 200 examples each,
fingerprints from the common initial adapter (128 examples, the last 3 blocks, projected to 256),
clustered with k chosen automatically. Prints ARI / NMI / purity against the true tasks, the
chosen k, the upload per client and the phase wall time (clients + server, one process), with
process_time / wall so a loaded machine shows.

    python bench/clustering.py                       # the issue's settings, seeds 0 1 2
    python bench/clustering.py --only ablation       # which parameters, how many layers
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from atlasfl.config import from_dict
from atlasfl.engine import CommLedger, build_experiment
from atlasfl.engine.executor import make_executor
from atlasfl.engine.simulation import run_fingerprint_phase

FOUR = ["sst2", "mrpc", "cola", "qnli"]
SIX = [*FOUR, "rte", "stsb"]
SETTINGS = {
    "4 tasks, iid": {"data.tasks": FOUR},
    "4 tasks, dirichlet 0.5": {"data.tasks": FOUR, "data.partition": "dirichlet",
                               "data.alpha": 0.5},
    "6 tasks, iid": {"data.tasks": SIX},
    "4 tasks, DP eps 8": {"data.tasks": FOUR, "clustering.epsilon": 8.0},
}
ABLATION = {
    f"{s} {p}, last {n}": {"data.tasks": FOUR, "clustering.params": p,
                           "clustering.layers": n, "clustering.statistic": s}
    for s in ("fisher", "gradient") for p in ("lora", "weights") for n in (1, 2, 6)
}


def run_one(overrides: dict, seed: int) -> dict:
    cfg = from_dict({"method": "fedavg-cluster", "seed": seed, "progress": False,
                     "data": {"clients_per_task": 3, "samples": 200, "eval_samples": 8}}
                    ).replace(**overrides)
    exp = build_experiment(cfg)
    ledger = CommLedger()
    executor = make_executor(exp, ledger)
    wall, cpu = time.perf_counter(), time.process_time()
    _, metrics = run_fingerprint_phase(exp, executor, exp.strategy, exp.strategy.init(), 1)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"seed": seed, "k": int(metrics["k"]), "ari": metrics["ari"], "nmi": metrics["nmi"],
            "purity": metrics["purity"], "clients": len(exp.clients),
            "upload_bytes_per_client": ledger.get(1, 0, "up"), "phase_seconds": wall,
            "cpu_over_wall": cpu / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=["settings", "ablation", "all", "four", "six"],
                        default="settings")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=JSON value")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    table = {"settings": SETTINGS, "ablation": ABLATION, "all": {**SETTINGS, **ABLATION},
             "four": {"4 tasks, iid": SETTINGS["4 tasks, iid"]},
             "six": {"6 tasks, iid": SETTINGS["6 tasks, iid"]}}
    print(f"{'setting':<30}{'seed':>5}{'k':>4}{'ARI':>7}{'NMI':>7}{'purity':>8}{'bytes':>7}"
          f"{'phase s':>9}{'cpu/wall':>9}")
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    for name, overrides in table[args.only].items():
        rows = []
        for seed in args.seeds:
            row = run_one({**overrides, **extra}, seed)
            rows.append(row)
            print(f"{name:<30}{seed:>5}{row['k']:>4}{row['ari']:>7.3f}{row['nmi']:>7.3f}"
                  f"{row['purity']:>8.3f}{row['upload_bytes_per_client']:>7}"
                  f"{row['phase_seconds']:>9.1f}{row['cpu_over_wall']:>9.2f}", flush=True)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps({"setting": name, "overrides": extra, **row}) + "\n")
        print(f"{name:<30}{'mean':>5}{'':>4}{statistics.mean(r['ari'] for r in rows):>7.3f}"
              f"{statistics.mean(r['nmi'] for r in rows):>7.3f}", flush=True)


if __name__ == "__main__":
    main()
