"""A grid of runs in one folder: ``atlasfl sweep``.

``expand_grid`` turns ``key=v1,v2,...`` settings into the cartesian product of their values;
``run_grid`` runs every point in its own run folder under one output folder, sequentially: a
point whose run finished is skipped (its summary is read), an interrupted one is resumed from its
latest checkpoint, a point that never reached a checkpoint starts over. ``choose_on_validation``
names the setting a sweep would pick, from the validation metric only (it is never handed a test
score), and ``grid_table`` writes one table of the points: the validation metric and the chosen
setting, then the local and global test metrics, reported and never used to choose.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import sys
from collections.abc import Sequence
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
from atlasfl.engine.setup import build_experiment, resolve_device
from atlasfl.engine.simulation import StopFlag, run_experiment
from atlasfl.errors import AtlasError
from atlasfl.runfiles import CONFIG_FILE, SUMMARY_FILE

Point = dict[str, Any]  # dotted key -> value


def expand_grid(settings: Sequence[str]) -> list[Point]:
    """``["a=1,2", "b=x"]`` -> ``[{a: 1, b: x}, {a: 2, b: x}]``; values parsed as YAML.

    A value in brackets (``data.tasks=[sst2,mrpc]``) is one value, not a list of points.
    """
    axes: list[tuple[str, list[Any]]] = []
    for item in settings:
        if "=" not in item:
            raise AtlasError(f"--set expects key=value[,value...], got {item!r}")
        key, text = (part.strip() for part in item.split("=", 1))
        texts = [text] if text.startswith(("[", "{")) else text.split(",")
        if any(key == k for k, _ in axes):
            raise AtlasError(f"--set names {key!r} twice; give its values once, comma-separated")
        axes.append((key, [yaml.safe_load(t) for t in texts]))
    return [dict(zip([k for k, _ in axes], values, strict=True))
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


def run_grid(raw: dict[str, Any], points: Sequence[Point], out: Path, *,
             fixed: Point | None = None, stop: StopFlag | None = None
             ) -> list[tuple[Point, Path, dict[str, Any] | None]]:
    """Run (or skip, or resume) every point; returns (point, run folder, summary or None).

    A point's config is ``raw`` (a config file's dict), its method's ``method_settings``, then
    ``fixed`` (settings of every point), then the point (``atlasfl.config.layered``).
    """
    results: list[tuple[Point, Path, dict[str, Any] | None]] = []
    configs = []
    for point in points:  # every point's config is checked before anything runs
        configs.append(from_dict(layered(raw, fixed or {}, point,
                                         {"out": str(out), "run_name": point_name(point)})))
    for i, (point, cfg) in enumerate(zip(points, configs, strict=True), start=1):
        path = out / point_name(point)
        label = f"[{i}/{len(points)}] {point_name(point)}"
        if (path / SUMMARY_FILE).is_file():
            saved = yaml.safe_load((path / CONFIG_FILE).read_text())
            summary = json.loads((path / SUMMARY_FILE).read_text())
            try:  # a finished run of another config is not this point's result
                check_same_experiment(saved, cfg)
                _check_same_precision(saved, summary, cfg)
            except AtlasError as exc:
                raise AtlasError(f"{path} holds a finished run of another experiment: "
                                 f"{exc}; use another --out") from None
            print(f"atlasfl sweep: {label}: finished, skipped", file=sys.stderr)
            results.append((point, path, summary))
            continue
        snapshot = load_checkpoint(path) if latest_checkpoint(path) is not None else None
        if snapshot is not None:
            check_same_experiment(snapshot.config, cfg)
            print(f"atlasfl sweep: {label}: resuming after round {snapshot.round_idx}",
                  file=sys.stderr)
            run_dir = RunDir(path)
        else:
            if path.exists():  # started but never checkpointed: start over
                if not (path / CONFIG_FILE).is_file():
                    raise AtlasError(f"{path} exists and is not a run folder; use another --out")
                shutil.rmtree(path)
            print(f"atlasfl sweep: {label}: running", file=sys.stderr)
            run_dir = RunDir.create(cfg)
        outcome = run_experiment(build_experiment(cfg), run_dir, resume=snapshot, stop=stop)
        results.append((point, path, outcome.summary))
        if outcome.summary is None:  # stopped: the rest waits for the next call
            break
    return results


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
        mark = "yes" if chosen is not None and all(point.get(k) == v for k, v in chosen.items()
                                                   ) else ""
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
    if chosen is not None:
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
