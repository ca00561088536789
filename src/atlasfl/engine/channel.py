"""Channels carry messages between server and clients and count their payloads in the ledger.

The in-process channel copies every tensor of a payload (so neither side can alias the other's
memory, as over a network) and records its bytes by kind; a network channel (Flower) implements
the same call. Simulated failures wrap a channel (``atlasfl.engine.faults.FaultyChannel``).
"""

from __future__ import annotations

from typing import Protocol

from atlasfl.engine.ledger import CommLedger, state_bytes
from atlasfl.messages import M
from atlasfl.types import ClientId


class Channel(Protocol):
    """Carries one message between the server and a client."""

    def send(self, round_idx: int, client_id: ClientId, direction: str, message: M) -> M:
        """Carry ``message`` ``down`` (server to client) or ``up``; returns what arrives."""
        ...


class InProcessChannel:
    """Server and clients in one process."""

    def __init__(self, ledger: CommLedger):
        self.ledger = ledger

    def send(self, round_idx: int, client_id: ClientId, direction: str, message: M) -> M:
        """Carry ``message`` ``down`` (server to client) or ``up``; returns what arrives."""
        received = {kind: {name: t.detach().clone() for name, t in tensors.items()}
                    for kind, tensors in message.payload().items()}
        for kind, tensors in received.items():
            self.ledger.record(round_idx, client_id, direction, kind, state_bytes(tensors))
        return message.with_payload(received)
