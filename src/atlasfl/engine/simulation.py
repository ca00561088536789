"""The one round loop: sample, configure, train, aggregate, write back, evaluate, record, save.

A run may span several sessions: ``session.max_rounds`` caps this session, a checkpoint is
written every ``session.save_every`` rounds (and when the session ends), and ``resume`` continues
from a checkpoint to exactly the state an uninterrupted run would have reached. A stop request
(SIGINT/SIGTERM via ``StopFlag``) abandons the round in progress when the last completed round is
checkpointed, and otherwise finishes it and saves.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atlasfl.engine.checkpoint import (
    Snapshot,
    flatten_state,
    save_checkpoint,
    unflatten_state,
)
from atlasfl.engine.executor import make_executor
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.rundir import CLIENTS_FILE, RunDir
from atlasfl.engine.setup import Experiment
from atlasfl.errors import AtlasError
from atlasfl.phases.ranks import KINDS
from atlasfl.report.summary import summarize
from atlasfl.types import ClientId

def without_timings(row: dict[str, Any]) -> dict[str, Any]:
    """A history row without the fields that measure this machine (``*seconds``)."""
    return {k: v for k, v in row.items() if not k.endswith("seconds")}



@dataclass
class StopFlag:
    """Set by a signal handler; the loop stops at the next client boundary."""

    requested: bool = False


@dataclass
class RunOutcome:
    """What a session did: the summary when the run is complete, else None."""

    summary: dict[str, Any] | None
    completed_rounds: int
    checkpoint: Path | None


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


def capture(exp: Experiment, server_state: Any, round_idx: int,
            history: list[list[dict[str, Any]]], elapsed: dict[str, float]) -> Snapshot:
    """Everything that crosses rounds, as tensors + JSON: the one place state is collected."""
    tensors: dict[str, torch.Tensor] = {}
    clients_meta = {}
    for cid, client in exp.clients.items():
        client_tensors, clients_meta[str(cid)] = client.checkpoint()
        tensors.update({f"client/{cid}/{k}": v for k, v in client_tensors.items()})
    server = flatten_state(server_state, tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    if exp.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(exp.device)
    meta = {"history": history, "server": server, "clients": clients_meta, "elapsed": elapsed,
            "strategy": exp.cfg.method}
    return Snapshot(round_idx, exp.cfg.to_dict(), tensors, meta)


def restore(exp: Experiment, snapshot: Snapshot) -> tuple[Any, list[list[dict[str, Any]]],
                                                           dict[str, float]]:
    """Put a snapshot back into a freshly built experiment; returns server state and history."""
    saved_ids = sorted(int(c) for c in snapshot.meta["clients"])
    if saved_ids != sorted(exp.clients):
        raise AtlasError(f"checkpoint holds clients {saved_ids}, this experiment has "
                         f"{sorted(exp.clients)}")
    for cid, client in exp.clients.items():
        prefix = f"client/{cid}/"
        client.restore({k[len(prefix):]: v for k, v in snapshot.tensors.items()
                        if k.startswith(prefix)}, snapshot.meta["clients"][str(cid)])
    torch.set_rng_state(snapshot.tensors["rng/torch"])
    if exp.device.type == "cuda" and "rng/cuda" in snapshot.tensors:
        torch.cuda.set_rng_state(snapshot.tensors["rng/cuda"], exp.device)
    server = unflatten_state(snapshot.meta["server"], snapshot.tensors, exp.device)
    return server, snapshot.meta["history"], snapshot.meta["elapsed"]


def _summary(exp: Experiment, history: list[list[dict[str, Any]]], elapsed: dict[str, float]
             ) -> dict[str, Any]:
    cfg = exp.cfg
    final_rows = history[-1]  # the last round is always evaluated
    rows = [row for round_rows in history for row in round_rows]
    summary = summarize(final_rows, exp.majority,
                        {c.task.name: c.task.primary_metric for c in exp.clients.values()})
    summary.update(
        method=cfg.method, model=cfg.model.name, seed=cfg.seed, rounds=cfg.federation.rounds,
        num_clients=len(exp.clients), device=str(exp.device),
        wall_seconds=elapsed["wall"], process_seconds=elapsed["process"],
        cpu_utilisation=elapsed["process"] / elapsed["wall"] if elapsed["wall"] else 0.0,
        bytes_up=sum(r["bytes_up"] for r in rows), bytes_down=sum(r["bytes_down"] for r in rows),
        data=exp.data_notes, **peak_memory_mb(exp.device),
        clients=[{k: v for k, v in row.items() if k not in ("round", "trained")}
                 for row in final_rows],
    )
    return summary


def run_fingerprint_phase(exp: Experiment, executor, strategy, state: Any, round_idx: int,
                          rows: dict[ClientId, dict[str, Any]] | None = None, *,
                          fingerprint: bool = True, importance: bool = False
                          ) -> tuple[Any, dict[str, float]]:
    """Phases 1 and 2 before a round: fingerprints and/or module importance, one pass each.

    Every client uploads what is asked; the strategy clusters and/or plans ranks from it.
    """
    start = time.perf_counter()
    fingerprints, noise, scores = {}, {}, {}
    for cid in sorted(exp.clients):
        received, imp, diag = executor.probe(round_idx, cid, exp.cfg.clustering,
                                             fingerprint=fingerprint, importance=importance,
                                             importance_samples=exp.cfg.ranks.samples,
                                             importance_kind=KINDS[exp.cfg.ranks.utility],
                                             importance_top=exp.cfg.ranks.r_max)
        if received is not None:
            fingerprints[cid], noise[cid] = received
        if imp is not None:
            scores[cid] = imp
        if rows is not None:
            rows[cid].update(diag)
            rows[cid]["seconds"] += diag["fingerprint_seconds"]
    server_start = time.perf_counter()
    metrics: dict[str, float] = {}
    if fingerprint:
        state, metrics = strategy.observe_fingerprints(state, round_idx, fingerprints, noise)
    if importance:
        state, more = strategy.observe_importance(state, round_idx, scores)
        metrics = {**metrics, **more}
    now = time.perf_counter()
    metrics = {**metrics, "clustering_seconds": now - server_start,
               "fingerprint_phase_seconds": now - start}
    return state, metrics


def _report_configuration(records: dict[str, Any], run_dir: RunDir | None) -> None:
    """Keep Phase 2's per-client configuration; say which clients their devices exclude."""
    if not records:
        return
    if run_dir is not None:
        run_dir.write_json(CLIENTS_FILE, records)
    for cid, rec in records.items():
        if not rec.get("feasible", True):
            print(f"client {cid} excluded: its device {rec['device']} has "
                  f"{rec['budget_bytes'] / 2**20:.0f} MiB, the smallest adapter needs "
                  f"{rec['memory_estimate_bytes'] / 2**20:.0f} MiB", file=sys.stderr)


def run_experiment(exp: Experiment, run_dir: RunDir | None = None, *,
                   resume: Snapshot | None = None, stop: StopFlag | None = None) -> RunOutcome:
    """Run this session's rounds of ``exp`` (all of them unless capped or stopped)."""
    cfg, strategy, session = exp.cfg, exp.strategy, exp.cfg.session
    stop = stop or StopFlag()
    ids = sorted(exp.clients)
    rounds = cfg.federation.rounds
    ledger = CommLedger()
    executor = make_executor(exp, ledger)
    if resume is not None:
        state, history, elapsed = restore(exp, resume)
        if run_dir is not None:
            run_dir.rewrite_rounds(history)  # drop rows of rounds after the checkpoint
    else:
        state, history, elapsed = strategy.init(), [], {"wall": 0.0, "process": 0.0}
    first = len(history) + 1
    last = rounds if not session.max_rounds else min(rounds, first - 1 + session.max_rounds)
    schedule = {r: sample_clients(ids, cfg.federation.fraction, cfg.seed, r)
                for r in range(first, last + 1)}
    work = sum(len(s) + (len(ids) if _is_eval_round(r, rounds, cfg.federation.eval_every) else 0)
               for r, s in schedule.items())
    bar = tqdm(total=work, unit="client", disable=not cfg.progress, file=sys.stderr,
               desc=cfg.method, dynamic_ncols=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    prior = dict(elapsed)
    saved_round = first - 1 if resume is not None else 0
    checkpoint: Path | None = None

    def may_abandon() -> bool:
        # abandon only when the last completed round is safely on disk (or nothing is saved)
        return stop.requested and (run_dir is None or saved_round == len(history))

    for round_idx in range(first, last + 1):
        rows: dict[ClientId, dict[str, Any]] = {
            cid: {"round": round_idx, "client": cid, "task": exp.clients[cid].task.name,
                  "trained": False, "seconds": 0.0} for cid in ids}
        updates = []
        server_metrics: dict[str, float] = {}
        wants_fp, wants_imp = (strategy.fingerprint_round(round_idx),
                               strategy.importance_round(round_idx))
        if wants_fp or wants_imp:
            state, server_metrics = run_fingerprint_phase(exp, executor, strategy, state,
                                                          round_idx, rows, fingerprint=wants_fp,
                                                          importance=wants_imp)
        for cid, ranks in strategy.client_ranks(state).items():
            executor.configure(round_idx, cid, ranks)  # a no-op for clients already at them
        if round_idx == 1:
            _report_configuration(strategy.client_records(state), run_dir)
        plans = strategy.configure_round(state, round_idx, schedule[round_idx])
        for plan, update, metrics in executor.run(round_idx, plans):
            if may_abandon():
                break
            rows[plan.client_id].update(trained=True, train_loss=metrics["train_loss"],
                                        steps=metrics["steps"],
                                        seconds=rows[plan.client_id]["seconds"]
                                        + metrics["train_seconds"])
            if update is not None:
                updates.append(update)
            bar.set_postfix_str(f"round {round_idx}/{rounds} trained client {plan.client_id}")
            bar.update()
        if may_abandon():
            break
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
        for cid in ids:
            rows[cid]["bytes_up"] = ledger.get(round_idx, cid, "up")
            rows[cid]["bytes_down"] = ledger.get(round_idx, cid, "down")
            rows[cid].update({f"server_{k}": v
                              for k, v in {**server_metrics, **outcome.metrics}.items()})
        history.append([rows[cid] for cid in ids])
        if run_dir is not None:
            run_dir.append_rounds(history[-1])
        elapsed = {"wall": prior["wall"] + time.perf_counter() - wall0,
                   "process": prior["process"] + time.process_time() - cpu0}
        due = session.save_every and round_idx % session.save_every == 0
        if run_dir is not None and (due or round_idx == last or stop.requested):
            checkpoint = save_checkpoint(run_dir.path, capture(exp, state, round_idx, history,
                                                               elapsed),
                                         keep=session.keep_checkpoints)
            saved_round = round_idx
        if stop.requested:
            break
    bar.close()
    done = len(history)
    if done < rounds:
        return RunOutcome(None, done, checkpoint)
    summary = _summary(exp, history, elapsed)
    if run_dir is not None:
        run_dir.write_summary(summary)
    return RunOutcome(summary, done, checkpoint)
