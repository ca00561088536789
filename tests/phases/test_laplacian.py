"""Phase 4: the client graph and MIRA's Laplacian step, checked by hand and by property."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from atlasfl.errors import AtlasError
from atlasfl.phases.aggregation import linear_combination, mix
from atlasfl.phases.laplacian import client_graph, laplacian_rows, laplacian_step


def _similarity(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit @ unit.T


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000), st.sampled_from(["rbf", "knn"]),
       st.floats(0.0, 2.0), st.integers(1, 4))
def test_laplacian_is_symmetric_psd_with_zero_row_sums(n, seed, kind, cross, k):
    rng = np.random.default_rng(seed)
    sim = _similarity(rng.normal(size=(n, 5)))
    labels = rng.integers(0, 3, size=n)
    graph = client_graph(sim, labels, kind=kind, k=k, cross_weight=cross)
    lap = graph.laplacian
    assert np.allclose(lap, lap.T)
    assert np.allclose(lap @ np.ones(n), 0.0)
    assert np.linalg.eigvalsh(lap).min() >= -1e-10
    assert (graph.adjacency >= 0).all() and np.allclose(np.diag(graph.adjacency), 0.0)
    if cross == 0:  # no edge across clusters
        assert (graph.adjacency[labels[:, None] != labels[None, :]] == 0).all()


def test_rbf_weights_by_hand():
    # cos 1/2 between 0 and 1, 0 between 0 and 2 and 1 and 2: d2 = 1, 2, 2; median 2
    sim = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    graph = client_graph(sim)
    assert graph.bandwidth == 2.0
    assert graph.adjacency[0, 1] == pytest.approx(math.exp(-1 / 4))
    assert graph.adjacency[0, 2] == pytest.approx(math.exp(-2 / 4))
    split = client_graph(sim, [0, 0, 1])
    assert split.adjacency[0, 2] == 0 and split.adjacency[0, 1] == pytest.approx(math.exp(-0.25))
    crossed = client_graph(sim, [0, 0, 1], cross_weight=0.1, k=1)
    assert crossed.adjacency[0, 2] == pytest.approx(0.1 * math.exp(-0.5))


def test_knn_keeps_the_k_most_similar_symmetrised():
    sim = np.array([[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.0],
                    [0.2, 0.3, 1.0, 0.8], [0.1, 0.0, 0.8, 1.0]])
    adj = client_graph(sim, kind="knn", k=1).adjacency
    expected = np.array([[0, 0.9, 0, 0], [0.9, 0, 0, 0], [0, 0, 0, 0.8], [0, 0, 0.8, 0]])
    assert np.allclose(adj, expected)


def _states(n, seed=0, rank=2):
    gen = torch.Generator().manual_seed(seed)
    return [{"m.lora_A.weight": torch.randn(rank, 4, generator=gen),
             "m.lora_B.weight": torch.randn(3, rank, generator=gen),
             "out.weight": torch.randn(2, 3, generator=gen)} for _ in range(n)]


def test_lambda_zero_keeps_every_model_exactly():
    states = _states(3)
    adj = np.ones((3, 3)) - np.eye(3)
    for space in ("factors", "product"):
        out = laplacian_step(states, adj, eta=0.5, lam=0.0, space=space,
                             scaling=lambda r: 2.0 / r)
        for before, after in zip(states, out, strict=True):
            assert all(torch.equal(before[k], after[k]) for k in before)


def test_complete_graph_at_one_over_n_gives_everyone_the_mean():
    n = 4
    states = _states(n)
    adj = np.ones((n, n)) - np.eye(n)
    out = laplacian_step(states, adj, eta=0.5, lam=2.0 / n)  # eta lam = 1/N
    for key in states[0]:
        mean = sum(s[key] for s in states) / n
        for s in out:
            torch.testing.assert_close(s[key], mean, rtol=1e-6, atol=1e-7)


def test_the_step_by_hand_and_it_moves_differing_clients():
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}]
    adj = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=float)
    out = laplacian_step(states, adj, eta=0.1, lam=1.0)
    # w0 - 0.1 (w0 - w1); w1 - 0.1 ((w1 - w0) + 2 (w1 - w2)); w2 - 0.1 (2 (w2 - w1))
    assert [float(s["w"]) for s in out] == pytest.approx([0.1, 1.5, 3.4])


def test_product_space_passes_mixed_ranks_and_reaches_the_mean_product():
    scaling = lambda r: 2.0 / r  # noqa: E731
    states = [_states(1, seed=1, rank=2)[0], _states(1, seed=2, rank=3)[0]]
    adj = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = laplacian_step(states, adj, eta=0.25, lam=2.0, space="product", scaling=scaling)

    def product(s):
        a, b = s["m.lora_A.weight"].double(), s["m.lora_B.weight"].double()
        return scaling(a.shape[0]) * b @ a

    mean = (product(states[0]) + product(states[1])) / 2
    u, sv, vh = torch.linalg.svd(mean)
    for before, after in zip(states, out, strict=True):
        rank = before["m.lora_A.weight"].shape[0]
        assert after["m.lora_A.weight"].shape == before["m.lora_A.weight"].shape
        best = (u[:, :rank] * sv[:rank]) @ vh[:rank]  # Eckart-Young: best rank-r of the mean
        torch.testing.assert_close(product(after), best, rtol=1e-5, atol=1e-6)
    with pytest.raises(AtlasError, match="different shapes; use laplacian.space=product"):
        laplacian_step(states, adj, eta=0.25, lam=2.0)


def test_the_step_is_mixing_by_the_rows_of_i_minus_eta_lam_l():
    a = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 2.0, 0.0]])  # a path 0 - 1 - 2
    rows = laplacian_rows(a, eta=0.5, lam=0.2)  # eta lam = 0.1; degrees 1, 3, 2
    assert rows == {0: pytest.approx({0: 0.9, 1: 0.1}), 1: pytest.approx({0: 0.1, 1: 0.7, 2: 0.2}),
                    2: pytest.approx({1: 0.2, 2: 0.8})}  # no entry for a non-neighbour
    assert laplacian_rows(a, eta=1.0, lam=1.0, rows=[1]) == {1: {0: 1.0, 1: -2.0, 2: 2.0}}
    states = [{"w": torch.tensor([v])} for v in (1.0, 2.0, 4.0)]
    stepped = laplacian_step(states, a, eta=0.5, lam=0.2, rows=[1])
    assert stepped[1]["w"].item() == pytest.approx(0.1 * 1 + 0.7 * 2 + 0.2 * 4)  # 2.3
    assert [s["w"].item() for s in (stepped[0], stepped[2])] == [1.0, 4.0]  # not in rows
    mixed = mix(laplacian_rows(a, eta=0.5, lam=0.2), dict(enumerate(states)),
                lambda k, sts, ws: linear_combination(sts, ws))
    assert [mixed[k]["w"].item() for k in range(3)] == pytest.approx(
        [s["w"].item() for s in laplacian_step(states, a, eta=0.5, lam=0.2)])


def test_bad_inputs_name_what_is_allowed():
    with pytest.raises(AtlasError, match="^laplacian.graph = 'full' is invalid"):
        client_graph(np.eye(2), kind="full")  # type: ignore[arg-type]
    with pytest.raises(AtlasError, match="must both be >= 0"):
        laplacian_step(_states(2), np.zeros((2, 2)), eta=-1.0, lam=1.0)
    with pytest.raises(AtlasError, match=r"^similarity must be a symmetric square matrix, got "
                                         r"shape \(2, 2\)$"):
        client_graph(np.array([[1.0, 0.9], [0.4, 1.0]]))
    with pytest.raises(AtlasError, match=r"^laplacian.k = 0 is invalid; allowed: an integer >= 1$"):
        client_graph(np.eye(2), k=0)
    with pytest.raises(AtlasError, match=r"^laplacian.cross_weight = -1.0 is invalid; allowed: "
                                         r">= 0$"):
        client_graph(np.eye(2), cross_weight=-1.0)
    with pytest.raises(AtlasError, match="^laplacian.space = 'full' is invalid"):
        laplacian_step(_states(2), np.zeros((2, 2)), eta=1.0, lam=1.0,
                       space="full")  # type: ignore[arg-type]
    with pytest.raises(AtlasError, match=r"^adjacency of shape \(3, 3\) for 2 client models$"):
        laplacian_step(_states(2), np.zeros((3, 3)), eta=1.0, lam=1.0)
    with pytest.raises(AtlasError, match=r"^rows \[2\] outside the 2 client models$"):
        laplacian_step(_states(2), np.zeros((2, 2)), eta=1.0, lam=1.0, rows=[2])
    with pytest.raises(AtlasError, match="^laplacian.space=product needs the LoRA scaling of a "
                                         "rank$"):
        laplacian_step(_states(2), np.ones((2, 2)), eta=0.1, lam=1.0, space="product")
    stay = laplacian_step(_states(2), np.ones((2, 2)) - np.eye(2), eta=0.0, lam=1.0)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(stay, _states(2), strict=True)
               for k in a)  # eta 0 is a step of size 0, not an error


def test_a_single_client_keeps_its_model():
    state = _states(1)
    out = laplacian_step(state, np.zeros((1, 1)), eta=0.5, lam=1.0)
    assert all(torch.equal(out[0][k], state[0][k]) for k in state[0])
    out = laplacian_step(state, np.zeros((1, 1)), eta=0.5, lam=1.0, space="product",
                         scaling=lambda r: 1.0)
    torch.testing.assert_close(out[0]["m.lora_B.weight"] @ out[0]["m.lora_A.weight"],
                               state[0]["m.lora_B.weight"] @ state[0]["m.lora_A.weight"])


def test_rbf_bandwidth_by_hand_for_two_clients_one_client_and_identical_ones():
    two = client_graph(np.array([[1.0, 0.8], [0.8, 1.0]]))  # d2 = 0.4: the median of one
    assert two.bandwidth == pytest.approx(0.4)
    assert two.adjacency[0, 1] == pytest.approx(math.exp(-0.4 / 0.8))
    one = client_graph(np.array([[1.0]]))
    assert one.bandwidth == 1.0 and one.adjacency.tolist() == [[0.0]]
    same = client_graph(np.ones((3, 3)))  # d2 = 0 everywhere: no scale, weights 1
    assert same.bandwidth == 1.0 and np.allclose(same.adjacency, np.ones((3, 3)) - np.eye(3))
    rounding = client_graph(np.array([[1.0, 1.0 + 1e-12], [1.0 + 1e-12, 1.0]]))
    assert rounding.adjacency[0, 1] == 1.0  # a cosine above 1 by rounding is distance 0
    assert client_graph(np.eye(3), kind="knn").bandwidth == 0.0
    single = client_graph(np.eye(2, dtype=np.float32) * 0.5 + 0.5)
    assert single.adjacency.dtype == np.float64


def test_knn_keeps_three_neighbours_by_default_and_ties_in_index_order():
    n = 20
    sim = np.full((n, n), 0.5) + 0.5 * np.eye(n)  # every pair equally similar: all ties
    kept = client_graph(sim, kind="knn").adjacency > 0
    # each client keeps its three lowest-indexed equals (k = 3, stable order); the last one is
    # chosen by nobody, so its row is its own choice
    assert kept[n - 1].tolist() == [True, True, True] + [False] * (n - 3)
    assert kept[10].tolist() == [True, True, True] + [False] * (n - 3)


def test_edges_across_clusters_join_each_client_to_its_k_nearest_others_only():
    sim = np.array([[1.0, 0.9, 0.6, 0.2], [0.9, 1.0, 0.3, 0.1],
                    [0.6, 0.3, 1.0, 0.9], [0.2, 0.1, 0.9, 1.0]])
    labels = [0, 0, 1, 1]
    inside = client_graph(sim, labels).adjacency
    crossed = client_graph(sim, labels, k=1, cross_weight=0.5).adjacency
    # rbf: d2 = 2 - 2 s, sigma^2 the median off-diagonal d2, (0.8 + 1.4) / 2 = 1.1; each
    # client's one nearest client of the other cluster: 0 -> 2, 1 -> 2, 2 -> 0, 3 -> 0
    want = np.zeros((4, 4))
    for i, j in ((0, 2), (1, 2), (0, 3)):
        want[i, j] = want[j, i] = 0.5 * math.exp(-(2 - 2 * sim[i, j]) / 2.2)
    assert np.allclose(crossed - inside, want)


def test_the_product_step_keeps_each_clients_coordinates():
    scaling = lambda r: 2.0 / r  # noqa: E731
    states = [_states(1, seed=1, rank=2)[0], _states(1, seed=2, rank=3)[0]]
    out = laplacian_step(states, np.array([[0.0, 1.0], [1.0, 0.0]]), eta=0.1, lam=0.1,
                         space="product", scaling=scaling)
    for before, after in zip(states, out, strict=True):  # A keeps its norm (the reference's)
        assert float(after["m.lora_A.weight"].norm()) == pytest.approx(
            float(before["m.lora_A.weight"].norm()), rel=1e-5)


def test_linear_combination_by_hand():
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -1.0])}
    assert linear_combination([a, b], [2.0, -0.5])["w"].tolist() == [0.5, 4.5]
    assert linear_combination([a], [3.0])["w"].tolist() == [3.0, 6.0]
    assert linear_combination([a, b], [1.0, 1.0], keys=[])=={}
    with pytest.raises(ValueError, match=r"^need one weight per state, got 1 states, 2$"):
        linear_combination([a], [1.0, 2.0])
