"""``fedavg-cluster``: FedAvg within the task clusters found from gradient fingerprints.

The realistic counterpart of ``fedavg-task``: the server never reads the true task. Before round 1
(and every ``clustering.recluster_every`` rounds when set) every client uploads a fingerprint
(``atlasfl.phases.fingerprint``); the server clusters them and picks k itself
(``atlasfl.phases.clustering``), then averages adapters and heads within each cluster. True tasks
are passed to the clustering only to score it (ARI/NMI/purity), never to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from atlasfl.phases.clustering import cluster_fingerprints
from atlasfl.strategies.base import ClientUpdate, RoundOutcome, Strategy, register
from atlasfl.strategies.fedavg import GroupModels, aggregate_groups
from atlasfl.types import ClientId


@dataclass(frozen=True)
class ClusterState:
    """Server state: the per-cluster models, each client's cluster and the cluster centroids."""

    models: GroupModels = field(default_factory=GroupModels)
    assignment: dict[str, int] = field(default_factory=dict)  # client id (str) -> cluster
    centroids: torch.Tensor | None = None  # (k, dim), for clients that join later
    k: int = 0
    center: torch.Tensor | None = None  # (dim,) the centring of the fingerprints (late joiners)


@dataclass(frozen=True)
class Clusters:
    """What Phase 1's server step keeps: each client's cluster, centroids and centring."""

    assignment: dict[str, int]  # client id (str) -> cluster
    centroids: torch.Tensor  # (k, dim)
    center: torch.Tensor | None  # (dim,)
    k: int


def cluster_clients(strategy: Strategy, fingerprints: dict[ClientId, np.ndarray],
                    noise: dict[ClientId, float] | None = None
                    ) -> tuple[Clusters, dict[str, float]]:
    """Phase 1's server step for any strategy: the clusters and their metrics."""
    c = strategy.cfg.clustering
    ids = sorted(fingerprints)
    result = cluster_fingerprints(
        np.stack([fingerprints[i] for i in ids]), k=c.k or None,
        k_range=(c.k_min, c.k_max), method=c.method, seed=strategy.cfg.seed,
        true_labels=[strategy.clients[i].task for i in ids], center=c.center,
        noise_var=np.array([noise[i] for i in ids]) if noise and c.debias else None,
        criteria=tuple(c.criteria), min_signal=c.min_signal)
    assignment = {str(i): int(label) for i, label in zip(ids, result.labels, strict=True)}
    center = None if result.center is None else torch.from_numpy(result.center).float()
    clusters = Clusters(assignment, torch.from_numpy(result.centroids).float(), center, result.k)
    return clusters, {"k": float(result.k), **result.quality}


def recluster_due(cfg, round_idx: int) -> bool:
    """Round 1, and every ``clustering.recluster_every`` rounds after it when set."""
    every = cfg.clustering.recluster_every
    return round_idx == 1 or bool(every and (round_idx - 1) % every == 0)


@register
class FedAvgCluster(Strategy):
    """FedAvg per fingerprint cluster."""

    name = "fedavg-cluster"

    def init(self) -> ClusterState:  # noqa: D102
        return ClusterState()

    def fingerprint_round(self, round_idx: int) -> bool:
        """Whether clients upload fingerprints before this round."""
        return recluster_due(self.cfg, round_idx)

    def observe_fingerprints(self, state: ClusterState, round_idx: int,
                             fingerprints: dict[ClientId, np.ndarray],
                             noise: dict[ClientId, float] | None = None
                             ) -> tuple[ClusterState, dict[str, float]]:
        """Cluster the uploaded fingerprints into the new assignment."""
        found, metrics = cluster_clients(self, fingerprints, noise)
        models = state.models if found.assignment == state.assignment else GroupModels()
        return ClusterState(models, found.assignment, found.centroids, found.k,
                            found.center), metrics

    def aggregate_round(self, state: Any, round_idx: int, updates: Sequence[ClientUpdate]
                        ) -> RoundOutcome:
        """FedAvg within each found cluster."""
        def group_of(info):
            return f"cluster={state.assignment[str(info.client_id)]}"

        models, writes = aggregate_groups(state.models, self.clients, updates, group_of)
        groups = {group_of(self.clients[u.client_id]) for u in updates}
        return RoundOutcome(replace(state, models=models), writes,
                            {"groups": float(len(groups))})
