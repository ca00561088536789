"""``homolora`` and ``hetlora``: LoRA adapters of one rank, or of per-client per-module ranks.

``homolora`` is the baseline: every client trains rank ``model.lora.r`` in every module.
``hetlora`` gives each client the per-module ranks Phase 2 allocates (``atlasfl.phases.ranks``):
before round 1 every client uploads its importance per LoRA module (one number, or with
``ranks.utility=spectrum`` the top ``r_max`` squared singular values of the module's gradient;
from the same gradient pass as its Phase 1 fingerprint when clustering runs), the server sizes
each client's ranks to its device's memory budget (``atlasfl.phases.memory``) and sends the
rank map; the client builds its adapter through peft's ``rank_pattern``.

Both aggregate within groups (``ranks.grouping``: one global group, the true task — an oracle —
or the clusters Phase 1 finds) with ``ranks.aggregation``: ``zero-pad`` (HetLoRA,
arXiv:2401.06432), ``stack`` (FLoRA stacking, arXiv:2409.05976, exact, then truncated SVD to each
client's ranks) or ``svd`` (FlexLoRA, arXiv:2402.11505), see ``atlasfl.phases.aggregation``.
``ranks.update``: ``average`` aggregates what the clients hold, as those papers do; ``delta``
adds the clients' weighted change to the group's previous aggregate, which the server keeps at
full rank, so the part of it a small client's ranks cut off is not lost each round. Heads
are averaged per group and head shape. Every client's device, budget, memory estimate and rank
map are kept in the server state and written to the run folder (``clients.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from atlasfl.devices import known_profiles
from atlasfl.errors import AtlasError
from atlasfl.models.lora import lora_scaling
from atlasfl.phases.aggregation import aggregate_mixed, redistribute
from atlasfl.phases.memory import estimate_memory
from atlasfl.phases.ranks import Importance, RankPlan, allocate_ranks
from atlasfl.strategies.base import ClientInfo, ClientUpdate, RoundOutcome, Strategy, register
from atlasfl.strategies.fedavg import GroupModels, aggregate_groups
from atlasfl.strategies.fedavg_cluster import cluster_clients, recluster_due
from atlasfl.types import ClientId


@dataclass(frozen=True)
class RankState:
    """Server state: group aggregates, every client's ranks and record, the clusters."""

    models: GroupModels = field(default_factory=GroupModels)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> module -> rank
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # client -> configuration
    excluded: tuple[int, ...] = ()  # clients whose device cannot hold the minimum adapter
    assignment: dict[str, int] = field(default_factory=dict)  # client -> cluster (grouping)
    centroids: torch.Tensor | None = None
    center: torch.Tensor | None = None  # the fingerprints' centring (late joiners)


@register
class HomoLoRA(Strategy):
    """One LoRA rank for every client and module; mixed-rank aggregation settings apply."""

    name = "homolora"

    def __init__(self, clients: Sequence[ClientInfo], cfg: Any, model=None):
        super().__init__(clients, cfg, model)
        if model is None or model.dims is None:
            raise AtlasError(f"method {self.name} needs a memory model of the architecture; "
                             f"see atlasfl.phases.memory.model_dims for the supported ones")
        profiles = known_profiles(cfg.devices)  # each client reported its profile's name
        self.devices = {cid: profiles[info.device] for cid, info in self.clients.items()}

    # -- configuration ----------------------------------------------------------------------

    def scaling(self, rank: int) -> float:
        """The LoRA scaling every client applies at ``rank``."""
        lora = self.cfg.model.lora
        return lora_scaling(lora.alpha, rank, rslora=lora.rslora)

    def memory_of(self, client_id: ClientId):
        """Map ranks to the memory model's training peak of this client."""
        cfg, info = self.cfg, self.clients[client_id]
        head = self.model.head_params[info.head_shape[0]]

        def memory(ranks: dict[str, int]) -> int:
            modules = [(ranks[m], *self.model.shapes[m]) for m in ranks]
            return estimate_memory(self.model.dims, modules, batch_size=cfg.train.batch_size,
                                   seq_len=cfg.data.max_length, head_params=head,
                                   lora_dropout=cfg.model.lora.dropout > 0).total
        return memory

    def plan(self, client_id: ClientId, importance: Importance | None) -> RankPlan:
        """This client's ranks: ``model.lora.r`` everywhere, checked against its budget."""
        rank = self.cfg.model.lora.r
        ranks = dict.fromkeys(self.model.shapes, rank)
        memory = self.memory_of(client_id)(ranks)
        budget = self.devices[client_id].memory_bytes
        params = sum(rank * sum(s) for s in self.model.shapes.values())
        return RankPlan(ranks, memory, budget, params, memory <= budget, "fixed")

    def configure(self, state: RankState, importance: dict[ClientId, Importance] | None
                  ) -> RankState:
        """Plan every client; exclude or refuse those whose device cannot hold the minimum."""
        ranks, records, excluded = {}, {}, []
        for cid in sorted(self.clients):
            plan = self.plan(cid, importance[cid] if importance else None)
            device = self.devices[cid]
            records[str(cid)] = {
                "task": self.clients[cid].task, "device": device.name,
                "budget_bytes": plan.budget_bytes, "memory_estimate_bytes": plan.memory_bytes,
                "lora_params": plan.params, "feasible": plan.feasible,
                "limited_by": plan.limited_by, "ranks": plan.ranks}
            if not plan.feasible:
                if self.cfg.ranks.on_infeasible == "error":
                    need = plan.memory_bytes / 2**20
                    raise AtlasError(
                        f"client {cid} on device {device.name} needs {need:.0f} MiB for its "
                        f"smallest adapter, its budget is "
                        f"{plan.budget_bytes / 2**20:.0f} MiB; lower train.batch_size or "
                        f"data.max_length, or set ranks.on_infeasible=exclude")
                excluded.append(cid)
            ranks[str(cid)] = plan.ranks
        return replace(state, ranks=ranks, records=records, excluded=tuple(excluded))

    def init(self) -> RankState:  # noqa: D102
        return self.configure(RankState(), None)

    def client_ranks(self, state: RankState) -> dict[ClientId, dict[str, int]]:  # noqa: D102
        return {int(c): r for c, r in state.ranks.items() if int(c) not in state.excluded}

    def client_records(self, state: RankState) -> dict[str, Any]:  # noqa: D102
        return state.records

    # -- Phase 1 (grouping: cluster) --------------------------------------------------------

    def fingerprint_round(self, round_idx: int) -> bool:  # noqa: D102
        return self.cfg.ranks.grouping == "cluster" and recluster_due(self.cfg, round_idx)

    def observe_fingerprints(self, state: RankState, round_idx: int,
                             fingerprints: dict[ClientId, np.ndarray],
                             noise: dict[ClientId, float] | None = None
                             ) -> tuple[RankState, dict[str, float]]:
        """Cluster the fingerprints; a new grouping starts new group models."""
        found, metrics = cluster_clients(self, fingerprints, noise)
        models = state.models if found.assignment == state.assignment else GroupModels()
        return replace(state, models=models, assignment=found.assignment,
                       centroids=found.centroids, center=found.center), metrics

    # -- rounds -----------------------------------------------------------------------------

    def group_of(self, state: RankState, info: ClientInfo) -> str:
        """The aggregation group of a client under ``ranks.grouping``."""
        grouping = self.cfg.ranks.grouping
        if grouping == "global":
            return "all"
        if grouping == "task":
            return f"task={info.task}"
        return f"cluster={state.assignment[str(info.client_id)]}"

    def configure_round(self, state: RankState, round_idx: int, sampled: Sequence[ClientId]):
        """Every sampled client that its device can hold trains."""
        return super().configure_round(state, round_idx,
                                       [c for c in sampled if c not in state.excluded])

    def aggregate_round(self, state: RankState, round_idx: int,
                        updates: Sequence[ClientUpdate]) -> RoundOutcome:
        """Mixed-rank aggregation per group; each client receives its own ranks."""
        method, delta = self.cfg.ranks.aggregation, self.cfg.ranks.update == "delta"
        # averaging keeps what the largest client can take; the delta update keeps everything
        keep = None if delta else max(max(r.values()) for r in state.ranks.values())

        def combine(states, weights, previous):
            return aggregate_mixed(states, weights, method=method, scaling=self.scaling,
                                   keep=keep, previous=previous if delta else None)

        uploaded = {u.client_id: u.state for u in updates}

        def deliver(cid, aggregate):
            # a client that trained keeps its own factor coordinates (see ``redistribute``)
            return redistribute(aggregate, state.ranks[str(cid)], method=method,
                                scaling=self.scaling, reference=uploaded.get(cid))

        models, writes = aggregate_groups(state.models, self.clients, updates,
                                          lambda info: self.group_of(state, info),
                                          combine=combine, deliver=deliver)
        writes = {c: w for c, w in writes.items() if c not in state.excluded}
        groups = {self.group_of(state, self.clients[u.client_id]) for u in updates}
        return RoundOutcome(replace(state, models=models), writes,
                            {"groups": float(len(groups))})


@register
class HetLoRA(HomoLoRA):
    """Per-client, per-module ranks from importance under each device's memory budget."""

    name = "hetlora"

    def init(self) -> RankState:  # noqa: D102
        return RankState()  # planned once importance arrives (before round 1)

    def importance_round(self, round_idx: int) -> bool:  # noqa: D102
        return round_idx == 1

    def observe_importance(self, state: RankState, round_idx: int,
                           importance: dict[ClientId, Importance]
                           ) -> tuple[RankState, dict[str, float]]:
        """Allocate every client's ranks from its importance and its device budget."""
        state = self.configure(state, importance)
        ranks = [r for c, m in state.ranks.items() if int(c) not in state.excluded
                 for r in m.values()]
        return state, {"excluded_clients": float(len(state.excluded)),
                       "mean_rank": float(np.mean(ranks)) if ranks else 0.0}

    def plan(self, client_id: ClientId, importance: Importance | None) -> RankPlan:
        """Importance-guided ranks under the device's memory (and the parameter budget)."""
        if importance is None:
            raise AtlasError("hetlora needs every client's module importance before planning")
        r = self.cfg.ranks
        return allocate_ranks(importance, self.model.shapes, memory_of=self.memory_of(client_id),
                              budget_bytes=self.devices[client_id].memory_bytes,
                              param_budget=self.param_budget(client_id), r_min=r.r_min,
                              r_max=r.r_max, utility=r.utility)

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
