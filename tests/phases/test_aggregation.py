"""Aggregation math: FedAvg's weighted mean and the three mixed-rank LoRA aggregations."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from atlasfl.phases.aggregation import (
    aggregate_mixed,
    dense_svd,
    redistribute,
    stack,
    svd_of_product,
    unheld,
    weighted_average,
    zero_pad,
)


def _clients(ranks, d_in=7, d_out=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, d_in, generator=gen, dtype=torch.float64),
             torch.randn(d_out, r, generator=gen, dtype=torch.float64)) for r in ranks]


def _target(factors, weights, scalings):
    total = sum(weights)
    return sum(w / total * s * (b @ a) for (a, b), w, s in zip(factors, weights, scalings,
                                                                 strict=True))


def test_weighted_average_by_hand():
    states = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}]
    out = weighted_average(states, [1, 3])
    assert torch.allclose(out["x"], torch.tensor([2.5, 5.0]))


@settings(max_examples=25, deadline=None)
@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=5),
       weights=st.lists(st.floats(0.1, 10.0), min_size=5, max_size=5),
       seed=st.integers(0, 1000))
def test_stack_reproduces_the_weighted_sum_of_products(ranks, weights, seed):
    factors = _clients(ranks, seed=seed)
    weights = weights[: len(ranks)]
    scalings = [16 / math.sqrt(r) for r in ranks]  # rsLoRA, rank-dependent
    a, b = stack(factors, weights, scalings)
    assert a.shape[0] == sum(ranks)
    assert torch.allclose(b @ a, _target(factors, weights, scalings), atol=1e-5)


def test_svd_of_product_matches_the_dense_svd():
    factors = _clients([3, 2, 4])
    weights, scalings = [1.0, 2.0, 3.0], [2.0, 1.0, 0.5]
    u, s, vh = svd_of_product(*stack(factors, weights, scalings))
    _, s_dense, _ = dense_svd(factors, weights, scalings)
    assert torch.allclose(u @ torch.diag(s) @ vh, _target(factors, weights, scalings), atol=1e-10)
    assert torch.allclose(s[: len(s_dense)], s_dense, atol=1e-10)


@pytest.mark.parametrize("method", ["stack", "svd"])
@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_redistribution_is_the_best_rank_r_approximation(rank, method):
    """Eckart-Young: the error of the rank-r cut is the energy of the dropped singular values."""
    factors = _clients([3, 4])
    states = [{"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()} for a, b in factors]
    scaling = lambda r: 16 / math.sqrt(r)  # noqa: E731
    target = _target(factors, [1.0, 1.0], [scaling(3), scaling(4)])
    s = torch.linalg.svdvals(target)
    agg = aggregate_mixed(states, [1, 1], method=method, scaling=scaling, keep=5)
    out = redistribute(agg, {"m": rank}, method=method, scaling=scaling)
    a, b = out["m.lora_A.weight"].double(), out["m.lora_B.weight"].double()
    assert a.shape == (rank, 7) and b.shape == (5, rank)
    error = torch.linalg.matrix_norm(target - scaling(rank) * b @ a) ** 2
    assert float(error) == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-4, abs=1e-4)
    # no rank-r matrix does better: perturbed rank-r competitors are all worse
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        other = (scaling(rank) * b + 0.1 * torch.randn(5, rank, generator=gen,
                                                       dtype=torch.float64)) @ a
        assert torch.linalg.matrix_norm(target - other) ** 2 >= error - 1e-6


def test_zero_pad_adds_the_cross_terms_by_hand():
    """Two rank-1 clients: mean(B) mean(A) = (B1A1 + B2A2)/4 + (B1A2 + B2A1)/4, not the mean."""
    a1, b1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    a, b = zero_pad([(a1, b1), (a2, b2)], [1, 1])
    exact = (b1 @ a1 + b2 @ a2) / 2  # [[.5, 0], [0, .5]]
    naive = (b @ a).float()  # [[.25, .25], [.25, .25]]
    assert torch.allclose(naive, torch.full((2, 2), 0.25))
    assert torch.linalg.matrix_norm(naive - exact) == pytest.approx(0.5)
    sa, sb = stack([(a1, b1), (a2, b2)], [1, 1], [1.0, 1.0])
    assert torch.allclose((sb @ sa).float(), exact)


def test_zero_pad_pads_lower_ranks():
    factors = _clients([1, 3])
    a, b = zero_pad(factors, [1, 1])
    assert a.shape == (3, 7) and b.shape == (5, 3)
    assert torch.allclose(a[1:], factors[1][0][1:] / 2)


@given(seed=st.integers(0, 100), rank=st.integers(1, 4))
@settings(max_examples=10, deadline=None)
def test_identical_updates_come_back_unchanged(seed, rank):
    """Aggregating N copies of one adapter returns it (up to the SVD's basis) for every method."""
    (a, b), = _clients([rank], seed=seed)
    state = {"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()}
    for method in ("zero-pad", "stack", "svd"):
        agg = aggregate_mixed([state] * 3, [1, 2, 3], method=method, scaling=lambda r: 2.0,
                              keep=rank)
        back = redistribute(agg, {"m": rank}, method=method, scaling=lambda r: 2.0)
        product = back["m.lora_B.weight"] @ back["m.lora_A.weight"]
        assert torch.allclose(product, b.float() @ a.float(), atol=1e-4)


def test_stack_and_svd_give_each_client_the_same_product():
    states = [{"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()}
              for a, b in _clients([2, 4, 8], d_in=16, d_out=12)]
    scaling = lambda r: 8 / math.sqrt(r)  # noqa: E731
    outs = {m: aggregate_mixed(states, [3, 1, 2], method=m, scaling=scaling, keep=8)
            for m in ("stack", "svd")}
    for rank in (2, 4, 8):
        prods = [scaling(rank) * (lambda s: s["m.lora_B.weight"] @ s["m.lora_A.weight"])(
            redistribute(outs[m], {"m": rank}, method=m, scaling=scaling)) for m in outs]
        assert torch.allclose(prods[0], prods[1], atol=1e-4)


def test_redistribution_keeps_the_product_and_follows_the_reference_coordinates():
    factors = _clients([4, 4], d_in=16, d_out=12)
    states = [{"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()} for a, b in factors]
    scaling = lambda r: 8 / math.sqrt(r)  # noqa: E731
    agg = aggregate_mixed(states, [1, 1], method="stack", scaling=scaling, keep=4)
    plain = redistribute(agg, {"m": 4}, method="stack", scaling=scaling)
    aligned = redistribute(agg, {"m": 4}, method="stack", scaling=scaling, reference=states[0])

    def product(s):
        return s["m.lora_B.weight"] @ s["m.lora_A.weight"]

    torch.testing.assert_close(product(aligned), product(plain), rtol=1e-4, atol=1e-5)
    ref = states[0]["m.lora_A.weight"]
    assert aligned["m.lora_A.weight"].norm() == pytest.approx(float(ref.norm()), rel=1e-5)
    # closer to the client's own A than the default coordinates, scaled alike
    scaled = plain["m.lora_A.weight"] * (ref.norm() / plain["m.lora_A.weight"].norm())
    assert (aligned["m.lora_A.weight"] - ref).norm() < (scaled - ref).norm()


def test_unheld_weights_by_hand():
    # ranks 1, 3, 2 with weights 1, 2, 1: component 0 is held by all, 1 by the 2nd and 3rd, 2 by
    # the 2nd only, 3 by none
    c = unheld([1, 3, 2], [1, 2, 1], 4)
    assert torch.allclose(c, torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64))


def _cut(aggregate, rank, method, scaling):
    out = redistribute(aggregate, {"m": rank}, method=method, scaling=scaling)
    return out["m.lora_A.weight"].double(), out["m.lora_B.weight"].double()


@pytest.mark.parametrize("method", ["stack", "svd"])
def test_delta_update_is_the_previous_aggregate_plus_the_weighted_change(method):
    """M' = M + sum_i p_i (s_i B_i' A_i' - M cut to r_i), exactly; averaging loses the cut."""
    scaling = lambda r: 8 / math.sqrt(r)  # noqa: E731
    start = [{"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()}
             for a, b in _clients([6, 6], d_in=16, d_out=12, seed=3)]
    previous = aggregate_mixed(start, [1, 1], method=method, scaling=scaling, keep=None)
    m = previous["m.lora_B.weight"].double() @ previous["m.lora_A.weight"].double()
    ranks, weights = [1, 3, 6], [1.0, 2.0, 1.0]
    gen = torch.Generator().manual_seed(0)
    states, change = [], torch.zeros_like(m)
    for r, w in zip(ranks, weights, strict=True):
        a, b = _cut(previous, r, method, scaling)  # what the client received
        a2 = a + 0.1 * torch.randn(a.shape, generator=gen, dtype=torch.float64)  # it trains
        b2 = b + 0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float64)
        states.append({"m.lora_A.weight": a2.float(), "m.lora_B.weight": b2.float()})
        change += w / sum(weights) * scaling(r) * (b2.float().double() @ a2.float().double()
                                                   - b @ a)
    new = aggregate_mixed(states, weights, method=method, scaling=scaling, keep=None,
                          previous=previous)
    got = new["m.lora_B.weight"].double() @ new["m.lora_A.weight"].double()
    torch.testing.assert_close(got, m + change, rtol=1e-4, atol=1e-5)
    # clients that upload exactly what they received leave the delta aggregate unchanged,
    # while averaging drops a share of what the rank-1 and rank-3 clients could not hold
    same = [dict(zip(("m.lora_A.weight", "m.lora_B.weight"),
                     (t.float() for t in _cut(previous, r, method, scaling)), strict=True))
            for r in ranks]
    kept = aggregate_mixed(same, weights, method=method, scaling=scaling, keep=None,
                           previous=previous)
    torch.testing.assert_close(kept["m.lora_B.weight"].double() @ kept["m.lora_A.weight"].double(),
                               m, rtol=1e-4, atol=1e-5)
    averaged = aggregate_mixed(same, weights, method=method, scaling=scaling, keep=None)
    lost = m - averaged["m.lora_B.weight"].double() @ averaged["m.lora_A.weight"].double()
    assert float(torch.linalg.matrix_norm(lost)) > 0.1 * float(torch.linalg.matrix_norm(m))


def test_zero_pad_delta_update_adds_the_padded_factor_changes():
    """A' = A + sum_i p_i pad(A_i' - A[:r_i]) (and B alike): rows a client lacks keep A's."""
    (a0, b0), = _clients([4], seed=5)
    previous = {"m.lora_A.weight": a0.float(), "m.lora_B.weight": b0.float()}
    ranks, weights = [1, 4], [3.0, 1.0]
    states, want_a, want_b = [], a0.clone(), b0.clone()
    for i, (r, w) in enumerate(zip(ranks, weights, strict=True)):
        a, b = a0[:r] + i + 1.0, b0[:, :r] - i - 1.0
        states.append({"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()})
        want_a[:r] += w / 4 * (a - a0[:r])
        want_b[:, :r] += w / 4 * (b - b0[:, :r])
    new = aggregate_mixed(states, weights, method="zero-pad", scaling=lambda r: 1.0, keep=None,
                          previous=previous)
    torch.testing.assert_close(new["m.lora_A.weight"].double(), want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new["m.lora_B.weight"].double(), want_b, rtol=1e-5, atol=1e-5)
