"""Throughput of the federated runner vs a plain PEFT training loop, alternated epoch by epoch.

Both train all-MiniLM-L6-v2 with LoRA (r=8, query/value) and a mean-pooling linear head, batch
16, AdamW, gradient clipping, on the same client rows (sst2 mrpc cola qnli x 3 clients). One
*epoch* is every client's rows once: for the runner one `fedavg-task` round (per-client adapter
binding, uploads and downloads through the channel, FedAvg per task, write-back, a 1-row
evaluation), for the plain loop the same rows in one model with one optimizer, fp32, dynamic
padding, no bucketing: the baseline the issue measures against. The arms alternate epoch by
epoch (which goes first alternates too) at a fixed thread count, and each is timed in CPU
seconds per optimizer step (process time: a process that is preempted on a busy host does not
accrue it, where wall time would). Printed: each pair's ratio plain / runner (> 1: the runner is
faster), the median and the interquartile spread, the load average and each arm's cpu/wall, and
a verdict: when the host's load exceeds its cores, or the ratios spread by more than 10%, the
figure is called inconclusive.

    python bench/overhead.py --pairs 6 --threads 1
    python bench/overhead.py --runner-set train.length_bucket=8 --runner-set train.precision=bf16
    python bench/overhead.py --runner-set train.precision=auto --runner-set train.length_bucket=8 \
        --runner-set train.pad_multiple=16                  # the runner at today's defaults
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from peft import get_peft_model

from atlasfl.client import client_seed
from atlasfl.config import apply_overrides, from_dict
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.engine.host import host_facts, usable_cores
from atlasfl.models.head import init_head
from atlasfl.models.lora import lora_config
from atlasfl.models.registry import load_backbone
from atlasfl.report.stats import quartiles


def runner_raw(samples: int) -> dict:
    return {
        "method": "fedavg-task", "progress": False,
        "model": {"name": "minilm", "pooling": "mean", "lora": {"r": 8, "alpha": 16}},
        "data": {"tasks": ["sst2", "mrpc", "cola", "qnli"], "clients_per_task": 3,
                 "samples": samples, "eval_samples": 1, "val_fraction": 0.0, "max_length": 128},
        # the plain loop's settings, pinned (today's defaults differ: --runner-set gives them)
        "train": {"batch_size": 16, "lr": 0.002, "local_epochs": 1, "precision": "fp32",
                  "length_bucket": 0, "pad_multiple": 1},
        "federation": {"rounds": 1},
    }


class Plain:
    """A plain PEFT loop: one model, one head, one optimizer, fp32."""

    def __init__(self, cfg, num_labels: int = 2):
        backbone = load_backbone("minilm")
        self.model = get_peft_model(backbone.model, lora_config(cfg.model.lora, backbone.family))
        self.head = init_head(backbone.hidden_size, num_labels, pooling="mean", dropout=0.1,
                              seed=0)
        self.params = ([p for p in self.model.parameters() if p.requires_grad]
                       + list(self.head.parameters()))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.train.lr)

    def epoch(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        self.model.train()
        wall, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            logits = self.head(self.model(**inputs).last_hidden_state, batch["attention_mask"])
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        return time.perf_counter() - wall, time.process_time() - cpu


def plain_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """The rows the runner trains in one round, in the runner's plain (unbucketed) order."""
    exp = build_experiment(cfg)
    out = []
    for client in exp.clients.values():
        gen = torch.Generator().manual_seed(client_seed(cfg.seed, 1, client.client_id))
        out.extend(client.train_set.batches(cfg.train.batch_size, generator=gen))
    return out


def runner_epoch(exp) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    run_experiment(exp)
    steps = sum(-(-c.num_examples // exp.cfg.train.batch_size) for c in exp.clients.values())
    return time.perf_counter() - wall, time.process_time() - cpu, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="alternated epoch pairs")
    parser.add_argument("--samples", type=int, default=64, help="rows per client")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both arms")
    parser.add_argument("--runner-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the runner only (the plain loop stays fp32)")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # the runner's 1-row evaluation holds one label: scikit-learn's warning says nothing here
    warnings.filterwarnings("ignore", message="A single label was found")
    torch.set_num_threads(args.threads)
    base = runner_raw(args.samples)
    runner_cfg = from_dict(apply_overrides(base | {"train": {**base["train"],
                                                             "threads": args.threads}},
                                           args.runner_set))
    plain_cfg = from_dict(base | {"train": {**base["train"], "threads": args.threads}})
    batches = plain_batches(plain_cfg)
    exp = build_experiment(runner_cfg)
    torch.set_num_threads(args.threads)
    plain = Plain(plain_cfg)
    plain.epoch(batches[:4])  # warm-up: allocator, thread pool, first calls
    print(f"{len(batches)} optimizer steps per epoch, {args.threads} torch thread(s) on "
          f"{host_facts(torch.device('cpu'))['cpu']}, runner settings: "
          f"{' '.join(args.runner_set) or 'as the plain loop'}")
    ratios, loads, utils = [], [], {"runner": [], "plain": []}
    for pair in range(args.pairs):
        arms = ("runner", "plain") if pair % 2 == 0 else ("plain", "runner")
        cpu_per_step = {}
        for arm in arms:
            if arm == "runner":
                wall, cpu, steps = runner_epoch(exp)
                assert steps == len(batches), (steps, len(batches))
            else:
                wall, cpu = plain.epoch(batches)
            cpu_per_step[arm] = cpu / len(batches)
            utils[arm].append(cpu / wall / args.threads)
        loads.append(os.getloadavg()[0])
        ratios.append(cpu_per_step["plain"] / cpu_per_step["runner"])
        print(f"pair {pair}: runner {1e3 * cpu_per_step['runner']:7.1f} cpu-ms/step "
              f"(cpu/wall {utils['runner'][-1]:.2f}), plain {1e3 * cpu_per_step['plain']:7.1f} "
              f"cpu-ms/step (cpu/wall {utils['plain'][-1]:.2f}), ratio {ratios[-1]:.3f}, "
              f"load {loads[-1]:.1f}", flush=True)
    low, high = quartiles(ratios)
    median = statistics.median(ratios)
    cores = usable_cores()
    print(f"runner speed / plain PEFT loop (cpu per step): median {median:.3f}, quartiles "
          f"{low:.3f}-{high:.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} "
          f"pairs; load average {statistics.mean(loads):.1f} on {cores} cores; cpu/wall runner "
          f"{statistics.mean(utils['runner']):.2f}, plain {statistics.mean(utils['plain']):.2f}")
    reasons = []
    if max(loads) > cores:
        reasons.append(f"the load average reached {max(loads):.1f} on {cores} cores")
    if (high - low) / median > 0.10:
        reasons.append(f"the ratios spread by {(high - low) / median:.0%} (quartiles)")
    print("verdict: " + ("inconclusive, " + "; ".join(reasons) if reasons else
                         "conclusive (host not overloaded, spread within 10%)"))


if __name__ == "__main__":
    main()
