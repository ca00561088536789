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
import io
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import (
    from_dict,
    layered,
)
from atlasfl.engine.points import (
    GridJob,
    GridProgress,
    Point,
    folder_state,
    point_name,
    run_point,
)
from atlasfl.engine.setup import Loaded, preflight
from atlasfl.engine.simulation import StopFlag
from atlasfl.errors import AtlasError

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


def run_grid(raw: dict[str, Any], points: Sequence[Point], out: Path, *,
             fixed: Point | None = None, stop: StopFlag | None = None, jobs: int = 1,
             ray: str | None = None, gather: bool = False, name: str = "sweep"
             ) -> list[tuple[Point, Path, dict[str, Any] | None]]:
    """Run (or skip, or resume) every point; returns (point, run folder, summary or None).

    A point's config is ``raw`` (a config file's dict), its method's ``method_settings``, then
    ``fixed`` (settings of every point), then the point (``atlasfl.config.layered``). Every
    point is checked first (``plan_grid``). ``jobs`` > 1 runs that many points at once, each in
    its own process with its share of the cores (``atlasfl.engine.jobs``); results are those
    of a sequential run at the same torch threads per client. ``ray`` (an address, or "auto")
    runs the points as tasks on a Ray cluster (``atlasfl.engine.raygrid``); ``gather``: its
    nodes share no file system, so the run folders are copied to ``out`` here.
    """
    planned = plan_grid(raw, points, out, fixed=fixed)
    progress = GridProgress(planned, jobs, name)
    for job in planned:
        if job.state == "finished":
            progress.say(job, "finished, skipped")
    summaries = {job.index: job.summary for job in planned}
    todo = [job for job in planned if job.state != "finished"]
    summaries.update(run_jobs(todo, progress, jobs=jobs, ray=ray, gather=gather, stop=stop))
    return [(job.point, job.path, summaries.get(job.index)) for job in planned]


def run_jobs(todo: Sequence[GridJob], progress: GridProgress, *, jobs: int = 1,
             ray: str | None = None, gather: bool = False, stop: StopFlag | None = None,
             halt_on_pause: bool = True) -> dict[int, dict[str, Any] | None]:
    """Run checked points here, ``jobs`` at once, or on Ray; point index -> summary or None.

    A point that pauses before its end (``session.max_rounds``) starts no new one here or with
    ``jobs`` unless ``halt_on_pause`` is False (tune's rungs pause every point); on Ray every
    point was submitted at once and a pause stops only itself.
    """
    if not todo:
        return {}
    if ray is not None:
        from atlasfl.engine.raygrid import run_on_ray

        return run_on_ray(list(todo), progress, ray, stop, gather=gather)
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
