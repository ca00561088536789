"""The one round loop: sample, then run the strategy's exchanges, record, save.

Each round, the loop asks the strategy for the plans of its next exchange, has the executor deliver
them, hands the replies back to the strategy, and repeats until the strategy's round is over
(``atlasfl.strategies.base``); it knows no phase. It owns all I/O: rows of ``rounds.jsonl`` (what
each client reported, its bytes by kind from the ledger, the server's metrics), the files and
notices a strategy asks for, checkpoints and the summary.

A run may span several sessions: ``session.max_rounds`` caps this session, a checkpoint is
written every ``session.save_every`` rounds (and when the session ends), and ``resume`` continues
from a checkpoint to exactly the state an uninterrupted run would have reached. A stop request
(SIGINT/SIGTERM via ``StopFlag``) abandons the round in progress when the last completed round is
checkpointed, and otherwise finishes it and saves.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from atlasfl.client.training import resolve_precision
from atlasfl.config import precision_ran
from atlasfl.engine.allocator import peak_rss_mb
from atlasfl.engine.checkpoint import (
    Snapshot,
    flatten_state,
    save_checkpoint,
    unflatten_state,
)
from atlasfl.engine.executor import Executor, make_executor
from atlasfl.engine.host import host_facts
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import Experiment
from atlasfl.errors import AtlasError
from atlasfl.messages import Plan, Reply, TrainReply
from atlasfl.summary import reported_rows, stop_early, summarize
from atlasfl.strategies.base import RoundInfo, RoundOutcome
from atlasfl.strategies.strategy import Strategy
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
    state: Any = None  # the strategy's server state after the last completed round


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
    out = {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def capture(exp: Experiment, server_state: Any, round_idx: int,
            history: list[list[dict[str, Any]]], elapsed: dict[str, float]) -> Snapshot:
    """Everything that crosses rounds, as tensors + JSON: the one place state is collected."""
    tensors: dict[str, torch.Tensor] = {}
    files: dict[str, Path] = {}
    clients_meta: dict[str, dict[str, Any] | None] = {}
    for cid in exp.clients:
        if exp.clients.untouched(cid):  # at the shared start: nothing to save (None)
            clients_meta[str(cid)] = None
            continue
        on_disk = exp.clients.spilled(cid)
        if on_disk is not None:  # a spilled client's file is copied, never loaded
            files[f"client/{cid}/"], clients_meta[str(cid)] = on_disk
            continue
        client_tensors, clients_meta[str(cid)] = exp.clients.checkpoint(cid)
        tensors.update({f"client/{cid}/{k}": v for k, v in client_tensors.items()})
    server = flatten_state(server_state, tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    if exp.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(exp.device)
    meta = {"history": history, "server": server, "clients": clients_meta, "elapsed": elapsed,
            "strategy": exp.cfg.method,
            "precision": resolve_precision(exp.cfg.train.precision, exp.device)}
    return Snapshot(round_idx, exp.cfg.to_dict(), tensors, meta, files)


def restore(exp: Experiment, snapshot: Snapshot) -> tuple[Any, list[list[dict[str, Any]]],
                                                           dict[str, float]]:
    """Put a snapshot back into a freshly built experiment; returns server state and history."""
    now = resolve_precision(exp.cfg.train.precision, exp.device)
    saved = precision_ran(snapshot.config.get("train", {}).get("precision", "auto"),
                          exp.device.type, snapshot.meta.get("precision"))
    if saved != now:
        raise AtlasError(f"train.precision resolves to {now!r} on this machine but the checkpoint "
                         f"was trained in {saved!r}; resume with --set train.precision={saved} "
                         f"(auto follows each machine's bf16 support)")
    saved_ids = sorted(int(c) for c in snapshot.meta["clients"])
    if saved_ids != sorted(exp.clients):
        raise AtlasError(f"checkpoint holds clients {saved_ids}, this experiment has "
                         f"{sorted(exp.clients)}")
    for cid in exp.clients:
        if snapshot.meta["clients"][str(cid)] is None:  # it never left the shared start
            continue
        prefix = f"client/{cid}/"
        exp.clients.restore(cid, {k[len(prefix):]: v for k, v in snapshot.tensors.items()
                                  if k.startswith(prefix)}, snapshot.meta["clients"][str(cid)])
    torch.set_rng_state(snapshot.tensors["rng/torch"])
    if exp.device.type == "cuda" and "rng/cuda" in snapshot.tensors:
        torch.cuda.set_rng_state(snapshot.tensors["rng/cuda"], exp.device)
    server = unflatten_state(snapshot.meta["server"], snapshot.tensors, exp.device)
    return server, snapshot.meta["history"], snapshot.meta["elapsed"]


def _summary(exp: Experiment, history: list[list[dict[str, Any]]], elapsed: dict[str, float],
             workers: dict[str, float]) -> dict[str, Any]:
    cfg = exp.cfg
    # the last round (always evaluated); with early stopping each client's best on validation
    reported, rounds_of = reported_rows(history, cfg.federation.patience)
    rows = [row for round_rows in history for row in round_rows]
    summary = summarize(reported, exp.references,
                        {exp.clients.task(c).name: exp.clients.task(c).primary_metric
                         for c in exp.clients})
    summary.update(
        method=cfg.method, model=cfg.model.name, seed=cfg.seed, rounds=cfg.federation.rounds,
        rounds_run=len(history), reported_rounds={str(c): r for c, r in rounds_of.items()},
        num_clients=len(exp.clients), device=str(exp.device), host=host_facts(exp.device),
        precision=resolve_precision(cfg.train.precision, exp.device),
        wall_seconds=elapsed["wall"], process_seconds=elapsed["process"],
        cpu_utilisation=elapsed["process"] / elapsed["wall"] if elapsed["wall"] else 0.0,
        bytes_up=sum(r["bytes_up"] for r in rows), bytes_down=sum(r["bytes_down"] for r in rows),
        bytes_by_kind=_bytes_by_kind(rows),
        data=exp.data_notes, **peak_memory_mb(exp.device),
        # worker processes (train.workers): their peaks summed, beside this process's
        **({"workers_peak_rss_mb": workers["peak_rss_mb"]} if workers else {}),
        clients=[{k: v for k, v in row.items() if k not in ("round", "trained")}
                 for row in reported],
    )
    return summary


def _round_line(method: str, rows: list[dict[str, Any]], rounds: int, wall: float) -> str:
    """One log line for a finished round: its number, the run's wall time, the mean metric."""
    trained = sum(bool(r.get("trained")) for r in rows)
    line = (f"{method}: round {rows[0]['round']}/{rounds} done, {wall:.0f} s, "
            f"{trained} clients trained")
    for key in ("local_metric", "global_metric", "val_metric"):
        scores = [r[key] for r in rows if key in r]
        if scores:
            line += f", mean client {key} {sum(scores) / len(scores):.3f}"
    return line


def _bytes_by_kind(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Total bytes per ``<direction>_<kind>`` over all rows (``up_adapter``, ``down_head``...)."""
    out: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(("bytes_up_", "bytes_down_")):
                out[key.removeprefix("bytes_")] = out.get(key.removeprefix("bytes_"), 0) + value
    return dict(sorted(out.items()))


@dataclass
class Exchange:
    """One exchange of a round: the plans sent, the replies received, the server's outcome."""

    plans: list[Plan]
    replies: list[Reply]
    outcome: RoundOutcome | None  # None: abandoned before the server aggregated
    server_seconds: float = 0.0


def _checked(strategy: Strategy, state: Any, reply: Reply) -> Reply:
    """The reply, or, when the strategy refuses its update, the reply without it (and why)."""
    if not isinstance(reply, TrainReply) or reply.update is None:
        return reply
    reason = strategy.check_update(state, reply.update)
    if reason is None:
        return reply
    print(f"atlasfl: round update of client {reply.client_id} refused: {reason}",
          file=sys.stderr)
    return dataclasses.replace(reply, update=None, record={**reply.record, "refused": reason})


def run_exchange(executor: Executor, strategy: Strategy, state: Any, rnd: RoundInfo, *,
                 on_reply: Callable[[Reply], None] | None = None,
                 stop: Callable[[], bool] | None = None) -> Exchange | None:
    """Exchange ``rnd.exchange`` of a round: configure, deliver, collect, aggregate.

    When plans split the model, the server's half of split learning holds the strategy's
    server-side models the dispatch names during the exchange and hands them back to the
    strategy's aggregation as ``served``.

    Returns None when the strategy's round has no such exchange. ``on_reply`` sees each reply as
    it arrives; when ``stop()`` turns true the exchange is abandoned before aggregation.
    """
    dispatch = strategy.configure_round(state, rnd)
    if dispatch is None:
        return None
    plans = dispatch.plans
    server = None if dispatch.server is None else executor.split_server(dispatch.server)
    replies: list[Reply] = []
    for reply in executor.run(rnd.round_idx, plans, server):
        if stop is not None and stop():
            return Exchange(plans, replies, None)
        reply = _checked(strategy, state, reply)
        if on_reply is not None:
            on_reply(reply)
        replies.append(reply)
    if stop is not None and stop():
        return Exchange(plans, replies, None)
    start = time.perf_counter()
    outcome = strategy.aggregate_round(state, rnd, replies,
                                       None if server is None else server.snapshot())
    return Exchange(plans, replies, outcome, time.perf_counter() - start)


class _RoundRecord:
    """One round's rows, one per client, filled as replies arrive; and the progress bar."""

    def __init__(self, exp: Experiment, rnd: RoundInfo, bar: tqdm, expected: int, rounds: int):
        self.rnd, self.bar, self.expected, self.rounds = rnd, bar, expected, rounds
        self.messages = 0
        self.rows: dict[ClientId, dict[str, Any]] = {
            cid: {"round": rnd.round_idx, "client": cid, "task": exp.clients.task(cid).name,
                  "trained": False, "seconds": 0.0} for cid in sorted(exp.clients)}

    def reply(self, reply: Reply) -> None:
        """What a client reported, and the time it took (also per kind of message)."""
        row = self.rows[reply.client_id]
        row.update(reply.record)
        row["seconds"] += reply.seconds
        row[f"{reply.kind}_seconds"] = row.get(f"{reply.kind}_seconds", 0.0) + reply.seconds
        self.messages += 1
        if self.messages > self.expected:
            self.bar.total += 1
        self.bar.set_postfix_str(f"round {self.rnd.round_idx}/{self.rounds} {reply.kind} "
                                 f"client {reply.client_id}")
        self.bar.update()

    def finish(self, ledger: CommLedger, server_metrics: dict[str, float]) -> None:
        """Bytes by direction and kind, and the server's metrics, into every row."""
        self.bar.total -= max(0, self.expected - self.messages)
        for cid, row in self.rows.items():
            row["bytes_up"] = ledger.get(self.rnd.round_idx, cid, "up")
            row["bytes_down"] = ledger.get(self.rnd.round_idx, cid, "down")
            row.update({f"bytes_{k}": v for k, v in ledger.kinds(self.rnd.round_idx, cid).items()})
            row.update({f"server_{k}": v for k, v in server_metrics.items()})


def _play_round(executor: Executor, strategy: Strategy, state: Any, rnd: RoundInfo,
                record: _RoundRecord, stop: Callable[[], bool], run_dir: RunDir | None
                ) -> tuple[Any, dict[str, float]] | None:
    """Every exchange of a round; None when a stop abandoned it (the state is then stale)."""
    server_metrics: dict[str, float] = {}
    index = 0
    while (done := run_exchange(executor, strategy, state,
                                dataclasses.replace(rnd, exchange=index),
                                on_reply=record.reply, stop=stop)) is not None:
        index += 1
        if done.outcome is None:
            return None
        state = done.outcome.state
        server_metrics.update(done.outcome.metrics)
        if done.plans:
            server_metrics[f"{done.plans[0].kind}_server_seconds"] = done.server_seconds
        for name, content in done.outcome.files.items():
            if run_dir is not None:
                run_dir.write_json(name, content)
        for line in done.outcome.notices:
            print(line, file=sys.stderr)
    return state, server_metrics


def run_experiment(exp: Experiment, run_dir: RunDir | None = None, *,
                   resume: Snapshot | None = None, stop: StopFlag | None = None,
                   executor_of: Callable[[Experiment, CommLedger], Executor] = make_executor
                   ) -> RunOutcome:
    """Run this session's rounds of ``exp`` (all of them unless capped or stopped).

    ``executor_of`` builds the executor that delivers plans (in process by default; Flower:
    ``atlasfl.engine.flower``). The clients' states are collected from it into ``exp.clients``
    for every checkpoint and when the session ends; it is closed when the session ends.
    """
    ledger = CommLedger()
    executor = executor_of(exp, ledger)  # first: Flower nodes may report their devices
    try:
        return _run_rounds(exp, executor, ledger, run_dir, resume, stop)
    finally:
        executor.close()


def _run_rounds(exp: Experiment, executor: Executor, ledger: CommLedger, run_dir: RunDir | None,
                resume: Snapshot | None, stop: StopFlag | None) -> RunOutcome:
    """``run_experiment``'s rounds, with its executor."""
    cfg, strategy, session = exp.cfg, exp.strategy, exp.cfg.session
    stop = stop or StopFlag()
    ids = sorted(exp.clients)
    rounds = cfg.federation.rounds
    if resume is not None:
        state, history, elapsed = restore(exp, resume)
        executor.restore_states()
        if run_dir is not None:
            run_dir.rewrite_rounds(history)  # drop rows of rounds after the checkpoint
    else:
        state, history, elapsed = strategy.init(), [], {"wall": 0.0, "process": 0.0}
    first = len(history) + 1
    last = rounds if not session.max_rounds else min(rounds, first - 1 + session.max_rounds)
    if stop_early(history, cfg.federation.patience):  # resumed after it had stopped early
        last = first - 1
    schedule = {r: RoundInfo(r, tuple(sample_clients(ids, cfg.federation.fraction, cfg.seed, r)),
                             _is_eval_round(r, rounds, cfg.federation.eval_every))
                for r in range(first, last + 1)}

    def expected(rnd: RoundInfo) -> int:  # messages a round usually holds, for the progress bar
        return len(rnd.sampled) + (len(ids) if rnd.evaluate else 0)

    # a bar redrawn into a log file is noise: when stderr is not a terminal, one line per round
    live = cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=sum(expected(r) for r in schedule.values()), unit="client",
               disable=not live, file=sys.stderr, desc=cfg.method, dynamic_ncols=True)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    workers0 = executor.usage().get("cpu_seconds", 0.0)  # CPU time of worker processes
    prior = dict(elapsed)
    saved_round = first - 1 if resume is not None else 0
    checkpoint: Path | None = None

    def may_abandon() -> bool:
        # abandon only when the last completed round is safely on disk (or nothing is saved)
        return stop.requested and (run_dir is None or saved_round == len(history))

    for round_idx in range(first, last + 1):
        rnd = schedule[round_idx]
        record = _RoundRecord(exp, rnd, bar, expected(rnd), rounds)
        played = _play_round(executor, strategy, state, rnd, record, may_abandon, run_dir)
        if played is None:
            break
        state, server_metrics = played
        record.finish(ledger, server_metrics)
        history.append(list(record.rows.values()))  # in client-id order
        if cfg.progress and not live:
            print(_round_line(cfg.method, history[-1], rounds,
                              time.perf_counter() - wall0 + prior["wall"]), file=sys.stderr)
        if run_dir is not None:
            run_dir.append_rounds(history[-1])
        elapsed = {"wall": prior["wall"] + time.perf_counter() - wall0,
                   "process": prior["process"] + time.process_time() - cpu0
                   + executor.usage().get("cpu_seconds", 0.0) - workers0}
        due = session.save_every and round_idx % session.save_every == 0
        converged = stop_early(history, cfg.federation.patience)  # no better validation lately
        if run_dir is not None and (due or round_idx == last or stop.requested or converged):
            executor.collect_states()
            checkpoint = save_checkpoint(run_dir.path, capture(exp, state, round_idx, history,
                                                               elapsed),
                                         keep=session.keep_checkpoints)
            saved_round = round_idx
        if stop.requested or converged:
            break
    bar.close()
    if saved_round != len(history):  # the store holds the clients as the session left them
        executor.collect_states()
    done_rounds = len(history)
    if done_rounds < rounds and not stop_early(history, cfg.federation.patience):
        return RunOutcome(None, done_rounds, checkpoint, state)
    summary = _summary(exp, history, elapsed, executor.usage())
    if run_dir is not None:
        run_dir.write_summary(summary)
    return RunOutcome(summary, done_rounds, checkpoint, state)
