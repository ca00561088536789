"""Phase 1, server side: cluster client fingerprints and choose the number of clusters.

Cosine geometry: fingerprints are L2-normalised, so Euclidean k-means on them is spherical
k-means, and the similarity graph is W_ij = max(0, cos(f_i, f_j)). The number of clusters k is
chosen over ``k_range`` (default 2..min(10, N-1)) by a Borda count of four criteria, each ranking
the candidates: silhouette (cosine, higher is better; Rousseeuw 1987), Davies-Bouldin (lower;
1979), Calinski-Harabasz (higher; 1974) and the eigengap of the normalised Laplacian of W
(larger gap after the k-th eigenvalue; von Luxburg, "A Tutorial on Spectral Clustering",
arXiv:0711.0189). The k with the best mean rank wins; ties go to the higher silhouette. With
fewer than three clients there is nothing to choose between and all share one cluster.
Clustering itself is k-means (default) or spectral clustering on W (scikit-learn).
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

from atlasfl.errors import AtlasError

METHODS = ("kmeans", "spectral")
CRITERIA = ("silhouette", "davies_bouldin", "calinski_harabasz", "eigengap")


@dataclass(frozen=True)
class ClusterAssignment:
    """Result of ``cluster_fingerprints``."""

    labels: np.ndarray  # (num_clients,) cluster of each client, 0..k-1
    k: int
    centroids: np.ndarray  # (k, dim) unit-norm cluster means
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # per candidate k
    quality: dict[str, float] = field(default_factory=dict)  # ARI/NMI/purity vs true tasks


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


def purity(true_labels: np.ndarray, labels: np.ndarray) -> float:
    """Share of clients whose cluster's majority true label is their own."""
    total = 0
    for c in np.unique(labels):
        _, counts = np.unique(true_labels[labels == c], return_counts=True)
        total += counts.max()
    return total / len(labels)


def _fit(unit: np.ndarray, k: int, method: str, seed: int, similarity: np.ndarray) -> np.ndarray:
    if method == "kmeans":
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(unit)
    return SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                              assign_labels="cluster_qr").fit_predict(similarity + 1e-9)


def cluster_fingerprints(fingerprints: np.ndarray, *, k: int | None = None,
                         k_range: tuple[int, int] | None = None, method: str = "kmeans",
                         seed: int = 0, true_labels: list | np.ndarray | None = None
                         ) -> ClusterAssignment:
    """Group clients by fingerprint; choose k unless given.

    Args:
        fingerprints: (num_clients, dim) uploaded fingerprints.
        k: a fixed number of clusters; None chooses it.
        k_range: inclusive (min, max) candidates; default (2, min(10, N-1)).
        method: "kmeans" or "spectral".
        seed: seed of the clustering algorithm.
        true_labels: the clients' true tasks, for ARI/NMI/purity only — never used to cluster.
    """
    if method not in METHODS:
        raise AtlasError(f"clustering.method = {method!r} is invalid; allowed: kmeans, spectral")
    x = np.asarray(fingerprints, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise AtlasError("no fingerprints to cluster")
    unit = _normalise(x)
    similarity = similarity_graph(unit)
    scores: dict[int, dict[str, float]] = {}
    fits: dict[int, np.ndarray] = {}
    if k is not None:
        if not 1 <= k <= n:
            raise AtlasError(f"clustering.k = {k} is invalid for {n} clients; allowed: 1..{n}")
        chosen = k
    elif n < 3:
        chosen = 1
    else:
        lo, hi = k_range or (2, min(10, n - 1))
        lo, hi = max(2, lo), min(hi, n - 1)
        if lo > hi:
            raise AtlasError(f"clustering k range ({lo}, {hi}) is empty for {n} clients")
        gaps = eigengaps(similarity)
        for cand in range(lo, hi + 1):
            labels = _fit(unit, cand, method, seed, similarity)
            fits[cand] = labels
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
        for name in CRITERIA:
            values = np.array([scores[c][name] for c in cands])
            ranks += rankdata(values if name == "davies_bouldin" else -values)
        for c, r in zip(cands, ranks, strict=True):
            scores[c]["mean_rank"] = float(r / len(CRITERIA))
        chosen = min(cands, key=lambda c: (scores[c]["mean_rank"], -scores[c]["silhouette"]))
    if chosen == 1:
        labels = np.zeros(n, dtype=np.int64)
    else:  # reuse the candidate's fit when k was chosen; fit once when k was fixed
        labels = fits[chosen] if chosen in fits else _fit(unit, chosen, method, seed, similarity)
    _, labels = np.unique(labels, return_inverse=True)  # consecutive ids, no empty cluster
    chosen = int(labels.max()) + 1
    centroids = _normalise(np.stack([unit[labels == c].mean(0) for c in range(chosen)]))
    quality = {}
    if true_labels is not None:
        truth = np.asarray(true_labels)
        quality = {"ari": float(adjusted_rand_score(truth, labels)),
                   "nmi": float(normalized_mutual_info_score(truth, labels)),
                   "purity": float(purity(truth, labels))}
    return ClusterAssignment(labels, chosen, centroids, scores, quality)


def assign_to_nearest(fingerprint: np.ndarray, centroids: np.ndarray) -> int:
    """Cluster of a client that joins later: the centroid of highest cosine similarity."""
    unit = _normalise(np.asarray(fingerprint, dtype=np.float64)[None, :])[0]
    return int(np.argmax(centroids @ unit))
