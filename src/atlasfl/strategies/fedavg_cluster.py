"""``fedavg-cluster``: FedAvg within the task clusters found from gradient fingerprints.

The realistic counterpart of ``fedavg-task``: the server never reads the true task. Before round 1
(and every ``clustering.recluster_every`` rounds when set) every client uploads a fingerprint
(``atlasfl.phases.fingerprint``); the server clusters them and picks k itself
(``atlasfl.phases.clustering``), then averages adapters and heads within each cluster. True tasks
are passed to the clustering only to score it (ARI/NMI/purity), never to decide.
"""

from __future__ import annotations

from atlasfl.strategies.base import register
from atlasfl.strategies.fedavg import FedAvg


@register
class FedAvgCluster(FedAvg):
    """FedAvg per fingerprint cluster."""

    name = "fedavg-cluster"
    grouping = "cluster"
