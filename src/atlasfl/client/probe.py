"""Phases 1 and 2 on one client: a fingerprint of its task and the importance of its modules.

One gradient pass at the common seeded initial adapter and head, in eval mode, over a seeded
sample of the client's rows (``atlasfl.phases.fingerprint`` and ``atlasfl.phases.ranks`` hold the
math). When both are asked, the fingerprint's backward pass also feeds the importance meter, so the
client reads its data once. The common start is what every client can rebuild from the shared
seed; it is never sent.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Protocol, cast

import torch
from torch import Tensor, nn

from atlasfl.client.state import ClientState
from atlasfl.client.training import forward_logits, task_loss
from atlasfl.messages import Probe, ProbeReply
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder
from atlasfl.phases.fingerprint import compute_fingerprint, fingerprint_modules, select_blocks
from atlasfl.phases.ranks import ImportanceMeter, module_importance
from atlasfl.types import AdapterState


class ProbeRuntime(Protocol):
    """What a probe reads of the process's shared runtime (``client.runtime.ClientRuntime``)."""

    @property
    def model(self) -> nn.Module: ...  # noqa: D102
    @property
    def binder(self) -> AdapterBinder: ...  # noqa: D102
    @property
    def seed(self) -> int: ...  # noqa: D102
    @property
    def device(self) -> torch.device: ...  # noqa: D102
    @property
    def num_layers(self) -> int: ...  # noqa: D102
    @property
    def initial_adapter(self) -> AdapterState: ...  # noqa: D102
    @property
    def initial_heads(self) -> dict[int, ClassificationHead]: ...  # noqa: D102


def probe_client(runtime: ProbeRuntime, client: ClientState, plan: Probe,
                 generator: torch.Generator) -> ProbeReply:
    """Answer a ``Probe``: the fingerprint (and its noise variance) and/or module importance.

    ``generator`` draws the examples (and the privacy noise); it is seeded per (run, round,
    client), so the pass does not depend on the order clients run in.
    """
    start = time.perf_counter()
    fp, imp = plan.fingerprint, plan.importance
    model, binder = runtime.model, runtime.binder
    initial = {k: nn.Parameter(v.detach().clone()) for k, v in runtime.initial_adapter.items()}
    head = copy.deepcopy(runtime.initial_heads[client.task.num_labels]).eval()
    binder.bind(initial)
    model.eval()
    blocks = select_blocks(runtime.num_layers, fp.layers) if fp else ()
    modules = (fingerprint_modules(model, runtime.num_layers, blocks, params=fp.params)
               if fp else {})
    meter = None
    if imp:  # norm: each module's LoRA B factor | spectrum: its frozen weight
        paths = [k.removesuffix(".lora_B.weight") for k in initial
                 if k.endswith(".lora_B.weight")]
        meter = ImportanceMeter(
            {p: (initial[f"{p}.lora_B.weight"] if imp.kind == "norm"
                 else _frozen_weight(model, p)) for p in paths},
            imp.kind, imp.top)
    tensors = [cast(Tensor, m.weight) for m in modules.values()]
    tensors += list(meter.params.values()) if meter else []
    frozen = list({id(p): p for p in tensors if not p.requires_grad}.values())
    for p in frozen:  # frozen base weights: differentiate them for this pass only
        p.requires_grad_(True)
    samples = fp.samples if fp else imp.samples if imp else 0
    batch_size = fp.batch_size if fp else imp.batch_size if imp else 1
    rows = torch.randperm(len(client.train_set), generator=generator)[:samples].numpy()
    batches = [{k: v.to(runtime.device) for k, v in
                client.train_set.collate(rows[i : i + batch_size]).items()}
               for i in range(0, len(rows), batch_size)]

    def loss_fn(batch: dict[str, Tensor]) -> Tensor:
        logits = forward_logits(model, head, batch)
        return task_loss(logits, batch["labels"], client.task.is_regression)

    reply = ProbeReply(client.client_id)
    try:
        if fp:
            found = compute_fingerprint(loss_fn, batches, modules, dim=fp.dim, seed=runtime.seed,
                                        blocks=blocks, statistic=fp.statistic,
                                        epsilon=fp.epsilon, delta=fp.delta, clip=fp.clip,
                                        generator=generator, importance=meter)
            reply = ProbeReply(client.client_id, found.vector, found.noise_var,
                               found.importance or None,
                               {"fingerprint_noise_std": found.noise_std})
        elif meter:
            reply = ProbeReply(client.client_id,
                               importance=module_importance(loss_fn, batches, meter))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return dataclasses.replace(reply, seconds=time.perf_counter() - start)


def _frozen_weight(model: nn.Module, path: str) -> Tensor:
    """The frozen weight under a LoRA layer (peft keeps it in ``base_layer``)."""
    return cast(Tensor, cast(nn.Module, model.get_submodule(path).base_layer).weight)
