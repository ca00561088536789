"""The grouping part: which clients share a group model, and Phase 1's clustering.

``global`` (one group), ``task`` (the true task: an oracle) or ``cluster`` (the clusters Phase 1
finds from gradient fingerprints, ``atlasfl.phases.clustering``: round 1 and every
``clustering.recluster_every`` rounds); ``config``: ``ranks.grouping`` of the run's config. It owns
the membership in ``ServerState.groups``; the aggregation part fills the group models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from atlasfl.messages import ProbeReply
from atlasfl.strategies.context import Context
from atlasfl.strategies.groups import Groups, cluster_groups, initial_members, recluster_due
from atlasfl.strategies.state import ServerState
from atlasfl.types import ClientId, Grouping

GroupingChoice = Literal["global", "task", "cluster", "config"]


@dataclass(frozen=True)
class GroupBy:
    """Group clients by ``kind`` (``config``: the run's ``ranks.grouping``)."""

    kind: GroupingChoice

    @property
    def name(self) -> str:  # noqa: D102
        return self.kind

    def resolve(self, ctx: Context) -> Grouping:
        """The grouping this run uses."""
        return ctx.cfg.ranks.grouping if self.kind == "config" else self.kind

    def initial(self, ctx: Context) -> Groups:
        """Groups before any fingerprint (cluster groups come with the first probe)."""
        return Groups(initial_members(self.resolve(ctx), ctx.clients))

    def fingerprints_due(self, ctx: Context, round_idx: int) -> bool:
        """Whether clusters are (re)computed from fresh fingerprints before this round."""
        return self.resolve(ctx) == "cluster" and recluster_due(ctx.cfg, round_idx)

    def cluster(self, ctx: Context, state: ServerState, round_idx: int,
                replies: list[ProbeReply]
                ) -> tuple[ServerState, dict[str, float], dict[str, Any]]:
        """Cluster the fingerprints; a new grouping starts new group models.

        A method that probes fingerprints without cluster grouping (the graph of ``mira``,
        oracle groups) keeps its groups and takes the similarity only. Returns the state, the
        clustering's metrics and ``clusters.json`` (empty when no fingerprint came).
        """
        fingerprints = {r.client_id: (r.fingerprint, r.noise_var) for r in replies
                        if r.fingerprint is not None}
        if not fingerprints:
            return state, {}, {}
        found = cluster_groups(fingerprints, ctx.clients, ctx.cfg)
        members, similarity, metrics = found.members, found.similarity, found.metrics
        document = _clusters_document(ctx, fingerprints, found.labels, metrics, round_idx)
        if self.resolve(ctx) != "cluster":
            members = state.groups.members
        groups = state.groups.regroup(members, similarity)
        return dataclasses.replace(state, groups=groups), metrics, document


def _clusters_document(ctx: Context, fingerprints: Mapping[ClientId, tuple[Any, float]],
                       labels: dict[ClientId, int], metrics: dict[str, float], round_idx: int
                       ) -> dict[str, Any]:
    """The clustering as the server saw it, for the report's fingerprint map."""
    ids = sorted(fingerprints)
    return {"round": round_idx, "clients": ids,
            "tasks": [ctx.clients[i].task for i in ids],  # only to score and draw
            "labels": [labels[i] for i in ids],
            "k": metrics["k"], "quality": {k: v for k, v in metrics.items() if k != "k"},
            "fingerprints": [np.asarray(fingerprints[i][0], dtype=np.float64).round(7).tolist()
                             for i in ids]}
