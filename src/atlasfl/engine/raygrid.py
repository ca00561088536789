"""Points of a grid on a Ray cluster: ``atlasfl sweep|compare|tune --ray [ADDRESS]``.

Start the cluster first (``ray start --head`` on one machine, ``ray start --address=HEAD:6379``
on the others; each needs atlasfl installed and the GLUE files at the same path). Each point is
a Ray task asking for the CPUs it runs on (``train.threads``, 1 when that is 0, auto) and one GPU
when its ``device`` names CUDA; it runs ``atlasfl.engine.jobs.execute_config`` on the node Ray
gives it and writes its run folder under ``--out``, which must be a path every node sees (a
shared file system; on one machine any folder), so the report reads the folders as always.

A node lost mid-run: Ray runs the task again on another node (``MAX_RETRIES``), and the point
resumes from the last checkpoint the lost process wrote (``execute`` reads the folder again),
so its rows are those of an uninterrupted run. A first stop request is posted on a small actor
that every task polls (each stops at its next client boundary, keeping its checkpoint); a
second cancels the tasks.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from atlasfl.engine.jobs import execute_config, job_config
from atlasfl.errors import AtlasError

if TYPE_CHECKING:
    from atlasfl.engine.points import GridJob, GridProgress
    from atlasfl.engine.simulation import StopFlag

MAX_RETRIES = 3  # runs of a task whose node or worker process died
POLL_SECONDS = 1.0


class _Board:
    """The cluster-wide stop request (a Ray actor)."""

    def __init__(self) -> None:
        self.stop = False

    def request(self) -> None:
        self.stop = True

    def requested(self) -> bool:
        return self.stop


def _task(config: dict[str, Any], threads: int, board: Any) -> tuple[str, Any]:
    """One point on a node: ("done", summary or None) or ("error", message)."""
    import ray

    from atlasfl.engine.simulation import StopFlag

    stop = StopFlag()

    def poll() -> None:
        while not stop.requested:
            try:
                stop.requested = bool(ray.get(board.requested.remote()))
            except Exception:  # the driver went away: finish the point
                return
            time.sleep(POLL_SECONDS)

    threading.Thread(target=poll, daemon=True).start()
    try:
        return "done", execute_config(config, threads, stop)
    except AtlasError as exc:
        return "error", str(exc)


def resources(job: GridJob) -> tuple[int, int]:
    """(CPUs, GPUs) a point asks of the cluster."""
    return max(1, job.cfg.train.threads), int(job.cfg.device.startswith("cuda"))


def connect(address: str | None) -> None:
    """Join a running cluster (``auto``: the one ``ray start`` made on this machine)."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address or "auto", log_to_driver=False, configure_logging=False)
    except ConnectionError as exc:
        raise AtlasError(f"--ray {address or 'auto'}: no Ray cluster there ({exc}); start one "
                         f"with ray start --head") from None


def run_on_ray(todo: list[GridJob], progress: GridProgress, address: str | None = None,
               stop: StopFlag | None = None) -> dict[int, dict[str, Any] | None]:
    """Run ``todo`` (checked points) as Ray tasks; point index -> its summary or None.

    Every point is submitted at once and Ray schedules them by their resources, so a point
    that pauses before its end (``session.max_rounds``) stops only itself; one that fails
    lets the others finish and is named in the error raised at the end.
    """
    import ray

    connect(address)
    board: Any = ray.remote(num_cpus=0)(_Board).remote()
    remote = ray.remote(max_retries=MAX_RETRIES)(_task)
    refs: dict[Any, tuple[GridJob, float]] = {}
    progress.running_word = "submitted"
    cpus_each = max((resources(job)[0] for job in todo), default=1)
    progress.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_each)
    for job in todo:
        cpus, gpus = resources(job)
        ref = remote.options(num_cpus=cpus, num_gpus=gpus,
                             name=f"atlasfl {job.label}").remote(job_config(job), cpus, board)
        refs[ref] = (job, time.perf_counter())
        progress.started(job)
    results: dict[int, dict[str, Any] | None] = {}
    failure: str | None = None
    posted = False
    try:
        while refs:
            if stop is not None and stop.requested and not posted:
                ray.get(board.request.remote())
                posted = True
            done, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
            for ref in done:
                job, start = refs.pop(ref)
                try:
                    status, value = ray.get(ref)
                except ray.exceptions.RayError as exc:  # not an input error: name its last line
                    status, value = "error", str(exc).strip().splitlines()[-1]
                if status == "error":
                    progress.running -= 1
                    progress.say(job, f"failed: {value}")
                    failure = failure or f"point {job.index} of {progress.total} " \
                                         f"({job.label}): {value}"
                    continue
                results[job.index] = value
                progress.ended(job, value, time.perf_counter() - start)
    except KeyboardInterrupt:  # a second stop request: cancel what still runs
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    if failure is not None:
        raise AtlasError(failure)
    return results
