"""The experiment's configuration: ``ExperimentConfig`` over its sections, and its range checks.

The sections (one frozen dataclass per concern) are in ``atlasfl.config.sections``; building one
from a nested dict is ``atlasfl.config.parse``'s. Choices are checked as they are read, from
their ``Literal`` types; ``validate`` checks ranges, and the method's name against the registry's
names (``atlasfl.types.MethodName``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from atlasfl.config.parse import build, set_dotted
from atlasfl.config.sections import (
    ClusteringConfig,
    DataConfig,
    DevicesConfig,
    FaultsConfig,
    FederationConfig,
    LaplacianConfig,
    ModelConfig,
    RanksConfig,
    SessionConfig,
    SplitConfig,
    TrainConfig,
)
from atlasfl.errors import AtlasError, choices, unknown_name
from atlasfl.types import MethodName


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
    split: SplitConfig = field(default_factory=SplitConfig)
    laplacian: LaplacianConfig = field(default_factory=LaplacianConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    session: SessionConfig = field(default_factory=SessionConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML/JSON."""
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **dotted: Any) -> ExperimentConfig:
        """Return a copy with dotted keys replaced, e.g. ``replace(**{"data.samples": 10})``."""
        raw = self.to_dict()
        for key, value in dotted.items():
            set_dotted(raw, key, value)
        cfg: ExperimentConfig = build(ExperimentConfig, ExperimentConfig, raw)
        validate(cfg)
        return cfg


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise AtlasError(f"config key {key!r} = {value!r} is invalid; allowed: {allowed}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges and the method's name; tasks and models are checked by their registries."""
    if cfg.method not in choices(MethodName):
        raise unknown_name("method", cfg.method, choices(MethodName))
    d, t, f, m = cfg.data, cfg.train, cfg.federation, cfg.model
    _check(len(d.tasks) >= 1, "data.tasks", list(d.tasks), "at least one task")
    _check(len(set(d.tasks)) == len(d.tasks), "data.tasks", list(d.tasks), "no duplicates")
    _check(d.clients_per_task >= 1, "data.clients_per_task", d.clients_per_task, "an integer >= 1")
    _check(d.samples >= 1, "data.samples", d.samples, "an integer >= 1")
    for task, n in d.task_samples.items():
        _check(n >= 1, f"data.task_samples.{task}", n, "an integer >= 1")
    _check(d.eval_samples >= 0, "data.eval_samples", d.eval_samples, "0 (all) or more")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "0 <= x < 1")
    _check(0.0 <= d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "0 <= x < 1")
    _check(d.val_fraction + d.test_fraction < 1.0, "data.test_fraction", d.test_fraction,
           f"0 <= x < 1 - data.val_fraction ({1 - d.val_fraction:g}): rows must be left to train")
    _check(d.alpha > 0, "data.alpha", d.alpha, "a number > 0")
    _check(d.max_length >= 8, "data.max_length", d.max_length, "an integer >= 8")
    for i, ct in enumerate(d.custom_tasks):
        key = f"data.custom_tasks[{i}]"
        _check(ct.num_labels >= 1, key + ".num_labels", ct.num_labels, "1 (regression) or more")
        _check(len(ct.text_fields) in (1, 2), key + ".text_fields", ct.text_fields, "1 or 2 names")
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
    _check(t.prox_mu >= 0, "train.prox_mu", t.prox_mu, "0 or more")
    _check(t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size, "an integer >= 1")
    _check(t.length_bucket >= 0, "train.length_bucket", t.length_bucket, "0 (off) or more")
    _check(t.pad_multiple >= 1, "train.pad_multiple", t.pad_multiple, "an integer >= 1")
    _check(t.threads >= 0, "train.threads", t.threads, "0 (auto) or more")
    _check(t.workers >= 0, "train.workers", t.workers, "0 (auto: one per core on a CPU) or more")
    _check(t.batch_clients >= 0, "train.batch_clients", t.batch_clients,
           "0 (off) or an integer >= 1 (clients per batched group)")
    _check(f.resident_clients >= 0, "federation.resident_clients", f.resident_clients,
           "0 (all in memory) or more")
    _check(t.mmap_threshold_kb >= 0, "train.mmap_threshold_kb", t.mmap_threshold_kb,
           "0 (glibc's default) or a size in KiB")
    _check(t.onednn_cache >= 0, "train.onednn_cache", t.onednn_cache,
           "0 (the libraries' default, 1024) or a number of primitives")
    fl = cfg.faults
    _check(fl.max_update_norm >= 0, "faults.max_update_norm", fl.max_update_norm,
           "0 (off) or a number > 0")
    for key in ("drop_before", "drop_during"):
        _check(0.0 <= getattr(fl, key) <= 1.0, f"faults.{key}", getattr(fl, key), "0 <= p <= 1")
    _check(fl.drop_before + fl.drop_during <= 1.0, "faults.drop_before + faults.drop_during",
           fl.drop_before + fl.drop_during, "at most 1")
    _check(fl.deadline_seconds >= 0, "faults.deadline_seconds", fl.deadline_seconds,
           "0 (off) or a number > 0")
    _check(fl.step_seconds > 0, "faults.step_seconds", fl.step_seconds, "a number > 0")
    _check(fl.jitter >= 0, "faults.jitter", fl.jitter, "a number >= 0")
    _check(f.rounds >= 1, "federation.rounds", f.rounds, "an integer >= 1")
    _check(0.0 < f.fraction <= 1.0, "federation.fraction", f.fraction, "0 < x <= 1")
    _check(f.eval_every >= 1, "federation.eval_every", f.eval_every, "an integer >= 1")
    _check(f.patience >= 0, "federation.patience", f.patience, "0 (off) or an integer >= 1")
    c = cfg.clustering
    _check(c.samples >= 1, "clustering.samples", c.samples, "an integer >= 1")
    _check(c.batch_size >= 1, "clustering.batch_size", c.batch_size, "an integer >= 1")
    _check(c.layers >= 1, "clustering.layers", c.layers, "an integer >= 1")
    _check(c.dim >= 2, "clustering.dim", c.dim, "an integer >= 2")
    _check(c.k >= 0, "clustering.k", c.k, "0 (choose) or more")
    _check(2 <= c.k_min <= c.k_max, "clustering.k_min", (c.k_min, c.k_max),
           "2 <= k_min <= k_max")
    _check(c.recluster_every >= 0, "clustering.recluster_every", c.recluster_every,
           "0 (never) or more")
    _check(bool(c.criteria), "clustering.criteria", list(c.criteria), "a non-empty list")
    _check(c.epsilon >= 0, "clustering.epsilon", c.epsilon, "0 (no noise) or > 0")
    _check(0 < c.delta < 1, "clustering.delta", c.delta, "0 < delta < 1")
    _check(c.clip > 0, "clustering.clip", c.clip, "a number > 0")
    _check(0 <= c.min_signal < 1, "clustering.min_signal", c.min_signal, "0 <= min_signal < 1")
    r = cfg.ranks
    _check(1 <= r.r_min <= r.r_max <= 256, "ranks.r_min", (r.r_min, r.r_max),
           "1 <= r_min <= r_max <= 256")
    _check(r.samples >= 1, "ranks.samples", r.samples, "an integer >= 1")
    sp = cfg.split
    _check(sp.cut == "auto" or (sp.cut.isdigit() and int(sp.cut) >= 0), "split.cut", sp.cut,
           "auto or an integer >= 0 (blocks the client keeps)")
    _check(sp.tail >= 1, "split.tail", sp.tail, "an integer >= 1")
    _check(sp.min_cut >= 0, "split.min_cut", sp.min_cut, "an integer >= 0")
    _check(sp.window >= 1, "split.window", sp.window, "an integer >= 1")
    _check(sp.fixed_cut is None or sp.fixed_cut >= sp.min_cut, "split.cut", sp.cut,
           f"auto or an integer >= split.min_cut = {sp.min_cut}")
    _check(sp.server_compute > 0, "split.server_compute", sp.server_compute, "a number > 0")
    lp = cfg.laplacian
    _check(lp.k >= 1, "laplacian.k", lp.k, "an integer >= 1")
    _check(lp.cross_weight >= 0, "laplacian.cross_weight", lp.cross_weight, "a number >= 0")
    _check(lp.eta == "auto" or (_number(lp.eta) or 0) > 0, "laplacian.eta", lp.eta,
           "auto (1 / the largest eigenvalue of the graph's Laplacian) or a number > 0")
    _check(lp.lam >= 0, "laplacian.lam", lp.lam, "a number >= 0 (0: local training)")
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
