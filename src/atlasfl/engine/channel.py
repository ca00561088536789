"""Channels carry tensors between server and clients and count them in the ledger.

The in-process channel copies tensors (so neither side can alias the other's memory, as over a
network); a network channel (Flower) implements the same two calls.
"""

from __future__ import annotations

from atlasfl.engine.ledger import CommLedger, state_bytes
from atlasfl.types import AdapterState, ClientId


class InProcessChannel:
    """Server and clients in one process."""

    def __init__(self, ledger: CommLedger):
        self.ledger = ledger

    def _send(self, round_idx: int, client_id: ClientId, direction: str, state: AdapterState
              ) -> AdapterState:
        received = {k: v.detach().clone() for k, v in state.items()}
        self.ledger.record(round_idx, client_id, direction, state_bytes(received))
        return received

    def upload(self, round_idx: int, client_id: ClientId, state: AdapterState) -> AdapterState:
        """Client -> server."""
        return self._send(round_idx, client_id, "up", state)

    def download(self, round_idx: int, client_id: ClientId, state: AdapterState) -> AdapterState:
        """Server -> client."""
        return self._send(round_idx, client_id, "down", state)
