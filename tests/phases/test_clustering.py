import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.errors import AtlasError
from atlasfl.phases import clustering
from atlasfl.phases.clustering import (
    cluster_fingerprints,
    eigengaps,
    embed,
    purity,
    score_candidates,
    signal_fraction,
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
    assert result.similarity.shape == (n, n)


def test_similarity_is_the_cosine_of_the_centred_geometry_it_clustered_in():
    x, truth = planted(3, 4, seed=2)
    x = x + 5.0 * np.random.default_rng(9).normal(size=x.shape[1])  # a shared component
    result = cluster_fingerprints(x, k=3, true_labels=truth)
    unit = embed(x) / np.linalg.norm(embed(x), axis=1, keepdims=True)
    np.testing.assert_allclose(result.similarity, unit @ unit.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(result.similarity), 1.0)
    same = truth[:, None] == truth[None, :]
    # uncentred, the shared component makes every pair look alike; centred, only the task does
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (raw @ raw.T)[~same].min() > 0.5
    assert result.similarity[same].min() > 0.5 > result.similarity[~same].max()
    assert result.quality["ari"] == pytest.approx(1.0)


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


# -- values worked out by hand or by brute force over every partition ---------------------------


def _bipartitions(n):
    for mask in range(1, 2 ** (n - 1)):
        yield np.array([(mask >> i) & 1 for i in range(n)])


def _same_partition(a, b):
    return bool((a == b).all() or (a == 1 - b).all())


def _centred_cosine(x):
    """Cosine similarity after subtracting the mean unit fingerprint (the default geometry)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = unit - unit.mean(0)
    gram = c @ c.T
    return gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))


def _two_cluster_scores(s, labels):
    """Silhouette (cosine), Davies-Bouldin and Calinski-Harabasz of unit rows with Gram s."""
    n, groups = len(s), [labels == c for c in (0, 1)]
    dist = 1.0 - s  # cosine distance
    sil = []
    for i in range(n):
        own, other = groups[labels[i]], groups[1 - labels[i]]
        a = dist[i, own].sum() / (own.sum() - 1)
        b = dist[i, other].mean()
        sil.append((b - a) / max(a, b))
    # centroids m_c: ||e_i - m_c||^2 = 1 - 2 mean_j s_ij + mean_jk s_jk
    mean_s = [[s[np.ix_(g, h)].mean() for h in groups] for g in groups]
    scatter = [np.sqrt(1 - 2 * s[np.ix_(g, g)].mean(1) + mean_s[c][c]).mean()
               for c, g in enumerate(groups)]
    separation = np.sqrt(mean_s[0][0] + mean_s[1][1] - 2 * mean_s[0][1])
    within = sum(g.sum() - s[np.ix_(g, g)].sum() / g.sum() for g in groups)
    between = sum(g.sum() * (mean_s[c][c] - 2 * s[g].mean() + s.mean())
                  for c, g in enumerate(groups))
    return {"silhouette": float(np.mean(sil)),
            "davies_bouldin": float((scatter[0] + scatter[1]) / separation),
            "calinski_harabasz": float(between / (within / (n - 2)))}


def test_kmeans_finds_the_least_squares_split_and_spectral_the_normalised_cut():
    # six clients where the two methods disagree: k-means must return the bipartition of least
    # within-cluster squared distance, spectral the one of least normalised cut of max(0, cos)
    x = np.random.default_rng(55).normal(size=(6, 3))
    s = _centred_cosine(x)
    w = np.clip(s, 0.0, None)

    def sse(labels):
        return sum(g.sum() - s[np.ix_(g, g)].sum() / g.sum() for g in (labels == 0, labels == 1))

    def ncut(labels):
        cut = w[np.ix_(labels == 0, labels == 1)].sum()
        return cut / w[labels == 0].sum() + cut / w[labels == 1].sum()

    least_squares = min(_bipartitions(6), key=sse)
    least_cut = min(_bipartitions(6), key=ncut)
    assert not _same_partition(least_squares, least_cut)
    kmeans = cluster_fingerprints(x, k=2, true_labels=least_squares)
    spectral = cluster_fingerprints(x, k=2, method="spectral")
    assert _same_partition(kmeans.labels, least_squares)
    assert _same_partition(spectral.labels, least_cut)
    np.testing.assert_allclose(kmeans.similarity, s, atol=1e-12)
    assert kmeans.quality == pytest.approx({"ari": 1.0, "nmi": 1.0, "purity": 1.0})
    assert kmeans.scores == {}  # k was given: nothing was scored


def test_the_seed_decides_between_tied_partitions_and_defaults_to_zero():
    # four clients on a square: {0, 1 | 2, 3} and {1, 2 | 3, 0} have the same within-cluster
    # sum of squares (2), so only k-means' seeded initialisation picks one
    angles = np.deg2rad([0, 90, 180, 270])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    first = cluster_fingerprints(x, k=2, seed=0).labels
    assert all(_same_partition(cluster_fingerprints(x, k=2, seed=0).labels, first)
               for _ in range(15))
    assert _same_partition(cluster_fingerprints(x, k=2).labels, first)  # default seed 0
    assert not _same_partition(cluster_fingerprints(x, k=2, seed=1).labels, first)


def test_scores_of_a_candidate_match_the_formulas():
    x = np.random.default_rng(55).normal(size=(6, 3))
    s = _centred_cosine(x)
    labels = min(_bipartitions(6), key=lambda lab: sum(
        g.sum() - s[np.ix_(g, g)].sum() / g.sum() for g in (lab == 0, lab == 1)))
    w = np.clip(s, 0.0, None)
    inv = 1 / np.sqrt(w.sum(1))
    eig = np.sort(np.linalg.eigvalsh(np.eye(6) - inv[:, None] * w * inv[None, :]))
    result = cluster_fingerprints(x, k_range=(2, 2))
    assert set(result.scores) == {2}
    expected = _two_cluster_scores(s, labels) | {"eigengap": eig[2] - eig[1], "mean_rank": 1.0}
    assert result.scores[2] == pytest.approx(expected, rel=1e-9)


def test_mean_rank_averages_the_rank_of_each_criterion():
    x, _ = planted(3, 3, noise=0.8, seed=8)
    criteria = ("silhouette", "davies_bouldin", "eigengap")
    scores = cluster_fingerprints(x, k_range=(2, 5), criteria=criteria).scores
    cands = sorted(scores)

    def rank(c, name):  # 1 = best; ties share the mean of their ranks
        sign = 1 if name == "davies_bouldin" else -1  # lower Davies-Bouldin is better
        v = {d: sign * scores[d][name] for d in cands}
        return sum(v[d] < v[c] for d in cands) + (sum(v[d] == v[c] for d in cands) + 1) / 2

    for c in cands:
        assert scores[c]["mean_rank"] == pytest.approx(sum(rank(c, n) for n in criteria) / 3)
    assert len({scores[c]["mean_rank"] for c in cands}) > 1


def test_a_fit_that_finds_one_cluster_scores_worst_on_every_criterion():
    unit = np.full((4, 3), 3**-0.5)  # four identical clients: k-means finds one cluster
    scores = score_candidates(unit, (2, 3), method="kmeans", seed=0, criteria=("silhouette",))
    for k in (2, 3):
        assert scores[k] == {"silhouette": -1.0, "davies_bouldin": np.inf,
                             "calinski_harabasz": 0.0, "eigengap": pytest.approx(0.0, abs=1e-9),
                             "mean_rank": 1.5}


def test_ties_in_mean_rank_go_to_the_higher_silhouette(monkeypatch):
    x, _ = planted(3, 2, seed=9)
    monkeypatch.setattr(clustering, "score_candidates", lambda *a, **kw: {
        2: {"mean_rank": 1.5, "silhouette": 0.2}, 3: {"mean_rank": 1.5, "silhouette": 0.6},
        4: {"mean_rank": 3.0, "silhouette": 0.9}})
    assert cluster_fingerprints(x).k == 3


def test_criteria_and_method_are_checked_and_named():
    x, _ = planted(2, 3)
    allowed = "silhouette, davies_bouldin, calinski_harabasz, eigengap"
    with pytest.raises(AtlasError, match=rf"^clustering\.criteria = \['silhouette', 'bogus'\] is "
                                         rf"invalid; allowed: a non-empty subset of {allowed}$"):
        cluster_fingerprints(x, criteria=("silhouette", "bogus"))
    with pytest.raises(AtlasError, match=r"^clustering\.criteria = \[\] is invalid"):
        cluster_fingerprints(x, criteria=())
    with pytest.raises(AtlasError, match=r"^clustering\.method = 'dbscan' is invalid; allowed: "
                                         r"kmeans, spectral$"):
        cluster_fingerprints(x, method="dbscan")
    with pytest.raises(AtlasError, match=r"^no fingerprints to cluster$"):
        cluster_fingerprints(np.zeros((0, 4)))


def test_k_may_be_anything_from_one_to_the_number_of_clients():
    x, _ = planted(2, 2, seed=3)
    one = cluster_fingerprints(x, k=1)
    assert one.k == 1 and one.labels.tolist() == [0, 0, 0, 0]
    every = cluster_fingerprints(x, k=4)
    assert every.k == 4 and sorted(every.labels.tolist()) == [0, 1, 2, 3]
    for bad in (0, 5):
        with pytest.raises(AtlasError, match=rf"^clustering\.k = {bad} is invalid for 4 clients; "
                                             r"allowed: 1\.\.4$"):
            cluster_fingerprints(x, k=bad)


def test_candidate_k_stop_one_below_the_number_of_voters():
    x, _ = planted(2, 3, seed=4)
    assert set(cluster_fingerprints(x[:5], k_range=(2, 10)).scores) == {2, 3, 4}
    with pytest.raises(AtlasError, match=r"^clustering k range \(5, 3\) is empty for 4 clients$"):
        cluster_fingerprints(x[:4], k_range=(5, 6))


def test_three_clients_are_split_in_two():
    # three clients: the only candidate is k = 2, the odd client alone
    x = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]])
    result = cluster_fingerprints(x, center=False)
    assert result.k == 2 and _same_partition(result.labels, np.array([0, 0, 1]))


def test_two_clients_share_one_cluster_and_the_centre_is_their_mean_unit_vector():
    # float32 uploads; the centre is computed in float64: units (0.6, 0.8) and (0, 1)
    x = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    for method in ("kmeans", "spectral"):
        result = cluster_fingerprints(x, method=method)
        assert result.k == 1 and result.labels.tolist() == [0, 0]
        np.testing.assert_allclose(result.center, [0.3, 0.9], rtol=0, atol=1e-15)
        assert result.quality == {}


def test_spectral_clustering_copes_with_a_client_unlike_every_other():
    # centred, client 3 has negative cosine with everyone: no edge in max(0, cos) at all
    x = np.array([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [1.0, 0.05, 0.05], [0.0, 0.0, 1.0]])
    result = cluster_fingerprints(x, k=2, method="spectral")
    assert (result.similarity[3, :3] < 0).all()
    assert _same_partition(result.labels, np.array([0, 0, 0, 1]))


def test_noise_variance_is_subtracted_before_the_clients_are_compared():
    # uncentred: G = [[1, 1], [1, 2]]; minus noise (0, 1) on the diagonal, both clients have unit
    # energy and cosine 1; without it the cosine is 1 / sqrt(2)
    x = np.array([[1.0, 0.0], [1.0, 1.0]])
    debiased = cluster_fingerprints(x, k=1, center=False, noise_var=np.array([0.0, 1.0]))
    np.testing.assert_allclose(debiased.similarity, np.ones((2, 2)), atol=1e-12)
    raw = cluster_fingerprints(x, k=1, center=False)
    np.testing.assert_allclose(raw.similarity[0, 1], 2**-0.5, atol=1e-12)


@pytest.mark.parametrize("center", [True, False])
def test_only_reliable_clients_vote_and_they_keep_their_noise_variance(monkeypatch, center):
    x, _ = planted(2, 3, seed=5)
    raw = (x**2).sum(1)
    var = raw * np.array([0.1, 0.2, 0.25, 0.1, 0.9, 0.2])  # client 4 is 10% signal
    seen = []
    real = clustering.score_candidates
    monkeypatch.setattr(clustering, "score_candidates",
                        lambda unit, *a, **kw: seen.append(unit) or real(unit, *a, **kw))
    cluster_fingerprints(x, noise_var=var, center=center)
    keep = np.array([True, True, True, True, False, True])
    sub = embed(x[keep], var[keep], center=center)
    np.testing.assert_allclose(seen[0], sub / np.linalg.norm(sub, axis=1, keepdims=True),
                               atol=1e-12)


def test_three_reliable_clients_are_enough_to_vote_and_two_are_not(monkeypatch):
    x, _ = planted(2, 2, seed=6)
    raw = (x**2).sum(1)
    voters = []
    real = clustering.score_candidates
    monkeypatch.setattr(clustering, "score_candidates",
                        lambda unit, *a, **kw: voters.append(len(unit)) or real(unit, *a, **kw))
    cluster_fingerprints(x, noise_var=raw * np.array([0.0, 0.0, 0.0, 0.9]))
    cluster_fingerprints(x, noise_var=raw * np.array([0.0, 0.0, 0.9, 0.9]))
    # a client exactly at min_signal counts as reliable
    fraction = signal_fraction(x, raw * np.array([0.0, 0.0, 0.25, 0.9]))[2]
    cluster_fingerprints(x, noise_var=raw * np.array([0.0, 0.0, 0.25, 0.9]), min_signal=fraction)
    assert voters == [3, 4, 3]


def test_eigengaps_of_two_connected_clients_by_hand():
    # W = 1/4 everywhere: degrees 1/2, L = I - W / (1/2) = [[.5, -.5], [-.5, .5]]: eigenvalues 0, 1
    gaps = eigengaps(np.full((2, 2), 0.25))
    np.testing.assert_allclose(gaps, [0.0, 1.0], atol=1e-12)


def test_embed_floors_the_debiased_energy_at_one_percent_of_the_raw():
    # client 0: energy 2, noise 5: floored at 0.02; kernel [[1, k], [k, 1]] with k = 1/sqrt(0.02),
    # whose only non-negative eigenvalue 1 + k has eigenvector (1, 1)/sqrt(2)
    x = np.array([[1.0, 1.0], [1.0, 0.0]])
    e = embed(x, np.array([5.0, 0.0]), center=False)
    k = 1 / np.sqrt(0.02)
    np.testing.assert_allclose(e @ e.T, np.full((2, 2), (1 + k) / 2), atol=1e-9)


def test_embed_is_scale_free_and_computed_in_float64():
    x, _ = planted(2, 3, dim=8, seed=7)
    gram = embed(x) @ embed(x).T
    small = embed(1e-3 * x) @ embed(1e-3 * x).T  # squared norms far below 1
    np.testing.assert_allclose(small, gram, atol=1e-12)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(embed(x32) @ embed(x32).T,
                               embed(x32.astype(np.float64)) @ embed(x32.astype(np.float64)).T,
                               atol=1e-13)
    np.testing.assert_allclose(similarity_graph(x32), similarity_graph(x32.astype(np.float64)),
                               atol=1e-15)


def test_signal_fraction_by_hand():
    x = np.array([[2.0, 0.0], [0.1, 0.0], [0.0, 3.0]])
    var = np.array([10.0, 0.005, 0.0])  # energies 4, 0.01, 9
    np.testing.assert_allclose(signal_fraction(x, var), [0.01, 0.5, 1.0], rtol=1e-12)
    np.testing.assert_allclose(signal_fraction(x.astype(np.float32), var),
                               signal_fraction(x.astype(np.float32).astype(np.float64), var),
                               rtol=1e-15)
    assert signal_fraction(x, None).tolist() == [1.0, 1.0, 1.0]


def test_purity_by_hand():
    # cluster 0 holds tasks (0, 0, 1): 2 right; cluster 1 (1, 2): 1; cluster 2 (2): 1 -> 4 / 6
    truth, labels = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 2])
    assert purity(truth, labels) == pytest.approx(4 / 6)
