"""The server's check of an update before any aggregation: what was planned, and sane.

A reference implementation averaged whatever arrived; here an update is refused, with its reason,
when its adapter keys are not LoRA factors of the model's modules, when a factor's shape is not
(rank, in) / (out, rank) at the rank planned for that client and module, when its head is not of
the client's label space, when a value is not finite, when it claims no examples, or when its L2
norm exceeds ``faults.max_update_norm``. A subset of the modules is fine: split clients upload
their part and FedSA clients their A factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from atlasfl.messages import Update

SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def check_update(update: Update, *, shapes: Mapping[str, tuple[int, int]],
                 ranks: Mapping[str, int] | None, head_shape: tuple[int, ...] | None,
                 max_norm: float = 0.0) -> str | None:
    """Why ``update`` must be refused, or None when it is as planned.

    Args:
        update: what the client uploaded.
        shapes: module path -> (in_features, out_features) of every LoRA module.
        ranks: module path -> the rank planned for this client (None: any rank, equal in A, B).
        head_shape: the client's head weight shape (num_outputs, hidden); None: no head check.
        max_norm: > 0: the largest L2 norm accepted over all uploaded tensors.
    """
    if update.num_examples <= 0:
        return f"num_examples = {update.num_examples}, expected > 0"
    adapter_ranks: dict[str, dict[str, int]] = {}
    for key, tensor in update.adapter.items():
        module, suffix = next(((key[: -len(s)], s) for s in SUFFIXES if key.endswith(s)),
                              (key, ""))
        if not suffix or module not in shapes:
            return f"adapter key {key!r} is no LoRA factor of the model's modules"
        fan_in, fan_out = shapes[module]
        planned = None if ranks is None else ranks.get(module)
        if ranks is not None and planned is None:
            return f"adapter key {key!r}: module not in the client's rank plan"
        a_factor = suffix == SUFFIXES[0]
        rank = tensor.shape[0] if a_factor else tensor.shape[-1]
        expected = ((planned or rank, fan_in) if a_factor else (fan_out, planned or rank))
        if tuple(tensor.shape) != expected:
            return (f"adapter {key!r} has shape {tuple(tensor.shape)}, the plan says "
                    f"{expected}")
        adapter_ranks.setdefault(module, {})[suffix] = rank
    for module, found in adapter_ranks.items():
        if len(set(found.values())) > 1:
            return f"module {module!r}: A has rank {found[SUFFIXES[0]]}, B {found[SUFFIXES[1]]}"
    if head_shape is not None and update.head:
        expected_head = {"out.weight": tuple(head_shape), "out.bias": (head_shape[0],)}
        got = {k: tuple(v.shape) for k, v in update.head.items()}
        if got != expected_head:
            return f"head {got} is not the client's {expected_head}"
    squared = 0.0
    for name, tensor in [*update.adapter.items(), *(("head/" + k, v)
                                                     for k, v in update.head.items())]:
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} holds non-finite values"
        squared += float(tensor.double().pow(2).sum())
    if max_norm > 0 and math.sqrt(squared) > max_norm:
        return (f"L2 norm {math.sqrt(squared):.4g} exceeds faults.max_update_norm = "
                f"{max_norm:g}")
    return None
