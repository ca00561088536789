"""What a run folder holds, by name, and how to read it: shared by the engine and the report.

This module imports nothing of the training code (no torch), so ``atlasfl.report`` can read runs
without the engine: ``config.yaml`` (the resolved config), ``rounds.jsonl`` (one row per round and
client), ``summary.json`` (written when the run completes), ``clients.json`` (Phase 2's per-client
configuration), ``clusters.json`` (Phase 1's latest clustering), ``graph.json`` (Phase 4's
client graph) and ``checkpoints/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from atlasfl.errors import AtlasError

CONFIG_FILE, ROUNDS_FILE, SUMMARY_FILE = "config.yaml", "rounds.jsonl", "summary.json"
CLIENTS_FILE = "clients.json"  # per-client configuration: device, memory, ranks (Phase 2)
CLUSTERS_FILE = "clusters.json"  # the latest clustering: fingerprints, labels, k (Phase 1)
GRAPH_FILE = "graph.json"  # the client graph of the Laplacian step (Phase 4)


def read_run(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Read (config, round rows, summary) of a finished run folder."""
    path = Path(path)
    if not (path / SUMMARY_FILE).is_file():
        raise AtlasError(f"{path} is not a finished run folder (no {SUMMARY_FILE})")
    config = yaml.safe_load((path / CONFIG_FILE).read_text())
    rows = [json.loads(line) for line in (path / ROUNDS_FILE).read_text().splitlines() if line]
    return config, rows, json.loads((path / SUMMARY_FILE).read_text())
