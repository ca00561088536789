"""Checkpoint size and save/load time for a config (default configs/quick.yaml).

Trains one round with one local step per client (so every optimizer holds its moments), then
times ``save_checkpoint`` and ``load_checkpoint`` + restore into a fresh experiment, and
prints the bytes per client.

    python bench/checkpoint.py [--config configs/quick.yaml] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from atlasfl.config import from_dict, from_yaml
from atlasfl.engine import RunDir, build_experiment, load_checkpoint, run_experiment
from atlasfl.engine.checkpoint import TENSORS, latest_checkpoint, save_checkpoint
from atlasfl.engine.simulation import capture, restore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = from_dict(from_yaml(args.config)).replace(**{
            "out": tmp, "run_name": "ckpt", "progress": False, "train.local_steps": 1,
            "federation.rounds": 1, "data.eval_samples": 8})
        exp = build_experiment(cfg)
        run = RunDir.create(cfg)
        outcome = run_experiment(exp, run)
        snapshot = load_checkpoint(run.path)
        server_state, history, elapsed = restore(exp, snapshot)
        fresh = build_experiment(cfg)
        saves, loads = [], []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            path = save_checkpoint(Path(tmp) / f"save{rep}",
                                   capture(exp, server_state, 1, history, elapsed))
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            restore(fresh, load_checkpoint(path))
            loads.append(time.perf_counter() - t0)
        assert outcome.checkpoint is not None
        files = {p.name: p.stat().st_size for p in latest_checkpoint(run.path).iterdir()}
        per_client = {cid: sum(v.numel() * v.element_size() for k, v in snapshot.tensors.items()
                               if k.startswith(f"client/{cid}/")) for cid in exp.clients}
        adapter = sum(p.numel() * p.element_size() for p in exp.clients[0].adapter.values())
        print(f"model {cfg.model.name}, {len(exp.clients)} clients, method {cfg.method}")
        print(f"checkpoint files: {files} (total {sum(files.values()) / 2**20:.2f} MiB)")
        print(f"per client: {statistics.mean(per_client.values()):.0f} bytes (adapter "
              f"{adapter} + head + AdamW moments); server state and RNG: "
              f"{files[TENSORS] - sum(per_client.values())} bytes incl. safetensors header")
        print(f"save: median {statistics.median(saves) * 1000:.0f} ms, load+verify+restore: "
              f"median {statistics.median(loads) * 1000:.0f} ms over {args.repeats} repeats")


if __name__ == "__main__":
    main()
