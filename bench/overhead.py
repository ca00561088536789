"""Throughput of the federated runner vs a plain PEFT training loop, same process, same run.

Both train all-MiniLM-L6-v2 with LoRA (r=8, query/value) and a mean-pooling linear head, batch
16, AdamW, gradient clipping, on the same client rows (sst2 mrpc cola qnli x 3 clients), for the
same number of optimizer steps. The runner adds everything federated: per-client adapter binding,
uploads/downloads through the channel, FedAvg per task, write-back, and a (1-row) evaluation.
A and B alternate; each line logs process_time / wall so a loaded machine shows.

    python bench/overhead.py [--repeats 3] [--samples 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import get_peft_model

from atlasfl.config import from_dict
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.client import client_seed
from atlasfl.models.head import init_head
from atlasfl.models.lora import lora_config
from atlasfl.models.registry import load_backbone


def runner_config(samples: int, rounds: int):
    return from_dict({
        "method": "fedavg-task", "progress": False,
        "model": {"name": "minilm", "pooling": "mean", "lora": {"r": 8, "alpha": 16}},
        "data": {"tasks": ["sst2", "mrpc", "cola", "qnli"], "clients_per_task": 3,
                 "samples": samples, "eval_samples": 1, "val_fraction": 0.0, "max_length": 128},
        "train": {"batch_size": 16, "lr": 0.002, "local_epochs": 1},
        "federation": {"rounds": rounds},
    })


def time_runner(cfg) -> tuple[float, float, int]:
    exp = build_experiment(cfg)
    steps = sum(-(-c.num_examples // cfg.train.batch_size) for c in exp.clients.values())
    steps *= cfg.federation.rounds
    wall, cpu = time.perf_counter(), time.process_time()
    run_experiment(exp)
    return time.perf_counter() - wall, time.process_time() - cpu, steps


def time_plain(cfg, batches: list[dict[str, torch.Tensor]], num_labels: int) -> tuple[float, float]:
    """A plain PEFT loop: one model, one head, one optimizer, the same batches."""
    backbone = load_backbone("minilm")
    model = get_peft_model(backbone.model, lora_config(cfg.model.lora, backbone.family))
    head = init_head(backbone.hidden_size, num_labels, pooling="mean", dropout=0.1, seed=0)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        labels = batch.pop("labels")
        logits = head(model(**batch).last_hidden_state, batch["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        batch["labels"] = labels
    return time.perf_counter() - wall, time.process_time() - cpu


def plain_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """Exactly the runner's batches (same rows, order and padding), round after round."""
    exp = build_experiment(cfg)
    out = []
    for round_idx in range(1, cfg.federation.rounds + 1):
        for client in exp.clients.values():
            gen = torch.Generator().manual_seed(client_seed(cfg.seed, round_idx, client.client_id))
            out.extend(client.train_set.batches(cfg.train.batch_size, generator=gen))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = runner_config(args.samples, args.rounds)
    batches = plain_batches(cfg)
    ratios = []
    print(f"{len(batches)} optimizer steps per measurement, torch threads "
          f"{torch.get_num_threads()}")
    time_plain(cfg, batches[:4], 2)  # warm-up: allocator, thread pool, first-call costs
    for rep in range(args.repeats):
        if rep % 2 == 0:  # alternate which goes first, so drift in machine load cancels
            runner_wall, runner_cpu, steps = time_runner(cfg)
            plain_wall, plain_cpu = time_plain(cfg, batches, 2)
        else:
            plain_wall, plain_cpu = time_plain(cfg, batches, 2)
            runner_wall, runner_cpu, steps = time_runner(cfg)
        assert steps == len(batches), (steps, len(batches))
        ratio = plain_wall / runner_wall  # runner throughput / plain throughput
        ratios.append(ratio)
        print(f"rep {rep}: runner {steps / runner_wall:6.2f} steps/s (cpu/wall "
              f"{runner_cpu / runner_wall:.2f}), plain {steps / plain_wall:6.2f} steps/s "
              f"(cpu/wall {plain_cpu / plain_wall:.2f}), ratio {ratio:.3f}", flush=True)
    print(f"throughput ratio runner/plain: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {len(ratios)} alternations")


if __name__ == "__main__":
    main()
