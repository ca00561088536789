"""Methods as strategies, looked up by name."""

from atlasfl.strategies import (  # noqa: F401 (registers each method)
    atlas,
    centralized,
    fedavg,
    fedavg_cluster,
    fedavg_task,
    fedsa,
    hetlora,
    laplacian,
    local,
    mixed_rank,
    splitlora,
)
from atlasfl.strategies.base import (
    STRATEGIES,
    ClientInfo,
    ModelInfo,
    RoundInfo,
    RoundOutcome,
    Strategy,
    get_strategy,
)
from atlasfl.strategies.groups import Groups

__all__ = ["STRATEGIES", "ClientInfo", "Groups", "ModelInfo", "RoundInfo", "RoundOutcome",
           "Strategy", "get_strategy"]
