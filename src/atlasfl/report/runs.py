"""Run folders as the report sees them: finished, unfinished or failed, with what they wrote.

A folder given to the report is a run folder (it holds ``config.yaml``) or a folder of run
folders (a ``compare`` or ``sweep`` output, searched one and two levels down). A run is
``finished`` when it wrote ``summary.json``; ``unfinished`` when it has rounds or checkpoints
but no summary (stopped, or still running); ``failed`` when its files cannot be read. Only
finished runs enter statistics; the others are listed by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atlasfl.errors import AtlasError
from atlasfl.runfiles import CLIENTS_FILE, CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE

EXTRA_FILES = ("graph.json", "clusters.json", CLIENTS_FILE)  # written by later phases


@dataclass(frozen=True)
class RunRecord:
    """One run folder: its status, config, round rows, summary and the phase files it has."""

    path: Path
    status: str  # finished | unfinished | failed
    config: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)  # graph.json, clusters.json, clients.json
    problem: str = ""  # why a run is failed

    @property
    def method(self) -> str:
        """The method's name (from the config)."""
        return str(self.config.get("method", "?"))

    @property
    def seed(self) -> int:
        """The run's seed (from the config)."""
        return int(self.config.get("seed", 0))


def upgrade_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary written before local test splits (issue 30) in today's keys.

    Its ``metric``/``accuracy`` were on the shared test rows (today's ``global_*``) and its
    majority class is the ``majority`` reference; it has no local scores. Its "own label mix"
    scores (the shared rows reweighted) are dropped: they are not a local test.
    """
    if "references" in summary:
        return summary
    renamed = {"metric": "global_metric", "accuracy": "global_accuracy"}

    def upgrade(row: dict[str, Any]) -> dict[str, Any]:
        return {renamed.get(k, k): v for k, v in row.items()
                if not k.startswith(("own_", "majority_"))}

    majority = {"tasks": {t: {renamed[k.removeprefix("majority_")]: v for k, v in entry.items()
                              if k.startswith("majority_")}
                          for t, entry in summary["tasks"].items()},
                "average": {renamed[k.removeprefix("majority_")]: v
                            for k, v in summary["average"].items() if k.startswith("majority_")}}
    return {**summary, "tasks": {t: upgrade(e) for t, e in summary["tasks"].items()},
            "average": upgrade(summary["average"]),
            "clients": [upgrade(c) for c in summary.get("clients", [])],
            "references": {"majority": majority}}


def read_record(path: Path) -> RunRecord:
    """Read one run folder; a file that cannot be read makes it ``failed``, named."""
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        rounds_text = (path / ROUNDS_FILE).read_text() if (path / ROUNDS_FILE).is_file() else ""
        rounds = [json.loads(line) for line in rounds_text.splitlines() if line]
        summary = (upgrade_summary(json.loads((path / SUMMARY_FILE).read_text()))
                   if (path / SUMMARY_FILE).is_file() else None)
        files = {name: json.loads((path / name).read_text())
                 for name in EXTRA_FILES if (path / name).is_file()}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        return RunRecord(path, "failed", problem=f"{type(exc).__name__}: {exc}")
    return RunRecord(path, "finished" if summary is not None else "unfinished", config, rounds,
                     summary, files)


def find_runs(paths: Iterable[str | Path]) -> list[RunRecord]:
    """Every run folder in ``paths`` (run folders, or folders of them), sorted by path."""
    found: dict[Path, RunRecord] = {}
    for given in map(Path, paths):
        if not given.is_dir():
            raise AtlasError(f"{given}: no such folder")
        if (given / CONFIG_FILE).is_file():
            candidates = [given]
        else:
            candidates = sorted({p.parent for p in [*given.glob(f"*/{CONFIG_FILE}"),
                                                   *given.glob(f"*/*/{CONFIG_FILE}")]})
        if not candidates:
            raise AtlasError(f"{given} holds no run folder (no {CONFIG_FILE} one or two "
                             f"levels down)")
        for path in candidates:
            found[path] = read_record(path)
    return [found[p] for p in sorted(found)]
