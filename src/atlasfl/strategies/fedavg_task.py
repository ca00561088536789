"""``fedavg-task``: FedAvg within each true task — the oracle clustering.

Reads the true task of each client, which a real server does not know: it is the ceiling that
task clustering (``fedavg-cluster``) tries to reach.
"""

from __future__ import annotations

from atlasfl.strategies.base import register
from atlasfl.strategies.fedavg import FedAvg


@register
class FedAvgTask(FedAvg):
    """FedAvg with one group per true task."""

    name = "fedavg-task"
    grouping = "task"
