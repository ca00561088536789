"""``fedavg``: one adapter over all clients, task-agnostic; and the family of grouped FedAvg.

FedAvg (McMahan et al., arXiv:1602.05629) applied to LoRA adapters and heads: the server averages
the uploaded adapters, weighted by examples, within each group (``atlasfl.strategies.groups``):
here one group of all clients. The server does not know tasks; a head can only be averaged with
heads of the same shape, so heads are shared among clients whose label spaces have the same size.
Subclasses change the grouping (``fedavg-task``, ``fedavg-cluster``), the combiner and what each
client receives (``homolora``/``hetlora``); the round is the same.

A round: a probe exchange when fingerprints are due (grouping ``cluster``: round 1 and every
``clustering.recluster_every`` rounds), then training, then evaluation when due. A client
receives its group's latest aggregate with the first plan that reaches it after the group
changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from atlasfl.messages import (
    EvaluateReply,
    FingerprintSpec,
    ImportanceSpec,
    Model,
    Probe,
    ProbeReply,
    TrainReply,
)
from atlasfl.runfiles import CLUSTERS_FILE
from atlasfl.strategies.base import RoundInfo, RoundOutcome, Stage, Strategy, register
from atlasfl.strategies.groups import (
    Combine,
    Groups,
    cluster_groups,
    head_key,
    initial_members,
    recluster_due,
)
from atlasfl.types import AdapterState, ClientId, Grouping


@register
class FedAvg(Strategy):
    """Example-weighted averaging within groups; here a single group of all clients."""

    name = "fedavg"
    grouping: ClassVar[Grouping] = "global"
    # True: a client that trained receives its share of the aggregate computed from its own
    # upload (``deliver``'s reference), kept in the outbox until it is sent
    personal_delivery: ClassVar[bool] = False

    def group_kind(self) -> Grouping:
        """How clients are grouped (a config key for the rank strategies)."""
        return self.grouping

    def init(self) -> Any:  # noqa: D102
        return self.initial_groups()

    def initial_groups(self) -> Groups:
        """Groups before any fingerprint (cluster groups come with the first probe)."""
        return Groups(initial_members(self.group_kind(), self.clients))

    # The server state of FedAvg is its Groups; strategies with more state keep them in a field.
    def groups(self, state: Any) -> Groups:
        """The groups inside a server state."""
        return state

    def with_groups(self, state: Any, groups: Groups) -> Any:
        """The server state with new groups."""
        return groups

    # -- probe: fingerprints (Phase 1) and importance (Phase 2) ------------------------------

    def stages(self, rnd: RoundInfo) -> tuple[Stage, ...]:  # noqa: D102
        rest = super().stages(rnd)
        return ("probe", *rest) if self.probes(rnd.round_idx) else rest

    def probes(self, round_idx: int) -> bool:
        """Whether clients are probed before training in this round."""
        return self.fingerprints_due(round_idx) or self.importance_spec(round_idx) is not None

    def fingerprints_due(self, round_idx: int) -> bool:
        """Whether clusters are (re)computed from fresh fingerprints before this round."""
        return self.group_kind() == "cluster" and recluster_due(self.cfg, round_idx)

    def importance_spec(self, round_idx: int) -> ImportanceSpec | None:
        """Module importance asked in this round's probe (Phase 2 strategies)."""
        return None

    def configure_probe(self, state: Any, rnd: RoundInfo) -> list[Probe]:
        """Every client probes: a fingerprint when clusters are due, importance when asked."""
        fingerprint = (FingerprintSpec.from_config(self.cfg.clustering)
                       if self.fingerprints_due(rnd.round_idx) else None)
        importance = self.importance_spec(rnd.round_idx)
        return [Probe(c, fingerprint, importance) for c in sorted(self.clients)]

    def aggregate_probe(self, state: Any, rnd: RoundInfo, replies: Sequence[ProbeReply]
                        ) -> RoundOutcome:
        """Cluster the fingerprints into groups; a new grouping starts new group models.

        A strategy that probes fingerprints without cluster grouping (the Laplacian graph of
        ``mira``, oracle groups) keeps its groups and takes the similarity only.
        """
        fingerprints = {r.client_id: (r.fingerprint, r.noise_var) for r in replies
                        if r.fingerprint is not None}
        if not fingerprints:
            return RoundOutcome(state)
        members, similarity, metrics = cluster_groups(fingerprints, self.clients, self.cfg)
        ids = sorted(fingerprints)
        document = {  # the clustering as the server saw it, for the report's fingerprint map
            "round": rnd.round_idx, "clients": ids,
            "tasks": [self.clients[i].task for i in ids],  # only to score and draw
            "labels": [int(members[str(i)].removeprefix("cluster=")) for i in ids],
            "k": metrics["k"], "quality": {k: v for k, v in metrics.items() if k != "k"},
            "fingerprints": [np.asarray(fingerprints[i][0], dtype=np.float64).round(7).tolist()
                             for i in ids]}
        if self.group_kind() != "cluster":
            members = self.groups(state).members
        groups = self.groups(state).regroup(members, similarity)
        return RoundOutcome(self.with_groups(state, groups), metrics,
                            files={CLUSTERS_FILE: document})

    # -- train and evaluate -----------------------------------------------------------------

    def download(self, state: Any, client_id: ClientId) -> Model:
        """The group's latest adapter (and head of the client's shape) if the client lacks it."""
        groups = self.groups(state)
        if not groups.stale(client_id):
            return Model()
        group = groups.group(client_id)
        adapter = groups.outbox.get(str(client_id))
        if adapter is None:
            adapter = self.deliver(state, client_id, groups.adapters[group], None)
        head = groups.heads.get(head_key(group, self.clients[client_id].head_shape))
        return Model(adapter=adapter, head=head)

    def deliver(self, state: Any, client_id: ClientId, aggregate: AdapterState,
                reference: AdapterState | None) -> AdapterState:
        """A client's adapter from its group's aggregate (FedAvg: the aggregate itself).

        ``reference`` is the client's own upload of the round that made the aggregate, if any.
        """
        return aggregate

    def combine(self, state: Any, groups: Groups) -> Combine[str] | None:
        """How a group's adapters are combined (None: FedAvg's weighted mean)."""
        return None

    def planned_ranks(self, state: Any, client_id: ClientId) -> dict[str, int] | None:
        """``model.lora.r`` in every module."""
        return dict.fromkeys(self.model.shapes, self.cfg.model.lora.r)

    def aggregate_train(self, state: Any, rnd: RoundInfo, replies: Sequence[TrainReply]
                        ) -> RoundOutcome:
        """Average adapters per group and heads per (group, head shape).

        A client whose update was refused (``check_update``) is forgotten: its next plan carries
        its group's model again, over whatever it trained.
        """
        groups = self.groups(state).acknowledge(r.client_id for r in replies
                                                if r.update is not None)
        groups = groups.forget(r.client_id for r in replies if r.update is None)
        updates = [r.update for r in replies if r.update is not None]
        groups = groups.aggregate(updates, self.clients, rnd.round_idx,
                                  self.combine(state, groups))
        if self.personal_delivery:
            share = {str(u.client_id): self.deliver(state, u.client_id,
                                                    groups.adapters[groups.group(u.client_id)],
                                                    u.adapter) for u in updates}
            groups = dataclasses.replace(groups, outbox={**groups.outbox, **share})
        metrics = {"groups": float(len({groups.group(u.client_id) for u in updates}))}
        return RoundOutcome(self.with_groups(state, groups), metrics)

    def aggregate_evaluate(self, state: Any, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """The evaluated clients hold what their plans carried (a failed one may not)."""
        groups = self.groups(state).acknowledge(r.client_id for r in replies if r.delivered)
        return RoundOutcome(self.with_groups(state, groups))
