"""Build an experiment from a config: data, partitions, shared model, clients.

Everything that can fail on bad input (names, files, labels) fails here, before a run folder
is created.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlasfl.client import ClientRuntime, ClientState, make_client
from atlasfl.client.store import ClientStore
from atlasfl.config import ExperimentConfig
from atlasfl.data.batching import TokenizedSet, tokenize
from atlasfl.data.glue import Examples, load_task, resolve_data_root
from atlasfl.data.metrics import reference_scores
from atlasfl.data.partition import ClientSplit, drop_test_overlap, partition
from atlasfl.data.tasks import TaskSpec, resolve_tasks
from atlasfl.devices import assign_devices, known_profiles
from atlasfl.engine.allocator import set_mmap_threshold, set_onednn_cache, trim
from atlasfl.engine.host import usable_cores
from atlasfl.errors import AtlasError, unknown_name
from atlasfl.models.head import ClassificationHead, init_head
from atlasfl.models.lora import AdapterBinder, inject_lora
from atlasfl.models.registry import Backbone, check_model, load_backbone
from atlasfl.phases.memory import model_dims
from atlasfl.strategies import ClientInfo, ModelInfo, Recipe, Strategy, get_method
from atlasfl.types import ClientId


@dataclass
class Experiment:
    """A ready-to-run experiment: one shared model, the clients, their test sets."""

    cfg: ExperimentConfig
    backbone: Backbone
    strategy: Strategy
    clients: ClientStore  # client id -> its state (built or reloaded on access)
    # the client side: the shared model, binder, device and seeded start of every client here
    runtime: ClientRuntime
    # per task: what constant predictions score ("majority", "own_majority": global_* on the
    # shared test rows, local_* on the clients' local tests; ``reference_scores``)
    references: dict[str, dict[str, dict[str, float]]]
    data_notes: dict[str, dict[str, int]]  # per task: rows read, dropped, used

    @property
    def device(self) -> torch.device:
        """Where the model and every client's tensors live."""
        return self.runtime.device

    @property
    def model(self) -> nn.Module:
        """The backbone with LoRA layers injected, shared by all clients."""
        return self.runtime.model

    @property
    def binder(self) -> AdapterBinder:
        """Points the shared model's LoRA layers at one client's tensors."""
        return self.runtime.binder

    @property
    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The seeded adapter every client starts from."""
        return self.runtime.initial_adapter


@dataclass(frozen=True)
class _Recipe:
    """What a client is built from: its task, head size and rows (train, validation, local test)."""

    spec: TaskSpec
    num_out: int
    train_set: TokenizedSet
    val_set: TokenizedSet
    local_set: TokenizedSet
    local_parts: tuple[int, ...]  # a pooled client: the sizes of its pooled local tests


def _stable(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"device = {name!r} but CUDA is not available; use auto or cpu")
    return torch.device(name)


def resolve_threads(threads: int) -> int:
    """``train.threads``; 0 (auto): OMP_NUM_THREADS when set, else the cores this process may use.

    More threads than free cores is the costly mistake: on a host whose load exceeds its cores,
    two threads per process measured 8x slower than one (issue 15), hence the environment first.
    """
    if threads > 0:
        return threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()


def resolve_workers(workers: int, threads: int, device: torch.device) -> int:
    """``train.workers``: processes answering clients' plans (``atlasfl.engine.pool``).

    0 (auto): one per core ``resolve_threads`` gives on a CPU (each then runs one torch thread),
    1 on a GPU, where clients share the card in this process.
    """
    if workers == 0:
        return resolve_threads(threads) if device.type == "cpu" else 1
    if workers > 1 and device.type != "cpu":
        raise AtlasError(f"train.workers = {workers} runs clients in CPU processes but the device "
                         f"is {device}; use 1 (or 0, auto) on a GPU")
    return workers


def _pool(splits: list[ClientSplit]) -> tuple[list[ClientSplit], tuple[int, ...]]:
    """One split of a task's pooled rows; its local tests stay in client order, with their sizes.

    A pooled trainer (``centralized``) is scored on each pooled client's local test on its own
    (``ClientState.local_parts``), so its local metric is comparable with the clients'.
    """
    pooled = ClientSplit(np.sort(np.concatenate([s.train_idx for s in splits])),
                         np.sort(np.concatenate([s.val_idx for s in splits])),
                         np.concatenate([s.test_idx for s in splits]))
    return [pooled], tuple(len(s.test_idx) for s in splits)


Loaded = dict[tuple[str, str], tuple[Examples, Examples]]  # (data root, task) -> (train, test)


def _resolve_names(cfg: ExperimentConfig) -> tuple[Recipe, list[TaskSpec]]:
    """The method's recipe and the tasks; a name no registry knows is an error naming it."""
    recipe = get_method(cfg.method)
    specs: list[TaskSpec] = resolve_tasks(cfg.data.tasks, cfg.data.custom_tasks)
    # a count for a task this run leaves out is kept (--tasks on a config that has them), a
    # name no registry knows is an error
    try:
        resolve_tasks(tuple(cfg.data.task_samples), cfg.data.custom_tasks)
    except AtlasError as exc:
        raise AtlasError(f"data.task_samples: {exc}") from None
    resolve_device(cfg.device)
    return recipe, specs


def _load(specs: list[TaskSpec], cfg: ExperimentConfig,
          cache: Loaded | None = None) -> dict[str, tuple[Examples, Examples]]:
    """Every task's (train, test) examples, read once per data root when ``cache`` is given."""
    root = resolve_data_root(cfg.data.data_dir)
    cache = {} if cache is None else cache
    for spec in specs:  # all file errors up front
        key = (str(root), spec.name)
        if key not in cache:
            cache[key] = load_task(spec, root)
    return {spec.name: cache[(str(root), spec.name)] for spec in specs}


def _client_splits(cfg: ExperimentConfig, spec: TaskSpec, train: Examples, test: Examples
                   ) -> tuple[Examples, int, list[ClientSplit]]:
    """A task's training rows less those in its test split, how many were dropped, and splits.

    The splits are each client's (train, validation, local test) rows of them.
    """
    train, dropped = drop_test_overlap(train, test)
    try:
        splits = partition(train.labels, cfg.data.clients_per_task,
                           cfg.data.task_samples.get(spec.name, cfg.data.samples),
                           scheme=cfg.data.partition, alpha=cfg.data.alpha,
                           val_fraction=cfg.data.val_fraction,
                           test_fraction=cfg.data.test_fraction,
                           seed=[cfg.seed, _stable(spec.name)])
    except AtlasError as exc:  # a task left (nearly) empty: name it and why
        overlap = f", after dropping {dropped} rows that are also in its test split" \
            if dropped else ""
        raise AtlasError(f"task {spec.name!r}: {exc}{overlap}; allowed: "
                         f"data.clients_per_task <= its training rows") from None
    return train, dropped, splits


def preflight(cfg: ExperimentConfig, cache: Loaded | None = None) -> None:
    """Every check of ``build_experiment`` that needs no model weights, for a grid's points.

    Names (method, tasks, device, model), data files and each task's partition at this point's
    row counts and seed. ``cache`` keeps the tasks' rows between points. Not checked: what the
    strategy checks once it knows the model's shapes (a device that fits no rank plan).
    """
    _, specs = _resolve_names(cfg)
    check_model(cfg.model.name)
    loaded = _load(specs, cfg, cache)
    for spec in specs:
        _client_splits(cfg, spec, *loaded[spec.name])


def num_clients(cfg: ExperimentConfig) -> int:
    """How many clients ``build_experiment(cfg)`` creates, without loading anything.

    ``data.clients_per_task`` per task, or one per task for a method that pools each task's data.
    """
    recipe, specs = _resolve_names(cfg)
    return len(specs) * (1 if recipe.pools_data else cfg.data.clients_per_task)


def build_experiment(cfg: ExperimentConfig, devices: Mapping[ClientId, str] | None = None
                     ) -> Experiment:
    """Load data and model and create every client from the shared seeded initialisation.

    ``devices``: device profiles the clients reported themselves (client id -> a
    ``devices.profiles`` name, e.g. from their Flower nodes); the others keep ``devices.*``.
    """
    recipe, specs = _resolve_names(cfg)
    torch.set_num_threads(resolve_threads(cfg.train.threads))
    set_mmap_threshold(cfg.train.mmap_threshold_kb)
    set_onednn_cache(cfg.train.onednn_cache)
    device = resolve_device(cfg.device)
    loaded = _load(specs, cfg)
    backbone = load_backbone(cfg.model.name)
    pooling = cfg.model.pooling
    if pooling == "auto":
        pooling = "last" if backbone.is_decoder else "mean"
    model = inject_lora(backbone, cfg.model.lora, seed=cfg.seed).to(device)
    binder = AdapterBinder(model, cfg.model.lora)
    adapter_init = binder.initial_state()
    use_types = backbone.family == "bert"

    def tok(examples) -> TokenizedSet:
        return tokenize(examples, backbone.tokenizer, max_length=cfg.data.max_length,
                        use_token_types=use_types)

    recipes: dict[int, _Recipe] = {}
    infos: list[ClientInfo] = []
    initial_heads: dict[int, ClassificationHead] = {}
    test_sets, references, notes = {}, {}, {}
    for spec in specs:
        train, test = loaded[spec.name]
        train, dropped, splits = _client_splits(cfg, spec, train, test)
        if cfg.data.eval_samples and len(test) > cfg.data.eval_samples:
            # the same test rows for every seed and method: comparisons are paired
            rng = np.random.default_rng(_stable("test", spec.name))
            test = test.subset(np.sort(rng.choice(len(test), cfg.data.eval_samples, replace=False)))
        test_sets[spec.name] = tok(test)
        references[spec.name] = reference_scores(
            spec, [train.labels[s.train_idx] for s in splits],
            [train.labels[s.test_idx] for s in splits], test.labels)
        notes[spec.name] = {"train_rows": len(train) + dropped, "dropped_in_test": dropped,
                            "used_rows": int(sum(len(s.train_idx) + len(s.val_idx)
                                                 + len(s.test_idx) for s in splits)),
                            "local_test_rows": int(sum(len(s.test_idx) for s in splits)),
                            "test_rows": len(test)}
        parts: tuple[int, ...] = ()
        if recipe.pools_data:
            splits, parts = _pool(splits)
        num_out = spec.num_labels
        head_seed = _stable(cfg.seed, "head", num_out)
        initial_heads[num_out] = init_head(backbone.hidden_size, num_out, pooling=pooling,
                                           dropout=cfg.model.head_dropout, seed=head_seed
                                           ).to(device)
        for split in splits:
            cid = len(recipes)
            recipes[cid] = _Recipe(spec, num_out, tok(train.subset(split.train_idx)),
                                   tok(train.subset(split.val_idx)),
                                   tok(train.subset(split.test_idx)), parts)
            infos.append(ClientInfo(cid, spec.name, len(split.train_idx),
                                    tuple(initial_heads[num_out].out.weight.shape)))

    def build(cid: int) -> ClientState:  # the same seeded start for every client
        r = recipes[cid]
        return make_client(cid, r.spec, adapter_init, copy.deepcopy(initial_heads[r.num_out]),
                           r.train_set, r.val_set, cfg.train, device,
                           local_set=r.local_set if len(r.local_set) else None,
                           local_parts=r.local_parts)

    clients = ClientStore(build, {c: r.spec for c, r in recipes.items()},
                          {c: len(r.train_set) for c, r in recipes.items()},
                          resident=cfg.federation.resident_clients, release=trim)
    seeded = assign_devices([i.client_id for i in infos], cfg.devices, seed=cfg.seed)
    known = known_profiles(cfg.devices)
    reported = dict(devices or {})
    for cid, name in sorted(reported.items()):
        if cid not in recipes:
            raise AtlasError(f"a device profile was reported for client {cid}; allowed: client "
                             f"ids 0..{len(recipes) - 1}")
        if name not in known:
            raise unknown_name("device profile", name, known)
    infos = [dataclasses.replace(i, device=reported.get(i.client_id, seeded[i.client_id].name))
             for i in infos]
    shapes = binder.shapes()
    try:
        dims = model_dims(backbone.model.config)
    except AtlasError:
        dims = None  # no memory model for this architecture: only Phase 2 strategies need one
    facts = ModelInfo(dims, shapes,
                      {n: sum(p.numel() for p in h.parameters())
                       for n, h in initial_heads.items()})
    strategy = Strategy(recipe, infos, cfg, facts)
    runtime = ClientRuntime(model, binder, cfg.train, cfg.model.lora, cfg.seed, device,
                            backbone.num_layers, adapter_init, initial_heads, test_sets)
    return Experiment(cfg, backbone, strategy, clients, runtime, references, notes)
