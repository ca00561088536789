"""Phase 1 on real data: how well do gradient fingerprints recover the clients' tasks?

For each setting and seed: all-MiniLM-L6-v2, 3 clients per task with 200 examples each,
fingerprints from the common initial adapter (128 examples, the last 3 blocks, projected to 256),
clustered with k chosen automatically. Prints ARI / NMI / purity against the true tasks, the
chosen k, the upload per client and the phase wall time (clients + server, one process), with
process_time / wall so a loaded machine shows.

    python bench/clustering.py                       # the issue's settings, seeds 0 1 2
    python bench/clustering.py --only ablation       # which parameters, how many layers
    python bench/clustering.py --dump DIR            # also save what the server received
    python bench/clustering.py --server DIR          # the server's steps, on saved fingerprints
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from atlasfl.config import from_dict
from atlasfl.engine import CommLedger, build_experiment, run_exchange
from atlasfl.engine.executor import make_executor
from atlasfl.phases.clustering import CRITERIA, cluster_fingerprints
from atlasfl.strategies import RoundInfo

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


def run_one(overrides: dict, seed: int, dump: str | None = None) -> dict:
    cfg = from_dict({"method": "fedavg-cluster", "seed": seed, "progress": False,
                     "data": {"clients_per_task": 3, "samples": 200, "eval_samples": 8}}
                    ).replace(**overrides)
    exp = build_experiment(cfg)
    ledger = CommLedger()
    executor = make_executor(exp, ledger)
    wall, cpu = time.perf_counter(), time.process_time()
    # round 1's first exchange: every client's fingerprint, clustered by the server
    done = run_exchange(executor, exp.strategy, exp.strategy.init(),
                        RoundInfo(1, tuple(sorted(exp.clients)), evaluate=False))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    metrics = done.outcome.metrics
    if dump:  # keep what the server received, to study its side offline
        _save_fingerprints(exp, done.replies, dump)
    return {"seed": seed, "k": int(metrics["k"]), "ari": metrics["ari"], "nmi": metrics["nmi"],
            "purity": metrics["purity"], "clients": len(exp.clients),
            "upload_bytes_per_client": ledger.get(1, 0, "up"), "phase_seconds": wall,
            "cpu_over_wall": cpu / wall}


def _save_fingerprints(exp, replies, path: str) -> None:
    """Save the received fingerprints, their noise variances and the true tasks (safetensors)."""
    from safetensors.numpy import save_file

    replies = sorted(replies, key=lambda r: r.client_id)
    truth = [exp.clients[r.client_id].task.name for r in replies]
    tasks = sorted(set(truth))
    save_file({"fingerprints": np.stack([r.fingerprint for r in replies]),
               "noise_var": np.array([r.noise_var for r in replies]),
               "tasks": np.array([tasks.index(t) for t in truth])},
              path, metadata={"task_names": ",".join(tasks)})


SERVERS = {  # the server's steps, switched on one after the other
    "uncentred, 4-criterion vote": {"center": False, "debias": False, "criteria": CRITERIA},
    "centred, 4-criterion vote": {"center": True, "debias": False, "criteria": CRITERIA},
    "centred, debiased, 4-criterion vote": {"center": True, "debias": True, "criteria": CRITERIA},
    "centred, debiased, silhouette + eigengap": {"center": True, "debias": True,
                                                 "criteria": ("silhouette", "eigengap")},
    "centred, debiased, silhouette, all vote": {"center": True, "debias": True,
                                                "criteria": ("silhouette",), "min_signal": 0.0},
    "default (+ min_signal 0.7)": {"center": True, "debias": True, "criteria": ("silhouette",)},
}


def server_ablation(folder: str) -> None:
    """ARI of each server variant on the fingerprints saved by ``--dump`` (seconds, no model)."""
    from safetensors.numpy import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    short = {"4_tasks__iid": "4 iid", "4_tasks__dirichlet_0_5": "4 dir", "6_tasks__iid": "6 iid",
             "4_tasks__DP_eps_8": "4 dp"}
    heads = [f"{short.get(f.stem.rsplit('_seed', 1)[0], f.stem)} s{f.stem.rsplit('seed', 1)[1]}"
             for f in files]
    print(f"{'server (k: ARI per saved run)':<44}" + "".join(f"{h:>10}" for h in heads))
    for name, opts in SERVERS.items():
        aris = []
        for f in files:
            saved = load_file(str(f))
            result = cluster_fingerprints(
                saved["fingerprints"], true_labels=saved["tasks"], center=opts["center"],
                noise_var=saved["noise_var"] if opts["debias"] else None,
                criteria=opts["criteria"], min_signal=opts.get("min_signal", 0.7))
            aris.append(f"{result.k}:{result.quality['ari']:.3f}")
        print(f"{name:<44}" + "".join(f"{a:>10}" for a in aris))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", choices=["settings", "ablation", "all", "four", "six"],
                        default="settings")
    parser.add_argument("--out", help="append JSON lines here")
    parser.add_argument("--dump", help="save each run's fingerprints into this folder")
    parser.add_argument("--server", help="only compare server variants on the fingerprints "
                                         "saved in this folder by --dump")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=JSON value")
    args = parser.parse_args()
    if args.server:
        server_ablation(args.server)
        return
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
            dump = None
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                tag = "".join(ch if ch.isalnum() else "_" for ch in name)
                dump = str(Path(args.dump) / f"{tag}_seed{seed}.safetensors")
            row = run_one({**overrides, **extra}, seed, dump)
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
