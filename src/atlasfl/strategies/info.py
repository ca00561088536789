"""What the server knows of its clients and of the shared model (no other strategy module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.phases.memory import ModelDims


@dataclass(frozen=True)
class ClientInfo:
    """What the server may know of a client.

    ``task`` is the TRUE task: only oracle parts (grouping ``task``, ``centralized``'s pooling)
    read it to decide; clustering reads it only to score itself.
    """

    client_id: ClientId
    task: str
    num_examples: int
    head_shape: tuple[int, ...]  # the shape of its head's output layer: all the server sees
    device: str = ""  # the device profile it reports (Phase 2)


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of the shared model: its dimensions and LoRA modules."""

    dims: ModelDims | None  # None: no memory model for this architecture
    shapes: dict[str, tuple[int, int]]  # LoRA module path -> (in_features, out_features)
    head_params: dict[int, int]  # number of outputs -> parameters of such a head
