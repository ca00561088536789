"""The round protocol as the server sees it: what the one round loop hands a strategy.

A round is a sequence of exchanges (``atlasfl.messages``). The loop (``atlasfl.engine.simulation``)
asks the strategy (``atlasfl.strategies.strategy``) for the plans of the next exchange (``None``:
the round is over) and, when a plan splits a model, the server half they train with
(``Dispatch``); it delivers them through an executor and hands the typed replies back, with the
server half as training left it, which give the new server state. The loop knows no phase: a
round's ``stages`` name its exchanges (``probe``, ``train``, ``evaluate``), like Flower's
``configure_train``/``aggregate_train``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from atlasfl.messages import EvaluateReply, Plan, ProbeReply, TrainReply
from atlasfl.strategies.info import ClientInfo, ModelInfo
from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.strategies.state import ServerModel

Stage = Literal["probe", "train", "evaluate"]
REPLIES: dict[str, type] = {"probe": ProbeReply, "train": TrainReply, "evaluate": EvaluateReply}

__all__ = ["REPLIES", "ClientInfo", "Dispatch", "ModelInfo", "RoundInfo", "RoundOutcome",
           "Stage"]


@dataclass(frozen=True)
class RoundInfo:
    """Where the loop is: the round, who was sampled, whether it is evaluated, which exchange."""

    round_idx: int
    sampled: tuple[ClientId, ...]
    evaluate: bool
    exchange: int = 0  # index into the strategy's stages of this round


@dataclass(frozen=True)
class Dispatch:
    """An exchange's plans, and the server half of split learning when a plan splits a model.

    ``server``: group -> the server-side model its split clients train with in this exchange
    (``atlasfl.engine.split_server``); the loop hands the trained models back to
    ``aggregate_round`` as ``served``. None: no plan is split.
    """

    plans: list[Plan]
    server: dict[str, ServerModel] | None = None


@dataclass(frozen=True)
class RoundOutcome:
    """What one exchange's replies made of the server state."""

    state: Any  # the strategy's frozen server state
    metrics: dict[str, float] = field(default_factory=dict)  # recorded as server_<name>
    files: dict[str, Any] = field(default_factory=dict)  # JSON documents for the run folder
    notices: tuple[str, ...] = ()  # lines the runner shows the user
