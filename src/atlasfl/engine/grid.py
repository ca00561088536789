"""A grid of runs in one folder: ``atlasfl sweep`` and ``compare`` (and ``tune``'s trials).

``expand_grid`` turns ``key=v1,v2,...`` settings into the cartesian product of their values;
``plan_grid`` checks every point before anything runs (its config, names, data and partition,
and what its folder holds); ``run_grid`` then runs every point in its own run folder under one
output folder, one after another here, ``jobs`` at once (``atlasfl.engine.jobs``) or on a Ray
cluster (``atlasfl.engine.raygrid``): a point whose run finished is skipped (its summary is
read), an interrupted one is resumed from its latest checkpoint, a point that never reached a
checkpoint starts over. ``choose_on_validation`` names the setting a sweep would pick, from the
validation metric only (it is never handed a test score), and ``grid_table`` writes one table of
the points: the validation metric and the chosen setting, then the local and global test
metrics, reported and never used to choose.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
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
from atlasfl.config import (
    ExperimentConfig,
    check_same_experiment,
    from_dict,
    layered,
    precision_ran,
)
from atlasfl.engine.checkpoint import latest_checkpoint, load_checkpoint
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import Loaded, build_experiment, preflight, resolve_device
from atlasfl.engine.simulation import StopFlag, run_experiment
from atlasfl.errors import AtlasError
from atlasfl.runfiles import CONFIG_FILE, SUMMARY_FILE

Point = dict[str, Any]  # dotted key -> value


def expand_grid(settings: Sequence[str], flag: str = "--set") -> list[Point]:
    """``["a=1,2", "b=x"]`` -> ``[{a: 1, b: x}, {a: 2, b: x}]``; values parsed as YAML.

    The values are a YAML flow sequence without its brackets, so a value in brackets is one
    value: ``data.tasks=[sst2,mrpc]`` is one point, ``data.tasks=[sst2],[sst2,mrpc]`` two.
    """
    axes: list[tuple[str, list[Any]]] = []
    for item in settings:
        if "=" not in item:
            raise AtlasError(f"{flag} expects key=value[,value...], got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        if any(key == k for k, _ in axes):
            raise AtlasError(f"{flag} names {key!r} twice; give its values once, comma-separated")
        try:
            values = yaml.safe_load(f"[{text}]")
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise AtlasError(f"{flag} {key}: {text!r} is not values separated by commas "
                             f"({problem})") from None
        if not values:
            raise AtlasError(f"{flag} {key}: no value given")
        axes.append((key, values))
    return cartesian(axes)


def cartesian(axes: Sequence[tuple[str, Sequence[Any]]]) -> list[Point]:
    """Every combination of the axes' values, the last axis varying fastest."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, values, strict=True))
            for values in itertools.product(*[v for _, v in axes])]


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


def plan_grid(raw: dict[str, Any], points: Sequence[Point], out: Path, *,
              fixed: Point | None = None) -> list[GridJob]:
    """Check every point before anything runs; read-only (nothing is written or deleted).

    Each point's config (keys, types, ranges), its names (method, tasks, device, model), its
    data files and each task's partition (``atlasfl.engine.setup.preflight``), and what its
    folder holds: a finished run of the same experiment (skipped), a checkpoint of it (resumed),
    nothing, or a run folder that never reached a checkpoint (started over). Any error is one
    ``AtlasError`` naming the point.
    """
    jobs: list[GridJob] = []
    cache: Loaded = {}
    names: dict[str, int] = {}
    for i, point in enumerate(points, start=1):
        name = point_name(point)
        try:
            if name in names:
                raise AtlasError(f"its folder name is that of point {names[name]}; give the "
                                 f"two points keys whose last parts differ")
            names[name] = i
            cfg = from_dict(layered(raw, fixed or {}, point,
                                    {"out": str(out), "run_name": name}))
            preflight(cfg, cache)
            jobs.append(folder_state(i, point, cfg, out / name))
        except AtlasError as exc:
            raise AtlasError(f"point {i} of {len(points)} ({name}): {exc}") from None
    return jobs


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


def run_grid(raw: dict[str, Any], points: Sequence[Point], out: Path, *,
             fixed: Point | None = None, stop: StopFlag | None = None, jobs: int = 1,
             ray: str | None = None, name: str = "sweep"
             ) -> list[tuple[Point, Path, dict[str, Any] | None]]:
    """Run (or skip, or resume) every point; returns (point, run folder, summary or None).

    A point's config is ``raw`` (a config file's dict), its method's ``method_settings``, then
    ``fixed`` (settings of every point), then the point (``atlasfl.config.layered``). Every
    point is checked first (``plan_grid``). ``jobs`` > 1 runs that many points at once, each in
    its own process with its share of the cores (``atlasfl.engine.jobs``); results are those
    of a sequential run at the same torch threads per client. ``ray`` (an address, or "auto")
    runs the points as tasks on a Ray cluster (``atlasfl.engine.raygrid``).
    """
    planned = plan_grid(raw, points, out, fixed=fixed)
    progress = GridProgress(planned, jobs, name)
    for job in planned:
        if job.state == "finished":
            progress.say(job, "finished, skipped")
    summaries = {job.index: job.summary for job in planned}
    todo = [job for job in planned if job.state != "finished"]
    summaries.update(run_jobs(todo, progress, jobs=jobs, ray=ray, stop=stop))
    return [(job.point, job.path, summaries.get(job.index)) for job in planned]


def run_jobs(todo: Sequence[GridJob], progress: GridProgress, *, jobs: int = 1,
             ray: str | None = None, stop: StopFlag | None = None, halt_on_pause: bool = True
             ) -> dict[int, dict[str, Any] | None]:
    """Run checked points here, ``jobs`` at once, or on Ray; point index -> summary or None.

    A point that pauses before its end (``session.max_rounds``) starts no new one here or with
    ``jobs`` unless ``halt_on_pause`` is False (tune's rungs pause every point); on Ray every
    point was submitted at once and a pause stops only itself.
    """
    if not todo:
        return {}
    if ray is not None:
        from atlasfl.engine.raygrid import run_on_ray

        return run_on_ray(list(todo), progress, ray, stop)
    if jobs > 1:
        from atlasfl.engine.jobs import run_parallel

        return run_parallel(list(todo), jobs, progress, stop, halt_on_pause=halt_on_pause)
    summaries: dict[int, dict[str, Any] | None] = {}
    for job in todo:
        summaries[job.index] = run_point(job, progress, stop)
        if stop is not None and stop.requested:
            break
        if summaries[job.index] is None and halt_on_pause:  # the rest waits for the next call
            break
    return summaries


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


def choose_on_validation(values: Sequence[tuple[Point, float | None]]) -> Point | None:
    """The setting with the best mean validation metric over its seeds (first on ties).

    ``values`` are (point, validation metric) pairs; points that differ only in ``seed`` are one
    setting, averaged. A setting with an unfinished or unscored seed is not chosen. This is
    the only place a sweep chooses, and it is given validation scores only.
    """
    settings: dict[str, tuple[Point, list[float | None]]] = {}
    for point, value in values:
        setting = {k: v for k, v in point.items() if k != "seed"}
        settings.setdefault(json.dumps(setting, sort_keys=True, default=str),
                            (setting, []))[1].append(value)
    best: Point | None = None
    best_value = -float("inf")
    for setting, scores in settings.values():
        if scores and all(v is not None for v in scores):
            mean = sum(scores) / len(scores)  # type: ignore[arg-type]
            if mean > best_value:
                best, best_value = setting, mean
    return best


def grid_table(results: Sequence[tuple[Point, Path, dict[str, Any] | None]]
               ) -> tuple[str, str]:
    """(Markdown, CSV) of the points: validation metric and the choice, then the test scores.

    The chosen setting (``choose_on_validation``) is marked on each of its rows; the local and
    global test columns are reported, not used to choose.
    """
    chosen = choose_on_validation(
        [(point, None if summary is None else summary["average"].get("val_metric"))
         for point, _, summary in results])
    keys = list(results[0][0]) if results else []
    header = [*keys, "val metric", "chosen on val", "local test metric (reported)",
              "global test metric (reported)", "global test acc (reported)", "MB up", "MB down",
              "wall s"]
    rows = []
    for point, _, summary in results:
        mark = "yes" if chosen and all(point.get(k) == v for k, v in chosen.items()) else ""
        if summary is None:
            rows.append([*(point[k] for k in keys), "unfinished", "", "", "", "", "", "", ""])
            continue
        avg = summary["average"]
        rows.append([*(point[k] for k in keys), _fmt(avg.get("val_metric")), mark,
                     _fmt(avg.get("local_metric")), _fmt(avg.get("global_metric")),
                     _fmt(avg.get("global_accuracy")),
                     f"{summary['bytes_up'] / 1e6:.2f}", f"{summary['bytes_down'] / 1e6:.2f}",
                     f"{summary['wall_seconds']:.0f}"])
    markdown = "\n".join(["| " + " | ".join(header) + " |",
                          "|" + "---|" * len(header),
                          *("| " + " | ".join(map(str, r)) + " |" for r in rows)])
    if chosen:  # not when the points differ in their seeds only
        markdown += ("\n\nChosen on the validation metric (mean over seeds): "
                     + ", ".join(f"{k}={v}" for k, v in chosen.items())
                     + ". Test columns are reported, not used to choose.")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return markdown, buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
