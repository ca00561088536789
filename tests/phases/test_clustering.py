import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.phases.clustering import (
    assign_to_nearest,
    cluster_fingerprints,
    eigengaps,
    similarity_graph,
)


def planted(num_clusters: int, per_cluster: int, dim: int = 64, noise: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_clusters, dim))
    x = np.concatenate([c + noise * np.linalg.norm(c) / np.sqrt(dim) * rng.normal(
        size=(per_cluster, dim)) for c in centers])
    return x, np.repeat(np.arange(num_clusters), per_cluster)


@pytest.mark.parametrize("k, per, method", [(2, 3, "kmeans"), (4, 3, "kmeans"), (6, 3, "kmeans"),
                                            (4, 3, "spectral"), (3, 5, "spectral")])
def test_recovers_planted_clusters_and_their_number(k, per, method):
    x, truth = planted(k, per, seed=k)
    result = cluster_fingerprints(x, method=method, seed=0, true_labels=truth)
    assert result.k == k
    assert result.quality["ari"] == pytest.approx(1.0)
    assert result.quality["purity"] == 1.0
    assert set(result.scores) == set(range(2, min(10, len(x) - 1) + 1))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_small_n_does_not_crash(n):
    x, _ = planted(2, 2, seed=1)
    result = cluster_fingerprints(x[:n])
    assert len(result.labels) == n and 1 <= result.k <= max(1, n - 1)
    assert result.centroids.shape == (result.k, x.shape[1])


def test_fixed_k_and_late_joiner_goes_to_its_cluster():
    x, truth = planted(3, 4, seed=2)
    result = cluster_fingerprints(x[:-1], k=3)
    joined = assign_to_nearest(x[-1], result.centroids)
    same = result.labels[np.flatnonzero(truth[:-1] == truth[-1])]
    assert (same == joined).all()


def test_quality_is_not_used_to_cluster():
    x, truth = planted(3, 3, seed=3)
    a = cluster_fingerprints(x, true_labels=truth)
    b = cluster_fingerprints(x, true_labels=np.zeros(len(x), dtype=int))
    assert np.array_equal(a.labels, b.labels)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 12), dim=st.integers(2, 16), seed=st.integers(0, 1000))
def test_similarity_graph_is_symmetric_and_laplacian_gaps_nonnegative(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim))
    w = similarity_graph(x)
    assert np.allclose(w, w.T) and (w >= 0).all() and np.allclose(np.diag(w), 1.0)
    assert (eigengaps(w) >= -1e-9).all()  # sorted eigenvalues: the Laplacian is PSD
