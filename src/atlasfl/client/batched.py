"""Clients that train together: one forward and backward per step over their stacked adapters.

For a GPU (issue 15): the clients of a round each train a small adapter over the same frozen
backbone, so one client's batch keeps a large card mostly idle. Clients whose rounds have the
same batch sizes step for step (``step_sizes``) can instead share every step: their batches are
right-padded to one length and concatenated (client-major), the backbone runs once, and every
injected LoRA layer applies each client's own A, B and scaling to that client's rows
(``stacked_lora``, batched matrix products over the client dimension). Each client's head scores
its own rows and the loss is the sum of the clients' mean losses; since no parameter is shared,
one backward gives every client exactly the gradient it gets alone. Then each client clips and
steps its own optimizer, as ``atlasfl.client.training.run_steps`` does.

Exact (to float rounding) with dropout off: the attention mask hides the extra padding, and
clients of lower rank are zero-padded to the group's largest rank, which adds exact zeros. With
dropout on, the masks are drawn for the whole batch from one stream, so they differ from those
each client would draw alone (same distribution, other draws).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from atlasfl.client.state import ClientState
from atlasfl.client.training import autocast, round_batches, task_loss
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.models.lora import ADAPTER, AdapterBinder


def step_sizes(num_rows: int, cfg: TrainConfig, *, epochs: int, steps: int, seed: int
               ) -> tuple[int, ...]:
    """Rows in each batch of a client's round, in order, as ``round_batches`` gives them.

    They depend on the number of rows and the client's seed only (``length_bucket`` reorders
    rows within a chunk by length, never moves a chunk's bounds), so a stand-in set of
    one-token rows gives them without the client's state.
    """
    rows = TokenizedSet([[0]] * num_rows, None, np.zeros(num_rows), pad_id=0)
    batches = round_batches(rows, cfg, epochs=epochs, steps=steps,
                            generator=torch.Generator().manual_seed(seed))
    return tuple(len(b) for b in batches)


def group_by_key(keys: Sequence[Hashable | None], size: int) -> list[list[int]]:
    """Indices of equal keys, in order, cut into groups of at most ``size``.

    ``None`` keys and groups of one are left out (those go their own way).
    """
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    groups = [same[s : s + size] for same in by_key.values() for s in range(0, len(same), size)]
    return sorted((g for g in groups if len(g) > 1), key=lambda g: g[0])


def supports_batching(binder: AdapterBinder) -> bool:
    """Whether every injected layer is a plain peft LoRA linear layer (no DoRA, not merged)."""
    return all(type(layer) is LoraLinear and ADAPTER not in layer.lora_variant
               and not layer.merged for layer in binder.layers.values())


def join_batches(parts: Sequence[Mapping[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """The model inputs of several batches as one: right-padded to one length, concatenated.

    Labels are left out (the clients' tasks may differ in kind); ``input_ids`` are padded with
    ``pad_id``, the attention mask and token types with 0.
    """
    length = max(p["input_ids"].shape[1] for p in parts)
    out: dict[str, Tensor] = {}
    for key in parts[0]:
        if key == "labels":
            continue
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.cat([F.pad(p[key], (0, length - p[key].shape[1]), value=fill)
                              for p in parts])  # (sum of rows, length)
    return out


def _stacked_forward(layer: LoraLinear, a: list[Tensor], b: list[Tensor], scaling: Tensor,
                     x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """The forward of a peft LoRA linear layer, adapter ``c`` on the ``c``-th slice of rows."""
    result = layer.base_layer(x, *args, **kwargs)
    num = len(a)
    assert x.shape[0] % num == 0, "internal: the batch is not the clients' rows, client-major"
    rank = max(t.shape[0] for t in a)
    # zero rows of A meet zero columns of B: a lower rank padded to ``rank`` adds exact zeros,
    # and the padding's gradient stops at F.pad (a client's tensors get only their own part)
    a_stack = torch.stack([F.pad(t, (0, 0, 0, rank - t.shape[0])) for t in a])  # (C, r, in)
    b_stack = torch.stack([F.pad(t, (0, rank - t.shape[1])) for t in b]) * scaling  # (C, out, r)
    h = layer.lora_dropout[ADAPTER](x).reshape(num, -1, x.shape[-1])  # (C, rows * T, in)
    delta = torch.bmm(torch.bmm(h, a_stack.transpose(1, 2)), b_stack.transpose(1, 2))
    return result + delta.reshape(result.shape).to(result.dtype)  # (C * rows, T, out)


@contextlib.contextmanager
def stacked_lora(binder: AdapterBinder, adapters: Sequence[Mapping[str, Tensor]]
                 ) -> Iterator[None]:
    """Each injected LoRA layer applies adapter ``c`` to the ``c``-th slice of its batch.

    The batch is cut into ``len(adapters)`` equal slices; slice ``c`` gets
    ``base(x) + scaling_c x A_c^T B_c^T``, with ``scaling_c`` from the rank of adapter ``c`` in
    that module (``AdapterBinder.scaling``, as binding it alone sets). The layers' ``forward``
    is replaced for the duration and restored on leaving (on an error too), so outside it the
    layers run peft's forward on whatever is bound.
    """
    assert supports_batching(binder), "internal: a layer peft's plain LoRA forward does not fit"
    replaced: list[LoraLinear] = []
    try:
        for path, layer in binder.layers.items():
            assert isinstance(layer, LoraLinear) and "forward" not in vars(layer)
            a = [adapter[f"{path}.lora_A.weight"] for adapter in adapters]  # (r_c, in)
            b = [adapter[f"{path}.lora_B.weight"] for adapter in adapters]  # (out, r_c)
            scaling = torch.tensor([binder.scaling(t.shape[0]) for t in a],
                                   device=a[0].device).view(-1, 1, 1)  # (C, 1, 1)
            layer.forward = functools.partial(  # type: ignore[method-assign]
                _stacked_forward, layer, a, b, scaling)
            replaced.append(layer)
        yield
    finally:
        for done in replaced:
            del vars(done)["forward"]  # peft's class method shows through again


def train_batched(model: nn.Module, binder: AdapterBinder, clients: Sequence[ClientState],
                  orders: Sequence[Sequence[np.ndarray]], cfg: TrainConfig, *,
                  device: torch.device) -> list[dict[str, float]]:
    """Train each client on its round's batches (``orders[c]``: row indices per step) together.

    Every step is one forward and one backward for the group (see the module's docstring),
    then each client clips its own parameters and steps its own optimizer. The batches must
    have the same sizes step for step. Returns, per client, what ``train_client`` returns;
    ``train_seconds`` is the group's time split evenly (one forward serves them all).
    """
    sizes = [len(idx) for idx in orders[0]]
    assert all([len(idx) for idx in o] == sizes for o in orders), "internal: unequal batches"
    pad_ids = {c.train_set.pad_id for c in clients}
    assert len(pad_ids) == 1, "internal: clients of one backbone share its tokenizer"
    pad_id = pad_ids.pop()
    start = time.perf_counter()
    model.train()
    params = []
    for client in clients:
        client.head.train()
        params.append([*client.adapter.values(), *client.head.parameters()])
    losses: list[list[Tensor]] = [[] for _ in clients]
    with stacked_lora(binder, [c.adapter for c in clients]):
        for step, rows in enumerate(sizes):
            parts = [c.train_set.collate(o[step], pad_multiple=cfg.pad_multiple)
                     for c, o in zip(clients, orders, strict=True)]
            inputs = {k: v.to(device) for k, v in join_batches(parts, pad_id).items()}
            for client in clients:
                client.optimizer.zero_grad(set_to_none=True)
            with autocast(device, cfg.precision):
                hidden = model(**inputs).last_hidden_state  # (C * rows, T, H)
                logits = [c.head(h, m).float() for c, h, m in
                          zip(clients, hidden.split(rows), inputs["attention_mask"].split(rows),
                              strict=True)]  # (rows, num_labels) each
            step_losses = [task_loss(lg, p["labels"].to(device), c.task.is_regression)
                           for c, lg, p in zip(clients, logits, parts, strict=True)]
            torch.stack(step_losses).sum().backward()
            for c, client in enumerate(clients):
                losses[c].append(step_losses[c].detach())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params[c], cfg.max_grad_norm)
                client.optimizer.step()
    seconds = (time.perf_counter() - start) / len(clients)
    return [{"train_loss": float(torch.stack(own).float().mean()) if own else float("nan"),
             "steps": len(sizes), "examples": sum(sizes), "train_seconds": seconds}
            for own in losses]
