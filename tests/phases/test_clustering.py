import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.phases.clustering import (
    assign_to_nearest,
    cluster_fingerprints,
    embed,
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
    x = x + 5.0 * np.random.default_rng(9).normal(size=x.shape[1])  # a shared component
    result = cluster_fingerprints(x[:-1], k=3)
    joined = assign_to_nearest(x[-1], result.centroids, result.center)
    same = result.labels[np.flatnonzero(truth[:-1] == truth[-1])]
    assert (same == joined).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_centring_removes_the_component_every_client_shares(seed):
    # real fingerprints share a direction (the pretrained model) much larger than the task part
    x, truth = planted(4, 3, noise=0.3, seed=seed)
    x = x + 8.0 * np.linalg.norm(x[0]) * _unit(np.random.default_rng(seed + 10).normal(size=64))
    centred = cluster_fingerprints(x, true_labels=truth)
    assert centred.k == 4 and centred.quality["ari"] == pytest.approx(1.0)
    assert centred.center is not None and centred.center.shape == (64,)
    # the similarity graph's spectrum shows the four clusters only after centring
    assert centred.scores[4]["eigengap"] > 0.5
    assert max(s["eigengap"] for s in cluster_fingerprints(x, center=False).scores.values()) < 0.05


def test_debiasing_recovers_the_geometry_of_the_noise_free_fingerprints():
    # noise independent between clients (sampling or DP) inflates only the Gram diagonal
    x, _ = planted(4, 3, dim=4096, noise=0.3, seed=4)
    rng = np.random.default_rng(5)
    var = np.linspace(0.5, 3.0, len(x)) * (x**2).sum(1)  # noise up to 3x the signal energy
    noisy = x + np.sqrt(var / x.shape[1])[:, None] * rng.normal(size=x.shape)
    clean = embed(x) @ embed(x).T
    debiased = embed(noisy, var) @ embed(noisy, var).T
    raw = embed(noisy) @ embed(noisy).T
    assert np.abs(debiased - clean).max() < 0.1
    assert np.abs(raw - clean).max() > 0.3
    # no noise: the embedding is the centred cosine geometry itself
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    centred = unit - unit.mean(0)
    np.testing.assert_allclose(clean, centred @ centred.T, atol=1e-9)


def test_a_mostly_noise_client_does_not_vote_on_k_but_is_clustered(monkeypatch):
    from atlasfl.phases import clustering

    x, truth = planted(4, 3, noise=0.3, seed=6)
    noise = 1.5 * np.linalg.norm(x[0]) * np.random.default_rng(7).normal(size=64) / 8
    x = np.vstack([x, x[0] + noise])  # a 13th client of task 0 with few examples
    truth = np.append(truth, 0)
    var = np.append(np.zeros(12), (noise**2).sum())
    assert clustering.signal_fraction(x, var)[-1] < 0.7 <= clustering.signal_fraction(x, var)[0]
    voters = []
    score = clustering.score_candidates
    monkeypatch.setattr(clustering, "score_candidates",
                        lambda unit, *a, **kw: voters.append(len(unit)) or score(unit, *a, **kw))
    result = cluster_fingerprints(x, true_labels=truth, noise_var=var)
    assert voters == [12] and result.k == 4 and result.quality["ari"] == pytest.approx(1.0)


def _unit(v):
    return v / np.linalg.norm(v)


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
