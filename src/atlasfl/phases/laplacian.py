"""Phase 4: Laplacian personalisation (MIRA) over distinct client models.

MIRA (Elbakary et al., "MIRA: A Method of Federated Multi-Task Learning for Large Language
Models", arXiv:2410.15524) regularises each client's model toward its neighbours' on a graph of
clients: the server step is one gradient step on the graph penalty (lambda / 2) sum_kl a_kl
||W_k - W_l||^2, i.e. for every client k::

    W_k <- W_k - eta * lambda * sum_l a_kl (W_k - W_l)            (L = D - A, W <- W - eta lam L W)

on each client's OWN trained model (never on copies already averaged into one). With lambda = 0
every client keeps its model (``local``); on a complete graph with unit weights and
eta * lambda = 1/N every client gets the mean of the N models (FedAvg within the group), so
lambda interpolates between local training and ``fedavg-cluster``.

**The graph** (``client_graph``) is built in the geometry the clustering measured the
fingerprints in (Phase 1's centred, debiased cosine similarity ``S``): for unit vectors the
squared distance is ``d2 = 2 - 2 S``, so ``rbf`` weights are ``exp(-d2 / (2 sigma^2))`` with
sigma^2 the median off-diagonal d2 (the median heuristic), and ``knn`` keeps each client's k most
similar clients (weights max(0, S), symmetrised). Edges join clients of one cluster; with
``cross_weight`` > 0 each client is also joined to its ``k`` nearest clients of other clusters,
at that fraction of their weight, so related tasks help each other a little.

**The space** of the step (``space``): ``factors`` applies it to the A and B factors and the
head separately; all clients start from one shared initialisation (the common seeded A, B = 0),
so their factors stay comparable, as MIRA's formulation on the LoRA parameters implies. That
needs equal ranks. ``product`` applies it to each module's update s B A and re-factorises each
client's result to its own ranks by truncated SVD (the best rank-r approximation), which is how
mixed ranks pass through; the factors of the product are split as ``redistribute`` splits them
(the client keeps its own coordinates). MIRA states its step on the LoRA parameters
themselves, i.e. ``factors``: it is the default of this function, exact and linear (a step of the
factors is a step of A and B, not of B A, whose change is bilinear). ``product`` is the choice
when ranks differ; the strategies' ``laplacian.space=auto`` picks ``factors`` when every client
holds the same ranks and ``product`` otherwise (``atlas`` with device ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atlasfl.errors import AtlasError, check_choice
from atlasfl.phases.aggregation import Rows, linear_combination, mix, redistribute
from atlasfl.types import AdapterState, GraphKind, LaplacianSpace


@dataclass(frozen=True)
class ClientGraph:
    """Result of ``client_graph``: the weighted client graph and its Laplacian."""

    adjacency: np.ndarray  # (num_clients, num_clients) symmetric, >= 0, zero diagonal
    laplacian: np.ndarray  # (num_clients, num_clients) D - A
    bandwidth: float  # sigma^2 of the RBF kernel (0.0 for knn)


def client_graph(similarity: np.ndarray, labels: Sequence[int] | None = None, *,
                 kind: GraphKind = "rbf", k: int = 3, cross_weight: float = 0.0
                 ) -> ClientGraph:
    """The client graph from the clustering's similarity matrix (see the module docstring).

    Args:
        similarity: (N, N) cosine similarity of the clients' fingerprints.
        labels: each client's cluster; None puts every client in one cluster.
        kind: ``rbf`` (median-distance bandwidth) or ``knn`` (the ``k`` most similar).
        k: neighbours per client for ``knn`` and for the edges across clusters.
        cross_weight: weight factor of edges across clusters (0: none).
    """
    check_choice("laplacian.graph", kind, GraphKind)
    s = np.asarray(similarity, dtype=np.float64)
    n = len(s)
    if s.shape != (n, n) or not np.allclose(s, s.T, atol=1e-8):
        raise AtlasError(f"similarity must be a symmetric square matrix, got shape {s.shape}")
    if k < 1:
        raise AtlasError(f"laplacian.k = {k} is invalid; allowed: an integer >= 1")
    if cross_weight < 0:
        raise AtlasError(f"laplacian.cross_weight = {cross_weight} is invalid; allowed: >= 0")
    lab = np.zeros(n, dtype=int) if labels is None else np.asarray(labels)
    off = ~np.eye(n, dtype=bool)
    d2 = np.clip(2.0 - 2.0 * s, 0.0, None)  # squared distance of unit vectors
    if kind == "rbf":
        sigma2 = float(np.median(d2[off])) if n > 1 else 1.0
        sigma2 = sigma2 if sigma2 > 0 else 1.0
        weights = np.exp(-d2 / (2.0 * sigma2))
    else:
        sigma2 = 0.0
        weights = _knn(np.clip(s, 0.0, None), k)
    same = lab[:, None] == lab[None, :]
    adjacency = np.where(same & off, weights, 0.0)
    if cross_weight > 0:
        across = np.where(~same, weights, 0.0)
        adjacency = adjacency + cross_weight * _knn(across, k)
    adjacency = (adjacency + adjacency.T) / 2.0
    laplacian = np.diag(adjacency.sum(1)) - adjacency
    return ClientGraph(adjacency, laplacian, sigma2)


def _knn(weights: np.ndarray, k: int) -> np.ndarray:
    """Keep, for each row, its k largest off-diagonal positive weights; symmetrise by max."""
    n = len(weights)
    keep = np.zeros_like(weights)
    for i in range(n):
        row = weights[i].copy()
        row[i] = -np.inf
        for j in np.argsort(-row, kind="stable")[:k]:
            if row[j] > 0:
                keep[i, j] = weights[i, j]
    return np.maximum(keep, keep.T)


def laplacian_rows(adjacency: np.ndarray, *, eta: float, lam: float,
                   rows: Sequence[int] | None = None) -> Rows[int]:
    """The mixing rows of one MIRA step: row k of ``I - eta lam L`` for each target k.

    Each row holds client k and its neighbours (the entries that are not zero), in index order;
    its weights sum to one (L's rows sum to zero): ``1 - eta lam d_k`` for k itself, which may be
    negative, and ``eta lam a_kl`` for a neighbour l. ``rows``: the targets (default all).
    """
    a = np.asarray(adjacency, dtype=np.float64)
    n = len(a)
    step = np.eye(n) - eta * lam * (np.diag(a.sum(1)) - a)
    targets = sorted(set(range(n) if rows is None else rows))
    return {k: {j: float(step[k, j]) for j in range(n) if step[k, j] != 0} for k in targets}


def laplacian_step(states: Sequence[AdapterState], adjacency: np.ndarray, *, eta: float,
                   lam: float, space: LaplacianSpace = "factors",
                   scaling: Callable[[int], float] | None = None,
                   rows: Sequence[int] | None = None) -> list[AdapterState]:
    """One MIRA step on the clients' own models: W_k - eta lam sum_l a_kl (W_k - W_l).

    The step is a mixing (``atlasfl.phases.aggregation.mix``) by ``laplacian_rows``: in
    ``factors`` space each tensor is the row's linear combination; in ``product`` space each
    module's ``s B A`` is, cut back to the target's rank.

    Args:
        states: each client's tensors (adapter factors ``<module>.lora_A/B.weight``, and any
            other tensor such as a head's, stepped as it is), in the order of ``adjacency``.
        adjacency: (N, N) symmetric non-negative weights (``client_graph``).
        eta: the step size.
        lam: the strength of the graph penalty (0 returns the states unchanged).
        space: ``factors`` (every tensor as it is; equal shapes needed) or ``product`` (each
            module's s B A, re-factorised to the client's own rank; needs ``scaling``).
        scaling: the LoRA scaling of a rank, for ``product``.
        rows: the clients that take the step (default all); the others keep their models and
            still pull their neighbours (clients not sampled in a round).

    Returns:
        New states (copies for clients outside ``rows``); the inputs are not modified.
    """
    check_choice("laplacian.space", space, LaplacianSpace)
    a = np.asarray(adjacency, dtype=np.float64)
    n = len(states)
    if a.shape != (n, n):
        raise AtlasError(f"adjacency of shape {a.shape} for {n} client models")
    if eta < 0 or lam < 0:
        raise AtlasError(f"laplacian eta = {eta} and lam = {lam} must both be >= 0")
    targets = sorted(set(range(n) if rows is None else rows))
    if any(not 0 <= i < n for i in targets):
        raise AtlasError(f"rows {targets} outside the {n} client models")
    out: list[AdapterState] = [{key: t.clone() for key, t in s.items()} for s in states]
    if lam == 0 or not targets:
        return out
    modules = sorted({key.removesuffix(".lora_A.weight") for key in states[0]
                      if key.endswith(".lora_A.weight")}) if space == "product" else []
    factored = {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    plain = [key for key in states[0] if key not in factored]
    for key in plain:
        if any(s[key].shape != states[0][key].shape for s in states):
            raise AtlasError(f"client models hold {key!r} in different shapes; use "
                             "laplacian.space=product for mixed ranks")
    if modules and scaling is None:
        raise AtlasError("laplacian.space=product needs the LoRA scaling of a rank")

    def combine(k: int, neighbours: list[AdapterState], weights: list[float]) -> AdapterState:
        moved = linear_combination(neighbours, weights, plain)
        for m in modules:
            assert scaling is not None
            moved.update(_product(states[k], neighbours, weights, m, scaling))
        return {key: moved[key].to(states[k][key].dtype) for key in states[k]}

    for k, state in mix(laplacian_rows(a, eta=eta, lam=lam, rows=targets),
                        dict(enumerate(states)), combine).items():
        out[k] = state
    return out


def _product(own: AdapterState, states: Sequence[AdapterState], weights: Sequence[float],
             module: str, scaling: Callable[[int], float]) -> AdapterState:
    """A module's ``sum_l w_l s_l B_l A_l``, cut to ``own``'s rank.

    The sum is factored exactly by QR of the stacked factors (rank <= the neighbours' ranks
    summed), then cut by the SVD of its small core.
    """
    a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    b_cat = torch.cat([w * scaling(s[a_key].shape[0]) * s[b_key].double()
                       for s, w in zip(states, weights, strict=True)], dim=1)
    a_cat = torch.cat([s[a_key].double() for s in states], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)  # (out, R), (R, R)
    q_a, r_a = torch.linalg.qr(a_cat.T)  # (in, R), (R, R)
    core_u, sv, core_vh = torch.linalg.svd(r_b @ r_a.T)
    u, vh = q_b @ core_u, core_vh @ q_a.T  # the SVD of the moved product
    rank = own[a_key].shape[0]
    factors = {a_key: vh[:rank], b_key: u[:, :rank] * sv[:rank]}  # B @ A = the update
    return redistribute(factors, {module: rank}, method="svd", scaling=scaling,
                        reference={a_key: own[a_key]})
