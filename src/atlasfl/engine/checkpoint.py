"""Checkpoints: everything that crosses rounds, saved atomically and verified on load.

A checkpoint is one folder ``<run>/checkpoints/round-NNNNNN/`` holding ``state.safetensors``
(every tensor: clients' adapters, heads and optimizer moments, server state, RNG state; a
client spilled to disk by ``federation.resident_clients`` is copied file to file instead, as
``client-<id>.safetensors``, so saving never holds every client in memory at once),
``state.json`` (round, resolved config, history, server and optimizer metadata) and
``manifest.json`` (SHA-256 of every file). It is written under a temporary name, fsynced and
renamed, so a crash while saving never leaves a folder that looks complete. No pickle anywhere:
tensors go through safetensors and the rest through JSON; server-state dataclasses are rebuilt
only from classes inside the ``atlasfl`` package.

``capture`` and ``restore`` are the one place that knows what state exists: a client's state is
``ClientState.checkpoint``, a strategy's is its server-state dataclass, walked generically, so a
new phase that keeps its state in its server dataclass cannot forget to save it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from atlasfl.config import complete_saved
from atlasfl.errors import AtlasError

CHECKPOINTS = "checkpoints"
TENSORS, META, MANIFEST = "state.safetensors", "state.json", "manifest.json"
# 3: what each client holds is one store (``strategies.holdings``); 2: the server state is one
# ``strategies.state.ServerState`` for every method; 1: a dataclass per strategy class
FORMAT = 3


@dataclass
class Snapshot:
    """A run's complete state after ``round_idx`` rounds, as plain tensors and JSON."""

    round_idx: int
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    meta: dict[str, Any]  # history, server-state skeleton, client optimizer metadata, timings
    # prefix -> a safetensors file whose tensors belong under it (a spilled client's state),
    # copied into the checkpoint without loading; ``load_checkpoint`` merges them into tensors
    files: dict[str, Path] = field(default_factory=dict)


# -- generic (un)flattening of server-state dataclasses -------------------------------------

def flatten_state(obj: Any, tensors: dict[str, Tensor], prefix: str = "server",
                  seen: set[int] | None = None) -> Any:
    """Replace every tensor in a nested dataclass/dict/list by a reference; collect tensors.

    A tensor whose memory another collected tensor already uses (one aggregate held in two
    places of the state) is stored as a copy: safetensors refuses shared memory. A numpy array
    is stored as a tensor and comes back as an array.
    """
    if seen is None:
        seen = {t.untyped_storage().data_ptr() for t in tensors.values()}
    if isinstance(obj, np.ndarray):
        ref = flatten_state(torch.from_numpy(obj.copy()), tensors, prefix, seen)
        return {"__ndarray__": ref["__tensor__"]}
    if isinstance(obj, Tensor):
        key = f"{prefix}/{len(tensors)}"
        tensor = obj.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
            ptr = tensor.untyped_storage().data_ptr()
        seen.add(ptr)
        tensors[key] = tensor
        return {"__tensor__": key}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        cls = type(obj)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: flatten_state(getattr(obj, f.name), tensors, prefix, seen)
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"server state dict keys must be str, got {list(obj)[:3]}")
        return {"__dict__": {k: flatten_state(v, tensors, prefix, seen) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__":
                [flatten_state(v, tensors, prefix, seen) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint server state of type {type(obj).__name__}")


def unflatten_state(obj: Any, tensors: dict[str, Tensor], device: torch.device) -> Any:
    """Inverse of ``flatten_state``; only dataclasses defined inside atlasfl are rebuilt."""
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]].to(device)
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy()
    if "__dataclass__" in obj:
        module, _, name = obj["__dataclass__"].partition(":")
        if not module.startswith("atlasfl."):
            raise AtlasError(f"checkpoint names class {obj['__dataclass__']!r} outside atlasfl")
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise AtlasError(f"checkpoint names unknown state class {obj['__dataclass__']!r}")
        return cls(**{k: unflatten_state(v, tensors, device) for k, v in obj["fields"].items()})
    if "__dict__" in obj:
        return {k: unflatten_state(v, tensors, device) for k, v in obj["__dict__"].items()}
    if "__list__" in obj:
        return [unflatten_state(v, tensors, device) for v in obj["__list__"]]
    if "__tuple__" in obj:
        return tuple(unflatten_state(v, tensors, device) for v in obj["__tuple__"])
    raise AtlasError(f"checkpoint holds an unreadable state entry {sorted(obj)[:3]}")


# -- files ---------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_path: Path, round_idx: int) -> Path:
    """Folder of the checkpoint after ``round_idx``."""
    return run_path / CHECKPOINTS / f"round-{round_idx:06d}"


def save_checkpoint(run_path: Path, snapshot: Snapshot, *, keep: int = 2) -> Path:
    """Write ``snapshot`` atomically and keep only the latest ``keep`` checkpoints."""
    root = run_path / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash while saving: never complete
        shutil.rmtree(stale, ignore_errors=True)
    final = checkpoint_dir(run_path, snapshot.round_idx)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in snapshot.tensors.items()}
    save_file(tensors, str(tmp / TENSORS), metadata={"format": str(FORMAT)})
    meta = {"format": FORMAT, "round": snapshot.round_idx, "config": snapshot.config,
            **snapshot.meta}
    (tmp / META).write_text(json.dumps(meta))
    parts = {}
    for prefix, source in snapshot.files.items():
        name = prefix.strip("/").replace("/", "-") + ".safetensors"
        shutil.copyfile(source, tmp / name)
        parts[name] = prefix
    names = [TENSORS, META, *parts]
    manifest = {"format": FORMAT, "round": snapshot.round_idx,
                "files": {name: _sha256(tmp / name) for name in names}, "parts": parts}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for name in (*names, MANIFEST):
        _fsync(tmp / name)
    if final.exists():  # a later session redoing a round after resuming from an older one
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(root)
    for old in sorted(p for p in root.glob("round-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_path: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (a folder with a manifest), if any."""
    root = Path(run_path) / CHECKPOINTS
    done = sorted(p for p in root.glob("round-*") if (p / MANIFEST).is_file())
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run folder (take its latest checkpoint) or one checkpoint folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir() and (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    raise AtlasError(f"no complete checkpoint at {path} (expected a run folder with "
                     f"{CHECKPOINTS}/round-*/{MANIFEST}, or such a checkpoint folder)")


def find_run(path: str | Path) -> Path:
    """``path`` if it is a run folder or a checkpoint; else the one run folder inside it.

    ``atlasfl resume runs/`` then works when ``runs/`` holds a single run with a checkpoint;
    with several, the error lists them.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / CHECKPOINTS).is_dir() or not path.is_dir():
        return path
    runs = sorted(p for p in path.iterdir()
                  if p.is_dir() and (p / CHECKPOINTS).is_dir() and latest_checkpoint(p))
    if len(runs) == 1:
        return runs[0]
    if runs:
        raise AtlasError(f"{path} holds {len(runs)} runs with checkpoints; name one: "
                         + ", ".join(p.name for p in runs[:5]) + (" ..." if len(runs) > 5 else ""))
    return path


def load_checkpoint(path: str | Path) -> Snapshot:
    """Read and verify a checkpoint; any mismatch is refused naming the file."""
    path = resolve_checkpoint(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AtlasError(f"checkpoint manifest {path / MANIFEST} is unreadable") from None
    if manifest.get("format") != FORMAT:
        raise AtlasError(f"checkpoint {path} has format {manifest.get('format')!r}; this "
                         f"atlasfl reads format {FORMAT}: resume it with the atlasfl version "
                         f"that wrote it, or start the run over")
    parts = manifest.get("parts", {})
    for name in (TENSORS, META, *parts):
        file = path / name
        if name not in files or not file.is_file():
            raise AtlasError(f"checkpoint file {file} is missing")
        if _sha256(file) != files[name]:
            raise AtlasError(f"checkpoint file {file} fails its SHA-256 check (truncated or "
                             f"edited); refusing to resume from it")
    try:
        tensors = load_file(str(path / TENSORS))
        for name, prefix in parts.items():
            tensors.update({prefix + k: v for k, v in load_file(str(path / name)).items()})
        meta = json.loads((path / META).read_text())
    except (SafetensorError, json.JSONDecodeError, OSError) as exc:
        raise AtlasError(f"checkpoint {path} is unreadable: {exc}") from None
    # a checkpoint written before a key's default changed resumes at the value it ran with
    return Snapshot(int(meta.pop("round")), complete_saved(meta.pop("config")), tensors, meta)
