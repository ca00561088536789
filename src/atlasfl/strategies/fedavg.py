"""``fedavg``: one global adapter over all clients, task-agnostic.

FedAvg (McMahan et al., arXiv:1602.05629) applied to LoRA adapters and heads. The server does not
know tasks; a head can only be averaged with heads of the same shape, so heads are shared among
clients whose label spaces have the same size. The example-weighted mean is written back into
every client of the group, sampled or not (each write counted as a download).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

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


@register
class FedAvg(Strategy):
    """Example-weighted averaging within groups; here a single group of all clients."""

    name = "fedavg"

    def group_of(self, client: ClientInfo) -> str:
        """The aggregation group of a client; subclasses change only this."""
        return "all"

    def init(self) -> GroupModels:  # noqa: D102
        return GroupModels()

    def aggregate_round(self, state: GroupModels, round_idx: int,
                        updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Average adapters per group and heads per (group, head shape); write back to all."""
        by_group: dict[str, list[ClientUpdate]] = defaultdict(list)
        for update in updates:
            by_group[self.group_of(self.clients[update.client_id])].append(update)
        adapters, heads = dict(state.adapters), dict(state.heads)
        for group, members in by_group.items():
            parts = [_split(u.state) for u in members]
            adapters[group] = weighted_average([a for a, _ in parts],
                                               [u.num_examples for u in members])
            by_shape: dict[str, list[tuple[AdapterState, int]]] = defaultdict(list)
            for u, (_, head) in zip(members, parts, strict=True):
                shape = self.clients[u.client_id].head_shape
                by_shape[_shape_key(group, shape)].append((head, u.num_examples))
            for key, items in by_shape.items():
                heads[key] = weighted_average([h for h, _ in items], [n for _, n in items])
        writes: dict[ClientId, dict[str, Tensor]] = {}
        for cid, info in self.clients.items():
            group = self.group_of(info)
            if group not in by_group:
                continue  # nobody of this group trained this round: nothing new to send
            write = dict(adapters[group])
            write.update(heads.get(_shape_key(group, info.head_shape), {}))
            writes[cid] = write
        metrics = {"groups": float(len(by_group))}
        return RoundOutcome(GroupModels(adapters, heads), writes, metrics)
