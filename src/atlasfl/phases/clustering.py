"""Phase 1, server side: cluster client fingerprints and choose the number of clusters.

Centring (``center``, default on): every fingerprint of a pretrained model shares a large
component that says "this model on natural language", not which task: on four GLUE tasks
(bench/clustering.py, minilm, seeds 0-2) same-task pairs sit at cosine 0.95-0.98 and
different-task pairs up to 0.91-0.93, so the similarity graph has no spectral structure. The
server subtracts the mean of the unit fingerprints it received (as PCA centres data) and keeps
the mean to place clients that join later; after centring the same pairs sit at >= 0.62 and
<= 0.38.

Debiasing (``noise_var``): each client uploads the expected squared norm of its fingerprint's
noise (sampling noise of its n examples, or the DP mechanism's dim * sigma^2; see
``atlasfl.phases.fingerprint``). Noise that is independent between clients inflates only the
diagonal of the Gram matrix G = F F^T, so the server subtracts it there, normalises with the
debiased norms, centres (H K H, H = I - 11^T/N: kernel centring) and embeds the clients by the
eigendecomposition of the result (negative eigenvalues, which debiasing can create, clipped;
``embed``). Without noise this is exactly the centred cosine geometry above. Most of the spread
between same-task clients is sampling noise: debiased, same-task pairs sit at cosine 0.92-0.97
on four IID tasks, and the six-task setting, whose sentence-pair tasks merged before, separates.

Choosing k: the clustering (k-means, default, or spectral on W) runs for every k in ``k_range``
(default 2..min(10, N-1)) and four criteria are recorded for each: silhouette (cosine, higher is
better; Rousseeuw 1987), Davies-Bouldin (lower; 1979), Calinski-Harabasz (higher; 1974) and the
eigengap of the normalised Laplacian of W = max(0, cos) (von Luxburg, arXiv:0711.0189). The
``criteria`` vote by mean rank (ties to the higher silhouette). The default is silhouette
alone: once debiasing makes clusters tight, Davies-Bouldin and Calinski-Harabasz reward
splitting off a single client (their within-cluster scatter tends to 0) and the eigengap
prefers the coarse level of the sentence-pair tasks. On bench/clustering.py's 12 runs of seeds
0-2, silhouette alone chose the true k every time, the four-criterion vote and silhouette +
eigengap in 11; on seeds 3-4, run after the choice, 8 of 8, 8 and 7. k is chosen among the clients
whose fingerprint is at least ``min_signal`` signal (``signal_fraction``; a client with 12
examples had 54%), then every client is clustered at that k. With fewer than three clients all
share one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    silhouette_score,
)

from atlasfl.errors import AtlasError, check_choice, choices
from atlasfl.types import ClusterMethod, Criterion

CRITERIA: tuple[Criterion, ...] = choices(Criterion)  # type: ignore[assignment]
DEFAULT_CRITERIA: tuple[Criterion, ...] = ("silhouette",)


@dataclass(frozen=True)
class ClusterAssignment:
    """Result of ``cluster_fingerprints``."""

    labels: np.ndarray  # (num_clients,) cluster of each client, 0..k-1
    k: int
    # (num_clients, num_clients) cosine similarity of the clients in the geometry they were
    # clustered in (centred, debiased: ``embed``); Phase 4 builds its client graph from it
    similarity: np.ndarray
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # per candidate k
    quality: dict[str, float] = field(default_factory=dict)  # ARI/NMI/purity vs true tasks
    center: np.ndarray | None = None  # (dim,) mean unit fingerprint subtracted; None: none


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def similarity_graph(fingerprints: np.ndarray) -> np.ndarray:
    """W_ij = max(0, cos(f_i, f_j)); (num_clients, num_clients)."""
    unit = _normalise(np.asarray(fingerprints, dtype=np.float64))
    return np.clip(unit @ unit.T, 0.0, None)


def eigengaps(similarity: np.ndarray) -> np.ndarray:
    """gaps[k] = lambda_{k+1} - lambda_k of the normalised Laplacian (index k = #clusters)."""
    degree = similarity.sum(1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(len(similarity)) - inv_sqrt[:, None] * similarity * inv_sqrt[None, :]
    eig = np.sort(np.linalg.eigvalsh(laplacian))
    return np.concatenate([[0.0], np.diff(eig)])  # gaps[k] for k = 1..N-1 at index k


def embed(fingerprints: np.ndarray, noise_var: np.ndarray | None = None, *,
          center: bool = True) -> np.ndarray:
    """Rows whose inner products are the debiased, normalised, centred fingerprint Gram matrix.

    (num_clients, num_clients): G = F F^T minus ``noise_var`` on the diagonal (floored at 1% of
    the raw squared norm), scaled to unit diagonal, kernel-centred, then V sqrt(max(L, 0)) of its
    eigendecomposition.
    """
    x = np.asarray(fingerprints, dtype=np.float64)
    gram = x @ x.T
    raw = np.diag(gram).copy()
    norms2 = raw if noise_var is None else np.maximum(raw - np.asarray(noise_var), 0.01 * raw)
    norms2 = np.maximum(norms2, 1e-24)
    np.fill_diagonal(gram, norms2)
    kernel = gram / np.sqrt(np.outer(norms2, norms2))
    if center:
        h = np.eye(len(x)) - 1.0 / len(x)
        kernel = h @ kernel @ h
    values, vectors = np.linalg.eigh((kernel + kernel.T) / 2)
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def purity(true_labels: np.ndarray, labels: np.ndarray) -> float:
    """Share of clients whose cluster's majority true label is their own."""
    total = 0
    for c in np.unique(labels):
        _, counts = np.unique(true_labels[labels == c], return_counts=True)
        total += counts.max()
    return total / len(labels)


def _fit(unit: np.ndarray, k: int, method: ClusterMethod, seed: int, similarity: np.ndarray
         ) -> np.ndarray:
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit)
    return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                              assign_labels="cluster_qr").fit_predict(similarity + 1e-9)


def signal_fraction(fingerprints: np.ndarray, noise_var: np.ndarray | None) -> np.ndarray:
    """Share of each fingerprint's squared norm that is not noise, in [0.01, 1]."""
    raw = (np.asarray(fingerprints, dtype=np.float64) ** 2).sum(1)
    if noise_var is None:
        return np.ones(len(raw))
    return np.maximum(raw - np.asarray(noise_var), 0.01 * raw) / np.maximum(raw, 1e-24)


def score_candidates(unit: np.ndarray, k_range: tuple[int, int], *, method: ClusterMethod,
                     seed: int, criteria: tuple[Criterion, ...]) -> dict[int, dict[str, float]]:
    """Every criterion for every candidate k, and the mean rank over ``criteria``."""
    similarity = similarity_graph(unit)
    gaps = eigengaps(similarity)
    scores: dict[int, dict[str, float]] = {}
    for cand in range(k_range[0], k_range[1] + 1):
        labels = _fit(unit, cand, method, seed, similarity)
        if len(np.unique(labels)) < 2:  # degenerate fit: worst on every criterion
            scores[cand] = {"silhouette": -1.0, "davies_bouldin": np.inf,
                            "calinski_harabasz": 0.0, "eigengap": float(gaps[cand])}
            continue
        scores[cand] = {
            "silhouette": float(silhouette_score(unit, labels, metric="cosine")),
            "davies_bouldin": float(davies_bouldin_score(unit, labels)),
            "calinski_harabasz": float(calinski_harabasz_score(unit, labels)),
            "eigengap": float(gaps[cand]),
        }
    cands = sorted(scores)
    ranks = np.zeros(len(cands))
    for name in criteria:
        values = np.array([scores[c][name] for c in cands])
        ranks += rankdata(values if name == "davies_bouldin" else -values)
    for c, r in zip(cands, ranks, strict=True):
        scores[c]["mean_rank"] = float(r / len(criteria))
    return scores


def cluster_fingerprints(fingerprints: np.ndarray, *, k: int | None = None,
                         k_range: tuple[int, int] | None = None, method: ClusterMethod = "kmeans",
                         seed: int = 0, true_labels: list | np.ndarray | None = None,
                         center: bool = True, noise_var: np.ndarray | None = None,
                         criteria: tuple[Criterion, ...] = DEFAULT_CRITERIA, min_signal: float = 0.7
                         ) -> ClusterAssignment:
    """Group clients by fingerprint; choose k unless given.

    Args:
        fingerprints: (num_clients, dim) uploaded fingerprints.
        k: a fixed number of clusters; None chooses it.
        k_range: inclusive (min, max) candidates; default (2, min(10, N-1)).
        method: "kmeans" or "spectral".
        seed: seed of the clustering algorithm.
        true_labels: the clients' true tasks, for ARI/NMI/purity only — never used to cluster.
        center: subtract the mean unit fingerprint first (needs two or more clients).
        noise_var: (num_clients,) expected squared norm of each fingerprint's noise; None: 0.
        criteria: which of ``CRITERIA`` vote on k (mean rank).
        min_signal: k is chosen among the clients whose ``signal_fraction`` is at least this
            (all clients when fewer than three qualify); every client is then clustered.
    """
    check_choice("clustering.method", method, ClusterMethod)
    unknown = sorted(set(criteria) - set(CRITERIA))
    if unknown or not criteria:
        raise AtlasError(f"clustering.criteria = {list(criteria)} is invalid; allowed: a "
                         f"non-empty subset of {', '.join(CRITERIA)}")
    x = np.asarray(fingerprints, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise AtlasError("no fingerprints to cluster")
    mean = _normalise(x).mean(0) if center and n >= 2 else None
    unit = _normalise(embed(x, noise_var, center=mean is not None))
    scores: dict[int, dict[str, float]] = {}
    if k is not None:
        if not 1 <= k <= n:
            raise AtlasError(f"clustering.k = {k} is invalid for {n} clients; allowed: 1..{n}")
        chosen = k
    elif n < 3:
        chosen = 1
    else:
        reliable = signal_fraction(x, noise_var) >= min_signal
        if reliable.sum() < 3:
            reliable[:] = True
        m = int(reliable.sum())
        lo, hi = k_range or (2, min(10, m - 1))
        lo, hi = max(2, lo), min(hi, m - 1)
        if lo > hi:
            raise AtlasError(f"clustering k range ({lo}, {hi}) is empty for {m} clients")
        sub_unit = unit if reliable.all() else _normalise(embed(
            x[reliable], None if noise_var is None else np.asarray(noise_var)[reliable],
            center=center))
        scores = score_candidates(sub_unit, (lo, hi), method=method, seed=seed,
                                  criteria=criteria)
        chosen = min(scores, key=lambda c: (scores[c]["mean_rank"], -scores[c]["silhouette"]))
    labels = (np.zeros(n, dtype=np.int64) if chosen == 1
              else _fit(unit, chosen, method, seed, similarity_graph(unit)))
    _, labels = np.unique(labels, return_inverse=True)  # consecutive ids, no empty cluster
    chosen = int(labels.max()) + 1
    quality = {}
    if true_labels is not None:
        truth = np.asarray(true_labels)
        quality = {"ari": float(adjusted_rand_score(truth, labels)),
                   "nmi": float(normalized_mutual_info_score(truth, labels)),
                   "purity": float(purity(truth, labels))}
    return ClusterAssignment(labels, chosen, unit @ unit.T, scores, quality, mean)

