"""Splitting a task's training rows across its clients (IID or Dirichlet label skew), seeded.

Dirichlet label skew follows Hsu et al., "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification" (arXiv:1909.06335): for every class, the share each client
receives is drawn from Dir(alpha); small alpha means each client sees few classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from atlasfl.data.glue import Examples
from atlasfl.errors import AtlasError, check_choice
from atlasfl.types import Partition


@dataclass(frozen=True)
class ClientSplit:
    """Row indices (into the task's deduplicated train split) of one client, three disjoint sets.

    ``test_idx`` is the client's local test: held-out rows drawn like its own (its label mix),
    never trained on and never used to choose anything; ``val_idx`` is what choices are made on.
    """

    train_idx: np.ndarray  # (num_train,)
    val_idx: np.ndarray  # (num_val,)
    test_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (num_test,)


def drop_test_overlap(train: Examples, test: Examples) -> tuple[Examples, int]:
    """Drop train rows whose text also appears in the test split; return rows kept and dropped."""
    seen = {tuple(t.strip() for t in row) for row in test.texts}
    keep = [i for i, row in enumerate(train.texts) if tuple(t.strip() for t in row) not in seen]
    return train.subset(keep), len(train) - len(keep)


def _class_ids(labels: np.ndarray, num_bins: int = 5) -> np.ndarray:
    """Class of each row; regression scores are binned into quantiles so they can be skewed."""
    if labels.dtype.kind == "f":
        edges = np.quantile(labels, np.linspace(0, 1, num_bins + 1)[1:-1])
        return np.digitize(labels, edges)
    return labels


def partition(labels: np.ndarray, num_clients: int, samples: int, *, scheme: Partition = "iid",
              alpha: float = 0.5, val_fraction: float = 0.0, test_fraction: float = 0.0,
              seed: int | list[int] = 0) -> list[ClientSplit]:
    """Give each of ``num_clients`` clients disjoint rows of one task.

    Each client's rows are then cut three ways, stratified by class (``stratified_take``): its
    local test (``test_fraction``), its validation rows (``val_fraction``, of the same whole)
    and what it trains on, so the held-out rows follow the client's own label mix to within one
    row per class, as personalised-FL papers draw a client's test data (Ditto, FedAMP). A
    positive fraction holds out at least one row; every client keeps one row to train on.

    Args:
        labels: (num_rows,) labels of the task's train split.
        num_clients: clients holding this task (>= 1).
        samples: rows per client, its test and validation rows included; capped at an equal
            share.
        scheme: "iid" (equal random shares) or "dirichlet" (per-class shares ~ Dir(alpha)).
        alpha: Dirichlet concentration.
        val_fraction: share of each client's rows held out as its validation split.
        test_fraction: share of each client's rows held out as its local test.
        seed: seed (or seed sequence) of the generator.

    Returns:
        One ``ClientSplit`` per client; all indices disjoint.
    """
    if num_clients < 1:
        raise AtlasError(f"clients_per_task = {num_clients} is invalid; allowed: >= 1")
    check_choice("partition scheme", scheme, Partition)
    rng = np.random.default_rng(seed)
    per_client = min(samples, len(labels) // num_clients)
    if per_client < 1:
        raise AtlasError(f"{len(labels)} training rows cannot be split over {num_clients} clients")
    pool = rng.permutation(len(labels))[: per_client * num_clients]
    classes = _class_ids(labels)
    if scheme == "iid":
        parts = np.split(pool, num_clients)
    else:
        parts = _dirichlet(pool, classes[pool], num_clients, alpha, rng)
    out = []
    for part in parts:
        part = rng.permutation(part)
        num_test = _held_out(test_fraction, len(part), len(part) - 1)
        num_val = _held_out(val_fraction, len(part), len(part) - 1 - num_test)
        test, rest = stratified_take(part, classes[part], num_test, rng)
        val, train = stratified_take(rest, classes[rest], num_val, rng)
        out.append(ClientSplit(np.sort(train), np.sort(val), np.sort(test)))
    return out


def _held_out(fraction: float, rows: int, at_most: int) -> int:
    """Rows a positive fraction holds out: at least one, and never the client's last to train."""
    if fraction <= 0:
        return 0
    return max(0, min(max(1, round(fraction * rows)), at_most))


def stratified_take(rows: np.ndarray, classes: np.ndarray, count: int, rng: np.random.Generator
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into ``count`` taken and the rest, each class in proportion.

    Class c of n_c rows (of n) gets floor(count n_c / n) rows, and the rows still owed go to the
    classes with the largest remainders (Hamilton's method, ties to the lower class id), so every
    class's share is within one row of its exact quota count n_c / n. Which rows of a class are
    taken is drawn from ``rng``.
    """
    if count <= 0:
        return rows[:0], rows
    ids, counts = np.unique(classes, return_counts=True)
    quota = count * counts / len(rows)
    take = np.floor(quota).astype(int)
    owed = count - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:owed]] += 1
    taken = [rng.permutation(rows[classes == c])[:k] for c, k in zip(ids, take, strict=True)]
    chosen = np.concatenate(taken) if taken else rows[:0]
    return chosen, rows[~np.isin(rows, chosen)]


def _dirichlet(pool: np.ndarray, classes: np.ndarray, num_clients: int, alpha: float,
               rng: np.random.Generator, min_rows: int = 2, max_tries: int = 100
               ) -> list[np.ndarray]:
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in np.unique(classes):
            rows = pool[classes == c]
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for k, chunk in enumerate(np.split(rows, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_rows:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise AtlasError(f"Dirichlet partition with alpha={alpha} left a client with fewer than "
                     f"{min_rows} rows in {max_tries} draws; raise data.alpha or data.samples")
