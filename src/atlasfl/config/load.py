"""Reading a config: YAML and dotted overrides into a checked ``ExperimentConfig``.

The loader checks every value against its field's type as it reads it: a choice is a ``Literal``
from ``atlasfl.types`` (declared once, also what the phases check), so a wrong choice is refused
naming the key, the value and the allowed values (``atlasfl.config.parse``); ``validate`` then
checks ranges. Unknown keys are errors that list close matches.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from atlasfl.config.parse import build, known_key, set_dotted, unknown_key
from atlasfl.config.schema import ExperimentConfig, validate
from atlasfl.errors import AtlasError, choices
from atlasfl.types import MethodName

# Keys that may differ between the sessions of one run: where output goes, how it is shown, and
# how the session runs. Everything else changes the experiment and is refused on resume.
RESUMABLE_KEYS = ("out", "run_name", "progress", "session.", "train.onednn_cache")
# ``auto`` resolves per machine (bf16 where it is fast): a checkpoint records what it resolved to
# and ``atlasfl.engine.simulation.restore`` compares that, so auto against fp32/bf16 is no diff here
PRECISION = "train.precision"


def experiment_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys (dotted) whose values differ between two config dicts, ignoring resumable keys."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif path == PRECISION and "auto" in (a, b):
            return  # what auto resolved to is checked against the checkpoint's on restore
        elif a != b and not any(path == k or (k.endswith(".") and path.startswith(k))
                                for k in RESUMABLE_KEYS):
            out.append((path, a, b))

    walk(saved, new, "")
    return out


# Keys whose default changed after they were added (issue 15 made length buckets and padded
# shapes the default): a saved config without the key was written before it existed and ran
# with the value here, not with today's default.
# Issue 30 added each client's local test split: a config from before had none.
EARLIER_DEFAULTS: dict[str, Any] = {"train.length_bucket": 0, "train.pad_multiple": 1,
                                    "data.test_fraction": 0.0}


def complete_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (run folder, checkpoint) with ``EARLIER_DEFAULTS`` for keys it lacks.

    Other missing keys are left to today's defaults, which they ran with.
    """
    out = copy.deepcopy(saved)
    for dotted, value in EARLIER_DEFAULTS.items():
        section, key = dotted.split(".")
        part = out.setdefault(section, {})
        if isinstance(part, dict):
            part.setdefault(key, value)
    return out


def precision_ran(asked: str, device: str, recorded: str | None) -> str:
    """The precision a saved run trained in: as its checkpoint or summary ``recorded`` it.

    Runs from before they recorded it ran what ``asked`` meant then on ``device`` ("cpu",
    "cuda:0"): ``auto`` was bf16 on CUDA and fp32 elsewhere.
    """
    if recorded is not None:
        return recorded
    if asked != "auto":
        return asked
    return "bf16" if device.split(":")[0] == "cuda" else "fp32"


def check_same_experiment(saved: dict[str, Any], cfg: ExperimentConfig) -> None:
    """Refuse to continue a checkpoint (its config ``saved``) under a config that changes it.

    ``saved`` is completed with today's defaults first, so a key added to the config after the
    checkpoint was written (at its default) is no difference.
    """
    try:
        saved = from_dict(complete_saved(saved)).to_dict()
    except AtlasError:
        pass  # a key since removed or renamed: compare as saved, and name it
    diff = experiment_diff(saved, cfg.to_dict())
    if diff:
        lines = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff)
        raise AtlasError(f"the config differs from the checkpoint's in keys that change the "
                         f"experiment: {lines}")


def _known_key(key: str) -> bool:
    return known_key(ExperimentConfig, key)


def _unknown_key(path: str) -> AtlasError:
    return unknown_key(ExperimentConfig, path)


def from_dict(raw: dict[str, Any] | None) -> ExperimentConfig:
    """Build and validate a config from a nested dict; unknown keys are errors.

    A ``method_settings`` section is applied for the method the dict names (``layered``).
    """
    raw = raw or {}
    if METHOD_SETTINGS in raw:
        raw = layered(raw)
    cfg: ExperimentConfig = build(ExperimentConfig, ExperimentConfig, raw)
    validate(cfg)
    return cfg


# A config file's per-method settings: ``method_settings: {local: {train.lr: 0.004}}``. They are
# what each method was tuned to on validation rows (README, "Tuning"), applied when that method
# runs, before any override a user gives.
METHOD_SETTINGS = "method_settings"


def layered(raw: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """One run's raw config: ``raw``, then its method's ``method_settings``, then ``layers``.

    ``layers`` are dicts of dotted keys (``{"train.lr": 0.001}``), later ones winning: command
    line flags and ``--set`` overrides, a grid point. The method whose settings apply is the
    one the layers leave in place (a grid point's ``method``, else ``--method``, else the
    file's). The result holds no ``method_settings``: it is what the run folder records.

    Raises ``AtlasError`` naming a malformed section, an unknown method or an unknown key.
    """
    base = copy.deepcopy(raw)
    settings = base.pop(METHOD_SETTINGS, None) or {}
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        raise AtlasError(f"config key {METHOD_SETTINGS!r} must map each method to a mapping of "
                         f"dotted keys, e.g. {{local: {{train.lr: 0.004}}}}; got {settings!r}")
    unknown = sorted(set(settings) - set(choices(MethodName)))
    if unknown:
        raise AtlasError(f"{METHOD_SETTINGS}: unknown method(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(choices(MethodName))}")
    for method, keys in settings.items():  # every method's, not only the one that runs
        for key in keys:
            if not _known_key(key):
                raise AtlasError(f"{METHOD_SETTINGS}.{method}: {_unknown_key(key)}")

    def stack(first: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for layer in (first, *layers):
            for key, value in layer.items():
                if not _known_key(key):
                    raise _unknown_key(key)
                set_dotted(out, key, copy.deepcopy(value))
        return out

    method = stack({}).get("method", ExperimentConfig.method)
    return stack(settings.get(method, {}))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=0.01", "data.tasks=[sst2, rte]"]`` -> dotted keys and YAML-parsed values."""
    return dict(_parsed(item) for item in overrides)


def from_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict (validated later by ``from_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AtlasError(f"config file {path}: not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise AtlasError(f"config file {path}{where}: not valid YAML ({what})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AtlasError(f"config file {path} must hold a mapping at the top level")
    return raw


def _parsed(item: str) -> tuple[str, Any]:
    """One ``key=value`` override: its known dotted key and its value parsed as YAML."""
    if "=" not in item:
        raise AtlasError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not _known_key(key):
        raise _unknown_key(key)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        set_dotted(raw, *_parsed(item))
    return raw
