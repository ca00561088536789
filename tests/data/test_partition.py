import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.data.partition import partition
from atlasfl.errors import AtlasError


def _all(splits):
    return np.concatenate([np.concatenate([s.train_idx, s.val_idx]) for s in splits])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), clients=st.integers(1, 6), samples=st.integers(1, 80),
       scheme=st.sampled_from(["iid", "dirichlet"]), val=st.sampled_from([0.0, 0.2]),
       seed=st.integers(0, 10))
def test_partition_is_disjoint_and_covers_the_pool(n, clients, samples, scheme, val, seed):
    labels = np.arange(n) % 3
    per_client = min(samples, n // clients)
    try:
        splits = partition(labels, clients, samples, scheme=scheme, alpha=0.5,
                           val_fraction=val, seed=seed)
    except AtlasError:  # a Dirichlet draw that starves a client is refused loudly
        assert scheme == "dirichlet"
        return
    rows = _all(splits)
    assert len(splits) == clients
    assert len(np.unique(rows)) == len(rows)  # disjoint
    assert len(rows) == per_client * clients  # covers exactly the sampled pool
    assert rows.min() >= 0 and rows.max() < n


def test_iid_gives_equal_shares_and_carves_validation():
    splits = partition(np.zeros(100, dtype=int), 4, 20, val_fraction=0.25, seed=0)
    assert [len(s.train_idx) for s in splits] == [15] * 4
    assert [len(s.val_idx) for s in splits] == [5] * 4


def test_same_seed_same_partition_other_seed_other():
    labels = np.arange(300) % 2
    a = partition(labels, 3, 50, scheme="dirichlet", alpha=0.5, seed=1)
    b = partition(labels, 3, 50, scheme="dirichlet", alpha=0.5, seed=1)
    c = partition(labels, 3, 50, scheme="dirichlet", alpha=0.5, seed=2)
    assert all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, c, strict=True))


def test_dirichlet_small_alpha_skews_labels():
    labels = np.arange(3000) % 2
    splits = partition(labels, 5, 400, scheme="dirichlet", alpha=0.1, seed=0)
    shares = [labels[s.train_idx].mean() for s in splits]
    assert max(shares) - min(shares) > 0.5  # far from the IID 0.5 everywhere


def test_bad_client_count_is_refused():
    with pytest.raises(AtlasError, match="clients_per_task = 0"):
        partition(np.zeros(10, dtype=int), 0, 5)
