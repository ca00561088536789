"""Experiment configuration: frozen dataclasses mirrored by YAML, with dotted overrides.

Every field is validated where it is read (``validate``); unknown keys are errors that list close
matches. The resolved config is written into the run folder, so a run can be reproduced from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from atlasfl.errors import AtlasError


@dataclass(frozen=True)
class CustomTaskConfig:
    """A user-defined task read from local files (TSV, CSV or JSONL)."""

    name: str
    train: str
    test: str
    format: str = "tsv"  # tsv | csv | jsonl
    text_fields: tuple[str, ...] = ("sentence",)
    label_field: str = "label"
    num_labels: int = 2  # 1 = regression
    label_names: tuple[str, ...] = ()  # raw label values in class order; default "0".."n-1"
    metric: str = "accuracy"


@dataclass(frozen=True)
class DataConfig:
    """Which tasks, where their files are and how they are split over clients."""

    tasks: tuple[str, ...] = ("sst2", "mrpc", "cola", "qnli")
    data_dir: str | None = None
    clients_per_task: int = 3
    samples: int = 200  # training examples per client, before the validation carve-out
    eval_samples: int = 500  # test examples per task (GLUE dev split); 0 = all
    val_fraction: float = 0.1  # of each client's examples, held out for validation
    partition: str = "iid"  # iid | dirichlet
    alpha: float = 0.5  # Dirichlet concentration (partition: dirichlet)
    max_length: int = 128
    custom_tasks: tuple[CustomTaskConfig, ...] = ()


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (applied through peft)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: the architecture family's default
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r


@dataclass(frozen=True)
class ModelConfig:
    """Backbone, pooling and adapter."""

    name: str = "minilm"
    pooling: str = "auto"  # auto | mean | cls | last
    head_dropout: float = 0.1
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many optimizer steps per round instead of epochs
    batch_size: int = 16
    lr: float = 5e-4  # adapter learning rate
    head_lr: float | None = None  # classification head learning rate; None: same as lr
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_batch_size: int = 64
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16


@dataclass(frozen=True)
class FederationConfig:
    """The round loop."""

    rounds: int = 5
    fraction: float = 1.0  # share of clients sampled to train each round
    eval_every: int = 1  # evaluate every N rounds (and always after the last)


@dataclass(frozen=True)
class ClusteringConfig:
    """Phase 1: gradient fingerprints and task clustering (``fedavg-cluster``, ``atlas``)."""

    samples: int = 128  # examples per client in its fingerprint
    batch_size: int = 16
    layers: int = 3  # the last L transformer blocks
    params: str = "lora"  # lora (B factors) | weights (frozen target weights)
    statistic: str = "fisher"  # fisher (squared per-example gradients) | gradient (mean)
    dim: int = 256  # projected dimension (the upload is dim x 4 bytes)
    center: bool = True  # subtract the mean fingerprint before the cosine geometry
    debias: bool = True  # subtract each fingerprint's uploaded noise variance from its norm
    criteria: tuple[str, ...] = ("silhouette",)  # which of silhouette, davies_bouldin,
    # calinski_harabasz, eigengap vote on k (mean rank); all four are recorded for every k
    min_signal: float = 0.7  # k is chosen among clients whose fingerprint is >= 70% signal
    method: str = "kmeans"  # kmeans | spectral
    k: int = 0  # 0: choose k; > 0: fixed
    k_min: int = 2
    k_max: int = 10
    recluster_every: int = 0  # re-cluster from fresh fingerprints every R rounds (0: never)
    epsilon: float = 0.0  # example-level DP budget of each fingerprint; 0: no noise
    delta: float = 1e-5
    clip: float = 1.0  # per-example norm bound (with epsilon)


@dataclass(frozen=True)
class DeviceProfileConfig:
    """A user-defined device profile (``devices.custom``)."""

    name: str
    memory_gb: float  # memory a training process may use, GiB
    compute: float = 1.0  # training throughput relative to laptop-8gb
    uplink_mbps: float = 10.0
    downlink_mbps: float = 50.0


@dataclass(frozen=True)
class DevicesConfig:
    """Which device each client runs on (Phase 2). Drawn at random, seeded, never by index."""

    profiles: tuple[str, ...] = ("cpu-2gb", "tablet-4gb", "laptop-8gb", "gpu-16gb")
    assignment: tuple[str, ...] = ()  # explicit profile per client id; empty: draw from profiles
    custom: tuple[DeviceProfileConfig, ...] = ()


@dataclass(frozen=True)
class RanksConfig:
    """Phase 2: per-module LoRA ranks under each client's memory; mixed-rank aggregation."""

    aggregation: str = "stack"  # zero-pad | stack | svd
    # average: the mean of what the clients hold | delta: previous aggregate + the clients'
    # weighted change (the server keeps what a client's ranks cut off)
    update: str = "average"
    grouping: str = "task"  # global | task | cluster
    r_min: int = 1
    r_max: int = 16
    # linear: sum importance x rank | log: sum importance x log(rank) | spectrum: the gradient
    # energy each module's ranks can follow (clients upload their top r_max singular values)
    utility: str = "linear"
    # parity: <= homolora's LoRA parameters at model.lora.r | device: the federation's total of
    # those, shared in proportion to device memory | memory: the memory budget only
    budget: str = "parity"
    on_infeasible: str = "error"  # error | exclude (the client trains nothing)
    samples: int = 64  # importance examples per client when Phase 1 does not run


@dataclass(frozen=True)
class SessionConfig:
    """How this session runs and saves; may change between sessions of one run."""

    max_rounds: int = 0  # stop after this many rounds in this session (0: run to the end)
    save_every: int = 1  # checkpoint every N rounds (0: only when stopping or finishing)
    keep_checkpoints: int = 2  # how many of the latest checkpoints to keep


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines one run."""

    method: str = "fedavg-task"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = "runs"
    run_name: str | None = None
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    ranks: RanksConfig = field(default_factory=RanksConfig)
    session: SessionConfig = field(default_factory=SessionConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """Return a copy with dotted keys replaced, e.g. ``replace(**{"data.samples": 10})``."""
        raw = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(raw, key, value)
        return from_dict(raw)


# Keys that may differ between the sessions of one run: where output goes, how it is shown, and
# how the session runs. Everything else changes the experiment and is refused on resume.
RESUMABLE_KEYS = ("out", "run_name", "progress", "session.")


def experiment_diff(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Keys (dotted) whose values differ between two config dicts, ignoring resumable keys."""
    out: list[tuple[str, Any, Any]] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b and not any(path == k or (k.endswith(".") and path.startswith(k))
                                for k in RESUMABLE_KEYS):
            out.append((path, a, b))

    walk(saved, new, "")
    return out


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _all_dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_dotted_keys(hints[f.name], key + "."))
    return keys


def _unknown_key(path: str) -> AtlasError:
    close = difflib.get_close_matches(path, _all_dotted_keys(ExperimentConfig), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return AtlasError(f"unknown config key {path!r}{hint}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise AtlasError(f"config key {path!r} must be a mapping, got {value!r}")
        return _build(tp, value, path + ".")
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if isinstance(value, (str, dict)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise AtlasError(f"config key {path!r} must be a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AtlasError(f"config key {path!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise AtlasError(f"config key {path!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AtlasError(f"config key {path!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise AtlasError(f"config key {path!r} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} at {path}")  # internal: a field type we forgot


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    names = _field_names(cls)
    for key in raw:
        if key not in names:
            raise _unknown_key(prefix + str(key))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise AtlasError(f"config key {prefix + f.name!r} is required")
    return cls(**kwargs)


def from_dict(raw: dict[str, Any] | None) -> ExperimentConfig:
    """Build and validate a config from a nested dict; unknown keys are errors."""
    cfg = _build(ExperimentConfig, raw or {})
    validate(cfg)
    return cfg


def from_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict (validated later by ``from_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise AtlasError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AtlasError(f"config file {path} is not valid YAML: {exc}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AtlasError(f"config file {path} must hold a mapping at the top level")
    return raw


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _unknown_key(key)
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise AtlasError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in _all_dotted_keys(ExperimentConfig):
            raise _unknown_key(key)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        _set_dotted(raw, key, value)
    return raw


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise AtlasError(f"config key {key!r} = {value!r} is invalid; allowed: {allowed}")


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges and choices; names (tasks, model, method) are checked by their registries."""
    d, t, f, m = cfg.data, cfg.train, cfg.federation, cfg.model
    _check(len(d.tasks) >= 1, "data.tasks", list(d.tasks), "at least one task")
    _check(len(set(d.tasks)) == len(d.tasks), "data.tasks", list(d.tasks), "no duplicates")
    _check(d.clients_per_task >= 1, "data.clients_per_task", d.clients_per_task, "an integer >= 1")
    _check(d.samples >= 1, "data.samples", d.samples, "an integer >= 1")
    _check(d.eval_samples >= 0, "data.eval_samples", d.eval_samples, "0 (all) or more")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 <= x < 1")
    _check(d.partition in ("iid", "dirichlet"), "data.partition", d.partition, "iid, dirichlet")
    _check(d.alpha > 0, "data.alpha", d.alpha, "a number > 0")
    _check(d.max_length >= 8, "data.max_length", d.max_length, "an integer >= 8")
    for i, ct in enumerate(d.custom_tasks):
        key = f"data.custom_tasks[{i}]"
        _check(ct.format in ("tsv", "csv", "jsonl"), key + ".format", ct.format, "tsv, csv, jsonl")
        _check(ct.num_labels >= 1, key + ".num_labels", ct.num_labels, "1 (regression) or more")
        _check(len(ct.text_fields) in (1, 2), key + ".text_fields", ct.text_fields, "1 or 2 names")
    _check(m.pooling in ("auto", "mean", "cls", "last"), "model.pooling", m.pooling,
           "auto, mean, cls, last")
    _check(0.0 <= m.head_dropout < 1.0, "model.head_dropout", m.head_dropout, "0 <= x < 1")
    _check(m.lora.r >= 1, "model.lora.r", m.lora.r, "an integer >= 1")
    _check(m.lora.alpha > 0, "model.lora.alpha", m.lora.alpha, "a number > 0")
    _check(0.0 <= m.lora.dropout < 1.0, "model.lora.dropout", m.lora.dropout, "0 <= x < 1")
    _check(t.local_epochs >= 1, "train.local_epochs", t.local_epochs, "an integer >= 1")
    _check(t.local_steps >= 0, "train.local_steps", t.local_steps, "0 (use epochs) or more")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _check(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(t.head_lr is None or t.head_lr > 0, "train.head_lr", t.head_lr, "null or a number > 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "0 (off) or more")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "an integer >= 1")
    _check(t.precision in ("auto", "fp32", "bf16"), "train.precision", t.precision,
           "auto, fp32, bf16")
    _check(f.rounds >= 1, "federation.rounds", f.rounds, "an integer >= 1")
    _check(0.0 < f.fraction <= 1.0, "federation.fraction", f.fraction, "0 < x <= 1")
    _check(f.eval_every >= 1, "federation.eval_every", f.eval_every, "an integer >= 1")
    c = cfg.clustering
    _check(c.samples >= 1, "clustering.samples", c.samples, "an integer >= 1")
    _check(c.batch_size >= 1, "clustering.batch_size", c.batch_size, "an integer >= 1")
    _check(c.layers >= 1, "clustering.layers", c.layers, "an integer >= 1")
    _check(c.params in ("lora", "weights"), "clustering.params", c.params, "lora, weights")
    _check(c.statistic in ("fisher", "gradient"), "clustering.statistic", c.statistic,
           "fisher, gradient")
    _check(c.dim >= 2, "clustering.dim", c.dim, "an integer >= 2")
    _check(c.method in ("kmeans", "spectral"), "clustering.method", c.method,
           "kmeans, spectral")
    _check(c.k >= 0, "clustering.k", c.k, "0 (choose) or more")
    _check(2 <= c.k_min <= c.k_max, "clustering.k_min", (c.k_min, c.k_max),
           "2 <= k_min <= k_max")
    _check(c.recluster_every >= 0, "clustering.recluster_every", c.recluster_every,
           "0 (never) or more")
    _check(c.epsilon >= 0, "clustering.epsilon", c.epsilon, "0 (no noise) or > 0")
    _check(0 < c.delta < 1, "clustering.delta", c.delta, "0 < delta < 1")
    _check(c.clip > 0, "clustering.clip", c.clip, "a number > 0")
    _check(bool(c.criteria) and set(c.criteria) <= {"silhouette", "davies_bouldin",
                                                     "calinski_harabasz", "eigengap"},
           "clustering.criteria", list(c.criteria),
           "a non-empty list of silhouette, davies_bouldin, calinski_harabasz, eigengap")
    _check(0 <= c.min_signal < 1, "clustering.min_signal", c.min_signal, "0 <= min_signal < 1")
    r = cfg.ranks
    _check(r.aggregation in ("zero-pad", "stack", "svd"), "ranks.aggregation", r.aggregation,
           "zero-pad, stack, svd")
    _check(r.update in ("average", "delta"), "ranks.update", r.update, "average, delta")
    _check(r.grouping in ("global", "task", "cluster"), "ranks.grouping", r.grouping,
           "global, task, cluster")
    _check(1 <= r.r_min <= r.r_max <= 256, "ranks.r_min", (r.r_min, r.r_max),
           "1 <= r_min <= r_max <= 256")
    _check(r.utility in ("linear", "log", "spectrum"), "ranks.utility", r.utility,
           "linear, log, spectrum")
    _check(r.budget in ("parity", "device", "memory"), "ranks.budget", r.budget,
           "parity, device, memory")
    _check(r.on_infeasible in ("error", "exclude"), "ranks.on_infeasible", r.on_infeasible,
           "error, exclude")
    _check(r.samples >= 1, "ranks.samples", r.samples, "an integer >= 1")
    for i, prof in enumerate(cfg.devices.custom):
        key = f"devices.custom[{i}]"
        _check(prof.memory_gb > 0, key + ".memory_gb", prof.memory_gb, "a number > 0")
        _check(prof.compute > 0, key + ".compute", prof.compute, "a number > 0")
        _check(prof.uplink_mbps > 0 and prof.downlink_mbps > 0, key + ".uplink_mbps",
               (prof.uplink_mbps, prof.downlink_mbps), "numbers > 0")
    _check(cfg.session.max_rounds >= 0, "session.max_rounds", cfg.session.max_rounds,
           "0 (no cap) or more")
    _check(cfg.session.save_every >= 0, "session.save_every", cfg.session.save_every,
           "0 (only at the end of a session) or more")
    _check(cfg.session.keep_checkpoints >= 1, "session.keep_checkpoints",
           cfg.session.keep_checkpoints, "an integer >= 1")
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
           "device", cfg.device, "auto, cpu, cuda, cuda:N")
