"""Worker processes that answer clients' plans: the in-process executor's parallelism on a CPU.

A small model's products are too small for many torch threads to help, while processes answer
clients side by side. With ``train.workers`` > 1 the in-process executor hands every plan that
needs no server during its work (all but split plans) to a ``ClientPool``:

- each worker is a spawned process that builds the experiment once from its config, with
  ``train.threads // train.workers`` torch threads (at least 1);
- a plan travels with its client's state (``ClientState.checkpoint``); the worker restores it into
  its own copy of the client, answers with ``ClientRuntime.handle`` and sends back the reply and
  the client's new state, which the executor writes into its store, so checkpoints, resume and
  the next round see exactly what an in-process run sees;
- every client's round is seeded by (run, round, client) and runs at the same thread count in
  whichever worker takes it, so results do not depend on which worker answers, how many there
  are or in what order they finish (the executor yields replies in plan order).

Payloads cross the process boundary as safetensors bytes and JSON (``encode``: the checkpoint's
walk over dataclasses, so only atlasfl's dataclasses are rebuilt and no code runs on decoding),
not through torch's shared-memory file descriptors, which run out with many small tensors in
flight. Nothing is written to disk. The workers' CPU time and peak memory are reported
(``usage``) so a run's ``process_seconds`` and memory count them. Each worker holds its own copy
of the model: memory grows by one process per worker. On 2 cores it saved little time for much
more memory (README, "Speed and memory"), so it is off by default; it is meant for hosts with
many cores, where it is not yet measured.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, save

from atlasfl.engine.allocator import peak_rss_mb
from atlasfl.engine.checkpoint import flatten_state, unflatten_state

if TYPE_CHECKING:
    from torch import Tensor

    from atlasfl.config import ExperimentConfig
    from atlasfl.engine.setup import Experiment
    from atlasfl.messages import Plan, Reply

State = tuple[dict[str, "Tensor"], dict[str, Any]]
Payload = tuple[bytes, str]  # safetensors bytes, JSON

_WORKER: dict[str, Experiment] = {}  # the experiment this worker process built


def encode(obj: Any) -> Payload:
    """Any nest of atlasfl dataclasses, dicts, lists, tensors and arrays as bytes and JSON."""
    tensors: dict[str, Tensor] = {}
    meta = flatten_state(obj, tensors, prefix="t")
    return save(tensors), json.dumps(meta)


def decode(payload: Payload) -> Any:
    """Inverse of ``encode`` (tensors on the CPU)."""
    data, meta = payload
    return unflatten_state(json.loads(meta), load(data), torch.device("cpu"))


def _start(config: dict[str, Any]) -> None:
    """Worker initializer: build the experiment its plans belong to.

    The parent already showed the model's loading bar and warnings; each worker would repeat them.
    """
    from transformers.utils import logging as hf_logging

    from atlasfl.config import from_dict
    from atlasfl.engine.setup import build_experiment

    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)
    _WORKER["exp"] = build_experiment(from_dict(config))


def _answer(payload: Payload) -> Payload:
    """Worker side of one plan: restore the client, answer, return reply, new state and usage."""
    cpu = time.process_time()
    plan, round_idx, tensors, meta = decode(payload)
    exp = _WORKER["exp"]
    client = exp.clients[plan.client_id]
    client.restore(tensors, meta)
    reply = exp.runtime.handle(client, plan, round_idx)
    tensors, meta = client.checkpoint()
    usage = {"pid": os.getpid(), "cpu_seconds": time.process_time() - cpu,
             "peak_rss_mb": peak_rss_mb()}
    return encode((reply, tensors, meta, usage))


def worker_config(cfg: ExperimentConfig, workers: int, threads: int) -> dict[str, Any]:
    """The config a worker builds: the experiment's, with one worker's share of the threads.

    A worker keeps one client in memory at a time (the states live in the executor's store).
    """
    return cfg.replace(**{"train.workers": 1, "train.threads": max(1, threads // workers),
                          "federation.resident_clients": 1, "progress": False}).to_dict()


class ClientPool:
    """``workers`` spawned processes answering plans, each with the experiment built once."""

    def __init__(self, cfg: ExperimentConfig, workers: int, threads: int):
        self.workers = workers
        self._pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
            initargs=(worker_config(cfg, workers, threads),))
        self.cpu_seconds = 0.0  # the workers' CPU time spent on plans
        self._peaks: dict[int, float] = {}  # worker pid -> its peak RSS, MiB

    def submit(self, plan: Plan, round_idx: int, state: State) -> Future[Payload]:
        """Queue one plan with its client's state; the future holds the worker's answer."""
        return self._pool.submit(_answer, encode((plan, round_idx, *state)))

    def answer(self, future: Future[Payload]) -> tuple[Reply, State]:
        """The reply and the client's new state (waits for the worker); counts its usage."""
        reply, tensors, meta, usage = decode(future.result())
        self.cpu_seconds += usage["cpu_seconds"]
        self._peaks[usage["pid"]] = max(self._peaks.get(usage["pid"], 0.0),
                                        usage["peak_rss_mb"])
        return reply, (tensors, meta)

    def usage(self) -> dict[str, float]:
        """The workers' CPU seconds on plans and the sum of their peak RSS (MiB), so far."""
        return {"cpu_seconds": self.cpu_seconds, "peak_rss_mb": sum(self._peaks.values())}

    def close(self) -> None:
        """Stop the workers (queued plans are cancelled)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
