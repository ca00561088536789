"""Runs strategy plans on clients. In-process here; a Flower executor offers the same calls."""

from __future__ import annotations

import copy
import hashlib
import time
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from atlasfl.client import ClientState, evaluate, forward_logits, task_loss, train_client
from atlasfl.config import ClusteringConfig, TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.setup import Experiment
from atlasfl.models.head import ClassificationHead
from atlasfl.config import LoraSettings
from atlasfl.models.lora import AdapterBinder, plan_adapter
from atlasfl.phases.ranks import ImportanceMeter, module_importance
from atlasfl.phases.fingerprint import (
    compute_fingerprint,
    fingerprint_modules,
    select_blocks,
)
from atlasfl.strategies.base import ClientUpdate, TrainPlan
from atlasfl.types import AdapterState, ClientId


def client_seed(seed: int, round_idx: int, client_id: ClientId) -> int:
    """Seed of one client's round: independent of the order clients run in (exact resume)."""
    return zlib.crc32(f"{seed}/{round_idx}/{client_id}".encode())


def _digest(state: AdapterState) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class InProcessExecutor:
    """All clients in this process, sharing one frozen backbone."""

    def __init__(self, model: nn.Module, binder: AdapterBinder,
                 clients: dict[ClientId, ClientState],
                 test_sets: dict[str, TokenizedSet], cfg: TrainConfig, *, seed: int,
                 device: torch.device, channel: InProcessChannel, upload: bool,
                 initial_adapter: AdapterState, initial_heads: dict[int, ClassificationHead],
                 num_layers: int, lora: LoraSettings):
        self.model, self.binder, self.clients = model, binder, clients
        self.test_sets, self.cfg, self.seed, self.device = test_sets, cfg, seed, device
        self.channel, self.upload = channel, upload
        # the common starting point every fingerprint is computed from
        self.initial_adapter, self.initial_heads = initial_adapter, initial_heads
        self.num_layers = num_layers
        self.lora = lora
        self._test_cache: dict[tuple[str, str], dict[str, float]] = {}

    def train(self, round_idx: int, plan: TrainPlan
              ) -> tuple[ClientUpdate | None, dict[str, float]]:
        """Deliver the plan's download, train one round, upload the new state."""
        client = self.clients[plan.client_id]
        if plan.download is not None:
            client.load(self.channel.download(round_idx, plan.client_id, plan.download))
        seed = client_seed(self.seed, round_idx, plan.client_id)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator().manual_seed(seed)  # batch order
        metrics = train_client(self.model, self.binder, client, self.cfg, generator=generator,
                               device=self.device)
        if not self.upload:
            return None, metrics
        state = self.channel.upload(round_idx, plan.client_id, client.state())
        return ClientUpdate(plan.client_id, state, client.num_examples), metrics

    def fingerprint(self, round_idx: int, client_id: ClientId, settings: ClusteringConfig
                    ) -> tuple[np.ndarray, dict[str, float]]:
        """Phase 1 on one client: its fingerprint from the common initial adapter and head.

        Returns the vector the server received and the client-side diagnostics.
        """
        received, _, diag = self.probe(round_idx, client_id, settings, fingerprint=True)
        assert received is not None
        return received[0], diag

    def probe(self, round_idx: int, client_id: ClientId, settings: ClusteringConfig, *,
              fingerprint: bool = True, importance: bool = False, importance_samples: int = 64,
              importance_kind: str = "norm", importance_top: int = 16
              ) -> tuple[tuple[np.ndarray, float] | None,
                         dict[str, float | list[float]] | None, dict[str, float]]:
        """One gradient pass at the common initial adapter and head (Phases 1 and 2).

        With ``fingerprint``: the task fingerprint (Phase 1). With ``importance``: every LoRA
        module's importance (Phase 2, ``importance_kind`` norm or spectrum, the top
        ``importance_top`` values of a spectrum: ``atlasfl.phases.ranks.ImportanceMeter``), from
        the same backward pass when both are asked, so the client reads its data once. Returns
        what the server received: ((fingerprint, its noise variance) or None, importance by
        module or None, client-side diagnostics).
        """
        start = time.perf_counter()
        client = self.clients[client_id]
        initial = {k: nn.Parameter(v.detach().clone()) for k, v in self.initial_adapter.items()}
        head = copy.deepcopy(self.initial_heads[client.task.num_labels]).eval()
        self.binder.bind(initial)
        self.model.eval()
        blocks = select_blocks(self.num_layers, settings.layers)
        modules = (fingerprint_modules(self.model, self.num_layers, blocks, params=settings.params)
                   if fingerprint else {})
        meter = None
        if importance:  # norm: each module's LoRA B factor | spectrum: its frozen weight
            paths = [k.removesuffix(".lora_B.weight") for k in initial
                     if k.endswith(".lora_B.weight")]
            meter = ImportanceMeter(
                {p: (initial[f"{p}.lora_B.weight"] if importance_kind == "norm"
                     else self.model.get_submodule(p).base_layer.weight) for p in paths},
                importance_kind, importance_top)
        tensors = [m.weight for m in modules.values()]
        tensors += list(meter.params.values()) if meter else []
        frozen = list({id(p): p for p in tensors if not p.requires_grad}.values())
        for p in frozen:  # frozen base weights: differentiate them for this pass only
            p.requires_grad_(True)
        seed = client_seed(self.seed, round_idx, client_id)
        gen = torch.Generator().manual_seed(seed)
        samples = settings.samples if fingerprint else importance_samples
        rows = torch.randperm(len(client.train_set), generator=gen)[:samples].numpy()
        batches = [{k: v.to(self.device) for k, v in
                    client.train_set.collate(rows[i : i + settings.batch_size]).items()}
                   for i in range(0, len(rows), settings.batch_size)]

        def loss_fn(batch):
            logits = forward_logits(self.model, head, batch)
            return task_loss(logits, batch["labels"], client.task.is_regression)

        vector, scores = None, None
        try:
            if fingerprint:
                fp = compute_fingerprint(loss_fn, batches, modules, dim=settings.dim,
                                         seed=self.seed, blocks=blocks,
                                         statistic=settings.statistic,
                                         epsilon=settings.epsilon or None, delta=settings.delta,
                                         clip=settings.clip, generator=gen,
                                         importance=meter)
                vector, noise, scores = fp.vector, fp.noise_std, fp.importance or None
                noise_var = fp.noise_var
            else:
                noise = 0.0
                scores = module_importance(loss_fn, batches, meter) if meter else None
        finally:
            for p in frozen:
                p.requires_grad_(False)
        upload: dict[str, torch.Tensor] = {}
        if vector is not None:
            upload["fingerprint"] = torch.from_numpy(vector)
            upload["fingerprint_noise"] = torch.tensor([noise_var], dtype=torch.float32)
        if scores is not None:
            upload["importance"] = torch.tensor(list(scores.values()), dtype=torch.float32)
        received = self.channel.upload(round_idx, client_id, upload)
        if vector is not None:
            vector = (received["fingerprint"].numpy(), float(received["fingerprint_noise"][0]))
        if scores is not None:
            scores = dict(zip(scores, received["importance"].tolist(), strict=True))
        return vector, scores, {"fingerprint_seconds": time.perf_counter() - start,
                                "fingerprint_noise_std": noise}

    def configure(self, round_idx: int, client_id: ClientId, ranks: dict[str, int]) -> None:
        """Phase 2: send a client its per-module ranks; it builds its adapter at those ranks."""
        client = self.clients[client_id]
        if client.ranks() == ranks:
            return
        names = list(ranks)
        received = self.channel.download(round_idx, client_id, {
            "ranks": torch.tensor([ranks[n] for n in names], dtype=torch.int32)})
        planned = dict(zip(names, received["ranks"].tolist(), strict=True))
        client.replace_adapter(plan_adapter(self.model, self.lora, planned, seed=self.seed))

    def write(self, round_idx: int, writes: dict[ClientId, AdapterState]) -> None:
        """Send server tensors down and write them into the clients' models."""
        for client_id, state in writes.items():
            self.clients[client_id].load(self.channel.download(round_idx, client_id, state))

    def evaluate(self, client_id: ClientId) -> dict[str, float]:
        """The client's own model on its task's test split (and its validation split)."""
        client = self.clients[client_id]
        args = (self.model, self.binder, client.adapter, client.head)
        # Clients of one group often hold bit-identical models after aggregation: score the
        # shared test split once per distinct (task, model), keyed by a digest of the tensors.
        key = (client.task.name, _digest(client.state()))
        if key not in self._test_cache:
            self._test_cache[key] = evaluate(*args, self.test_sets[client.task.name],
                                             client.task, self.cfg, device=self.device)
        test = self._test_cache[key]
        out = {f"eval_{k}" if k == "loss" else k: v for k, v in test.items()}
        if len(client.val_set):
            val = evaluate(*args, client.val_set, client.task, self.cfg, device=self.device)
            out["val_loss"], out["val_metric"] = val["loss"], val["metric"]
        return out

    def run(self, round_idx: int, plans: Sequence[TrainPlan]):
        """Train every planned client; yields (plan, update or None, metrics) as each finishes."""
        for plan in plans:
            update, metrics = self.train(round_idx, plan)
            yield plan, update, metrics


def make_executor(exp: Experiment, ledger: CommLedger) -> InProcessExecutor:
    """The in-process executor of an experiment, counting transfers in ``ledger``."""
    return InProcessExecutor(exp.model, exp.binder, exp.clients, exp.test_sets, exp.cfg.train,
                             seed=exp.cfg.seed, device=exp.device,
                             channel=InProcessChannel(ledger), upload=exp.strategy.uploads,
                             initial_adapter=exp.initial_adapter,
                             initial_heads=exp.initial_heads, num_layers=exp.backbone.num_layers,
                             lora=exp.cfg.model.lora)
