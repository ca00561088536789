"""Methods as strategies, looked up by name."""

from atlasfl.strategies import centralized, fedavg, fedavg_task, local  # noqa: F401 (register)
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
