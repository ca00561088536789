"""The rank-planning part: each client's LoRA ranks under its device's memory (Phase 2).

``none`` (the FedAvg family: rank ``model.lora.r`` everywhere, nothing planned or recorded),
``equal`` (``homolora``: rank ``model.lora.r`` everywhere, checked against each device's memory,
planned before round 1) and ``device`` (``hetlora``, HetLoRA, Cho et al., arXiv:2401.06432:
before round 1 every client uploads its importance per LoRA module — one number, or with
``ranks.utility=spectrum`` the top ``r_max`` squared singular values of the module's gradient —
and the server sizes its ranks to its device's memory (``atlasfl.phases.memory``) and, with
``ranks.budget``, a parameter budget (``atlasfl.phases.ranks.allocate_ranks``)).

``plan_clients`` plans every client with the split part's cut where the client needs one (a
split client's ranks cover the modules of its own blocks under the memory of its client part),
records it (``clients.json``) and excludes, or refuses with an error, a client whose device cannot
hold its smallest adapter (``ranks.on_infeasible``). A client receives its rank map with the
first plan that reaches it after planning (none when it already holds those ranks, as every
``equal`` client does from the common initialisation).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from atlasfl.errors import AtlasError
from atlasfl.messages import ImportanceSpec, Reply
from atlasfl.models.blocks import client_side
from atlasfl.phases.memory import estimate_memory
from atlasfl.phases.ranks import Importance, RankPlan, allocate_ranks
from atlasfl.phases.cuts import CutOption, split_memory
from atlasfl.strategies.context import Context
from atlasfl.strategies.split_learning import ACT_BYTES, Splitting, split_record
from atlasfl.strategies.state import ServerState
from atlasfl.types import ClientId
from atlasfl.units import mib


def memory_of(ctx: Context, client_id: ClientId, cut: tuple[int, int] | None = None
              ) -> Callable[[dict[str, int]], int]:
    """Map ranks to the memory model's training peak of this client.

    ``cut`` = (cut, tail): the client part of a split client (``phases.cuts``); only the ranks of
    its own modules count.
    """
    cfg, dims, shapes = ctx.cfg, ctx.dims, ctx.model.shapes
    head = ctx.model.head_params[ctx.clients[client_id].head_shape[0]]

    def memory(ranks: dict[str, int]) -> int:
        if cut is not None:
            own = [(ranks[m], *shapes[m]) for m in ranks
                   if client_side(m, dims.num_layers, *cut)]
            return split_memory(dims, own, cut=cut[0], tail=cut[1],
                                batch_size=cfg.train.batch_size, seq_len=cfg.data.max_length,
                                head_params=head, act_bytes=ACT_BYTES[cfg.split.activation_dtype],
                                lora_dropout=cfg.model.lora.dropout > 0)
        modules = [(ranks[m], *shapes[m]) for m in ranks]
        return estimate_memory(dims, modules, batch_size=cfg.train.batch_size,
                               seq_len=cfg.data.max_length, head_params=head,
                               lora_dropout=cfg.model.lora.dropout > 0).total
    return memory


@dataclass(frozen=True)
class NoPlan:
    """Rank ``model.lora.r`` everywhere; nothing planned, recorded or excluded."""

    name = "none"
    plans = False  # whether clients are planned and recorded

    def importance_spec(self, ctx: Context, round_idx: int) -> ImportanceSpec | None:
        """Module importance asked in this round's probe (None: none)."""
        return None

    def planned_ranks(self, ctx: Context, state: ServerState, client_id: ClientId
                      ) -> dict[str, int]:
        """The ranks the server accepts from this client (its plan, else the initial ranks)."""
        return dict(state.plan.ranks.get(str(client_id), ctx.initial_ranks))

    def plan(self, ctx: Context, client_id: ClientId, importance: Importance | None,
             cut: tuple[int, int] | None = None) -> RankPlan:
        """This client's ranks (None importance: before any probe)."""
        # internal: the strategy calls ``plan_clients`` only for a part whose ``plans`` is True
        raise RuntimeError(f"method {ctx.method} plans no ranks")

    def smallest_ranks(self, ctx: Context) -> dict[str, int]:
        """The least adapter a client may get (what decides whether a cut fits)."""
        return dict(ctx.initial_ranks)


@dataclass(frozen=True)
class EqualRanks(NoPlan):
    """``model.lora.r`` everywhere, checked against each device's memory before round 1."""

    name = "equal"
    plans = True

    def plan(self, ctx: Context, client_id: ClientId, importance: Importance | None,
             cut: tuple[int, int] | None = None) -> RankPlan:
        """``model.lora.r`` everywhere, checked against the device's budget."""
        ranks = dict(ctx.initial_ranks)
        memory = memory_of(ctx, client_id, cut)(ranks)
        budget = ctx.devices[client_id].memory_bytes
        own = ranks if cut is None else {m: r for m, r in ranks.items()
                                         if client_side(m, ctx.dims.num_layers, *cut)}
        params = sum(r * sum(ctx.model.shapes[m]) for m, r in own.items())
        return RankPlan(ranks, memory, budget, params, memory <= budget, "fixed")


@dataclass(frozen=True)
class DeviceRanks(NoPlan):
    """Per-module ranks from importance under each device's memory (and ``ranks.budget``)."""

    name = "device"
    plans = True

    def importance_spec(self, ctx: Context, round_idx: int) -> ImportanceSpec | None:
        """Every client measures its modules' importance before round 1."""
        if round_idx != 1:
            return None
        return ImportanceSpec.from_config(ctx.cfg.ranks, ctx.cfg.clustering.batch_size)

    def plan(self, ctx: Context, client_id: ClientId, importance: Importance | None,
             cut: tuple[int, int] | None = None) -> RankPlan:
        """Importance-guided ranks under the device's memory (and the parameter budget).

        A split client's ranks are allocated over the modules of its own blocks under the
        memory of its client part; the server's modules stay at ``model.lora.r``.
        """
        if importance is None:
            raise AtlasError(f"{ctx.method} needs every client's module importance before "
                             f"planning")
        r = ctx.cfg.ranks
        shapes = ctx.model.shapes
        if cut is not None:
            shapes = {m: s for m, s in shapes.items()
                      if client_side(m, ctx.dims.num_layers, *cut)}
        plan = allocate_ranks({m: importance[m] for m in shapes}, shapes,
                              memory_of=memory_of(ctx, client_id, cut),
                              budget_bytes=ctx.devices[client_id].memory_bytes,
                              param_budget=param_budget(ctx, client_id), r_min=r.r_min,
                              r_max=r.r_max, utility=r.utility)
        if cut is None:
            return plan
        return dataclasses.replace(plan, ranks={**ctx.initial_ranks, **plan.ranks})

    def smallest_ranks(self, ctx: Context) -> dict[str, int]:  # noqa: D102
        return dict.fromkeys(ctx.model.shapes, ctx.cfg.ranks.r_min)


def param_budget(ctx: Context, client_id: ClientId) -> int | None:
    """LoRA parameters this client may train under ``ranks.budget`` (None: no limit).

    ``parity``: homolora's count at ``model.lora.r``, for every client. ``device``: the same total
    over the federation, shared in proportion to the clients' device memory (HetLoRA's setting of
    device-dependent ranks at the upload of homolora), at least r_min everywhere.
    """
    budget = ctx.cfg.ranks.budget
    per_rank = sum(sum(s) for s in ctx.model.shapes.values())  # parameters of rank 1
    parity = ctx.cfg.model.lora.r * per_rank
    if budget == "parity":
        return parity
    if budget == "device":
        memory = {c: d.memory_bytes for c, d in ctx.devices.items()}
        share = int(parity * len(memory) * memory[client_id] / sum(memory.values()))
        return max(share, ctx.cfg.ranks.r_min * per_rank)
    return None


def _smallest_memory(ctx: Context, client_id: ClientId, smallest: dict[str, int],
                     cut: tuple[int, int]) -> int:
    return memory_of(ctx, client_id, cut)(smallest)


def plan_clients(ctx: Context, ranks: NoPlan, split: Splitting, state: ServerState,
                 importance: Mapping[ClientId, Importance] | None) -> ServerState:
    """Plan every client; exclude or refuse those whose device cannot hold the minimum.

    A client the split part splits (every client, or with ``auto`` those whose device cannot hold
    the whole model) gets a cut first, then ranks for the modules of its own blocks under its
    budget.
    """
    out, records, excluded, cuts = {}, {}, [], {}
    smallest = ranks.smallest_ranks(ctx)
    for cid in sorted(ctx.clients):
        imp = importance[cid] if importance else None
        choice: CutOption | None = None
        options: list[CutOption] = []
        whole = ranks.plan(ctx, cid, imp) if split.resolve(ctx) == "auto" else None
        if split.splits(ctx, whole is None or whole.feasible):
            memory = functools.partial(_smallest_memory, ctx, cid, smallest)
            choice, options = split.choose(ctx, cid, memory)
        cut = None if choice is None else (choice.cut, choice.tail)
        if cut is None and options:  # no cut fits: the smallest client part decides
            best = min(options, key=lambda o: o.memory_bytes)
            cut = (best.cut, best.tail)
        plan = ranks.plan(ctx, cid, imp, cut)
        device = ctx.devices[cid]
        records[str(cid)] = {
            "task": ctx.clients[cid].task, "device": device.name,
            "budget_bytes": plan.budget_bytes, "memory_estimate_bytes": plan.memory_bytes,
            "lora_params": plan.params, "feasible": plan.feasible,
            "limited_by": plan.limited_by, "ranks": plan.ranks,
            "split": None if cut is None else split_record(cut, choice, options, ctx.cfg.split)}
        if cut is not None and plan.feasible:
            cuts[str(cid)] = cut
        if not plan.feasible:
            if ctx.cfg.ranks.on_infeasible == "error":
                hint = "set split.enabled=auto, " if split.resolve(ctx) == "never" else ""
                raise AtlasError(
                    f"client {cid} on device {device.name} needs {mib(plan.memory_bytes)} for "
                    f"its smallest adapter, its budget is {mib(plan.budget_bytes)}; lower "
                    f"train.batch_size or data.max_length, {hint}or set "
                    f"ranks.on_infeasible=exclude")
            excluded.append(cid)
        out[str(cid)] = plan.ranks
    return dataclasses.replace(
        state, plan=dataclasses.replace(state.plan, ranks=out, records=records,
                                        excluded=tuple(excluded)),
        split=dataclasses.replace(state.split, cuts=cuts))


def received_ranks(state: ServerState, replies: Sequence[Reply]) -> list[ClientId]:
    """Clients that answered a plan, and so hold their rank map (excluded ones never get one)."""
    return [r.client_id for r in replies if r.client_id not in state.plan.excluded
            and getattr(r, "delivered", True)]


def infeasible_notices(state: ServerState) -> tuple[str, ...]:
    """One line per excluded client: its device, its budget and what it would need."""
    return tuple(
        f"client {cid} excluded: its device {rec['device']} has {mib(rec['budget_bytes'])}, "
        f"the smallest adapter needs {mib(rec['memory_estimate_bytes'])}"
        for cid, rec in state.plan.records.items() if not rec["feasible"])
