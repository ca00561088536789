"""The split-learning part (Phase 3): which clients train across a cut, and the server's side.

``never``, ``always`` (SplitLoRA, Lin et al., arXiv:2407.00952: every client split) or ``auto``
(only the clients whose device cannot hold the whole model); ``config``: the run's
``split.enabled``. A split client gets a cut (``atlasfl.phases.cuts``: ``split.cut``, or the
fitting one of least estimated time) and ranks for the modules of its own blocks under the memory
of its client part (``atlasfl.strategies.rank_plan``); it trains across the cut with its group's
server model (``atlasfl.engine.split_server``), uploads only its own modules and receives only
those, and no head in vanilla mode (the server holds it).

A split client uploads only what it trained: the modules of its own blocks (and its head in
U-shape). The rest of the model it trained through is its group's server model. At the end of a
round the server completes each split client's upload with the server model's copies of the
other modules (and, vanilla, the server head), so that the group's aggregate mixes, module by
module, every copy trained on each client's data with that client's weight; the clients that
hold a module contribute their own copies, the server's copy counts once per client whose
batches trained it. A hybrid federation (``split.enabled=auto``: some clients split, some
whole) aggregates the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from atlasfl.config import ExperimentConfig, SplitConfig
from atlasfl.devices import DeviceProfile
from atlasfl.errors import AtlasError
from atlasfl.messages import Model, Plan, SplitPlan, TrainReply, Update
from atlasfl.models.blocks import split_tensors
from atlasfl.phases.memory import ModelDims
from atlasfl.phases.cuts import CutOption, choose_cut, cut_options
from atlasfl.strategies.context import Context
from atlasfl.strategies.groups import Groups, head_key
from atlasfl.strategies.state import ServerModel, ServerState
from atlasfl.types import AdapterState, ClientId, SplitWhen

ACT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per activation element that crosses
SplitChoice = Literal["never", "always", "auto", "config"]

__all__ = ["ACT_BYTES", "ServerModel", "Splitting", "complete_update", "plan_cut",
           "refresh_server", "split_record"]


@dataclass(frozen=True)
class Splitting:
    """Split the clients ``enabled`` says (``config``: the run's ``split.enabled``)."""

    enabled: SplitChoice

    @property
    def name(self) -> str:  # noqa: D102
        return self.enabled

    def resolve(self, ctx: Context) -> SplitWhen:
        """``never``, ``always``, or ``auto`` (only clients the model does not fit)."""
        return ctx.cfg.split.enabled if self.enabled == "config" else self.enabled

    def splits(self, ctx: Context, fits_whole: bool) -> bool:
        """Whether a client is split (``fits_whole``: whether its device holds the model)."""
        when = self.resolve(ctx)
        return when == "always" or (when == "auto" and not fits_whole)

    def choose(self, ctx: Context, client_id: ClientId,
               memory_of: Callable[[tuple[int, int]], int]
               ) -> tuple[CutOption | None, list[CutOption]]:
        """A split client's cut and every option considered (``memory_of((cut, tail))``)."""
        return plan_cut(ctx.dims, ctx.devices[client_id], ctx.cfg, memory_of)

    def plan(self, ctx: Context, state: ServerState, client_id: ClientId) -> SplitPlan | None:
        """How a client trains and evaluates across its cut (None: it is not split)."""
        cut = state.split.cuts.get(str(client_id))
        if cut is None:
            return None
        group = state.groups.group(client_id)
        return SplitPlan(cut[0], cut[1], ctx.cfg.split.activation_dtype, group,
                         ctx.clients[client_id].head_shape[0],
                         state.groups.versions.get(group, 0), ctx.cfg.split.window)

    def trim(self, ctx: Context, state: ServerState, client_id: ClientId, model: Model) -> Model:
        """What a split client receives: its own modules, a head only in U-shape."""
        cut = state.split.cuts.get(str(client_id))
        if cut is None or model.adapter is None:
            return model
        own, _ = split_tensors(model.adapter, ctx.dims.num_layers, *cut)
        return dataclasses.replace(model, adapter=own, head=model.head if cut[1] else None)

    def serve(self, state: ServerState, plans: Sequence[Plan]) -> dict[str, ServerModel] | None:
        """The server half the plans train with (None: no plan is split)."""
        if not any(getattr(p, "split", None) is not None for p in plans):
            return None
        return state.split.server

    def complete(self, ctx: Context, state: ServerState, served: dict[str, ServerModel],
                 replies: Sequence[TrainReply]) -> list[TrainReply]:
        """Split clients' uploads completed with their group's server copies (whole models).

        ``served``: the server models after the exchange (``served_models``).
        """
        if not state.split.cuts:
            return list(replies)
        return [dataclasses.replace(r, update=complete_update(
            r.update, served.get(state.groups.group(r.client_id)),
            state.split.cuts.get(str(r.client_id)), ctx.dims.num_layers,
            ctx.clients[r.client_id].head_shape[0]))
            if r.update is not None else r for r in replies]

    def refresh(self, ctx: Context, state: ServerState, served: dict[str, ServerModel],
                round_idx: int,
                share: Callable[[AdapterState, AdapterState | None], AdapterState]
                ) -> ServerState:
        """Each group with split clients takes its new aggregate as its server model."""
        heads: dict[str, set[int]] = {}  # group -> outputs of its vanilla split clients
        for c, (_, tail) in state.split.cuts.items():
            heads.setdefault(state.groups.group(int(c)), set()).update(
                [] if tail else [ctx.clients[int(c)].head_shape[0]])
        server = refresh_server(served, state.groups, heads, share, hidden=ctx.dims.hidden,
                                round_idx=round_idx)
        return dataclasses.replace(state, split=dataclasses.replace(state.split,
                                                                    server=server))


def served_models(state: ServerState, served: dict[str, ServerModel] | None
                  ) -> dict[str, ServerModel]:
    """The server models as the train exchange left them (``served``: those it trained).

    As they were when no split client trained in it: a hybrid group may still have moved through
    its whole-model clients.
    """
    return {**state.split.server, **(served or {})}


def complete_update(update: Update, server: ServerModel | None, cut: tuple[int, int] | None,
                    num_layers: int, outputs: int) -> Update:
    """A split client's upload, completed with its group's server-side copies.

    ``cut`` = (cut, tail), None for a client that trained the whole model (returned as is);
    ``server``: the group's server model after the exchange; ``outputs``: the client's head.
    """
    if cut is None:
        return update
    if server is None:  # internal: a split client trained without its group's server model
        raise RuntimeError(f"client {update.client_id} trained split but no server model")
    _, adapter = split_tensors(server.adapter, num_layers, *cut)
    adapter.update(update.adapter)
    head = update.head if cut[1] else server.heads[str(outputs)]
    return dataclasses.replace(update, adapter=adapter, head=head)


def plan_cut(dims: ModelDims, device: DeviceProfile, cfg: ExperimentConfig,
             memory_of: Callable[[tuple[int, int]], int]
             ) -> tuple[CutOption | None, list[CutOption]]:
    """A split client's cut, and every option considered.

    ``split.cut``, or among the cuts from ``split.min_cut`` the fitting one of least estimated
    time (``atlasfl.phases.cuts``).

    ``memory_of((cut, tail))`` is the client part's training peak at its smallest adapter.
    """
    sp = cfg.split
    tail = sp.tail if sp.mode == "u-shape" else 0
    top = dims.num_layers - tail - 1
    if top < sp.min_cut:
        raise AtlasError(f"split.min_cut = {sp.min_cut} leaves no cut in a model of "
                         f"{dims.num_layers} blocks with tail {tail}; allowed: 0..{max(top, 0)}")
    if sp.fixed_cut is not None and sp.fixed_cut > top:
        raise AtlasError(f"split.cut = {sp.fixed_cut} leaves the server no block of "
                         f"{dims.num_layers} (tail {tail}); allowed: auto or "
                         f"{sp.min_cut}..{top}")
    cuts = [sp.fixed_cut] if sp.fixed_cut is not None else list(range(sp.min_cut, top + 1))
    options = cut_options(
        dims, cuts, tail=tail, memory_of=lambda c: memory_of((c, tail)),
        budget_bytes=device.memory_bytes, batch_size=cfg.train.batch_size,
        seq_len=cfg.data.max_length, act_bytes=ACT_BYTES[sp.activation_dtype],
        compute=device.compute, server_compute=sp.server_compute,
        uplink_mbps=device.uplink_mbps, downlink_mbps=device.downlink_mbps)
    return choose_cut(options), options


def split_record(cut: tuple[int, int], choice: CutOption | None, options: list[CutOption],
                 cfg: SplitConfig) -> dict[str, Any]:
    """What ``clients.json`` says of a split client: its cut, the estimates, every option."""
    return {"cut": cut[0], "tail": cut[1], "mode": cfg.mode,
            "activation_dtype": cfg.activation_dtype,
            "chosen": None if choice is None else choice.as_dict(),
            "options": [o.as_dict() for o in options]}


def refresh_server(served: dict[str, ServerModel], groups: Groups, heads: dict[str, set[int]],
                   share: Callable[[AdapterState, AdapterState | None], AdapterState], *,
                   hidden: int, round_idx: int) -> dict[str, ServerModel]:
    """The server models after a round: each group with split clients takes its new aggregate.

    ``heads`` maps each such group to the outputs of its vanilla split clients.
    ``share(aggregate, reference)`` cuts an aggregate to the server model's ranks (keeping the
    coordinates of ``reference``, its adapter before); the heads take the group's merged head
    of their shape. Moments are kept. Only groups aggregated in ``round_idx`` change (the same
    model keeps the same version, which evaluation caches by). A group without a server model
    yet gets one; models of groups that no longer exist (a new clustering) are dropped.
    """
    out = {}
    for group, outputs in heads.items():
        model = served.get(group, ServerModel())
        if groups.versions.get(group) != round_idx:  # no new aggregate: the model stays as it is
            out[group] = model
            continue
        merged = {str(n): groups.heads[key] for n in outputs | {int(n) for n in model.heads}
                  if (key := head_key(group, (n, hidden))) in groups.heads}
        out[group] = dataclasses.replace(
            model, adapter=share(groups.adapters[group], model.adapter or None),
            heads={**model.heads, **merged})
    return out
