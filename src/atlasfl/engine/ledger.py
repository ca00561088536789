"""Communication ledger: bytes that would cross the network, per round, client, direction, kind.

Kinds are those of ``atlasfl.messages`` (adapter, head, rank_plan, fingerprint, importance, and
for split learning activations, labels, activation_grads, eval_activations, eval_logits): what a
payload's tensors hold. Bytes are numel x element size of every tensor;
names and message framing are not counted.
"""

from __future__ import annotations

from collections import defaultdict

from atlasfl.types import AdapterState, ClientId

DIRECTIONS = ("up", "down")  # up: client to server


def state_bytes(state: AdapterState) -> int:
    """Bytes of a tensor dict as sent: numel x element size of every tensor."""
    return sum(t.numel() * t.element_size() for t in state.values())


class CommLedger:
    """Counts every transfer once; the channel is the only writer."""

    def __init__(self) -> None:
        # (round, client) -> "<direction>_<kind>" -> bytes
        self._bytes: dict[tuple[int, ClientId], dict[str, int]] = defaultdict(dict)

    def record(self, round_idx: int, client_id: ClientId, direction: str, kind: str,
               num_bytes: int) -> None:
        """Add ``num_bytes`` of ``kind`` sent ``up`` (client to server) or ``down``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r} not in {DIRECTIONS}")
        entry = self._bytes[(round_idx, client_id)]
        key = f"{direction}_{kind}"
        entry[key] = entry.get(key, 0) + num_bytes

    def get(self, round_idx: int, client_id: ClientId, direction: str) -> int:
        """Bytes sent in one round by/to one client in one direction, all kinds."""
        return sum(n for key, n in self._bytes.get((round_idx, client_id), {}).items()
                   if key.startswith(direction + "_"))

    def kinds(self, round_idx: int, client_id: ClientId) -> dict[str, int]:
        """Bytes of one round and client by ``<direction>_<kind>`` (``up_adapter``, ...)."""
        return dict(sorted(self._bytes.get((round_idx, client_id), {}).items()))
