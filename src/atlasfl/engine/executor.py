"""Runs strategy plans on clients. In-process here; a Flower executor offers the same calls."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import torch
from torch import nn

from atlasfl.client import ClientState, evaluate, train_client
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.engine.channel import InProcessChannel
from atlasfl.models.lora import AdapterBinder
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
                 device: torch.device, channel: InProcessChannel, upload: bool):
        self.model, self.binder, self.clients = model, binder, clients
        self.test_sets, self.cfg, self.seed, self.device = test_sets, cfg, seed, device
        self.channel, self.upload = channel, upload
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
