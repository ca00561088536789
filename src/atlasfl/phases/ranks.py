"""Phase 2: per-module LoRA ranks that fit a client's memory, guided by importance (HSplitLoRA).

After HSplitLoRA (Lin et al., "HSplitLoRA: A Heterogeneous Split Parameter-Efficient Fine-Tuning
Framework for Large Language Models", arXiv:2505.02795): each client gets, per LoRA module, the
rank that maximises importance-weighted rank under its device's memory budget.

Importance (``module_importance``): the mean over batches of ||dL/dB_m||_F^2 of each module's
LoRA B factor at the common initial adapter. With B = 0, dL/dB = G A^T where G is the gradient of
the frozen weight, so this is the energy of G seen through the shared random A — a gradient
sensitivity of the module that costs no extra backward pass. When Phase 1 runs, the same backward
pass that yields the fingerprint yields it (``compute_fingerprint(importance_of=...)``).

Allocation (``allocate_ranks``): maximise sum_m I_m u(r_m) with u(r) = r (``linear``, the
importance-weighted rank) or u(r) = log r (``log``, diminishing returns: the proportional
allocation r_m ~ I_m / cost_m), subject to r_min <= r_m <= r_max, the memory model's estimate
<= the device budget, and optionally sum_m r_m (in_m + out_m) <= a parameter budget. The memory
estimate is linear in each rank, so the greedy that repeatedly raises the rank with the best
marginal utility per marginal parameter (while both budgets hold) is the exact optimum for the
linear utility up to one partial step, and the standard concave-knapsack greedy for ``log``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from atlasfl.errors import AtlasError

UTILITIES = ("linear", "log")


@dataclass(frozen=True)
class RankPlan:
    """Result of ``allocate_ranks``."""

    ranks: dict[str, int]  # module path -> rank
    memory_bytes: int  # the memory model's estimate for these ranks
    budget_bytes: int
    params: int  # LoRA parameters sum_m r_m (in_m + out_m)
    feasible: bool  # False: even r_min everywhere exceeds the budget (ranks are then r_min)
    limited_by: str  # what stopped the growth: memory | parameters | r_max


def module_importance(loss_fn: Callable[[dict], Tensor], batches: list[dict],
                      params: Mapping[str, Tensor]) -> dict[str, float]:
    """Mean over batches of the squared Frobenius norm of each parameter's gradient."""
    if not batches:
        raise AtlasError("a client needs at least one example to compute module importance")
    names = list(params)
    total = dict.fromkeys(names, 0.0)
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), [params[n] for n in names])
        for name, g in zip(names, grads, strict=True):
            total[name] += float(g.double().pow(2).sum()) / len(batches)
    return total


def allocate_ranks(importance: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], *,
                   memory_of: Callable[[dict[str, int]], int], budget_bytes: int,
                   param_budget: int | None = None, r_min: int = 1, r_max: int = 16,
                   utility: str = "linear") -> RankPlan:
    """Per-module ranks maximising importance-weighted rank under the budgets.

    Args:
        importance: module path -> importance (>= 0); every module of ``shapes`` needs one.
        shapes: module path -> (in_features, out_features).
        memory_of: ranks -> estimated training peak in bytes (the memory model); assumed
            non-decreasing and linear in each rank.
        budget_bytes: the device's memory budget.
        param_budget: at most this many LoRA parameters (None: no limit).
        r_min: smallest rank of any module.
        r_max: largest rank of any module.
        utility: ``linear`` or ``log``.
    """
    if utility not in UTILITIES:
        raise AtlasError(f"ranks.utility = {utility!r} is invalid; allowed: linear, log")
    missing = sorted(set(shapes) - set(importance))
    if missing:
        raise AtlasError(f"no importance for modules {missing[:3]}")
    if not 1 <= r_min <= r_max:
        raise AtlasError(f"rank bounds r_min={r_min}, r_max={r_max}; allowed: 1 <= r_min <= r_max")
    ranks = dict.fromkeys(shapes, r_min)
    base = memory_of(ranks)
    cost = {m: sum(shapes[m]) for m in shapes}  # parameters per unit of rank
    params = sum(r_min * cost[m] for m in shapes)
    if base > budget_bytes or (param_budget is not None and params > param_budget):
        return RankPlan(ranks, base, budget_bytes, params, False, "memory" if base > budget_bytes
                        else "parameters")
    # memory of one more rank in each module (linear model: the same at every rank)
    step = {m: memory_of({**ranks, m: r_min + 1}) - base for m in shapes}
    total_imp = sum(max(0.0, float(importance[m])) for m in shapes) or 1.0
    weight = {m: max(0.0, float(importance[m])) / total_imp for m in shapes}

    def gain(m: str, r: int) -> float:
        marginal = 1.0 if utility == "linear" else math.log((r + 1) / r)
        return weight[m] * marginal / cost[m]

    heap = [(-gain(m, r_min), m) for m in sorted(shapes) if r_min < r_max]
    heapq.heapify(heap)
    memory, limited = base, "r_max"
    while heap:
        _, m = heapq.heappop(heap)
        if memory + step[m] > budget_bytes:
            limited = "memory" if limited == "r_max" else limited
            continue
        if param_budget is not None and params + cost[m] > param_budget:
            limited = "parameters" if limited == "r_max" else limited
            continue
        ranks[m] += 1
        memory += step[m]
        params += cost[m]
        if ranks[m] < r_max:
            heapq.heappush(heap, (-gain(m, ranks[m]), m))
    return RankPlan(ranks, memory_of(ranks), budget_bytes, params, True, limited)
