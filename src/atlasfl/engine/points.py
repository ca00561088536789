"""One point of a grid: its folder as it stands, running it here, and the grid's progress lines.

Shared by the grid (``atlasfl.engine.grid``), its worker processes (``atlasfl.engine.jobs``) and
its Ray tasks (``atlasfl.engine.raygrid``), which import this module and never the grid's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from atlasfl.client.training import resolve_precision
from atlasfl.config import ExperimentConfig, check_same_experiment, precision_ran
from atlasfl.engine.checkpoint import latest_checkpoint, load_checkpoint
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import build_experiment, resolve_device
from atlasfl.engine.simulation import StopFlag, run_experiment
from atlasfl.errors import AtlasError
from atlasfl.runfiles import CONFIG_FILE, SUMMARY_FILE

Point = dict[str, Any]  # dotted key -> value


def point_name(point: Point) -> str:
    """The run folder name of a grid point: ``lam=0.1_eta=0.3`` (last part of each key)."""

    def text(value: Any) -> str:
        return "+".join(map(str, value)) if isinstance(value, list) else str(value)

    name = "_".join(f"{key.rsplit('.', 1)[-1]}={text(value)}" for key, value in point.items())
    return "".join(ch if ch.isalnum() or ch in "=._-+" else "-" for ch in name) or "default"


def _check_same_precision(saved: dict[str, Any], summary: dict[str, Any],
                          cfg: ExperimentConfig) -> None:
    """Refuse a finished run that trained in another precision than ``cfg`` resolves to here.

    ``check_same_experiment`` lets ``auto`` match fp32 and bf16 (resume compares what it
    resolved to with the checkpoint's); a finished run is compared here, from its summary.
    """
    ran = precision_ran(saved.get("train", {}).get("precision", "auto"),
                        str(summary.get("device", "cpu")), summary.get("precision"))
    wanted = resolve_precision(cfg.train.precision, resolve_device(cfg.device))
    if ran != wanted:
        raise AtlasError(f"train.precision: the run trained in {ran!r}, this point resolves "
                         f"to {wanted!r}")


@dataclass
class GridJob:
    """One point of a grid, checked: its config, its run folder and what is there."""

    index: int  # 1-based, in the grid's order
    point: Point
    cfg: ExperimentConfig
    path: Path
    state: str  # "finished" (skipped), "resume" (from its latest checkpoint) or "new"
    summary: dict[str, Any] | None = None  # a finished run's
    resume_round: int = 0  # the round its latest checkpoint ended (state "resume")
    until: int = 0  # stop after this round, to resume later (0: the run's end; tune's rungs)

    @property
    def label(self) -> str:
        """Its run folder's name."""
        return point_name(self.point)


def folder_state(index: int, point: Point, cfg: ExperimentConfig, path: Path) -> GridJob:
    """The point's job as its folder stands: finished, to resume, or new (errors name why)."""
    if (path / SUMMARY_FILE).is_file():
        saved = yaml.safe_load((path / CONFIG_FILE).read_text())
        summary = json.loads((path / SUMMARY_FILE).read_text())
        try:  # a finished run of another config is not this point's result
            check_same_experiment(saved, cfg)
            _check_same_precision(saved, summary, cfg)
        except AtlasError as exc:
            raise AtlasError(f"{path} holds a finished run of another experiment: {exc}; use "
                             f"another --out") from None
        return GridJob(index, point, cfg, path, "finished", summary)
    if latest_checkpoint(path) is not None:
        snapshot = load_checkpoint(path)
        check_same_experiment(snapshot.config, cfg)
        return GridJob(index, point, cfg, path, "resume", resume_round=snapshot.round_idx)
    if path.exists() and not (path / CONFIG_FILE).is_file():
        raise AtlasError(f"{path} exists and is not a run folder; use another --out")
    return GridJob(index, point, cfg, path, "new")


class GridProgress:
    """One line per point as it starts or ends: done, running and left, and the time left.

    The estimate is the mean wall time of the points finished in this call times the points
    still to finish, divided by how many run at once.
    """

    def __init__(self, jobs: Sequence[GridJob], parallel: int = 1, name: str = "sweep",
                 paused: str = "resumes on the next call") -> None:
        self.total = len(jobs)
        self.parallel = parallel
        self.name = name
        self.paused = paused  # what a point that stopped before its end waits for
        self.done = sum(job.state == "finished" for job in jobs)
        self.running = 0
        self.running_word = "running"  # "submitted" on Ray, which queues what it cannot start
        self.stopped = 0  # points that stopped before their end in this call
        self.durations: list[float] = []

    def _counts(self) -> str:
        left = self.total - self.done - self.running - self.stopped
        stopped = f"stopped {self.stopped}, " if self.stopped else ""
        text = f"done {self.done}, {self.running_word} {self.running}, {stopped}left {left}"
        if self.durations and self.done < self.total:
            to_go = (self.total - self.done) * (sum(self.durations) / len(self.durations))
            at_once = max(1, min(self.parallel, self.total - self.done))
            text += f"; about {_minutes(to_go / at_once)} left"
        return text

    def say(self, job: GridJob, what: str) -> None:
        """Print ``what`` happened to ``job`` with the grid's counts."""
        print(f"atlasfl {self.name}: [{job.index}/{self.total}] {job.label}: {what} "
              f"({self._counts()})", file=sys.stderr)

    def started(self, job: GridJob) -> None:
        """``job`` starts (or resumes; on Ray, is submitted)."""
        self.running += 1
        what = "running" if job.state == "new" else f"resuming after round {job.resume_round}"
        self.say(job, what if self.running_word == "running" else f"submitted ({what})")

    def ended(self, job: GridJob, summary: dict[str, Any] | None, seconds: float) -> None:
        """``job`` finished (``summary``) or stopped early (None) after ``seconds``."""
        self.running -= 1
        if summary is None:
            self.stopped += 1
            self.say(job, f"stopped after {_minutes(seconds)}; {self.paused}")
            return
        self.done += 1
        self.durations.append(seconds)
        val = summary["average"].get("val_metric")
        self.say(job, f"finished in {_minutes(seconds)}"
                 + ("" if val is None else f", val metric {val:.4f}"))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def execute(job: GridJob, stop: StopFlag | None = None) -> dict[str, Any] | None:
    """Run one point in this process from where its folder stands now; its summary or None.

    None when it stopped before its end (``job.until``, ``session.max_rounds``, a stop request).
    The folder is read again here, not trusted from the plan: a point retried after its
    process died (a Ray node lost) resumes from the checkpoint that process left. A folder
    that never reached a checkpoint is started over.
    """
    now = dataclasses.replace(folder_state(job.index, job.point, job.cfg, job.path),
                              until=job.until)
    if now.state == "finished":
        return now.summary
    if now.state == "resume":
        snapshot, run_dir = load_checkpoint(now.path), RunDir(now.path)
    else:
        if now.path.exists():
            shutil.rmtree(now.path)
        snapshot, run_dir = None, RunDir.create(now.cfg)
    cfg = now.cfg
    if now.until:
        if now.until <= now.resume_round:
            return None
        cfg = cfg.replace(**{"session.max_rounds": now.until - now.resume_round})
    return run_experiment(build_experiment(cfg), run_dir, resume=snapshot, stop=stop).summary


def run_point(job: GridJob, progress: GridProgress, stop: StopFlag | None
              ) -> dict[str, Any] | None:
    """Run one point in this process, with its progress lines."""
    start = time.perf_counter()
    progress.started(job)
    summary = execute(job, stop)
    progress.ended(job, summary, time.perf_counter() - start)
    return summary

