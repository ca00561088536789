"""The strategy interface: hooks called by the one round loop (``atlasfl.engine.simulation``).

A strategy never calls clients. ``configure_round`` says who trains and what they receive first;
the executor runs the plans; ``aggregate_round`` turns the uploaded updates into new server state
and the tensors written back into clients' models (each write is a download, counted by the
channel). Server state is one frozen dataclass holding everything that crosses rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from atlasfl.errors import unknown_name
from atlasfl.types import AdapterState, ClientId


@dataclass(frozen=True)
class ClientInfo:
    """What the server may know of a client.

    ``task`` is the TRUE task: only oracle strategies (``fedavg-task``, ``centralized``) read it.
    """

    client_id: ClientId
    task: str
    num_examples: int
    head_shape: tuple[int, ...]  # the shape of its head's output layer: all the server sees
    device: str = ""  # the device profile it reports (Phase 2)


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of the shared model: its dimensions and LoRA modules."""

    dims: Any  # atlasfl.phases.memory.ModelDims
    shapes: dict[str, tuple[int, int]]  # LoRA module path -> (in_features, out_features)
    head_params: dict[int, int]  # number of outputs -> parameters of such a head


@dataclass(frozen=True)
class TrainPlan:
    """One client's work this round; ``download`` is written into its model before it trains."""

    client_id: ClientId
    download: AdapterState | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """What a client uploaded after training."""

    client_id: ClientId
    state: AdapterState
    num_examples: int


@dataclass(frozen=True)
class RoundOutcome:
    """Result of ``aggregate_round``."""

    state: Any  # the strategy's frozen server-state dataclass
    writes: dict[ClientId, AdapterState] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


class Strategy:
    """Base class: every sampled client trains, nothing is sent, nothing aggregated."""

    name: ClassVar[str] = ""
    uploads: ClassVar[bool] = True  # trained clients send their adapter+head to the server
    pools_data: ClassVar[bool] = False  # one client per task holding all its data (centralized)

    def __init__(self, clients: Sequence[ClientInfo], cfg: Any, model: ModelInfo | None = None):
        self.clients = {c.client_id: c for c in clients}
        self.cfg = cfg  # the ExperimentConfig: a strategy reads its own section
        self.model = model

    def fingerprint_round(self, round_idx: int) -> bool:
        """Whether clients upload task fingerprints before this round (Phase 1)."""
        return False

    def observe_fingerprints(self, state: Any, round_idx: int, fingerprints: dict[ClientId, Any],
                             noise: dict[ClientId, float] | None = None
                             ) -> tuple[Any, dict[str, float]]:
        """Turn uploaded fingerprints (and their noise variances) into new server state."""
        return state, {}

    def importance_round(self, round_idx: int) -> bool:
        """Whether clients upload module importance before this round (Phase 2)."""
        return False

    def observe_importance(self, state: Any, round_idx: int,
                           importance: dict[ClientId, dict[str, Any]]
                           ) -> tuple[Any, dict[str, float]]:
        """Turn uploaded module importance into new server state (rank plans)."""
        return state, {}

    def client_ranks(self, state: Any) -> dict[ClientId, dict[str, int]]:
        """Per-module ranks each client must hold now (empty: clients keep theirs)."""
        return {}

    def client_records(self, state: Any) -> dict[str, Any]:
        """Per-client configuration worth keeping in the run folder (device, memory, ranks)."""
        return {}

    def init(self) -> Any:
        """Initial server state."""
        return None

    def configure_round(self, state: Any, round_idx: int, sampled: Sequence[ClientId]
                        ) -> list[TrainPlan]:
        """Who trains this round and what each receives first."""
        return [TrainPlan(c) for c in sampled]

    def aggregate_round(self, state: Any, round_idx: int, updates: Sequence[ClientUpdate]
                        ) -> RoundOutcome:
        """New server state and write-backs from this round's updates."""
        return RoundOutcome(state)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the name registry."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    """Look up a strategy class by method name."""
    if name not in STRATEGIES:
        raise unknown_name("method", name, STRATEGIES)
    return STRATEGIES[name]


