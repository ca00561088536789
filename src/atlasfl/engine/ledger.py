"""Communication ledger: bytes that would cross the network, per round, client and direction."""

from __future__ import annotations

from collections import defaultdict

from atlasfl.types import AdapterState, ClientId


def state_bytes(state: AdapterState) -> int:
    """Bytes of a tensor dict as sent: numel x element size of every tensor."""
    return sum(t.numel() * t.element_size() for t in state.values())


class CommLedger:
    """Counts every transfer once; the channel is the only writer."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[int, ClientId, str], int] = defaultdict(int)

    def record(self, round_idx: int, client_id: ClientId, direction: str, num_bytes: int) -> None:
        """Add ``num_bytes`` sent ``up`` (client to server) or ``down``."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction {direction!r} not in ('up', 'down')")
        self._bytes[(round_idx, client_id, direction)] += num_bytes

    def get(self, round_idx: int, client_id: ClientId, direction: str) -> int:
        """Bytes sent in one round by/to one client in one direction."""
        return self._bytes.get((round_idx, client_id, direction), 0)

    def total(self, direction: str) -> int:
        """All bytes in one direction so far."""
        return sum(v for (_, _, d), v in self._bytes.items() if d == direction)
