"""Aggregation of client states: mixing by rows of weights, FedAvg, and mixed-rank LoRA factors.

**Every aggregation is mixing** (``mix``): target t receives ``combine([u_i for i in row t],
[w_ti])``. FedAvg within groups is one row per group of the members' example counts, combined by
``weighted_average`` (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629: the example-weighted mean of every tensor, for clients
that hold tensors of equal shapes); mixed-rank aggregation changes the combiner
(``aggregate_mixed``), not the rows; Phase 4's Laplacian step is one row per client, row k of
``I - eta lam L`` (``atlasfl.phases.laplacian``), combined as it is (``linear_combination``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import torch

from atlasfl.errors import AtlasError, check_choice
from atlasfl.types import AdapterState, ClientId, MixedMethod

K = TypeVar("K")
Rows = dict[K, dict[ClientId, float]]  # target -> client -> weight (in the order to sum)
Combine = Callable[[K, list[AdapterState], list[float]], AdapterState]


def mix(rows: Rows[K], tensors: Mapping[ClientId, AdapterState],
        combine: Combine[K] | None = None) -> dict[K, AdapterState]:
    """Each target's mixture of the clients' tensors (default: FedAvg's weighted mean).

    ``combine(target, states, weights)`` aggregates one row; states and weights follow the row's
    order (the order updates arrived in), which fixes the floating-point sum.
    """
    out: dict[K, AdapterState] = {}
    for target, row in rows.items():
        states, weights = [tensors[c] for c in row], list(row.values())
        out[target] = (combine(target, states, weights) if combine
                       else weighted_average(states, weights))
    return out


def linear_combination(states: Sequence[AdapterState], weights: Sequence[float],
                       keys: Sequence[str] | None = None) -> AdapterState:
    """``sum_i w_i state_i`` of every tensor (or of ``keys``), in float64, as the weights stand.

    No normalisation and any sign: a Laplacian row (weights summing to one, the own weight
    possibly negative). The caller casts the result.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states, {len(weights)}")
    w = torch.tensor(list(weights), dtype=torch.float64)
    return {key: torch.tensordot(w, torch.stack([s[key].double() for s in states]), dims=1)
            for key in (states[0] if keys is None else keys)}


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Return sum_i w_i * state_i / sum_i w_i for every tensor name.

    Args:
        states: client states with identical names and shapes.
        weights: non-negative weights (e.g. example counts), not all zero.

    Returns:
        A new state; inputs are not modified.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states, {len(weights)}")
    total = float(sum(weights))
    if total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise AtlasError(f"update {i} holds tensors {sorted(set(state) ^ set(keys))} that the "
                             f"first update does not (or the reverse); cannot average")
    out: AdapterState = {}
    for key in keys:
        ref = states[0][key]
        for state in states[1:]:
            if state[key].shape != ref.shape:
                raise AtlasError(f"tensor {key!r}: shapes {tuple(ref.shape)} and "
                                 f"{tuple(state[key].shape)} differ; use a mixed-rank aggregation")
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


# -- mixed-rank LoRA aggregation -------------------------------------------------------------
#
# A client i holds, per module, factors A_i (r_i, in) and B_i (out, r_i); its model adds
# s(r_i) * B_i @ A_i to the frozen weight, with s the LoRA scaling of its rank (alpha/r, or
# alpha/sqrt(r) with rsLoRA). Weights p_i = w_i / sum_j w_j.

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))
# Row norm of peft's Kaiming-uniform A (U(-1/sqrt(in), 1/sqrt(in)): E||row||^2 = 1/3, any in).
A_ROW_NORM = 3**-0.5


def _probabilities(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not weights or total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def zero_pad(factors: Sequence[Factors], weights: Sequence[float]) -> Factors:
    """HetLoRA's aggregation: zero-pad every client's factors to the largest rank and average.

    Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
    arXiv:2401.06432. The naive baseline: the product of the averages is not the average of the
    products, mean(B) @ mean(A) = sum_ij p_i p_j B_i A_j, whose cross terms (i != j) are noise.

    Returns:
        (A (r_max, in), B (out, r_max)); a client of rank r takes the first r rows of A and
        columns of B.
    """
    probs = _probabilities(weights)
    r_max = max(a.shape[0] for a, _ in factors)
    a_out = torch.zeros(r_max, factors[0][0].shape[1], dtype=torch.float64)
    b_out = torch.zeros(factors[0][1].shape[0], r_max, dtype=torch.float64)
    for (a, b), p in zip(factors, probs, strict=True):
        r = a.shape[0]
        a_out[:r] += p * a.double()
        b_out[:, :r] += p * b.double()
    return a_out, b_out


def stack(factors: Sequence[Factors], weights: Sequence[float],
          scalings: Sequence[float], extra: Factors | None = None) -> Factors:
    """FLoRA's noise-free stacking: factors whose product is exactly sum_i p_i s_i B_i A_i.

    Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
    Adaptations", arXiv:2409.05976. A = [A_1; ...; A_N] (sum r_i, in) and
    B = [p_1 s_1 B_1, ..., p_N s_N B_N] (out, sum r_i): B @ A has no cross terms. ``extra``
    (A_x, B_x) is stacked as it is, adding B_x @ A_x (the delta update's ``unheld`` part).
    """
    probs = _probabilities(weights)
    a_parts = [a.double() for a, _ in factors]
    b_parts = [p * s * b.double() for (_, b), p, s in zip(factors, probs, scalings, strict=True)]
    if extra is not None:
        a_parts.append(extra[0].double())
        b_parts.append(extra[1].double())
    return torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)


def svd_of_product(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Thin SVD of B @ A without forming the (out, in) matrix: QR of both factors first.

    B = Q_b R_b and A^T = Q_a R_a give B @ A = Q_b (R_b R_a^T) Q_a^T; the SVD of the small
    (R, R) core then rotates the orthonormal bases. Returns U (out, R), S (R,), Vh (R, in).
    """
    q_b, r_b = torch.linalg.qr(b.double())  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ u, s, vh @ q_a.T


def dense_svd(factors: Sequence[Factors], weights: Sequence[float],
              scalings: Sequence[float], extra: Factors | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexLoRA: SVD of the dense weighted sum of full updates sum_i p_i s_i B_i A_i.

    Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
    Client Resources", arXiv:2402.11505. Materialises the (out, in) matrix (plus B_x @ A_x of
    ``extra``); returns the thin SVD truncated to the rank the sum can have.
    """
    probs = _probabilities(weights)
    delta = sum(p * s * (b.double() @ a.double())
                for (a, b), p, s in zip(factors, probs, scalings, strict=True))
    rank = sum(a.shape[0] for a, _ in factors)
    if extra is not None:
        delta = delta + extra[1].double() @ extra[0].double()
        rank += extra[0].shape[0]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(len(s), rank)
    return u[:, :keep], s[:keep], vh[:keep]


def unheld(ranks: Sequence[int], weights: Sequence[float], components: int) -> torch.Tensor:
    """Per component k of the previous aggregate, the weight of the clients that could not hold it.

    c_k = sum_i p_i [k >= r_i]. Every client received the first r_i components of the previous
    aggregate M (the largest singular components, or zero-pad's first rows); the delta update
    M' = M + sum_i p_i (P_i' - M_{:r_i}) = sum_i p_i P_i' + sum_k c_k M_k then keeps what the
    clients' ranks cut off on the server, instead of losing a share c_k of it every round.
    """
    probs = _probabilities(weights)
    c = torch.zeros(components, dtype=torch.float64)
    for r, p in zip(ranks, probs, strict=True):
        c[r:] += p
    return c


def _modules(state: AdapterState) -> list[str]:
    return [k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight")]


def aggregate_mixed(states: Sequence[AdapterState], weights: Sequence[float], *,
                    method: MixedMethod, scaling: Callable[[int], float], keep: int | None,
                    previous: AdapterState | None = None) -> AdapterState:
    """Aggregate clients' LoRA adapters of any per-module ranks, module by module.

    Args:
        states: adapter states (``<module>.lora_A.weight`` (r, in), ``<module>.lora_B.weight``
            (out, r)); ranks may differ between clients and modules.
        weights: aggregation weights (example counts).
        method: ``zero-pad`` (HetLoRA), ``stack`` (FLoRA stacking, exact product, then SVD via QR)
            or ``svd`` (FlexLoRA, dense sum then SVD).
        scaling: the LoRA scaling of a rank (what a client's model multiplies B @ A by).
        keep: components to keep per module (the largest rank any client may take); ``None``
            keeps every component the sum has.
        previous: the group's previous aggregate, which every client received cut to its ranks
            (``redistribute``). Given, the update is the delta form: the previous aggregate plus
            the weighted change of the clients (FedOpt's pseudo-gradient, Reddi et al.,
            arXiv:2003.00295), so what a client's rank could not hold stays on the server
            (``unheld``). Without it the aggregate is the weighted mean of what the clients hold,
            as the three papers do.

    Returns:
        Per module the aggregate as factors. ``zero-pad``: the padded averages of the raw factors.
        ``stack``/``svd``: A = Vh (orthonormal rows), B = U S of the aggregated update (scaling
        included), singular values in decreasing order; ``redistribute`` cuts them.
    """
    check_choice("ranks.aggregation", method, MixedMethod)
    out: AdapterState = {}
    for module in _modules(states[0]):
        factors = [(s[f"{module}.lora_A.weight"], s[f"{module}.lora_B.weight"]) for s in states]
        ranks = [a.shape[0] for a, _ in factors]
        extra = None
        if previous is not None:
            a_prev = previous[f"{module}.lora_A.weight"].double()
            b_prev = previous[f"{module}.lora_B.weight"].double()
            c = unheld(ranks, weights, a_prev.shape[0])
            extra = (a_prev, b_prev * c)
        if method == "zero-pad":
            a, b = zero_pad(factors, weights)
            if extra is not None:  # add c_k times row k of A and column k of B
                a, b = _pad_rows(a, len(c)), _pad_rows(b.T, len(c)).T
                a[: len(c)] += c[:, None] * extra[0]
                b[:, : len(c)] += extra[1]
        else:
            scales = [scaling(r) for r in ranks]
            if method == "stack":
                u, sv, vh = svd_of_product(*stack(factors, weights, scales, extra))
            else:
                u, sv, vh = dense_svd(factors, weights, scales, extra)
            k = len(sv) if keep is None else min(keep, len(sv))
            a, b = vh[:k], u[:, :k] * sv[:k]  # orthonormal rows; B @ A = the update
        out[f"{module}.lora_A.weight"] = a.float()
        out[f"{module}.lora_B.weight"] = b.float()
    return out


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def redistribute(aggregate: AdapterState, ranks: dict[str, int], *, method: MixedMethod,
                 scaling: Callable[[int], float], reference: AdapterState | None = None
                 ) -> AdapterState:
    """A client's adapter from a group aggregate, at the client's rank of each module.

    ``zero-pad`` (HetLoRA) keeps the first r rows of A and columns of B. ``stack``/``svd`` keep
    the r largest singular components (the best rank-r approximation, Eckart-Young), divided by
    the client's scaling so its model adds exactly that approximation.

    How that product is split between the factors is free (B A = (B R^T)(R A) for any
    orthogonal R), and it matters for training: each factor's gradient is proportional to the
    other, and the client's AdamW moments refer to its current coordinates. Without a
    ``reference``, A gets orthonormal rows at the row norm of LoRA's initialisation
    (``A_ROW_NORM``) and B the singular values — a balanced split (sqrt(S) on both) would shrink
    both factors to the size of a young update and stall training. With ``reference`` (the
    client's own adapter before the write), A keeps the reference's norm and is rotated to be as
    close as possible to the reference's A (orthogonal Procrustes: R from the SVD of
    A_ref V^T), so a client continues in the coordinates its optimizer state belongs to.
    """
    out: AdapterState = {}
    for module, rank in ranks.items():
        a, b = aggregate[f"{module}.lora_A.weight"], aggregate[f"{module}.lora_B.weight"]
        a_r = torch.zeros(rank, a.shape[1])  # (r, in)
        b_r = torch.zeros(b.shape[0], rank)  # (out, r)
        k = min(rank, a.shape[0])
        if method == "zero-pad":
            a_r[:k], b_r[:, :k] = a[:k], b[:, :k]
        else:
            v, bs = a[:k].double(), b[:, :k].double()  # (k, in) orthonormal rows, (out, k)
            ref = None if reference is None else reference.get(f"{module}.lora_A.weight")
            if ref is not None and ref.shape[0] == k and float(ref.norm()) > 0:
                ref = ref.double()
                p, _, qh = torch.linalg.svd(ref @ v.T)  # (k, k)
                rot = p @ qh  # orthogonal, argmin_R ||R V - A_ref / c||
                c = float(ref.norm()) / k**0.5
            else:
                rot, c = torch.eye(k, dtype=torch.float64), A_ROW_NORM
            a_r[:k] = (c * rot @ v).float()
            b_r[:, :k] = (bs @ rot.T / (c * scaling(rank))).float()
        out[f"{module}.lora_A.weight"] = a_r
        out[f"{module}.lora_B.weight"] = b_r
    return out
