"""``fedavg``: one global adapter over all clients, task-agnostic.

FedAvg (McMahan et al., arXiv:1602.05629) applied to LoRA adapters and heads. The server does not
know tasks; a head can only be averaged with heads of the same shape, so heads are shared among
clients whose label spaces have the same size. The example-weighted mean is written back into
every client of the group, sampled or not (each write counted as a download).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from atlasfl.client import HEAD_PREFIX
from atlasfl.phases.aggregation import weighted_average
from atlasfl.strategies.base import ClientInfo, ClientUpdate, RoundOutcome, Strategy, register
from atlasfl.types import AdapterState, ClientId


@dataclass(frozen=True)
class GroupModels:
    """Latest aggregate per group: ``adapters[group]`` and ``heads[group/head-shape]``."""

    adapters: dict[str, AdapterState] = field(default_factory=dict)
    heads: dict[str, AdapterState] = field(default_factory=dict)


def _split(state: AdapterState) -> tuple[AdapterState, AdapterState]:
    adapter = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return adapter, head


def _shape_key(group: str, shape: tuple[int, ...]) -> str:
    return f"{group}/head{'x'.join(map(str, shape))}"


def aggregate_groups(models: GroupModels, clients: dict[ClientId, ClientInfo],
                     updates: Sequence[ClientUpdate], group_of: Callable[[ClientInfo], str], *,
                     combine: Callable[[list[AdapterState], list[int], AdapterState | None],
                                       AdapterState] | None = None,
                     deliver: Callable[[ClientId, AdapterState], AdapterState] | None = None
                     ) -> tuple[GroupModels, dict[ClientId, AdapterState]]:
    """Aggregation within groups: adapters per group, heads per (group, head shape).

    ``combine(states, weights, previous)`` aggregates a group's adapters, given the group's
    previous aggregate or None (default: FedAvg's weighted mean); ``deliver``
    turns a group aggregate into what one client receives (default: the aggregate itself; mixed
    ranks cut it to the client's ranks). Heads are always averaged per shape. Returns the new
    models and, for every client of a group that trained this round, the tensors to write back.
    """
    by_group: dict[str, list[ClientUpdate]] = defaultdict(list)
    for update in updates:
        by_group[group_of(clients[update.client_id])].append(update)
    adapters, heads = dict(models.adapters), dict(models.heads)
    for group, members in by_group.items():
        parts = [_split(u.state) for u in members]
        states, weights = [a for a, _ in parts], [u.num_examples for u in members]
        adapters[group] = (combine(states, weights, adapters.get(group)) if combine
                           else weighted_average(states, weights))
        by_shape: dict[str, list[tuple[AdapterState, int]]] = defaultdict(list)
        for u, (_, head) in zip(members, parts, strict=True):
            by_shape[_shape_key(group, clients[u.client_id].head_shape)].append(
                (head, u.num_examples))
        for key, items in by_shape.items():
            heads[key] = weighted_average([h for h, _ in items], [n for _, n in items])
    writes: dict[ClientId, AdapterState] = {}
    for cid, info in clients.items():
        group = group_of(info)
        if group not in by_group:
            continue  # nobody of this group trained this round: nothing new to send
        adapter = deliver(cid, adapters[group]) if deliver else adapters[group]
        writes[cid] = {**adapter, **heads.get(_shape_key(group, info.head_shape), {})}
    return GroupModels(adapters, heads), writes


@register
class FedAvg(Strategy):
    """Example-weighted averaging within groups; here a single group of all clients."""

    name = "fedavg"

    def group_of(self, client: ClientInfo) -> str:
        """The aggregation group of a client; subclasses change only this."""
        return "all"

    def init(self) -> GroupModels:  # noqa: D102
        return GroupModels()

    def aggregate_round(self, state: Any, round_idx: int, updates: Sequence[ClientUpdate]
                        ) -> RoundOutcome:
        """Average adapters per group and heads per (group, head shape); write back."""
        models, writes = aggregate_groups(state, self.clients, updates, self.group_of)
        groups = {self.group_of(self.clients[u.client_id]) for u in updates}
        return RoundOutcome(models, writes, {"groups": float(len(groups))})
