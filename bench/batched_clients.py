"""One round's local training, client by client vs batched clients (``train.batch_clients``).

Both arms train every client of the config once (its Train plan as round 1 gives it: the
config's epochs or steps) on their own copies of the same client states. The sequential arm is
``ClientRuntime.train_round`` per client; the batched arm groups the clients whose batches have
the same sizes step for step (``step_sizes``, at most ``--batch-clients`` a group) and trains each
group with ``ClientRuntime.train_group`` (one forward and backward per step over the stacked
adapters), the others one by one. The arms alternate (which goes first alternates too); printed
per pair: each arm's wall and process seconds (cpu/wall) and, on CUDA, its peak GPU memory; then
the median ratio sequential / batched of wall seconds (> 1: batching is faster) with quartiles.
On CUDA the clock stops after a synchronize. ``--warmup`` pairs run first and are not counted
(allocator, kernels). ``--set train.local_steps=N`` times N steps a client instead of the
config's epochs. A timing on a busy host is no measurement.

    python bench/batched_clients.py --config configs/paper.yaml --device cuda \\
        --set train.local_steps=40 --pairs 5
    python bench/batched_clients.py --config configs/quick.yaml --set model.name=tiny-bert \\
        --device cpu --warmup 0 --pairs 1   # smoke check
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from atlasfl.client import client_seed
from atlasfl.client.batched import group_by_key, step_sizes
from atlasfl.config import apply_overrides, from_dict, from_yaml
from atlasfl.engine import build_experiment
from atlasfl.messages import Train
from atlasfl.report.stats import quartiles

ROUND = 1


def groups_of(exp, plans: list[Train], size: int) -> list[list[int]]:
    """The batched groups (plan indices) the in-process executor forms for these plans."""
    t = exp.cfg.train
    keys = [step_sizes(exp.clients.num_examples(p.client_id), t, epochs=p.epochs, steps=p.steps,
                       seed=client_seed(exp.cfg.seed, ROUND, p.client_id)) or None
            for p in plans]
    return group_by_key(keys, size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(exp, clients, plans, groups: list[list[int]] | None) -> dict[str, float]:
    """Train every plan once; ``groups``: None = one by one. Wall, process seconds, GPU peak."""
    rt, device = exp.runtime, exp.runtime.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    grouped = {i for g in groups or [] for i in g}
    for group in groups or []:
        rt.train_group([clients[i] for i in group], [plans[i] for i in group], ROUND)
    for i, plan in enumerate(plans):
        if i not in grouped:
            rt.train_round(clients[i], plan, client_seed(rt.seed, ROUND, plan.client_id))
    sync(device)
    out = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    if device.type == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--pairs", type=int, default=5, help="alternated pairs")
    parser.add_argument("--warmup", type=int, default=1, help="pairs run first, not counted")
    parser.add_argument("--batch-clients", type=int, default=0,
                        help="clients per group at most (0: all of them)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    raw = apply_overrides(from_yaml(args.config), [*args.set, f"device={args.device}",
                                                   "progress=false"])
    exp = build_experiment(from_dict(raw))
    t = exp.cfg.train
    ids = sorted(exp.clients)
    plans = [Train(cid, epochs=t.local_epochs, steps=t.local_steps) for cid in ids]
    groups = groups_of(exp, plans, args.batch_clients or len(ids))
    arms = {"sequential": [exp.clients[c] for c in ids]}
    arms["batched"] = copy.deepcopy(arms["sequential"])  # the same states, trained apart
    steps = sum(len(step_sizes(exp.clients.num_examples(p.client_id), t, epochs=p.epochs,
                               steps=p.steps, seed=client_seed(exp.cfg.seed, ROUND, p.client_id)))
                for p in plans)
    print(f"{exp.cfg.model.name} on {exp.runtime.device}, {len(ids)} clients, {steps} client "
          f"steps a round, precision {t.precision}, groups {[len(g) for g in groups]}",
          flush=True)
    ratios = []
    for pair in range(args.warmup + args.pairs):
        order = ("sequential", "batched") if pair % 2 == 0 else ("batched", "sequential")
        result = {arm: run_arm(exp, arms[arm], plans, groups if arm == "batched" else None)
                  for arm in order}
        ratios.append(result["sequential"]["wall"] / result["batched"]["wall"])
        line = ", ".join(
            f"{arm} {r['wall']:.2f} s wall {r['cpu']:.2f} s cpu (cpu/wall "
            f"{r['cpu'] / r['wall']:.2f})"
            + (f" peak {r['gpu_peak_gib']:.2f} GiB" if "gpu_peak_gib" in r else "")
            for arm, r in result.items())
        print(f"{'warm-up' if pair < args.warmup else 'pair'} {pair}: {line}, "
              f"ratio {ratios[-1]:.3f}", flush=True)
        if pair < args.warmup:
            ratios.pop()
    low, high = quartiles(ratios)
    print(f"sequential / batched wall: median {statistics.median(ratios):.3f} "
          f"({low:.3f}-{high:.3f}) over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
