"""The one strategy: a method's recipe of parts driven through the round protocol.

Every method is a ``Recipe`` (``atlasfl.strategies.methods``) naming six parts: grouping
(``grouping``), rank planning (``rank_plan``), split learning (``split_learning``), aggregation
(``aggregators``), personalisation (``personal``) and the clients' local objective
(``objective``). ``Strategy`` is the only class the round
loop (``atlasfl.engine.simulation``) drives, and this module is the only place the parts meet, in
this order each round:

1. **probe** (when fingerprints or importance are due): the grouping part clusters the
   fingerprints, the rank part plans each client's ranks and the split part its cut
   (``rank_plan.plan_clients``), the personalisation part builds its client graph;
2. **train**: every sampled client that its device can hold trains from what it lacks (its rank
   map, its group's share or its own model, cut to its part when split); the uploads of split
   clients are completed with their group's server copies, the aggregation part mixes them per
   group, the server models take their share, and the personalisation part steps;
3. **evaluate** (when due): every client scores the model it holds.

A client receives a part of its model only with the first plan that reaches it after it changed
(``download``), so downloads are counted when they happen. The server state is one
``ServerState`` (``atlasfl.strategies.state``), one field per part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from atlasfl.config import ExperimentConfig
from atlasfl.messages import (
    Evaluate,
    EvaluateReply,
    FingerprintSpec,
    Model,
    Plan,
    Probe,
    ProbeReply,
    Reply,
    Train,
    TrainReply,
    Update,
)
from atlasfl.runfiles import CLIENTS_FILE, CLUSTERS_FILE
from atlasfl.strategies.base import REPLIES, Dispatch, RoundInfo, RoundOutcome, Stage
from atlasfl.strategies.checks import check_update
from atlasfl.strategies.context import Context
from atlasfl.strategies.groups import head_key, recluster_due
from atlasfl.strategies.info import ClientInfo, ModelInfo
from atlasfl.strategies.rank_plan import infeasible_notices, plan_clients, received_ranks
from atlasfl.strategies.split_learning import served_models
from atlasfl.strategies.state import ServerModel, ServerState
from atlasfl.strategies.recipe import Recipe
from atlasfl.types import ClientId


class Strategy:
    """A method's parts driven through probe, train and evaluate exchanges."""

    def __init__(self, recipe: Recipe, clients: Sequence[ClientInfo], cfg: ExperimentConfig,
                 model: ModelInfo):
        self.recipe = recipe
        self.name = recipe.name
        self.ctx = Context(recipe.name, clients, cfg, model)
        self.clients, self.cfg, self.model = self.ctx.clients, cfg, model
        self.grouping, self.ranks, self.split = recipe.grouping, recipe.ranks, recipe.split
        self.aggregation, self.personal = recipe.aggregation, recipe.personal
        self.objective = recipe.objective
        if self.ranks.plans:
            _ = self.ctx.dims  # a rank plan needs the memory model: refuse the method now

    def scaling(self, rank: int) -> float:
        """The LoRA scaling every client applies at ``rank``."""
        return self.ctx.scaling(rank)

    def init(self) -> ServerState:
        """The state before round 1 (an ``equal`` rank plan is made now, ``device`` later)."""
        state = ServerState(groups=self.grouping.initial(self.ctx))
        if self.ranks.plans and self.ranks.importance_spec(self.ctx, 1) is None:
            state = plan_clients(self.ctx, self.ranks, self.split, state, None)
        return state

    # -- the protocol the loop drives -------------------------------------------------------

    def fingerprints_due(self, round_idx: int) -> bool:
        """Whether clients upload fingerprints before training in this round."""
        if self.personal.needs_graph:
            return recluster_due(self.cfg, round_idx)
        return self.grouping.fingerprints_due(self.ctx, round_idx)

    def stages(self, rnd: RoundInfo) -> tuple[Stage, ...]:
        """The exchanges of a round, in order; a function of the round, never of the state."""
        rest: tuple[Stage, ...] = ("train", "evaluate") if rnd.evaluate else ("train",)
        probes = (self.fingerprints_due(rnd.round_idx)
                  or self.ranks.importance_spec(self.ctx, rnd.round_idx) is not None)
        return ("probe", *rest) if probes else rest

    def configure_round(self, state: ServerState, rnd: RoundInfo) -> Dispatch | None:
        """The plans of exchange ``rnd.exchange`` and their server half (None: round over)."""
        stages = self.stages(rnd)
        if rnd.exchange >= len(stages):
            return None
        configure: dict[str, Callable[[ServerState, RoundInfo], Sequence[Plan]]] = {
            "probe": self.configure_probe, "train": self.configure_train,
            "evaluate": self.configure_evaluate}
        plans = list(configure[stages[rnd.exchange]](state, rnd))
        return Dispatch(plans, self.split.serve(state, plans))

    def aggregate_round(self, state: ServerState, rnd: RoundInfo, replies: Sequence[Reply],
                        served: dict[str, ServerModel] | None = None) -> RoundOutcome:
        """New server state from the replies of exchange ``rnd.exchange``.

        ``served``: the server half of split learning as the exchange left it (None: no split).
        After the first exchange of the run, a method that plans ranks writes every client's
        plan (``clients.json``) and names the clients it excluded.
        """
        stage = self.stages(rnd)[rnd.exchange]
        wrong = [r for r in replies if not isinstance(r, REPLIES[stage])]
        if wrong:  # internal: the executor paired a plan with another kind of reply
            raise TypeError(f"{stage} exchange got a {type(wrong[0]).__name__}")
        typed: Any = replies  # checked above to be the stage's reply type
        if stage == "train":
            outcome = self.aggregate_train(state, rnd, typed, served)
        elif stage == "probe":
            outcome = self.aggregate_probe(state, rnd, typed)
        else:
            outcome = self.aggregate_evaluate(state, rnd, typed)
        if not self.ranks.plans or rnd.round_idx != 1 or rnd.exchange != 0:
            return outcome
        return dataclasses.replace(outcome, files={**outcome.files,
                                                   CLIENTS_FILE: outcome.state.plan.records},
                                   notices=infeasible_notices(outcome.state))

    # -- what the server accepts and sends --------------------------------------------------

    def check_update(self, state: ServerState, update: Update) -> str | None:
        """Why the server refuses ``update`` (``atlasfl.strategies.checks``), or None."""
        info = self.clients.get(update.client_id)
        if info is None:
            return f"client {update.client_id} is not in this run"
        return check_update(update, shapes=self.model.shapes,
                            ranks=self.ranks.planned_ranks(self.ctx, state, update.client_id),
                            head_shape=info.head_shape,
                            max_norm=self.cfg.faults.max_update_norm)

    def download(self, state: ServerState, client_id: ClientId) -> Model:
        """What ``client_id`` lacks: its rank map, its model (group's or own), cut if split."""
        if client_id in state.plan.excluded:
            return Model()
        planned = state.plan.ranks.get(str(client_id))
        holds = client_id in state.held.ranks or planned == self.ctx.initial_ranks
        model = self.personal.next_model(self.ctx, state, client_id,
                                         lambda: self.group_model(state, client_id))
        model = dataclasses.replace(model, ranks=None if planned is None or holds else planned)
        return self.split.trim(self.ctx, state, client_id, model)

    def group_model(self, state: ServerState, client_id: ClientId) -> Model:
        """The group's latest adapter (its share) and head of the client's shape, if lacking."""
        groups = state.groups
        if not state.held.lacks_group(groups, client_id):
            return Model()
        group = groups.group(client_id)
        adapter = groups.outbox.get(str(client_id))
        if adapter is None:
            adapter = self.aggregation.deliver(self.ctx, state, client_id,
                                               groups.adapters[group], None)
        head = groups.heads.get(head_key(group, self.clients[client_id].head_shape))
        return Model(adapter=adapter, head=head)

    # -- probe --------------------------------------------------------------------------------

    def configure_probe(self, state: ServerState, rnd: RoundInfo) -> list[Probe]:
        """Every client probes: a fingerprint when due, importance when the rank part asks."""
        fingerprint = (FingerprintSpec.from_config(self.cfg.clustering)
                       if self.fingerprints_due(rnd.round_idx) else None)
        importance = self.ranks.importance_spec(self.ctx, rnd.round_idx)
        return [Probe(c, fingerprint, importance) for c in sorted(self.clients)]

    def aggregate_probe(self, state: ServerState, rnd: RoundInfo,
                        replies: Sequence[ProbeReply]) -> RoundOutcome:
        """Groups from fingerprints, then ranks and cuts from importance, then the graph."""
        state, metrics, document = self.grouping.cluster(self.ctx, state, rnd.round_idx,
                                                         list(replies))
        files: dict[str, Any] = {CLUSTERS_FILE: document} if document else {}
        importance = {r.client_id: r.importance for r in replies if r.importance is not None}
        if importance:
            state = plan_clients(self.ctx, self.ranks, self.split, state, importance)
            plan = state.plan
            ranks = [r for c, m in plan.ranks.items() if int(c) not in plan.excluded
                     for r in m.values()]
            metrics = {**metrics, "excluded_clients": float(len(plan.excluded)),
                       "mean_rank": float(np.mean(ranks)) if ranks else 0.0}
        state, graph_metrics, graph_files = self.personal.build_graph(self.ctx, state, replies)
        return RoundOutcome(state, {**metrics, **graph_metrics}, {**files, **graph_files})

    # -- train --------------------------------------------------------------------------------

    def configure_train(self, state: ServerState, rnd: RoundInfo) -> list[Train]:
        """Every sampled client that its device can hold trains (across its cut, if split)."""
        t = self.cfg.train
        return [Train(c, self.download(state, c), t.local_epochs, t.local_steps,
                      self.aggregation.uploads, self.split.plan(self.ctx, state, c),
                      self.personal.shares, self.objective.proximal(self.ctx))
                for c in rnd.sampled if c not in state.plan.excluded]

    def aggregate_train(self, state: ServerState, rnd: RoundInfo, replies: Sequence[TrainReply],
                        served: dict[str, ServerModel] | None = None) -> RoundOutcome:
        """Aggregate per group, refresh the server models, then the personal step.

        A client whose update was refused (``check_update``) is forgotten: its next plan
        carries its model again, over whatever it trained. Split clients contribute, per module,
        the copy trained on their data (their upload, or past their cut their group's server
        model), so every module of a group is the example-weighted mix of all its copies.
        """
        if not self.aggregation.uploads:
            return RoundOutcome(state)
        state = self.received(state, [r.client_id for r in replies if r.update is not None],
                              replies)
        state = dataclasses.replace(state, held=state.held.forget(
            r.client_id for r in replies if r.update is None))
        trained = served_models(state, served)
        completed = self.split.complete(self.ctx, state, trained, replies)
        updates = [r.update for r in completed if r.update is not None]
        groups = state.groups.aggregate(updates, self.clients, rnd.round_idx,
                                  self.aggregation.combine(self.ctx, state, state.groups))
        if self.aggregation.personal_shares and not self.personal.own_models:
            share = {str(u.client_id): self.aggregation.deliver(
                self.ctx, state, u.client_id, groups.adapters[groups.group(u.client_id)],
                u.adapter) for u in updates}
            groups = dataclasses.replace(groups, outbox={**groups.outbox, **share})
        metrics = {"groups": float(len({groups.group(u.client_id) for u in updates}))}
        state = dataclasses.replace(state, groups=groups)
        if state.split.cuts:
            state = self.split.refresh(self.ctx, state, trained, rnd.round_idx,
                                       lambda aggregate, reference: self.aggregation.server_share(
                                           self.ctx, aggregate, reference))
        state, personal = self.personal.after_train(self.ctx, state, rnd.round_idx, updates)
        return RoundOutcome(state, {**metrics, **personal})

    # -- evaluate -----------------------------------------------------------------------------

    def configure_evaluate(self, state: ServerState, rnd: RoundInfo) -> list[Evaluate]:
        """Every client evaluates the model it holds after receiving what it lacks."""
        return [Evaluate(c, self.download(state, c), self.split.plan(self.ctx, state, c))
                for c in sorted(self.clients)]

    def aggregate_evaluate(self, state: ServerState, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """The evaluated clients hold what their plans carried (a failed one may not)."""
        if not self.aggregation.uploads:
            return RoundOutcome(state)
        return RoundOutcome(self.received(state, [r.client_id for r in replies if r.delivered],
                                          replies))

    def received(self, state: ServerState, client_ids: Sequence[ClientId],
                 replies: Sequence[Reply]) -> ServerState:
        """These clients hold what their plans carried (``state.held``), ranks included."""
        held = state.held.received(client_ids, state.groups, state.personal.stepped)
        if self.ranks.plans:
            held = held.with_ranks(received_ranks(state, replies))
        return dataclasses.replace(state, held=held, groups=state.groups.delivered(client_ids))
