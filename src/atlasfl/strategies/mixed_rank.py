"""``homolora``, and what every LoRA strategy with per-client ranks or cuts shares.

``homolora`` is the baseline: every client trains rank ``model.lora.r`` in every module.
``hetlora`` (``atlasfl.strategies.hetlora``) gives each client per-module ranks from Phase 2;
``splitlora`` (``atlasfl.strategies.splitlora``) splits every client. This module holds what they
share: each client's device, budget, memory estimate, rank map and cut, kept in the server state
and written to the run folder (``clients.json``), and the mixed-rank aggregation.

Aggregation is within groups (``ranks.grouping``: one global group, the true task — an oracle —
or the clusters Phase 1 finds) with ``ranks.aggregation``: ``zero-pad`` (HetLoRA,
arXiv:2401.06432), ``stack`` (FLoRA stacking, arXiv:2409.05976, exact, then truncated SVD to each
client's ranks) or ``svd`` (FlexLoRA, arXiv:2402.11505), see ``atlasfl.phases.aggregation``.
``ranks.update``: ``average`` aggregates what the clients hold, as those papers do; ``delta``
adds the clients' weighted change to the group's previous aggregate, which the server keeps at
full rank, so the part of it a small client's ranks cut off is not lost each round. Heads
are averaged per group and head shape.

A client receives its rank map with the first plan that reaches it after planning (none when it
already holds those ranks, as every ``homolora`` client does from the common initialisation), and
its share of the group's aggregate cut to its ranks (``redistribute``); a client whose device
cannot hold the smallest adapter (``ranks.on_infeasible=exclude``) trains and receives nothing.

**Split learning** (Phase 3, ``split.enabled``: ``always``, or ``auto`` for the clients whose
device cannot hold the whole model): a split client gets a cut (``atlasfl.phases.split``) and
ranks for the modules of its own blocks under the memory of its client part; it trains across
the cut with its group's server model (``atlasfl.engine.split_server``), uploads only its own
modules and receives only those (``atlasfl.strategies.split`` merges them with the server's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from atlasfl.config import ExperimentConfig
from atlasfl.devices import known_profiles
from atlasfl.errors import AtlasError
from atlasfl.messages import (
    Evaluate,
    EvaluateReply,
    Model,
    Reply,
    SplitPlan,
    Train,
    TrainReply,
)
from atlasfl.models.lora import lora_scaling
from atlasfl.models.split import client_side, split_tensors
from atlasfl.phases.aggregation import aggregate_mixed, redistribute
from atlasfl.phases.memory import ModelDims, estimate_memory
from atlasfl.phases.ranks import Importance, RankPlan
from atlasfl.phases.split import CutOption, split_memory
from atlasfl.runfiles import CLIENTS_FILE
from atlasfl.strategies.base import ClientInfo, ModelInfo, RoundInfo, RoundOutcome, register
from atlasfl.strategies.fedavg import FedAvg
from atlasfl.strategies.groups import Combine, Groups
from atlasfl.strategies.split import (
    ACT_BYTES,
    ServerModel,
    complete_update,
    plan_cut,
    refresh_server,
    split_record,
)
from atlasfl.types import AdapterState, ClientId, Grouping, SplitWhen
from atlasfl.units import mib


@dataclass(frozen=True)
class RankState:
    """Server state: the groups and their models, every client's ranks and record."""

    groups: Groups = field(default_factory=Groups)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> module -> rank
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # client -> configuration
    excluded: tuple[int, ...] = ()  # clients whose device cannot hold the minimum adapter
    configured: tuple[int, ...] = ()  # clients that acknowledged their rank map
    cuts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split client -> (cut, tail)
    server: dict[str, ServerModel] = field(default_factory=dict)  # group -> server-side model


@register
class HomoLoRA(FedAvg):
    """One LoRA rank for every client and module; mixed-rank aggregation settings apply."""

    name = "homolora"
    personal_delivery = True  # a client that trained keeps its own factor coordinates
    # set by a method that fixes them; None: the config's ranks.grouping / split.enabled
    fixed_grouping: ClassVar[Grouping | None] = None
    fixed_split: ClassVar[SplitWhen | None] = None

    def __init__(self, clients: Sequence[ClientInfo], cfg: ExperimentConfig, model: ModelInfo):
        super().__init__(clients, cfg, model)
        if model.dims is None:
            raise AtlasError(f"method {self.name} needs a memory model of the architecture; "
                             f"see atlasfl.phases.memory.model_dims for the supported ones")
        self.dims: ModelDims = model.dims
        profiles = known_profiles(cfg.devices)  # each client reported its profile's name
        self.devices = {cid: profiles[info.device] for cid, info in self.clients.items()}
        # what every client holds before any rank map: the common initial adapter
        self.initial_ranks = dict.fromkeys(model.shapes, cfg.model.lora.r)

    def group_kind(self) -> Grouping:  # noqa: D102
        return self.fixed_grouping or self.cfg.ranks.grouping

    def planned_ranks(self, state: RankState, client_id: ClientId) -> dict[str, int] | None:
        """The client's rank map (its part's modules when split), else the initial ranks."""
        return dict(state.ranks.get(str(client_id), self.initial_ranks))

    def groups(self, state: RankState) -> Groups:  # noqa: D102
        return state.groups

    def with_groups(self, state: RankState, groups: Groups) -> RankState:  # noqa: D102
        return dataclasses.replace(state, groups=groups)

    # -- configuration ----------------------------------------------------------------------

    def scaling(self, rank: int) -> float:
        """The LoRA scaling every client applies at ``rank``."""
        lora = self.cfg.model.lora
        return lora_scaling(lora.alpha, rank, rslora=lora.rslora)

    def memory_of(self, client_id: ClientId, cut: tuple[int, int] | None = None
                  ) -> Callable[[dict[str, int]], int]:
        """Map ranks to the memory model's training peak of this client.

        ``cut`` = (cut, tail): the client part of a split client (``phases.split``); only the
        ranks of its own modules count.
        """
        cfg, info = self.cfg, self.clients[client_id]
        head = self.model.head_params[info.head_shape[0]]

        def memory(ranks: dict[str, int]) -> int:
            if cut is not None:
                return split_memory(self.dims, self.modules(ranks, cut), cut=cut[0],
                                    tail=cut[1], batch_size=cfg.train.batch_size,
                                    seq_len=cfg.data.max_length, head_params=head,
                                    act_bytes=ACT_BYTES[cfg.split.activation_dtype],
                                    lora_dropout=cfg.model.lora.dropout > 0)
            modules = [(ranks[m], *self.model.shapes[m]) for m in ranks]
            return estimate_memory(self.dims, modules, batch_size=cfg.train.batch_size,
                                   seq_len=cfg.data.max_length, head_params=head,
                                   lora_dropout=cfg.model.lora.dropout > 0).total
        return memory

    def modules(self, ranks: dict[str, int], cut: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(rank, in, out) of the modules a client split at ``cut`` = (cut, tail) trains."""
        return [(ranks[m], *self.model.shapes[m]) for m in ranks
                if client_side(m, self.dims.num_layers, *cut)]

    def plan(self, client_id: ClientId, importance: Importance | None,
             cut: tuple[int, int] | None = None) -> RankPlan:
        """This client's ranks: ``model.lora.r`` everywhere, checked against its budget."""
        ranks = dict(self.initial_ranks)
        memory = self.memory_of(client_id, cut)(ranks)
        budget = self.devices[client_id].memory_bytes
        own = ranks if cut is None else {m: r for m, r in ranks.items()
                                         if client_side(m, self.dims.num_layers, *cut)}
        params = sum(r * sum(self.model.shapes[m]) for m, r in own.items())
        return RankPlan(ranks, memory, budget, params, memory <= budget, "fixed")

    def smallest_ranks(self) -> dict[str, int]:
        """The least adapter a client may get (what decides whether a cut fits)."""
        return dict(self.initial_ranks)

    def split_when(self) -> SplitWhen:
        """``split.enabled``: never, always, or auto (only clients the model does not fit)."""
        return self.fixed_split or self.cfg.split.enabled

    def choose_split(self, client_id: ClientId) -> tuple[CutOption | None, list[CutOption]]:
        """The cut of a split client (``split.cut``, or the fitting one of least time)."""
        smallest = self.smallest_ranks()
        return plan_cut(self.dims, self.devices[client_id], self.cfg,
                        lambda cut: self.memory_of(client_id, cut)(smallest))

    def configure(self, state: RankState, importance: Mapping[ClientId, Importance] | None
                  ) -> RankState:
        """Plan every client; exclude or refuse those whose device cannot hold the minimum.

        With split learning (``split.enabled``) a client that is split (every client, or with
        ``auto`` those whose device cannot hold the whole model) gets a cut first, then ranks
        for the modules of its own blocks under its budget.
        """
        ranks, records, excluded, cuts = {}, {}, [], {}
        for cid in sorted(self.clients):
            imp = importance[cid] if importance else None
            choice: CutOption | None = None
            options: list[CutOption] = []
            when = self.split_when()
            if when == "always" or (when == "auto" and not self.plan(cid, imp).feasible):
                choice, options = self.choose_split(cid)
            cut = None if choice is None else (choice.cut, choice.tail)
            if cut is None and options:  # no cut fits: the smallest client part decides
                best = min(options, key=lambda o: o.memory_bytes)
                cut = (best.cut, best.tail)
            plan = self.plan(cid, imp, cut)
            device = self.devices[cid]
            records[str(cid)] = {
                "task": self.clients[cid].task, "device": device.name,
                "budget_bytes": plan.budget_bytes, "memory_estimate_bytes": plan.memory_bytes,
                "lora_params": plan.params, "feasible": plan.feasible,
                "limited_by": plan.limited_by, "ranks": plan.ranks,
                "split": None if cut is None else split_record(cut, choice, options,
                                                               self.cfg.split)}
            if cut is not None and plan.feasible:
                cuts[str(cid)] = cut
            if not plan.feasible:
                if self.cfg.ranks.on_infeasible == "error":
                    split_hint = ("set split.enabled=auto, " if self.split_when() == "never"
                                  else "")
                    raise AtlasError(
                        f"client {cid} on device {device.name} needs {mib(plan.memory_bytes)} "
                        f"for its smallest adapter, its budget is "
                        f"{mib(plan.budget_bytes)}; lower train.batch_size or "
                        f"data.max_length, {split_hint}or set ranks.on_infeasible=exclude")
                excluded.append(cid)
            ranks[str(cid)] = plan.ranks
        return dataclasses.replace(state, ranks=ranks, records=records,
                                   excluded=tuple(excluded), cuts=cuts)

    def init(self) -> RankState:  # noqa: D102
        return self.configure(RankState(self.initial_groups()), None)

    # -- rounds -----------------------------------------------------------------------------

    def aggregate_round(self, state: RankState, rnd: RoundInfo, replies: Sequence[Reply]
                        ) -> RoundOutcome:
        """As every strategy; after the first exchange, the run keeps each client's plan."""
        outcome = super().aggregate_round(state, rnd, replies)
        if rnd.round_idx != 1 or rnd.exchange != 0:
            return outcome
        new: RankState = outcome.state
        notices = tuple(
            f"client {cid} excluded: its device {rec['device']} has "
            f"{mib(rec['budget_bytes'])}, the smallest adapter needs "
            f"{mib(rec['memory_estimate_bytes'])}"
            for cid, rec in new.records.items() if not rec["feasible"])
        return dataclasses.replace(outcome, files={**outcome.files, CLIENTS_FILE: new.records},
                                   notices=notices)

    def download(self, state: RankState, client_id: ClientId) -> Model:
        """Its rank map if it does not hold it, and its share of the group's aggregate.

        A split client receives only the modules of its own blocks, and no head in vanilla
        mode (the server holds it): the client part never receives server weights.
        """
        if client_id in state.excluded:
            return Model()
        planned = state.ranks.get(str(client_id))
        holds = client_id in state.configured or planned == self.initial_ranks
        model = dataclasses.replace(self.next_model(state, client_id),
                                    ranks=None if planned is None or holds else planned)
        cut = state.cuts.get(str(client_id))
        if cut is None or model.adapter is None:
            return model
        own, _ = split_tensors(model.adapter, self.dims.num_layers, *cut)
        return dataclasses.replace(model, adapter=own, head=model.head if cut[1] else None)

    def next_model(self, state: RankState, client_id: ClientId) -> Model:
        """The adapter and head a client lacks (the group's share; Phase 4: its own model)."""
        return super().download(state, client_id)

    def split_plan(self, state: RankState, client_id: ClientId) -> SplitPlan | None:
        """How a client trains and evaluates across its cut (None: it is not split)."""
        cut = state.cuts.get(str(client_id))
        if cut is None:
            return None
        group = state.groups.group(client_id)
        return SplitPlan(cut[0], cut[1], self.cfg.split.activation_dtype, group,
                         self.clients[client_id].head_shape[0],
                         state.groups.versions.get(group, 0), self.cfg.split.window)

    def server_models(self, state: RankState) -> dict[str, ServerModel]:  # noqa: D102
        return state.server

    def configure_train(self, state: RankState, rnd: RoundInfo) -> list[Train]:
        """Every sampled client that its device can hold trains (across its cut, if split)."""
        return [dataclasses.replace(p, split=self.split_plan(state, p.client_id))
                for p in super().configure_train(state, rnd)
                if p.client_id not in state.excluded]

    def configure_evaluate(self, state: RankState, rnd: RoundInfo) -> list[Evaluate]:
        """Every client evaluates (a split client across its cut)."""
        return [dataclasses.replace(p, split=self.split_plan(state, p.client_id))
                for p in super().configure_evaluate(state, rnd)]

    def deliver(self, state: RankState, client_id: ClientId, aggregate: AdapterState,
                reference: AdapterState | None) -> AdapterState:
        """The aggregate cut to the client's ranks (``redistribute``).

        A client that trained keeps its own factor coordinates (``reference``: its upload).
        """
        return redistribute(aggregate, state.ranks[str(client_id)],
                            method=self.cfg.ranks.aggregation, scaling=self.scaling,
                            reference=reference)

    def combine(self, state: RankState, groups: Groups) -> Combine[str]:
        """Mixed-rank aggregation per group (``ranks.aggregation``, ``ranks.update``)."""
        method, delta = self.cfg.ranks.aggregation, self.cfg.ranks.update == "delta"
        # averaging keeps what the largest client can take; the delta update keeps everything
        keep = None if delta else max(max(r.values()) for r in state.ranks.values())

        def combine(group: str, states: list[AdapterState], weights: list[float]
                    ) -> AdapterState:
            return aggregate_mixed(states, weights, method=method, scaling=self.scaling,
                                   keep=keep, previous=groups.adapters.get(group) if delta
                                   else None)
        return combine

    def acknowledge_ranks(self, state: RankState, replies: Sequence[Reply]) -> RankState:
        """Clients that answered a plan hold their rank map (excluded ones never get one)."""
        done = {r.client_id for r in replies if r.client_id not in state.excluded
                and getattr(r, "delivered", True)}
        return dataclasses.replace(state, configured=tuple(sorted({*state.configured, *done})))

    def served(self, state: RankState, rnd: RoundInfo) -> dict[str, ServerModel]:
        """The server models as the train exchange left them.

        As they were when no split client trained in it: a hybrid group may still have moved
        through its whole-model clients.
        """
        return {**state.server, **(rnd.served or {})}

    def completed(self, state: RankState, rnd: RoundInfo, replies: Sequence[TrainReply]
                  ) -> list[TrainReply]:
        """Split clients' uploads completed with their group's server copies (whole models)."""
        if not state.cuts:
            return list(replies)
        served = self.served(state, rnd)
        return [dataclasses.replace(r, update=complete_update(
            r.update, served.get(state.groups.group(r.client_id)),
            state.cuts.get(str(r.client_id)), self.dims.num_layers,
            self.clients[r.client_id].head_shape[0]))
            if r.update is not None else r for r in replies]

    def aggregate_train(self, state: RankState, rnd: RoundInfo,
                        replies: Sequence[TrainReply]) -> RoundOutcome:
        """Acknowledge the rank maps, then aggregate as FedAvg with the mixed-rank combiner.

        Split clients: each trained client contributes, per module, the copy trained on its
        data (its own upload, or for the modules past its cut its group's server model), so
        every module of a group is the example-weighted mix of all its copies
        (``complete_update``); the server model then takes its share of the new aggregate.
        """
        state = self.acknowledge_ranks(state, replies)
        if not state.cuts:
            return super().aggregate_train(state, rnd, replies)
        served = self.served(state, rnd)
        outcome = super().aggregate_train(state, rnd, self.completed(state, rnd, replies))
        new: RankState = outcome.state
        heads: dict[str, set[int]] = {}  # group -> outputs of its vanilla split clients
        for c, (_, tail) in new.cuts.items():
            heads.setdefault(new.groups.group(int(c)), set()).update(
                [] if tail else [self.clients[int(c)].head_shape[0]])
        server = refresh_server(served, new.groups, heads, lambda aggregate, reference: (
            redistribute(aggregate, self.initial_ranks, method=self.cfg.ranks.aggregation,
                         scaling=self.scaling, reference=reference)), hidden=self.dims.hidden,
            round_idx=rnd.round_idx)
        return dataclasses.replace(outcome, state=dataclasses.replace(new, server=server))

    def aggregate_evaluate(self, state: RankState, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """Acknowledge the rank maps and the models the plans carried."""
        return super().aggregate_evaluate(self.acknowledge_ranks(state, replies), rnd, replies)
