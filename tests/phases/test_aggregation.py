"""Aggregation math: FedAvg's weighted mean and the three mixed-rank LoRA aggregations."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from atlasfl.errors import AtlasError
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


# -- edge cases and input checks, each value worked out by hand ---------------------------------


def test_weighted_average_of_one_state_is_that_state():
    state = {"x": torch.tensor([1.5, -2.0]), "y": torch.tensor([[4.0]])}
    out = weighted_average([state], [3.0])
    assert torch.equal(out["x"], state["x"]) and torch.equal(out["y"], state["y"])


def test_weighted_average_accepts_zero_and_fractional_weights():
    # p = (0, 0.25, 0.75): the zero-weight state is ignored, weights need not reach 1
    states = [{"x": torch.tensor([100.0])}, {"x": torch.tensor([4.0])}, {"x": torch.tensor([8.0])}]
    out = weighted_average(states, [0.0, 0.125, 0.375])
    assert out["x"].item() == pytest.approx(0.25 * 4 + 0.75 * 8)  # 7


def test_weighted_average_accumulates_in_float64_and_rounds_once():
    # bf16 holds multiples of 2^-7 in [1, 2): (1 + 3 + 1) / 3 = 1.6667 rounds to 213/128; adding
    # the three thirds in bf16 (or rounding each product to bf16) would give 214/128 = 1.671875
    states = [{"x": torch.tensor([v], dtype=torch.bfloat16)} for v in (1.0, 3.0, 1.0)]
    out = weighted_average(states, [1, 1, 1])
    assert out["x"].dtype == torch.bfloat16
    assert out["x"].item() == 213 / 128


@pytest.mark.parametrize("weights", [[0.0, 0.0], [2.0, -1.0]])
def test_weighted_average_refuses_weights_without_a_positive_sum_or_with_a_negative(weights):
    states = [{"x": torch.ones(2)}, {"x": torch.ones(2)}]
    with pytest.raises(ValueError, match=r"non-negative with a positive sum, got \[.*\]"):
        weighted_average(states, weights)


def test_weighted_average_refuses_a_weight_count_that_differs():
    with pytest.raises(ValueError, match="need one weight per state, got 2 states, 1"):
        weighted_average([{"x": torch.ones(1)}, {"x": torch.ones(1)}], [1.0])


def test_weighted_average_names_the_update_with_other_tensors():
    x, xy = {"x": torch.ones(1)}, {"x": torch.ones(1), "y": torch.ones(1)}
    with pytest.raises(AtlasError, match=r"^update 1 holds tensors \['y'\] that the first"):
        weighted_average([x, xy], [1, 1])
    with pytest.raises(AtlasError, match=r"^update 2 holds tensors \['y'\] that the first"):
        weighted_average([x, x, xy], [1, 1, 1])


def test_weighted_average_names_the_tensor_whose_shapes_differ():
    with pytest.raises(AtlasError, match=r"tensor 'x': shapes \(2,\) and \(3,\) differ"):
        weighted_average([{"x": torch.ones(2)}, {"x": torch.ones(3)}], [1, 1])


def test_mixed_aggregations_refuse_weights_without_a_positive_sum():
    (a, b), = _clients([1])
    for weights in ([0.0], [-1.0]):
        with pytest.raises(ValueError, match=r"positive sum, got \[-?[01]\.0\]$"):
            zero_pad([(a, b)], weights)


def test_zero_pad_ignores_a_zero_weight_client_and_keeps_one_client_as_it_is():
    (a1, b1), (a2, b2) = _clients([2, 2])
    a, b = zero_pad([(a1, b1), (a2, b2)], [0.0, 5.0])
    assert torch.equal(a, a2) and torch.equal(b, b2)
    a, b = zero_pad([(a1, b1)], [1.0])
    assert torch.equal(a, a1) and torch.equal(b, b1)


def test_factor_lists_and_weight_lists_must_have_the_same_length():
    factors = _clients([1, 2])
    with pytest.raises(ValueError, match="zip"):
        zero_pad(factors, [1.0])
    with pytest.raises(ValueError, match="zip"):
        stack(factors, [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="zip"):
        dense_svd(factors, [1.0, 1.0], [1.0])
    with pytest.raises(ValueError, match="zip"):
        unheld([1, 2, 3], [1.0, 1.0], 4)


def test_dense_svd_keeps_as_many_components_as_the_sum_can_have():
    # one rank-1 client in a 4 x 4 layer: the product has rank 1, so one singular value, 2 * 3
    a, b = torch.tensor([[1.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0], [3.0], [0.0], [0.0]])
    u, s, vh = dense_svd([(a, b)], [1.0], [2.0])
    assert s.tolist() == pytest.approx([6.0])
    assert u.shape == (4, 1) and vh.shape == (1, 4)
    # an extra rank-1 term (e2 e3^T) adds one more component: 6 and 1
    extra = (torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0], [0.0], [0.0], [1.0]]))
    _, s, _ = dense_svd([(a, b)], [1.0], [2.0], extra)
    assert s.tolist() == pytest.approx([6.0, 1.0])


def test_aggregate_mixed_keeps_the_largest_components_only():
    # the sum is diag(3, 2, 1) on the first three coordinates: keep=1 leaves 3 e1 e1^T
    factors = [(torch.eye(3)[[i]], (3.0 - i) * torch.eye(3)[:, [i]]) for i in range(3)]
    states = [{"m.lora_A.weight": a, "m.lora_B.weight": b} for a, b in factors]
    for method in ("stack", "svd"):
        out = aggregate_mixed(states, [1, 1, 1], method=method, scaling=lambda r: 3.0, keep=1)
        a, b = out["m.lora_A.weight"], out["m.lora_B.weight"]
        assert a.shape == (1, 3) and b.shape == (3, 1)
        expected = torch.zeros(3, 3)
        expected[0, 0] = 3.0  # p * s = 1/3 * 3 = 1 times B_1 A_1 = 3 e1 e1^T
        torch.testing.assert_close(b @ a, expected, rtol=0, atol=1e-6)


def test_aggregate_mixed_of_one_client_is_its_product():
    (a, b), = _clients([2])
    state = {"m.lora_A.weight": a.float(), "m.lora_B.weight": b.float()}
    out = aggregate_mixed([state], [2.0], method="svd", scaling=lambda r: 0.5, keep=None)
    torch.testing.assert_close(out["m.lora_B.weight"] @ out["m.lora_A.weight"],
                               0.5 * (b @ a).float(), rtol=1e-5, atol=1e-5)


def test_aggregate_mixed_names_the_setting_of_an_unknown_method():
    state = {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}
    with pytest.raises(AtlasError, match=r"^ranks\.aggregation = 'mean' is invalid; allowed: "
                                         r"zero-pad, stack, svd$"):
        aggregate_mixed([state], [1.0], method="mean", scaling=lambda r: 1.0, keep=None)


def test_zero_pad_delta_update_pads_an_aggregate_larger_than_every_client():
    # previous aggregate of rank 3; both clients hold rank 1 (unheld c = (0, 1, 1)), in = 5
    a0 = torch.arange(15, dtype=torch.float64).reshape(3, 5)
    b0 = torch.arange(6, dtype=torch.float64).reshape(2, 3) + 1.0
    previous = {"m.lora_A.weight": a0.float(), "m.lora_B.weight": b0.float()}
    states = [{"m.lora_A.weight": (a0[:1] + d).float(), "m.lora_B.weight": (b0[:, :1] - d).float()}
              for d in (1.0, 3.0)]
    new = aggregate_mixed(states, [1.0, 1.0], method="zero-pad", scaling=lambda r: 1.0,
                          keep=None, previous=previous)
    want_a, want_b = a0.clone(), b0.clone()
    want_a[0] += 2.0  # mean change of row 0: (1 + 3) / 2; rows 1-2 stay the aggregate's
    want_b[:, 0] -= 2.0
    torch.testing.assert_close(new["m.lora_A.weight"].double(), want_a)
    torch.testing.assert_close(new["m.lora_B.weight"].double(), want_b)


def test_redistribute_zero_pad_leaves_ranks_beyond_the_aggregate_zero():
    agg = {"m.lora_A.weight": torch.tensor([[1.0, 2.0, 3.0, 4.0]]),
           "m.lora_B.weight": torch.tensor([[5.0], [6.0]])}
    out = redistribute(agg, {"m": 3}, method="zero-pad", scaling=lambda r: 1.0)
    assert out["m.lora_A.weight"].tolist() == [[1.0, 2.0, 3.0, 4.0], [0.0] * 4, [0.0] * 4]
    assert out["m.lora_B.weight"].tolist() == [[5.0, 0.0, 0.0], [6.0, 0.0, 0.0]]


def test_redistribute_follows_a_small_reference_and_ignores_an_all_zero_one():
    # aggregate 2 e1 e1^T (+ nothing): A = e1 (orthonormal), B = 2 e1
    agg = {"m.lora_A.weight": torch.tensor([[1.0, 0.0]]), "m.lora_B.weight": torch.tensor([[2.0],
                                                                                         [0.0]])}
    small = {"m.lora_A.weight": torch.tensor([[-0.5, 0.0]])}  # norm 0.5 < 1, pointing at -e1
    out = redistribute(agg, {"m": 1}, method="stack", scaling=lambda r: 1.0, reference=small)
    torch.testing.assert_close(out["m.lora_A.weight"], torch.tensor([[-0.5, 0.0]]))
    # B A is still 2 e1 e1^T
    torch.testing.assert_close(out["m.lora_B.weight"], torch.tensor([[-4.0], [0.0]]))
    zero = {"m.lora_A.weight": torch.zeros(1, 2)}
    out = redistribute(agg, {"m": 1}, method="stack", scaling=lambda r: 1.0, reference=zero)
    torch.testing.assert_close(out["m.lora_A.weight"], torch.tensor([[3**-0.5, 0.0]]))  # A_ROW_NORM
    torch.testing.assert_close(out["m.lora_B.weight"], torch.tensor([[2 * 3**0.5], [0.0]]))
