"""The server state of every method: one frozen dataclass, one field per part that keeps state.

A strategy's state crosses rounds and checkpoints (``atlasfl.engine.checkpoint`` walks it
generically), so everything a part remembers lives here and nowhere else:

- ``groups`` (the grouping part, ``atlasfl.strategies.grouping``): each client's group and the
  group models the aggregation part writes (``atlasfl.strategies.groups.Groups``);
- ``plan`` (rank planning, ``atlasfl.strategies.rank_plan``): each client's ranks and record;
- ``split`` (split learning, ``atlasfl.strategies.split_learning``): cuts and server models;
- ``personal`` (personalisation, ``atlasfl.strategies.personal``): each client's own model and
  the client graph;
- ``held``: what each client holds of all that (``atlasfl.strategies.holdings``), the one record
  of what reached whom, which the strategy keeps from the replies.

A part that a method does not use leaves its field empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atlasfl.strategies.groups import Groups
from atlasfl.strategies.holdings import Holdings
from atlasfl.types import AdapterState

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class PlanState:
    """Every client's rank map and configuration record (Phase 2)."""

    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> module -> rank
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # client -> configuration
    excluded: tuple[int, ...] = ()  # clients whose device cannot hold the minimum adapter


@dataclass(frozen=True)
class ServerModel:
    """A group's server-side model: adapter, heads (vanilla) and optimizer moments (tensors)."""

    adapter: AdapterState = field(default_factory=dict)  # empty: the common initialisation
    heads: dict[str, AdapterState] = field(default_factory=dict)  # str(outputs) -> head
    moments: dict[str, Tensor] = field(default_factory=dict)  # "<param>/<exp_avg|...>"


@dataclass(frozen=True)
class SplitState:
    """The cut of every split client and each group's server model (Phase 3)."""

    cuts: dict[str, tuple[int, int]] = field(default_factory=dict)  # client -> (cut, tail)
    server: dict[str, ServerModel] = field(default_factory=dict)  # group -> server-side model


@dataclass(frozen=True)
class PersonalState:
    """Every client's own model and the client graph (Phase 4)."""

    models: dict[str, AdapterState] = field(default_factory=dict)  # client -> own adapter
    heads: dict[str, AdapterState] = field(default_factory=dict)  # client -> own head
    stepped: dict[str, int] = field(default_factory=dict)  # client -> round its model was set
    adjacency: Tensor | None = None  # (N, N) client graph, clients in id order
    eta: float = 0.0  # the step size (laplacian.eta, or 1 / the graph's largest eigenvalue)


@dataclass(frozen=True)
class ServerState:
    """Everything the server keeps across rounds."""

    groups: Groups = field(default_factory=Groups)
    plan: PlanState = field(default_factory=PlanState)
    split: SplitState = field(default_factory=SplitState)
    personal: PersonalState = field(default_factory=PersonalState)
    held: Holdings = field(default_factory=Holdings)
