"""The aggregation part: how a group's uploads become its model, and each client's share of it.

``none`` (``local``, ``centralized``: nothing is uploaded or mixed), ``fedavg`` (McMahan et al.,
arXiv:1602.05629: the example-weighted mean of the group's adapters, ``groups.mix``) and
``mixed`` (``ranks.aggregation`` of the run: ``zero-pad`` (HetLoRA, arXiv:2401.06432), ``stack``
(FLoRA stacking, arXiv:2409.05976, exact, then truncated SVD to each client's ranks) or ``svd``
(FlexLoRA, arXiv:2402.11505), ``atlasfl.phases.aggregation``). ``ranks.update``: ``average``
aggregates what the clients hold, as those papers do; ``delta`` adds the clients' weighted change
to the group's previous aggregate, which the server keeps at full rank, so the part of it a small
client's ranks cut off is not lost each round. Heads are always averaged per group and head shape
(only heads of one label space can be). A ``mixed`` client that trained receives its share of the
aggregate in its own factor coordinates (``redistribute`` with its upload as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

from atlasfl.phases.aggregation import aggregate_mixed, redistribute
from atlasfl.strategies.context import Context
from atlasfl.strategies.groups import Combine, Groups
from atlasfl.strategies.state import ServerState
from atlasfl.types import AdapterState, ClientId


@dataclass(frozen=True)
class NoAggregation:
    """Nothing leaves a client: it trains alone, the server mixes nothing."""

    name = "none"
    uploads = False  # trained clients send their adapter and head
    # True: a client that trained receives its share of the aggregate computed from its own
    # upload (``deliver``'s reference), kept in the outbox until it is sent
    personal_shares = False

    def combine(self, ctx: Context, state: ServerState, groups: Groups) -> Combine[str] | None:
        """How a group's adapters are combined (None: FedAvg's weighted mean)."""
        return None

    def deliver(self, ctx: Context, state: ServerState, client_id: ClientId,
                aggregate: AdapterState, reference: AdapterState | None) -> AdapterState:
        """A client's adapter from its group's aggregate (``reference``: its own upload)."""
        return aggregate

    def server_share(self, ctx: Context, aggregate: AdapterState,
                     reference: AdapterState | None) -> AdapterState:
        """A group's aggregate as a split server model holds it (only ``mixed`` serves one)."""
        # internal: ``Recipe`` refuses split learning without mixed-rank aggregation
        raise RuntimeError(f"method {ctx.method}: aggregation {self.name} serves no split "
                           f"server model")


@dataclass(frozen=True)
class Mean(NoAggregation):
    """FedAvg: the example-weighted mean of the group's adapters and heads."""

    name = "fedavg"
    uploads = True


@dataclass(frozen=True)
class MixedRank(NoAggregation):
    """Mixed-rank aggregation per group (``ranks.aggregation``, ``ranks.update``)."""

    name = "mixed"
    uploads = True
    personal_shares = True  # a client that trained keeps its own factor coordinates

    def combine(self, ctx: Context, state: ServerState, groups: Groups) -> Combine[str]:
        """``aggregate_mixed`` over a group's adapters (``delta``: onto its last aggregate)."""
        method, delta = ctx.cfg.ranks.aggregation, ctx.cfg.ranks.update == "delta"
        # averaging keeps what the largest client can take; the delta update keeps everything
        keep = None if delta else max(max(r.values()) for r in state.plan.ranks.values())

        def combine(group: str, states: list[AdapterState], weights: list[float]
                    ) -> AdapterState:
            return aggregate_mixed(states, weights, method=method, scaling=ctx.scaling,
                                   keep=keep, previous=groups.adapters.get(group) if delta
                                   else None)
        return combine

    def deliver(self, ctx: Context, state: ServerState, client_id: ClientId,
                aggregate: AdapterState, reference: AdapterState | None) -> AdapterState:
        """The aggregate cut to the client's ranks (``redistribute``)."""
        return redistribute(aggregate, state.plan.ranks[str(client_id)],
                            method=ctx.cfg.ranks.aggregation, scaling=ctx.scaling,
                            reference=reference)

    def server_share(self, ctx: Context, aggregate: AdapterState,
                     reference: AdapterState | None) -> AdapterState:
        """A group's aggregate cut to a server model's ranks (the initial ones)."""
        return redistribute(aggregate, ctx.initial_ranks, method=ctx.cfg.ranks.aggregation,
                            scaling=ctx.scaling, reference=reference)
