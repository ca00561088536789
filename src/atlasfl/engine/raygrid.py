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

Nodes without a shared file system (``--gather``): ``--out`` lives on the driver's machine only,
behind a ``_Store`` actor placed on the driver's node. A task copies its point's folder from the
store into a node-local scratch folder (``$ATLASFL_SCRATCH``, default the temp folder) and runs
there. Each complete checkpoint is copied back as soon as it is renamed into place (whole, or not
at all), and the finished or stopped folder replaces the store's copy at the end. A task retried
on another node therefore resumes from the last checkpoint that reached the driver. The folder
that arrives is the one the node wrote, except that ``config.yaml`` names the driver's ``--out``
(``out`` is a resumable key, so checkpoints naming the scratch folder resume anywhere).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from atlasfl.engine.checkpoint import CHECKPOINTS, MANIFEST
from atlasfl.engine.jobs import execute_config, job_config
from atlasfl.errors import AtlasError
from atlasfl.runfiles import CONFIG_FILE

if TYPE_CHECKING:
    from atlasfl.engine.points import GridJob, GridProgress
    from atlasfl.engine.simulation import StopFlag

MAX_RETRIES = 3  # runs of a task whose node or worker process died
POLL_SECONDS = 1.0
SYNC_SECONDS = 0.5  # how often a gathering task looks for a new checkpoint to copy back
SCRATCH_ENV = "ATLASFL_SCRATCH"  # a node's folder for the runs it holds while gathering


class _Board:
    """The cluster-wide stop request (a Ray actor)."""

    def __init__(self) -> None:
        self.stop = False

    def request(self) -> None:
        self.stop = True

    def requested(self) -> bool:
        return self.stop


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes), without unfinished ``.tmp`` ones."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".tmp") or part.endswith(".tmp")
                                       for part in p.relative_to(root).parts)}


def _write(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


class _Store:
    """The driver's ``--out`` for nodes that share no file system (a Ray actor on its node).

    Paths are the run folders' paths on the driver's machine.
    """

    def pull(self, path: str) -> dict[str, bytes]:
        """The run folder as the driver holds it (empty when there is none)."""
        return _files(Path(path))

    def put_checkpoint(self, path: str, name: str, files: dict[str, bytes], keep: int,
                       config: bytes) -> None:
        """One complete checkpoint, renamed into place whole, and the run's ``config.yaml``.

        Only the latest ``keep`` checkpoints stay. Without the config a resumed run's folder
        would not be a run folder.
        """
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_FILE).write_bytes(config)
        root = Path(path) / CHECKPOINTS
        tmp = root / f".tmp-{name}-gathered"
        shutil.rmtree(tmp, ignore_errors=True)
        _write(tmp, files)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def put_folder(self, path: str, files: dict[str, bytes]) -> None:
        """Replace the run folder with ``files`` (a finished or stopped run)."""
        final = Path(path)
        tmp, old = final.with_name(f".{final.name}.gathered"), final.with_name(f".{final.name}.old")
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        _write(tmp, files)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)


def _config_for_driver(config: bytes, out: str) -> bytes:
    """A run's ``config.yaml`` naming the driver's ``--out``, as a run there would."""
    saved = yaml.safe_load(config)
    saved["out"] = out
    return yaml.safe_dump(saved, sort_keys=False).encode()


def _copy_checkpoints_back(local: Path, head: str, out: str, store: Any, keep: int,
                           done: threading.Event) -> None:
    """Copy each new complete checkpoint of ``local`` to the store until ``done`` is set."""
    import ray

    sent: set[str] = set()
    while True:
        finished = done.is_set()  # one last look after the run ended
        for ckpt in sorted((local / CHECKPOINTS).glob("round-*")):
            if ckpt.name in sent or not (ckpt / MANIFEST).is_file():
                continue
            try:
                files = _files(ckpt)
                config = _config_for_driver((local / CONFIG_FILE).read_bytes(), out)
            except FileNotFoundError:  # a newer one replaced it while it was read
                continue
            ray.get(store.put_checkpoint.remote(head, ckpt.name, files, keep, config))
            sent.add(ckpt.name)
        if finished:
            return
        done.wait(SYNC_SECONDS)


def _run_gathered(config: dict[str, Any], threads: int, stop: StopFlag, store: Any
                  ) -> dict[str, Any] | None:
    """Run a point in a scratch folder of this node, copying it to the driver's store."""
    import ray

    head = config["path"]
    root = os.environ.get(SCRATCH_ENV) or None
    if root is not None and not Path(root).is_dir():
        raise AtlasError(f"${SCRATCH_ENV} = {root!r} on node {ray.util.get_node_ip_address()} is "
                         f"not a folder; create it or unset it (then the temp folder is used)")
    scratch = Path(tempfile.mkdtemp(prefix="atlasfl-", dir=root))
    try:
        local = scratch / Path(head).name
        _write(local, ray.get(store.pull.remote(head)))  # resume where the driver's copy is
        here = {**config, "path": str(local), "cfg": {**config["cfg"], "out": str(scratch)}}
        done = threading.Event()
        keep = int(config["cfg"]["session"]["keep_checkpoints"])
        out = config["cfg"]["out"]
        copier = threading.Thread(target=_copy_checkpoints_back,
                                  args=(local, head, out, store, keep, done))
        copier.start()
        try:
            summary = execute_config(here, threads, stop)
        finally:
            done.set()
            copier.join()
        files = _files(local)
        if CONFIG_FILE in files:
            files[CONFIG_FILE] = _config_for_driver(files[CONFIG_FILE], out)
        ray.get(store.put_folder.remote(head, files))
        return summary
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _task(config: dict[str, Any], threads: int, board: Any, store: Any = None
          ) -> tuple[str, Any]:
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
        if store is not None:
            return "done", _run_gathered(config, threads, stop, store)
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
               stop: StopFlag | None = None, *, gather: bool = False
               ) -> dict[int, dict[str, Any] | None]:
    """Run ``todo`` (checked points) as Ray tasks; point index -> its summary or None.

    Every point is submitted at once and Ray schedules them by their resources, so a point
    that pauses before its end (``session.max_rounds``) stops only itself; one that fails
    lets the others finish and is named in the error raised at the end. ``gather``: the nodes
    share no file system with this machine; run folders are copied here (module docstring).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    connect(address)
    board: Any = ray.remote(num_cpus=0)(_Board).remote()
    store: Any = None
    if gather:  # on this machine's node, which holds --out
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        store = ray.remote(num_cpus=0)(_Store).options(scheduling_strategy=here).remote()
    remote = ray.remote(max_retries=MAX_RETRIES)(_task)
    refs: dict[Any, tuple[GridJob, float]] = {}
    progress.running_word = "submitted"
    cpus_each = max((resources(job)[0] for job in todo), default=1)
    progress.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus_each)
    for job in todo:
        cpus, gpus = resources(job)
        ref = remote.options(num_cpus=cpus, num_gpus=gpus,
                             name=f"atlasfl {job.label}").remote(job_config(job), cpus, board,
                                                                 store)
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
