"""Methods as strategies, looked up by name."""

from atlasfl.strategies import (  # noqa: F401 (registers each method)
    centralized,
    fedavg,
    fedavg_cluster,
    fedavg_task,
    local,
    mixed_rank,
)
from atlasfl.strategies.base import (
    STRATEGIES,
    ClientInfo,
    ClientUpdate,
    RoundOutcome,
    Strategy,
    TrainPlan,
    get_strategy,
)

__all__ = ["STRATEGIES", "ClientInfo", "ClientUpdate", "RoundOutcome", "Strategy", "TrainPlan",
           "get_strategy"]
