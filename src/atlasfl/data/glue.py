"""Reading task files: the official GLUE TSV layout, CSV/JSONL for custom tasks, or the HF hub.

GLUE quirks handled here: CoLA has no header; MRPC starts with a UTF-8 BOM; quotes are literal
characters, so files are split on tabs only (``csv.QUOTE_NONE``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlasfl.data.tasks import TaskSpec
from atlasfl.errors import AtlasError

DATA_ENV = "ATLASFL_DATA"


@dataclass(frozen=True)
class Examples:
    """Rows of one task split: text fields per row and labels (int class or float score)."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray  # (num_rows,) int64 classes, or float32 scores for regression

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: np.ndarray | list[int]) -> Examples:
        """Rows at ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return Examples([self.texts[i] for i in idx], self.labels[idx])


def _parse_label(raw: str, spec: TaskSpec, where: str) -> float | int:
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise AtlasError(f"{where}: label {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise AtlasError(f"{where}: label {raw!r} is not a finite number")
        return value
    try:
        return spec.label_names.index(raw.strip())
    except ValueError:
        raise AtlasError(f"{where}: label {raw!r} is not in the label set of task "
                         f"{spec.name!r} {list(spec.label_names)}") from None


def _rows(path: Path, spec: TaskSpec):
    """Yield (line_number, dict row) from a TSV/CSV/JSONL file, checking its shape."""
    if spec.format == "jsonl":
        with path.open(encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise AtlasError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise AtlasError(f"{path} line {n}: expected a JSON object")
                yield n, {k: str(v) for k, v in row.items()}
        return
    delimiter = "\t" if spec.format == "tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=csv.QUOTE_NONE
                            if spec.format == "tsv" else csv.QUOTE_MINIMAL)
        if spec.columns is not None:
            header = list(spec.columns)
        else:
            first = next(reader, None)
            if first is None:
                raise AtlasError(f"{path} is empty: expected a header row")
            header = first
        for n, fields in enumerate(reader, start=1 if spec.columns is not None else 2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise AtlasError(f"{path} line {n}: expected {len(header)} "
                                 f"{'tab' if spec.format == 'tsv' else 'comma'}-separated "
                                 f"fields ({', '.join(header)}), found {len(fields)}")
            yield n, dict(zip(header, fields, strict=True))


def read_examples(path: str | Path, spec: TaskSpec) -> Examples:
    """Read one split file of ``spec``; raise ``AtlasError`` naming the file and line if bad."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"data file not found: {path} (task {spec.name!r})")
    texts: list[tuple[str, ...]] = []
    labels: list[float | int] = []
    needed = (*spec.text_fields, spec.label_field)
    n = 0
    try:
        for n, row in _rows(path, spec):
            missing = [c for c in needed if c not in row]
            if missing:
                raise AtlasError(f"{path} line {n}: missing column(s) {missing}; found "
                                 f"{list(row)}")
            texts.append(tuple(row[c] for c in spec.text_fields))
            labels.append(_parse_label(row[spec.label_field], spec, f"{path} line {n}"))
    except UnicodeDecodeError as exc:
        raise AtlasError(f"{path}: not UTF-8 text after line {n} ({exc.reason}, byte "
                         f"{exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except csv.Error as exc:
        raise AtlasError(f"{path} after line {n}: unreadable as "
                         f"{spec.format.upper()} ({exc})") from None
    if not texts:
        raise AtlasError(f"{path} holds no rows")
    dtype = np.float32 if spec.is_regression else np.int64
    return Examples(texts, np.asarray(labels, dtype=dtype))


def default_data_root() -> Path | None:
    """The shared GLUE folder beside the checkout (``../shared/data/glue``), if it exists."""
    repo = Path(__file__).resolve().parents[3]  # src/atlasfl/data/glue.py -> checkout root
    for base in (repo, Path.cwd()):
        candidate = base.parent / "shared" / "data" / "glue"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_root(data_dir: str | None) -> Path | None:
    """``--data-dir``, else ``$ATLASFL_DATA``, else the shared folder; None means the HF hub."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if chosen:
        root = Path(chosen).expanduser()
        if not root.is_dir():
            source = "data.data_dir" if data_dir else f"${DATA_ENV}"
            raise AtlasError(f"{source} = {chosen!r} is not a directory")
        return root
    return default_data_root()


def _load_hf(spec: TaskSpec) -> tuple[Examples, Examples]:
    try:
        import datasets  # optional: only when no local copy exists
    except ImportError:
        raise AtlasError(f"no local data for task {spec.name!r} (set --data-dir or "
                         f"${DATA_ENV}) and the `datasets` package is not installed") from None
    if spec.hf_config is None:
        raise AtlasError(f"task {spec.name!r} has no Hugging Face copy; give its files")
    try:
        ds = datasets.load_dataset("nyu-mll/glue", spec.hf_config)
    except Exception as exc:  # network and hub errors come in many types
        raise AtlasError(f"no local data for task {spec.name!r} and the Hugging Face hub "
                         f"failed: {exc}") from None
    fields = spec.hf_text_fields or spec.text_fields

    def convert(split) -> Examples:
        texts = list(zip(*(split[f] for f in fields), strict=True))
        dtype = np.float32 if spec.is_regression else np.int64
        return Examples(texts, np.asarray(split["label"], dtype=dtype))

    return convert(ds["train"]), convert(ds[spec.hf_test_split])


def load_task(spec: TaskSpec, root: Path | None) -> tuple[Examples, Examples]:
    """Return (train, test) for a task: local files when present, else the HF hub."""
    train_path, test_path = Path(spec.train_file), Path(spec.test_file)
    if train_path.is_absolute() or spec.hf_config is None:  # custom task: paths as given
        return read_examples(train_path, spec), read_examples(test_path, spec)
    if root is not None and (root / train_path).is_file():
        return read_examples(root / train_path, spec), read_examples(root / test_path, spec)
    if root is not None and (os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise AtlasError(f"data file not found: {root / train_path} (task {spec.name!r})")
    return _load_hf(spec)
