"""Phase 2: per-module LoRA ranks that fit a client's memory, guided by importance (HSplitLoRA).

After HSplitLoRA (Lin et al., "HSplitLoRA: A Heterogeneous Split Parameter-Efficient Fine-Tuning
Framework for Large Language Models", arXiv:2505.02795): each client gets, per LoRA module, the
rank that maximises importance-weighted rank under its device's memory budget.

Importance (``ImportanceMeter``), one of two kinds, from the gradients of the common initial
adapter and head, so it costs no extra backward pass when Phase 1 runs (the same pass that yields
the fingerprint yields it, ``compute_fingerprint(importance=...)``):

- ``norm``: the mean over batches of ||dL/dB_m||_F^2 of each module's LoRA B factor. With B = 0,
  dL/dB = G A^T where G is the gradient of the frozen weight, so this is the energy of G seen
  through the shared random A: one number per module.
- ``spectrum``: the squared singular values s_1 >= s_2 >= ... of the mean gradient G_m of each
  module's frozen weight, the top ``r_max`` of them. By Eckart-Young, s_1 + ... + s_r is the
  share of the gradient's energy that a rank-r update of the module can follow, so it prices
  every extra rank by what it adds (after GaLore, Zhao et al., arXiv:2403.03507, and AdaLoRA's
  singular-value importance, Zhang et al., arXiv:2303.10512). Measured on MiniLM and GLUE
  (``bench/ranks.py --quick``), the value projections' gradients are close to rank one (s_1
  holds 40-98% of the top 16's energy) while the query projections' spread over more
  directions: ``norm`` prices every rank of a module alike, ``spectrum`` by what it adds.

Allocation (``allocate_ranks``): maximise sum_m u_m(r_m) with u_m(r) = I_m r (``linear``, the
importance-weighted rank), I_m log r (``log``, diminishing returns: the proportional allocation
r_m ~ I_m / cost_m) or s_{m,1} + ... + s_{m,r} (``spectrum``), subject to r_min <= r_m <= r_max,
the memory model's estimate <= the device budget, and optionally sum_m r_m (in_m + out_m) <= a
parameter budget. The memory estimate is linear in each rank and every u_m is concave, so the
greedy that repeatedly raises the rank with the best marginal utility per marginal parameter
(while both budgets hold) is the standard exact greedy of a separable concave knapsack, up to
one partial step.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from atlasfl.errors import AtlasError, check_choice
from atlasfl.types import ImportanceKind, RankUtility

KINDS: dict[str, ImportanceKind] = {"linear": "norm", "log": "norm", "spectrum": "spectrum"}
Importance = dict[str, float | list[float]]  # module path -> a number or a spectrum


@dataclass(frozen=True)
class RankPlan:
    """Result of ``allocate_ranks``."""

    ranks: dict[str, int]  # module path -> rank
    memory_bytes: int  # the memory model's estimate for these ranks
    budget_bytes: int
    params: int  # LoRA parameters sum_m r_m (in_m + out_m)
    feasible: bool  # False: even r_min everywhere exceeds the budget (ranks are then r_min)
    limited_by: str  # what stopped the growth: memory | parameters | r_max


class ImportanceMeter:
    """Turns per-batch gradients into each module's importance (see the module docstring).

    ``params`` maps a module path to the tensor to differentiate: its LoRA B factor for
    ``norm``, its frozen weight for ``spectrum`` (which must require grad during the pass).
    """

    def __init__(self, params: Mapping[str, Tensor], kind: ImportanceKind = "norm", top: int = 16):
        check_choice("importance kind", kind, ImportanceKind)
        self.params, self.kind, self.top = dict(params), kind, top
        self._sum: dict[str, float | Tensor] = dict.fromkeys(self.params, 0.0)
        self._batches = 0

    def add(self, grads: Mapping[str, Tensor]) -> None:
        """One batch's mean-loss gradient of every module's tensor."""
        for name in self.params:
            g = grads[name].detach().double()
            self._sum[name] = self._sum[name] + (g.pow(2).sum() if self.kind == "norm" else g)
        self._batches += 1

    def result(self) -> Importance:
        """Module path -> mean squared norm (``norm``) or top squared singular values."""
        if not self._batches:
            raise AtlasError("a client needs at least one example to compute module importance")
        out: Importance = {}
        for name, total in self._sum.items():
            mean = total / self._batches
            if self.kind == "norm":
                out[name] = float(mean)
                continue
            values = torch.linalg.svdvals(mean).pow(2)[: self.top].tolist()
            out[name] = values + [0.0] * (self.top - len(values))  # a narrow module: pad
        return out


def module_importance(loss_fn: Callable[[dict], Tensor], batches: list[dict],
                      meter: ImportanceMeter) -> Importance:
    """Each module's importance over ``batches``, one backward pass per batch."""
    names = list(meter.params)
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), [meter.params[n] for n in names])
        meter.add(dict(zip(names, grads, strict=True)))
    return meter.result()


def allocate_ranks(importance: Mapping[str, float | Sequence[float]],
                   shapes: Mapping[str, tuple[int, int]], *,
                   memory_of: Callable[[dict[str, int]], int], budget_bytes: int,
                   param_budget: int | None = None, r_min: int = 1, r_max: int = 16,
                   utility: RankUtility = "linear") -> RankPlan:
    """Per-module ranks maximising importance-weighted rank under the budgets.

    Args:
        importance: module path -> importance (>= 0); every module of ``shapes`` needs one: a
            number for ``linear``/``log``, the descending squared singular values of its
            gradient for ``spectrum`` (``ImportanceMeter``).
        shapes: module path -> (in_features, out_features).
        memory_of: ranks -> estimated training peak in bytes (the memory model); assumed
            non-decreasing and linear in each rank.
        budget_bytes: the device's memory budget.
        param_budget: at most this many LoRA parameters (None: no limit).
        r_min: smallest rank of any module.
        r_max: largest rank of any module.
        utility: ``linear``, ``log`` or ``spectrum``.
    """
    check_choice("ranks.utility", utility, RankUtility)
    missing = sorted(set(shapes) - set(importance))
    if missing:
        raise AtlasError(f"no importance for modules {missing[:3]}")
    spectral = utility == "spectrum"
    wrong = [m for m in shapes if isinstance(importance[m], (int, float)) == spectral]
    if wrong:
        raise AtlasError(f"ranks.utility = {utility!r} needs "
                         f"{'a list of squared singular values' if spectral else 'one number'} "
                         f"of importance per module; module {wrong[0]!r} has "
                         f"{type(importance[wrong[0]]).__name__}")
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
    if utility == "spectrum":  # the (r+1)-th squared singular value: what one more rank adds
        spectrum = {m: sorted((max(0.0, float(v)) for v in cast(Sequence[float], importance[m])),
                              reverse=True) for m in shapes}

        def gain(m: str, r: int) -> float:
            return (spectrum[m][r] if r < len(spectrum[m]) else 0.0) / cost[m]
    else:
        scalar = {m: max(0.0, float(cast(float, importance[m]))) for m in shapes}
        total_imp = sum(scalar.values()) or 1.0
        weight = {m: scalar[m] / total_imp for m in shapes}

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
