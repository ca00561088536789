"""Server-side helpers of split learning shared by the strategies that split clients.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atlasfl.config import ExperimentConfig, SplitConfig
from atlasfl.devices import DeviceProfile
from atlasfl.errors import AtlasError
from atlasfl.messages import Update
from atlasfl.models.split import split_tensors
from atlasfl.phases.memory import ModelDims
from atlasfl.phases.split import CutOption, choose_cut, cut_options
from atlasfl.strategies.groups import Groups, head_key
from atlasfl.types import AdapterState

if TYPE_CHECKING:
    from torch import Tensor

ACT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # bytes per activation element that crosses


@dataclass(frozen=True)
class ServerModel:
    """A group's server-side model: adapter, heads (vanilla) and optimizer moments (tensors)."""

    adapter: AdapterState = field(default_factory=dict)  # empty: the common initialisation
    heads: dict[str, AdapterState] = field(default_factory=dict)  # str(outputs) -> head
    moments: dict[str, Tensor] = field(default_factory=dict)  # "<param>/<exp_avg|...>"


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
    time (``atlasfl.phases.split``).

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
