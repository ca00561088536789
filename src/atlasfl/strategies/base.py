"""The strategy interface: what the one round loop (``atlasfl.engine.simulation``) calls.

A round is a sequence of exchanges (``atlasfl.messages``). The loop asks ``configure_round`` for
the plans of the next exchange (``None``: the round is over), delivers them through an executor and
hands the typed replies to ``aggregate_round``, which returns the new server state. The loop knows
no phase: a strategy's ``stages`` name the exchanges of a round (``probe``, ``train``,
``evaluate``) and the base class dispatches each to its ``configure_<stage>`` and
``aggregate_<stage>``, like Flower's ``configure_train``/``aggregate_train``. A strategy never calls
clients, and its server state is one frozen dataclass holding everything that crosses rounds.

What a client receives with a plan is ``download(state, client)``: the parts of its model it does
not hold yet (rank plan, adapter, head), so a download is counted when a plan reaches a client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from atlasfl.config import ExperimentConfig
from atlasfl.errors import unknown_name
from atlasfl.messages import (
    Evaluate,
    EvaluateReply,
    Model,
    Probe,
    ProbeReply,
    Train,
    TrainReply,
    Update,
)
from atlasfl.strategies.checks import check_update
from atlasfl.types import ClientId

if TYPE_CHECKING:
    from atlasfl.messages import Plan, Reply
    from atlasfl.phases.memory import ModelDims
    from atlasfl.strategies.split import ServerModel

Stage = Literal["probe", "train", "evaluate"]
REPLIES: dict[str, type] = {"probe": ProbeReply, "train": TrainReply, "evaluate": EvaluateReply}


@dataclass(frozen=True)
class ClientInfo:
    """What the server may know of a client.

    ``task`` is the TRUE task: only oracle strategies (``fedavg-task``, ``centralized``, grouping
    ``task``) read it to decide; clustering reads it only to score itself.
    """

    client_id: ClientId
    task: str
    num_examples: int
    head_shape: tuple[int, ...]  # the shape of its head's output layer: all the server sees
    device: str = ""  # the device profile it reports (Phase 2)


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of the shared model: its dimensions and LoRA modules."""

    dims: ModelDims | None  # None: no memory model for this architecture
    shapes: dict[str, tuple[int, int]]  # LoRA module path -> (in_features, out_features)
    head_params: dict[int, int]  # number of outputs -> parameters of such a head


@dataclass(frozen=True)
class RoundInfo:
    """Where the loop is: the round, who was sampled, whether it is evaluated, which exchange."""

    round_idx: int
    sampled: tuple[ClientId, ...]
    evaluate: bool
    exchange: int = 0  # index into the strategy's stages of this round
    # the server-side split models after the exchange (``server_models`` trained); None: no split
    served: dict[str, ServerModel] | None = None


@dataclass(frozen=True)
class RoundOutcome:
    """Result of ``aggregate_round``."""

    state: Any  # the strategy's frozen server-state dataclass
    metrics: dict[str, float] = field(default_factory=dict)  # recorded as server_<name>
    files: dict[str, Any] = field(default_factory=dict)  # JSON documents for the run folder
    notices: tuple[str, ...] = ()  # lines the runner shows the user


class Strategy:
    """Base class: sampled clients train alone, everyone is evaluated, nothing is aggregated."""

    name: ClassVar[str] = ""
    uploads: ClassVar[bool] = True  # trained clients send their adapter and head
    pools_data: ClassVar[bool] = False  # one client per task holding all its data (centralized)

    def __init__(self, clients: Sequence[ClientInfo], cfg: ExperimentConfig, model: ModelInfo):
        self.clients = {c.client_id: c for c in clients}
        self.cfg = cfg
        self.model = model

    def init(self) -> Any:
        """Initial server state."""
        return None

    # -- the protocol the loop drives -------------------------------------------------------

    def stages(self, rnd: RoundInfo) -> tuple[Stage, ...]:
        """The exchanges of a round, in order; a function of the round, never of the state."""
        return ("train", "evaluate") if rnd.evaluate else ("train",)

    def configure_round(self, state: Any, rnd: RoundInfo) -> list[Plan] | None:
        """Plans of exchange ``rnd.exchange`` (possibly none), or None when the round is over."""
        stages = self.stages(rnd)
        if rnd.exchange >= len(stages):
            return None
        configure: dict[str, Callable[[Any, RoundInfo], Sequence[Plan]]] = {
            "probe": self.configure_probe, "train": self.configure_train,
            "evaluate": self.configure_evaluate}
        return list(configure[stages[rnd.exchange]](state, rnd))

    def aggregate_round(self, state: Any, rnd: RoundInfo, replies: Sequence[Reply]
                        ) -> RoundOutcome:
        """New server state from the replies of exchange ``rnd.exchange``."""
        stage = self.stages(rnd)[rnd.exchange]
        wrong = [r for r in replies if not isinstance(r, REPLIES[stage])]
        if wrong:  # internal: the executor paired a plan with another kind of reply
            raise TypeError(f"{stage} exchange got a {type(wrong[0]).__name__}")
        aggregate: dict[str, Callable[[Any, RoundInfo, Any], RoundOutcome]] = {
            "probe": self.aggregate_probe, "train": self.aggregate_train,
            "evaluate": self.aggregate_evaluate}
        return aggregate[stage](state, rnd, replies)

    # -- what the server accepts -----------------------------------------------------------

    def planned_ranks(self, state: Any, client_id: ClientId) -> dict[str, int] | None:
        """Module -> the rank this client trains (None: not planned by this method)."""
        return None

    def check_update(self, state: Any, update: Update) -> str | None:
        """Why the server refuses ``update`` (``atlasfl.strategies.checks``), or None."""
        info = self.clients.get(update.client_id)
        if info is None:
            return f"client {update.client_id} is not in this run"
        return check_update(update, shapes=self.model.shapes,
                            ranks=self.planned_ranks(state, update.client_id),
                            head_shape=info.head_shape,
                            max_norm=self.cfg.faults.max_update_norm)

    # -- one pair per message kind ----------------------------------------------------------

    def download(self, state: Any, client_id: ClientId) -> Model:
        """What ``client_id`` receives with its next plan: the parts it does not hold yet."""
        return Model()

    def server_models(self, state: Any) -> dict[str, ServerModel]:
        """The server-side models split clients train with (``atlasfl.engine.split_server``)."""
        return {}

    def configure_probe(self, state: Any, rnd: RoundInfo) -> Sequence[Probe]:
        """Probe plans (fingerprints, importance) of this round."""
        return []

    def aggregate_probe(self, state: Any, rnd: RoundInfo, replies: Sequence[ProbeReply]
                        ) -> RoundOutcome:
        """New server state from fingerprints and importance."""
        return RoundOutcome(state)

    def configure_train(self, state: Any, rnd: RoundInfo) -> Sequence[Train]:
        """Every sampled client trains the configured epochs (or steps) from what it receives."""
        t = self.cfg.train
        return [Train(c, self.download(state, c), t.local_epochs, t.local_steps, self.uploads)
                for c in rnd.sampled]

    def aggregate_train(self, state: Any, rnd: RoundInfo, replies: Sequence[TrainReply]
                        ) -> RoundOutcome:
        """New server state from the uploaded updates."""
        return RoundOutcome(state)

    def configure_evaluate(self, state: Any, rnd: RoundInfo) -> Sequence[Evaluate]:
        """Every client evaluates the model it holds after receiving what it lacks."""
        return [Evaluate(c, self.download(state, c)) for c in sorted(self.clients)]

    def aggregate_evaluate(self, state: Any, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """New server state once clients have evaluated (what they received is theirs now)."""
        return RoundOutcome(state)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to the name registry."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str) -> type[Strategy]:
    """Look up a strategy class by method name."""
    if name not in STRATEGIES:
        raise unknown_name("method", name, STRATEGIES)
    return STRATEGIES[name]
