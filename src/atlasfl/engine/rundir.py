"""The run folder: resolved config, per-round JSONL, summary JSON. All run writes live here.

File names and reading a finished run are in ``atlasfl.runfiles`` (shared with the report).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config import ExperimentConfig
from atlasfl.errors import AtlasError
from atlasfl.runfiles import CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE


class RunDir:
    """A run's output folder."""

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, cfg: ExperimentConfig, *, overwrite: bool = False) -> RunDir:
        """Create a new folder for ``cfg``; refuse to write into an existing non-empty one.

        ``overwrite`` replaces an existing run folder of that name (one holding ``config.yaml``);
        a folder that is not a run folder is never deleted.
        """
        name = cfg.run_name or (f"{cfg.method}-{cfg.model.name.replace('/', '_')}-seed{cfg.seed}-"
                                f"{time.strftime('%Y%m%d-%H%M%S')}")
        path = Path(cfg.out) / name
        if path.exists() and any(path.iterdir()):
            if cfg.run_name and overwrite:
                if not (path / CONFIG_FILE).is_file():
                    raise AtlasError(f"{path} is not a run folder (no {CONFIG_FILE}); "
                                     f"--overwrite replaces run folders only")
                shutil.rmtree(path)
            elif cfg.run_name:
                raise AtlasError(f"run folder {path} already exists and is not empty; choose "
                                 f"another run_name or out, or pass --overwrite to replace it")
            else:  # a generated name taken within the same second: the next free suffix
                suffix = 2
                while (Path(cfg.out) / f"{name}-{suffix}").exists():
                    suffix += 1
                path = Path(cfg.out) / f"{name}-{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        (path / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return run

    def append_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Append one JSON line per client of a round."""
        with (self.path / ROUNDS_FILE).open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    def rewrite_rounds(self, history: list[list[dict[str, Any]]]) -> None:
        """Replace the round rows with ``history`` (on resume: rounds after the checkpoint go)."""
        tmp = self.path / (ROUNDS_FILE + ".tmp")
        with tmp.open("w") as fh:
            for round_rows in history:
                for row in round_rows:
                    fh.write(json.dumps(row) + "\n")
        tmp.replace(self.path / ROUNDS_FILE)

    def write_json(self, name: str, obj: Any) -> None:
        """Write a JSON file into the run folder (atomically)."""
        tmp = self.path / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2))
        tmp.replace(self.path / name)

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the run's summary (atomically: a reader never sees half a file)."""
        self.write_json(SUMMARY_FILE, summary)

