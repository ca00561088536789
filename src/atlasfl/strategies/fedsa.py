"""``fedsa``: FedSA-LoRA, a current personalised-LoRA peer of ``atlas``.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
arXiv:2410.01463. The A factors of LoRA learn what clients share and the B factors what is
theirs: each client uploads only its A factors, the server averages them within the group (here
all clients, as the paper does), and every client keeps its own B factors and head, which never
leave it. Equal ranks (``model.lora.r``); the upload is half an adapter, counted as sent.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from atlasfl.messages import Model, Train
from atlasfl.strategies.base import RoundInfo, register
from atlasfl.strategies.fedavg import FedAvg
from atlasfl.types import ClientId


@register
class FedSA(FedAvg):
    """A factors averaged over all clients; B factors and heads stay on each client."""

    name = "fedsa"

    def configure_train(self, state: Any, rnd: RoundInfo) -> list[Train]:
        """Every sampled client trains and uploads its A factors only."""
        return [dataclasses.replace(p, shares="lora_A")
                for p in super().configure_train(state, rnd)]

    def download(self, state: Any, client_id: ClientId) -> Model:
        """The group's averaged A factors, never a head (each client keeps its own)."""
        return dataclasses.replace(super().download(state, client_id), head=None)
