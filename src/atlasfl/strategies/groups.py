"""Groups of clients and the mixing of their updates: where every aggregation is computed.

**Groups.** The server groups its clients globally (one group), by true task (an oracle) or by the
clusters Phase 1 finds from their fingerprints (``cluster_groups``). ``Groups`` holds all of it in
one place: each client's group, the clustering's similarity matrix, and each group's latest
aggregate adapter and heads (per head shape: only heads of one label space can be averaged).

**Mixing.** An aggregation mixes the clients' updates by rows of weights: target t receives
``combine([u_i for i in row t], [w_ti])`` (FedAvg's combiner normalises the weights). FedAvg within
groups (McMahan et al., arXiv:1602.05629) is one row per group whose weights are the members'
example counts (``fedavg_rows``); mixed-rank aggregation changes the combiner, not the rows
(``atlasfl.phases.aggregation.aggregate_mixed``); Phase 4's Laplacian step is one row per client
over its neighbours (``atlasfl.phases.laplacian.laplacian_rows``). ``mix``
(``atlasfl.phases.aggregation``) applies any such rows.

**Delivery.** A group's new aggregate is not pushed to its members: a client receives it with the
next plan that reaches it, and holds it once it has replied to that plan (what each client holds
is recorded in one place, ``atlasfl.strategies.holdings``). A client that is not addressed costs
nothing, and a client that never answers is sent the model again. ``outbox`` keeps, until
delivered, the share of an aggregate computed for a client from its own upload (mixed ranks keep a
trained client's factor coordinates); it holds only clients that trained in their group's latest
aggregation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from atlasfl.phases.aggregation import K, Combine, Rows, mix
from atlasfl.phases.clustering import cluster_fingerprints
from atlasfl.types import AdapterState, ClientId, Grouping

if TYPE_CHECKING:
    from torch import Tensor

    from atlasfl.config import ExperimentConfig
    from atlasfl.messages import Update
    from atlasfl.strategies.info import ClientInfo

GLOBAL = "all"


def initial_members(kind: Grouping, clients: Mapping[ClientId, ClientInfo]) -> dict[str, str]:
    """Each client's group before any fingerprint: one group, or its true task (an oracle).

    Cluster groups are unknown until Phase 1 (``cluster_groups``): none yet.
    """
    if kind == "cluster":
        return {}
    return {str(c): GLOBAL if kind == "global" else f"task={info.task}"
            for c, info in clients.items()}


def head_key(group: str, shape: tuple[int, ...]) -> str:
    """Heads aggregate within a group and a head shape."""
    return f"{group}/head{'x'.join(map(str, shape))}"


def fedavg_rows(targets: Mapping[ClientId, K], updates: Sequence[Update]) -> Rows[K]:
    """One row per target with an update: each contributing client's example count."""
    rows: Rows[K] = {}
    for u in updates:
        rows.setdefault(targets[u.client_id], {})[u.client_id] = u.num_examples
    return rows


@dataclass(frozen=True)
class Groups:
    """The server's groups and their latest models (checkpointed)."""

    members: dict[str, str] = field(default_factory=dict)  # client id (str) -> group
    # (num_clients, num_clients) cosine similarity of the clients' fingerprints in the geometry
    # they were clustered in, clients in id order (cluster grouping only)
    similarity: Tensor | None = None
    adapters: dict[str, AdapterState] = field(default_factory=dict)  # group -> aggregate
    heads: dict[str, AdapterState] = field(default_factory=dict)  # head_key -> aggregate
    versions: dict[str, int] = field(default_factory=dict)  # group -> round of its aggregate
    outbox: dict[str, AdapterState] = field(default_factory=dict)  # client -> its share

    def group(self, client_id: ClientId) -> str:
        """The group of a client."""
        return self.members[str(client_id)]

    def tag(self, client_id: ClientId) -> str | None:
        """``group@round`` of the latest aggregate of a client's group (None: none yet)."""
        group = self.members.get(str(client_id))
        if group is None or group not in self.versions:
            return None
        return f"{group}@{self.versions[group]}"

    def regroup(self, members: dict[str, str], similarity: Tensor | None) -> Groups:
        """A new grouping; the models start over unless every client kept its group."""
        if members == self.members:
            return dataclasses.replace(self, similarity=similarity)
        return Groups(members, similarity)

    def delivered(self, client_ids: Iterable[ClientId]) -> Groups:
        """These clients replied to a plan: the shares computed for them are delivered."""
        done = {str(c) for c in client_ids if self.tag(c) is not None}
        return dataclasses.replace(self, outbox={c: a for c, a in self.outbox.items()
                                                 if c not in done})

    def aggregate(self, updates: Sequence[Update], clients: Mapping[ClientId, ClientInfo],
                  round_idx: int, combine: Combine[str] | None = None) -> Groups:
        """Mix the updates within each group (adapters) and each (group, head shape) (heads)."""
        groups = {u.client_id: self.group(u.client_id) for u in updates}
        adapters = mix(fedavg_rows(groups, updates), {u.client_id: u.adapter for u in updates},
                       combine)
        heads = mix(fedavg_rows({c: head_key(g, clients[c].head_shape)
                                 for c, g in groups.items()}, updates),
                    {u.client_id: u.head for u in updates})
        outbox = {c: a for c, a in self.outbox.items() if self.members[c] not in adapters}
        return dataclasses.replace(
            self, adapters={**self.adapters, **adapters}, heads={**self.heads, **heads},
            versions={**self.versions, **dict.fromkeys(adapters, round_idx)}, outbox=outbox)


def recluster_due(cfg: ExperimentConfig, round_idx: int) -> bool:
    """Round 1, and every ``clustering.recluster_every`` rounds after it when set."""
    every = cfg.clustering.recluster_every
    return round_idx == 1 or bool(every and (round_idx - 1) % every == 0)


class Clustering(NamedTuple):
    """Phase 1's server step as the grouping part uses it."""

    members: dict[str, str]  # client id (str) -> its group's name ("cluster=<label>")
    similarity: Tensor  # (N, N) in the geometry the clients were clustered in, id order
    metrics: dict[str, float]  # k, and ARI/NMI/purity against the true tasks (scoring only)
    labels: dict[ClientId, int]  # client -> its cluster's label (never parsed from a name)


def cluster_groups(fingerprints: Mapping[ClientId, tuple[np.ndarray, float]],
                   clients: Mapping[ClientId, ClientInfo], cfg: ExperimentConfig
                   ) -> Clustering:
    """Phase 1's server step: groups from fingerprints (and their noise variances)."""
    c = cfg.clustering
    ids = sorted(fingerprints)
    result = cluster_fingerprints(
        np.stack([fingerprints[i][0] for i in ids]), k=c.k or None,
        k_range=(c.k_min, c.k_max), method=c.method, seed=cfg.seed,
        true_labels=[clients[i].task for i in ids], center=c.center,
        noise_var=np.array([fingerprints[i][1] for i in ids]) if c.debias else None,
        criteria=tuple(c.criteria), min_signal=c.min_signal)
    labels = {i: int(label) for i, label in zip(ids, result.labels, strict=True)}
    return Clustering({str(i): f"cluster={label}" for i, label in labels.items()},
                      torch.from_numpy(result.similarity),
                      {"k": float(result.k), **result.quality}, labels)
