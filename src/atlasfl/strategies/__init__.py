"""Methods as recipes of parts, looked up by name, and the one strategy that drives them."""

from atlasfl.strategies.base import RoundInfo, RoundOutcome
from atlasfl.strategies.groups import Groups
from atlasfl.strategies.info import ClientInfo, ModelInfo
from atlasfl.strategies.methods import METHODS, get_method
from atlasfl.strategies.recipe import Recipe
from atlasfl.strategies.strategy import Strategy

__all__ = ["METHODS", "ClientInfo", "Groups", "ModelInfo", "Recipe", "RoundInfo",
           "RoundOutcome", "Strategy", "get_method"]
