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

A client receives its rank map with the first plan that reaches it after planning (none when it
already holds those ranks, as every ``homolora`` client does from the common initialisation), and
its share of the group's aggregate cut to its ranks (``redistribute``); a client whose device
cannot hold the smallest adapter (``ranks.on_infeasible=exclude``) trains and receives nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from atlasfl.config import ExperimentConfig
from atlasfl.devices import known_profiles
from atlasfl.errors import AtlasError
from atlasfl.messages import (
    EvaluateReply,
    ImportanceSpec,
    Model,
    ProbeReply,
    Reply,
    Train,
    TrainReply,
)
from atlasfl.models.lora import lora_scaling
from atlasfl.phases.aggregation import aggregate_mixed, redistribute
from atlasfl.phases.memory import ModelDims, estimate_memory
from atlasfl.phases.ranks import Importance, RankPlan, allocate_ranks
from atlasfl.runfiles import CLIENTS_FILE
from atlasfl.strategies.base import ClientInfo, ModelInfo, RoundInfo, RoundOutcome, register
from atlasfl.strategies.fedavg import FedAvg
from atlasfl.strategies.groups import Combine, Groups
from atlasfl.types import AdapterState, ClientId, Grouping


@dataclass(frozen=True)
class RankState:
    """Server state: the groups and their models, every client's ranks and record."""

    groups: Groups = field(default_factory=Groups)
    ranks: dict[str, dict[str, int]] = field(default_factory=dict)  # client -> module -> rank
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # client -> configuration
    excluded: tuple[int, ...] = ()  # clients whose device cannot hold the minimum adapter
    configured: tuple[int, ...] = ()  # clients that acknowledged their rank map


@register
class HomoLoRA(FedAvg):
    """One LoRA rank for every client and module; mixed-rank aggregation settings apply."""

    name = "homolora"
    personal_delivery = True  # a client that trained keeps its own factor coordinates

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
        return self.cfg.ranks.grouping

    def groups(self, state: RankState) -> Groups:  # noqa: D102
        return state.groups

    def with_groups(self, state: RankState, groups: Groups) -> RankState:  # noqa: D102
        return dataclasses.replace(state, groups=groups)

    # -- configuration ----------------------------------------------------------------------

    def scaling(self, rank: int) -> float:
        """The LoRA scaling every client applies at ``rank``."""
        lora = self.cfg.model.lora
        return lora_scaling(lora.alpha, rank, rslora=lora.rslora)

    def memory_of(self, client_id: ClientId) -> Callable[[dict[str, int]], int]:
        """Map ranks to the memory model's training peak of this client."""
        cfg, info = self.cfg, self.clients[client_id]
        head = self.model.head_params[info.head_shape[0]]

        def memory(ranks: dict[str, int]) -> int:
            modules = [(ranks[m], *self.model.shapes[m]) for m in ranks]
            return estimate_memory(self.dims, modules, batch_size=cfg.train.batch_size,
                                   seq_len=cfg.data.max_length, head_params=head,
                                   lora_dropout=cfg.model.lora.dropout > 0).total
        return memory

    def plan(self, client_id: ClientId, importance: Importance | None) -> RankPlan:
        """This client's ranks: ``model.lora.r`` everywhere, checked against its budget."""
        ranks = dict(self.initial_ranks)
        memory = self.memory_of(client_id)(ranks)
        budget = self.devices[client_id].memory_bytes
        params = sum(ranks[m] * sum(s) for m, s in self.model.shapes.items())
        return RankPlan(ranks, memory, budget, params, memory <= budget, "fixed")

    def configure(self, state: RankState, importance: Mapping[ClientId, Importance] | None
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
        return dataclasses.replace(state, ranks=ranks, records=records,
                                   excluded=tuple(excluded))

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
            f"{rec['budget_bytes'] / 2**20:.0f} MiB, the smallest adapter needs "
            f"{rec['memory_estimate_bytes'] / 2**20:.0f} MiB"
            for cid, rec in new.records.items() if not rec["feasible"])
        return dataclasses.replace(outcome, files={CLIENTS_FILE: new.records}, notices=notices)

    def download(self, state: RankState, client_id: ClientId) -> Model:
        """Its rank map if it does not hold it, and its share of the group's aggregate."""
        if client_id in state.excluded:
            return Model()
        planned = state.ranks.get(str(client_id))
        holds = client_id in state.configured or planned == self.initial_ranks
        return dataclasses.replace(super().download(state, client_id),
                                   ranks=None if planned is None or holds else planned)

    def configure_train(self, state: RankState, rnd: RoundInfo) -> list[Train]:
        """Every sampled client that its device can hold trains."""
        return [p for p in super().configure_train(state, rnd)
                if p.client_id not in state.excluded]

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
        done = {r.client_id for r in replies if r.client_id not in state.excluded}
        return dataclasses.replace(state, configured=tuple(sorted({*state.configured, *done})))

    def aggregate_train(self, state: RankState, rnd: RoundInfo,
                        replies: Sequence[TrainReply]) -> RoundOutcome:
        """Acknowledge the rank maps, then aggregate as FedAvg with the mixed-rank combiner."""
        return super().aggregate_train(self.acknowledge_ranks(state, replies), rnd, replies)

    def aggregate_evaluate(self, state: RankState, rnd: RoundInfo,
                           replies: Sequence[EvaluateReply]) -> RoundOutcome:
        """Acknowledge the rank maps and the models the plans carried."""
        return super().aggregate_evaluate(self.acknowledge_ranks(state, replies), rnd, replies)


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
        return RoundOutcome(new, {**outcome.metrics,
                                  "excluded_clients": float(len(new.excluded)),
                                  "mean_rank": float(np.mean(ranks)) if ranks else 0.0})

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
