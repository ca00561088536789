"""The one round loop: sample, configure, train, aggregate, write back, evaluate, record."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.executor import InProcessExecutor
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import Experiment
from atlasfl.report.summary import summarize
from atlasfl.types import ClientId


def sample_clients(client_ids: list[ClientId], fraction: float, seed: int, round_idx: int
                   ) -> list[ClientId]:
    """Clients that train in ``round_idx``; the generator is seeded from (seed, round)."""
    k = max(1, round(fraction * len(client_ids)))
    if k >= len(client_ids):
        return sorted(client_ids)
    rng = np.random.default_rng([seed, round_idx])
    return sorted(int(c) for c in rng.choice(client_ids, size=k, replace=False))


def _is_eval_round(round_idx: int, rounds: int, every: int) -> bool:
    return round_idx % every == 0 or round_idx == rounds


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU when used), in MiB."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_experiment(exp: Experiment, run_dir: RunDir | None = None) -> dict[str, Any]:
    """Run all rounds of ``exp``; write rows and summary into ``run_dir``; return the summary."""
    cfg, strategy = exp.cfg, exp.strategy
    ids = sorted(exp.clients)
    rounds = cfg.federation.rounds
    ledger = CommLedger()
    executor = InProcessExecutor(exp.model, exp.binder, exp.clients, exp.test_sets, cfg.train,
                                 seed=cfg.seed, device=exp.device,
                                 channel=InProcessChannel(ledger), upload=strategy.uploads)
    schedule = {r: sample_clients(ids, cfg.federation.fraction, cfg.seed, r)
                for r in range(1, rounds + 1)}
    work = sum(len(s) + (len(ids) if _is_eval_round(r, rounds, cfg.federation.eval_every) else 0)
               for r, s in schedule.items())
    bar = tqdm(total=work, unit="client", disable=not cfg.progress, file=sys.stderr,
               desc=cfg.method, dynamic_ncols=True)
    state = strategy.init()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    final_rows: list[dict[str, Any]] = []
    for round_idx in range(1, rounds + 1):
        rows: dict[ClientId, dict[str, Any]] = {
            cid: {"round": round_idx, "client": cid, "task": exp.clients[cid].task.name,
                  "trained": False, "seconds": 0.0} for cid in ids}
        updates = []
        plans = strategy.configure_round(state, round_idx, schedule[round_idx])
        for plan, update, metrics in executor.run(round_idx, plans):
            rows[plan.client_id].update(trained=True, train_loss=metrics["train_loss"],
                                        steps=metrics["steps"],
                                        seconds=metrics["train_seconds"])
            if update is not None:
                updates.append(update)
            bar.set_postfix_str(f"round {round_idx}/{rounds} trained client {plan.client_id}")
            bar.update()
        outcome = strategy.aggregate_round(state, round_idx, updates)
        state = outcome.state
        executor.write(round_idx, outcome.writes)
        if _is_eval_round(round_idx, rounds, cfg.federation.eval_every):
            for cid in ids:
                start = time.perf_counter()
                rows[cid].update(executor.evaluate(cid))
                rows[cid]["seconds"] += time.perf_counter() - start
                bar.set_postfix_str(f"round {round_idx}/{rounds} evaluated client {cid}")
                bar.update()
            final_rows = [rows[cid] for cid in ids]
        for cid in ids:
            rows[cid]["bytes_up"] = ledger.get(round_idx, cid, "up")
            rows[cid]["bytes_down"] = ledger.get(round_idx, cid, "down")
            rows[cid].update({f"server_{k}": v for k, v in outcome.metrics.items()})
        if run_dir is not None:
            run_dir.append_rounds([rows[cid] for cid in ids])
    bar.close()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    summary = summarize(final_rows, exp.majority,
                        {c.task.name: c.task.primary_metric for c in exp.clients.values()})
    summary.update(
        method=cfg.method, model=cfg.model.name, seed=cfg.seed, rounds=rounds,
        num_clients=len(ids), device=str(exp.device), wall_seconds=wall,
        process_seconds=cpu, cpu_utilisation=cpu / wall if wall else 0.0,
        bytes_up=ledger.total("up"), bytes_down=ledger.total("down"),
        data=exp.data_notes, **peak_memory_mb(exp.device),
        clients=[{k: v for k, v in row.items() if k not in ("round", "trained")}
                 for row in final_rows],
    )
    if run_dir is not None:
        run_dir.write_summary(summary)
    return summary
