"""``hetlora``: per-client, per-module LoRA ranks from importance under each device's budget.

Before round 1 every client uploads its importance per LoRA module (one number, or with
``ranks.utility=spectrum`` the top ``r_max`` squared singular values of the module's gradient;
from the same gradient pass as its Phase 1 fingerprint when clustering runs); the server sizes
each client's ranks to its device's memory budget (``atlasfl.phases.memory``) and, with
``ranks.budget``, a parameter budget (``atlasfl.phases.ranks.allocate_ranks``), and sends the
rank map. Aggregation, delivery, exclusion and split learning are ``homolora``'s
(``atlasfl.strategies.mixed_rank``): HetLoRA, Cho et al., arXiv:2401.06432.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from atlasfl.errors import AtlasError
from atlasfl.messages import ImportanceSpec, ProbeReply
from atlasfl.models.split import client_side
from atlasfl.phases.ranks import Importance, RankPlan, allocate_ranks
from atlasfl.strategies.base import RoundInfo, RoundOutcome, register
from atlasfl.strategies.mixed_rank import HomoLoRA, RankState
from atlasfl.types import ClientId


@register
class HetLoRA(HomoLoRA):
    """Per-client, per-module ranks from importance under each device's memory budget."""

    name = "hetlora"

    def init(self) -> RankState:  # noqa: D102
        return RankState(self.initial_groups())  # planned once importance arrives (round 1)

    def importance_spec(self, round_idx: int) -> ImportanceSpec | None:
        """Every client measures its modules' importance before round 1."""
        if round_idx != 1:
            return None
        return ImportanceSpec.from_config(self.cfg.ranks, self.cfg.clustering.batch_size)

    def aggregate_probe(self, state: RankState, rnd: RoundInfo,
                        replies: Sequence[ProbeReply]) -> RoundOutcome:
        """Cluster when fingerprints came; allocate every client's ranks from its importance."""
        outcome = super().aggregate_probe(state, rnd, replies)
        importance = {r.client_id: r.importance for r in replies if r.importance is not None}
        if not importance:
            return outcome
        new = self.configure(outcome.state, importance)
        ranks = [r for c, m in new.ranks.items() if int(c) not in new.excluded
                 for r in m.values()]
        return dataclasses.replace(outcome, state=new, metrics={
            **outcome.metrics, "excluded_clients": float(len(new.excluded)),
            "mean_rank": float(np.mean(ranks)) if ranks else 0.0})  # files and notices kept

    def plan(self, client_id: ClientId, importance: Importance | None,
             cut: tuple[int, int] | None = None) -> RankPlan:
        """Importance-guided ranks under the device's memory (and the parameter budget).

        A split client's ranks are allocated over the modules of its own blocks under the
        memory of its client part; the server's modules stay at ``model.lora.r``.
        """
        if importance is None:
            raise AtlasError("hetlora needs every client's module importance before planning")
        r = self.cfg.ranks
        shapes = self.model.shapes
        if cut is not None:
            shapes = {m: s for m, s in shapes.items()
                      if client_side(m, self.dims.num_layers, *cut)}
        plan = allocate_ranks({m: importance[m] for m in shapes}, shapes,
                              memory_of=self.memory_of(client_id, cut),
                              budget_bytes=self.devices[client_id].memory_bytes,
                              param_budget=self.param_budget(client_id), r_min=r.r_min,
                              r_max=r.r_max, utility=r.utility)
        if cut is None:
            return plan
        return dataclasses.replace(plan, ranks={**self.initial_ranks, **plan.ranks})

    def smallest_ranks(self) -> dict[str, int]:  # noqa: D102
        return dict.fromkeys(self.model.shapes, self.cfg.ranks.r_min)

    def param_budget(self, client_id: ClientId) -> int | None:
        """LoRA parameters this client may train under ``ranks.budget`` (None: no limit).

        ``parity``: homolora's count at ``model.lora.r``, for every client. ``device``: the same
        total over the federation, shared in proportion to the clients' device memory (HetLoRA's
        setting of device-dependent ranks at the upload of homolora), at least r_min everywhere.
        """
        budget = self.cfg.ranks.budget
        per_rank = sum(sum(s) for s in self.model.shapes.values())  # parameters of rank 1
        parity = self.cfg.model.lora.r * per_rank
        if budget == "parity":
            return parity
        if budget == "device":
            memory = {c: d.memory_bytes for c, d in self.devices.items()}
            share = int(parity * len(memory) * memory[client_id] / sum(memory.values()))
            return max(share, self.cfg.ranks.r_min * per_rank)
        return None
