"""Points of a grid side by side: ``atlasfl sweep|compare|tune --jobs N`` on one machine.

Each point runs in its own spawned process with ``cores // N`` torch threads (at least 1, set
through ``OMP_NUM_THREADS``, which ``train.threads = 0`` and ``train.workers = 0`` read), so N
points share the cores without oversubscribing them. A point's results do not depend on where
it ran: every client's round is seeded by (run, round, client), and a run at one torch thread
per client gives the rows of a sequential run at one thread (``tests/engine/test_grid_jobs.py``).

The parent only schedules: it starts a point when a slot is free, reads a finished point's
summary from its run folder, and prints one line per start and end (``GridProgress``). A
first stop request (SIGINT/SIGTERM to the parent) is passed to every running point, which stops
at its next client boundary and keeps its last checkpoint, and no new point starts; a second
one terminates them. A point that fails keeps the others running to their end, starts no new
one, and its error is raised naming it, as a sequential grid would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from atlasfl.engine.host import usable_cores
from atlasfl.errors import AtlasError
from atlasfl.runfiles import SUMMARY_FILE

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import SimpleQueue
    from multiprocessing.synchronize import Event

    from atlasfl.engine.points import GridJob, GridProgress
    from atlasfl.engine.simulation import StopFlag

STOPPED = 3  # a worker's exit code when its run stopped before its last round


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """The torch threads each of ``jobs`` points gets: an equal share of the cores, at least 1."""
    return max(1, (usable_cores() if cores is None else cores) // jobs)


def _work(config: dict[str, Any], threads: int, stop_event: Event,
          errors: SimpleQueue) -> None:
    """A worker process: run one point, exit 0 (finished), ``STOPPED`` or 2 (an input error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from atlasfl.engine.simulation import StopFlag

    stop = StopFlag()

    def relay() -> None:
        stop_event.wait()
        stop.requested = True

    threading.Thread(target=relay, daemon=True).start()
    try:
        summary = execute_config(config, threads, stop)
    except AtlasError as exc:
        errors.put(str(exc))
        raise SystemExit(2) from None
    except BaseException:
        errors.put(traceback.format_exc().strip().splitlines()[-1])
        raise
    raise SystemExit(0 if summary is not None else STOPPED)


def job_config(job: GridJob) -> dict[str, Any]:
    """A checked point as plain data for another process (progress bars off there)."""
    return {"index": job.index, "point": job.point,
            "cfg": {**job.cfg.to_dict(), "progress": False}, "path": str(job.path),
            "state": job.state, "resume_round": job.resume_round, "until": job.until}


def execute_config(config: dict[str, Any], threads: int, stop: StopFlag | None = None
                   ) -> dict[str, Any] | None:
    """``atlasfl.engine.grid.execute`` of a ``job_config`` in a fresh process.

    It runs with ``threads`` torch threads and the libraries' notices off.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from atlasfl.config import from_dict
    from atlasfl.engine.points import GridJob, execute

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    job = GridJob(**{**config, "cfg": from_dict(config["cfg"]), "path": Path(config["path"])})
    return execute(job, stop)


def run_parallel(todo: list[GridJob], jobs: int, progress: GridProgress,
                 stop: StopFlag | None = None, *, halt_on_pause: bool = True
                 ) -> dict[int, dict[str, Any] | None]:
    """Run ``todo`` (checked points) ``jobs`` at a time; point index -> its summary or None.

    Progress bars are off in the workers (one bar per point would interleave); the parent's
    lines say what each point did. A point that pauses before its end (``session.max_rounds``)
    starts no new one unless ``halt_on_pause`` is False (``atlasfl tune``, whose rungs pause
    every point).
    """
    ctx = multiprocessing.get_context("spawn")
    stop_event, threads = ctx.Event(), threads_per_job(jobs)
    pending = list(todo)
    running: dict[int, tuple[BaseProcess, GridJob, SimpleQueue, float]] = {}
    results: dict[int, dict[str, Any] | None] = {}
    failure: str | None = None
    halted = False  # a point stopped early (session.max_rounds): start no new one
    try:
        while pending or running:
            while pending and len(running) < jobs and failure is None and not halted \
                    and not (stop is not None and stop.requested):
                job = pending.pop(0)
                errors = ctx.SimpleQueue()
                worker = ctx.Process(target=_work,
                                     args=(job_config(job), threads, stop_event, errors),
                                     name=f"atlasfl-{job.label}")
                worker.start()
                running[job.index] = (worker, job, errors, time.perf_counter())
                progress.started(job)
            if not running:
                break
            if stop is not None and stop.requested:
                stop_event.set()
            wait([entry[0].sentinel for entry in running.values()], timeout=0.5)
            for index, (process, job, errors, start) in list(running.items()):
                if process.is_alive():
                    continue
                process.join()
                del running[index]
                summary_file = job.path / SUMMARY_FILE
                code = process.exitcode
                summary = json.loads(summary_file.read_text()) \
                    if code == 0 and summary_file.is_file() else None
                results[index] = summary
                if code in (0, STOPPED):
                    progress.ended(job, summary, time.perf_counter() - start)
                    halted = halted or (summary is None and halt_on_pause)
                    continue
                progress.running -= 1
                why = errors.get() if not errors.empty() else f"its process exited with {code}"
                progress.say(job, f"failed: {why}")
                failure = failure or f"point {job.index} of {progress.total} ({job.label}): {why}"
    except KeyboardInterrupt:  # a second stop request: end every running point now
        for process, *_ in running.values():
            process.terminate()
        for process, *_ in running.values():
            process.join()
        raise
    if failure is not None:
        raise AtlasError(failure)
    return results
