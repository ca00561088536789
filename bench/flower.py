"""The same 2-round tiny run in process, on Flower's simulation (Ray) and on a loopback deployment.

Prints, per engine, the wall time from start to finished run (startup included) and the round
loop's own wall time (``wall_seconds`` of the summary), and checks that every engine ends on the
same client adapters. Then the bytes per round by message type and direction: the protocol's
payload bytes (what the ledger counts, identical on every engine: the tests check
``bytes_by_kind``) and the size of the Flower records that carry them (``ArrayRecord`` +
``ConfigRecord``: npy headers, keys, settings), and Flower's own count of the deployment's network
traffic (``flwr ls``: every message with its framing, the setup and state messages included).

    OMP_NUM_THREADS=1 python bench/flower.py [--method fedavg-task] [--skip-deploy]
        [--set split.window=3]

Split methods (``splitlora``): every per-batch message is a row ``split <type>``; on Flower
they travel in windows of ``split.window`` (one ``train.split`` message per window).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from atlasfl.config import from_dict
from atlasfl.data.glue import default_data_root
from atlasfl.engine import build_experiment, load_checkpoint, run_experiment
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.checkpoint import latest_checkpoint
from atlasfl.engine.executor import make_executor
from atlasfl.engine.flower.loopback import Loopback
from atlasfl.engine.flower.records import message_type, to_content, window_to_content
from atlasfl.engine.flower.server_app import FLOWER_ENV, run_flower_simulation
from atlasfl.engine.ledger import state_bytes
from atlasfl.messages import Activations, Evaluate, Gradients, Logits, Probe, Train


def tiny(method: str, **dotted):
    """The tests' tiny run: tiny-bert, cola and mrpc, 2 clients each, 2 rounds, 1 thread."""
    raw = {"method": method, "seed": 0, "progress": False,
           "model": {"name": "tiny-bert", "pooling": "mean"},
           "data": {"tasks": ["cola", "mrpc"], "clients_per_task": 2, "samples": 24,
                    "eval_samples": 32, "val_fraction": 0.25, "max_length": 32},
           "train": {"batch_size": 8, "lr": 0.01, "threads": 1},
           "federation": {"rounds": 2}}
    return from_dict(raw).replace(**dotted)


class CountingChannel(InProcessChannel):
    """The in-process channel, also tallying bytes per (round, direction, message type)."""

    def __init__(self, ledger, tally):
        super().__init__(ledger)
        self.tally = tally

    def send(self, round_idx, client_id, direction, message):
        arrived = super().send(round_idx, client_id, direction, message)
        if isinstance(message, Train | Evaluate | Probe):
            kind = message_type(message)
        elif isinstance(message, Activations | Gradients | Logits):  # one batch of a window
            kind = f"split {type(message).__name__}"
        else:
            kind = f"{message.kind} reply"
        payload = sum(state_bytes(t) for t in message.payload().values())
        content = (window_to_content(client_id, [arrived])
                   if kind.startswith("split ") else to_content(arrived))
        records = sum(r.count_bytes() for r in content.values())
        entry = self.tally[(round_idx, direction, kind)]
        entry[0] += payload
        entry[1] += records
        entry[2] += 1
        return arrived


def adapters(clients) -> dict[str, torch.Tensor]:
    return {f"{cid}/{k}": v.clone() for cid in clients
            for k, v in clients[cid].adapter_state().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="fedavg-task")
    parser.add_argument("--skip-deploy", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. split.window=3 (values as YAML)")
    args = parser.parse_args()
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    glue = default_data_root()
    overrides = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in args.set)}
    cfg = tiny(args.method, **{"data.data_dir": str(glue), **overrides})
    rows = []
    tally: dict = defaultdict(lambda: [0, 0, 0])

    def counting(exp, ledger):
        executor = make_executor(exp, ledger)
        executor.channel = CountingChannel(ledger, tally)
        return executor

    start = time.perf_counter()
    local = build_experiment(cfg)
    out = run_experiment(local, executor_of=counting)
    rows.append(("in-process", time.perf_counter() - start, out.summary["wall_seconds"]))
    want = adapters(local.clients)

    start = time.perf_counter()
    exp = build_experiment(cfg)
    out = run_flower_simulation(exp)
    rows.append(("flower-sim (Ray, 1 CPU)", time.perf_counter() - start,
                 out.summary["wall_seconds"]))
    same = {"flower-sim": all(torch.equal(want[k], v) for k, v in adapters(exp.clients).items())}

    traffic = None
    if not args.skip_deploy:
        with tempfile.TemporaryDirectory() as tmp:
            run_cfg = cfg.replace(out=str(Path(tmp) / "runs"), run_name="deploy")
            config = Path(tmp) / "experiment.yaml"
            config.write_text(yaml.safe_dump(run_cfg.to_dict()))
            nodes = [f'partition-id={i} data-dir="{glue}"' for i in range(4)]
            start = time.perf_counter()
            with Loopback(Path(tmp) / "deploy", nodes) as link:
                run_id = link.submit(f'config="{config}"')
                info = link.wait(run_id, 1800)
                if info["status"] != "finished:completed":
                    raise SystemExit(f"deployment run ended {info['status']}\n"
                                     f"{link.log_tails()}")
            wall = time.perf_counter() - start
            summary = json.loads((Path(tmp) / "runs" / "deploy" / "summary.json").read_text())
            rows.append(("loopback deployment (4 SuperNodes)", wall, summary["wall_seconds"]))
            snap = load_checkpoint(latest_checkpoint(Path(tmp) / "runs" / "deploy"))
            same["loopback"] = all(torch.equal(snap.tensors[f"client/{k.split('/', 1)[0]}/"
                                                            f"adapter/{k.split('/', 1)[1]}"], v)
                                   for k, v in want.items())
            traffic = info.get("network-traffic")

    print(f"method {args.method} {' '.join(args.set)}, 4 clients (cola, mrpc x 2), 2 rounds, "
          f"tiny-bert, 1 torch thread, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<36} {'start to end s':>15} {'round loop s':>13}")
    for name, total, loop in rows:
        print(f"{name:<36} {total:>15.1f} {loop:>13.1f}")
    print("final adapters equal the in-process run's: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()))
    print(f"\n{'round':>5} {'direction':<9} {'message type':<18} {'messages':>8} "
          f"{'payload B':>10} {'records B':>10}")
    for (rnd, direction, kind), (payload, records, n) in sorted(tally.items()):
        print(f"{rnd:>5} {direction:<9} {kind:<18} {n:>8} {payload:>10} {records:>10}")
    if traffic is not None:
        print(f"\nloopback deployment, Flower's count (flwr ls): {traffic}")


if __name__ == "__main__":
    main()
