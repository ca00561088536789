import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.data.glue import Examples
from atlasfl.data.partition import (
    _class_ids,
    _dirichlet,
    drop_test_overlap,
    partition,
    stratified_take,
)
from atlasfl.errors import AtlasError


def _all(splits):
    return np.concatenate([np.concatenate([s.train_idx, s.val_idx, s.test_idx]) for s in splits])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 400), clients=st.integers(1, 6), samples=st.integers(1, 80),
       scheme=st.sampled_from(["iid", "dirichlet"]), val=st.sampled_from([0.0, 0.2]),
       test=st.sampled_from([0.0, 0.2, 0.5]), seed=st.integers(0, 10))
def test_partition_is_disjoint_and_covers_the_pool(n, clients, samples, scheme, val, test, seed):
    labels = np.arange(n) % 3
    per_client = min(samples, n // clients)
    try:
        splits = partition(labels, clients, samples, scheme=scheme, alpha=0.5,
                           val_fraction=val, test_fraction=test, seed=seed)
    except AtlasError:  # a Dirichlet draw that starves a client is refused loudly
        assert scheme == "dirichlet"
        return
    rows = _all(splits)
    assert len(splits) == clients
    assert len(np.unique(rows)) == len(rows)  # disjoint
    assert len(rows) == per_client * clients  # covers exactly the sampled pool
    assert rows.min() >= 0 and rows.max() < n
    for split in splits:  # the local test is held out of training and validation
        assert not set(split.test_idx) & (set(split.train_idx) | set(split.val_idx))
        assert len(split.train_idx) >= 1  # every client keeps a row to train on


@settings(max_examples=40, deadline=None)
@given(alpha=st.sampled_from([0.1, 0.5, 1.0]), fraction=st.sampled_from([0.1, 0.2, 0.35]),
       seed=st.integers(0, 20))
def test_a_local_test_follows_its_clients_label_mix_within_one_row_per_class(alpha, fraction,
                                                                            seed):
    labels = np.arange(3000) % 4
    splits = partition(labels, 5, 300, scheme="dirichlet", alpha=alpha, val_fraction=0.1,
                       test_fraction=fraction, seed=seed)
    for split in splits:
        whole = np.concatenate([split.train_idx, split.val_idx, split.test_idx])
        own = np.bincount(labels[whole], minlength=4)  # the client's label mix, in rows
        held = np.bincount(labels[split.test_idx], minlength=4)
        quota = len(split.test_idx) * own / len(whole)  # its exact share of each class
        assert np.all(np.abs(held - quota) < 1)  # by construction, not on average
        assert len(split.test_idx) == max(1, round(fraction * len(whole)))


def test_stratified_take_by_hand():
    rows = np.arange(10, 20)
    classes = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])  # 6 / 3 / 1 of 10 rows
    taken, rest = stratified_take(rows, classes, 5, np.random.default_rng(0))
    # quotas 3.0, 1.5, 0.5: floors 3, 1, 0 and one row owed; the remainders tie at 0.5, so
    # the lower class id gets it: 3, 2, 0
    assert np.bincount(classes[np.isin(rows, taken)], minlength=3).tolist() == [3, 2, 0]
    assert sorted([*taken, *rest]) == rows.tolist()
    none, everything = stratified_take(rows, classes, 0, np.random.default_rng(0))
    assert len(none) == 0 and everything.tolist() == rows.tolist()


def test_stratified_take_breaks_ties_to_the_lower_class_id_with_many_classes():
    # 40 classes of 5, 2, 5, 2, ... rows (140): a take of 14 has quotas 0.5 and 0.2, every floor
    # is 0 and 14 rows are owed. Twenty classes tie at 0.5; the 14 lowest ids of them get a row.
    # (numpy's default argsort is not stable at this length: it would pick others.)
    sizes = [5, 2] * 20
    classes = np.repeat(np.arange(40), sizes)
    rows = np.arange(len(classes))
    taken, _ = stratified_take(rows, classes, 14, np.random.default_rng(0))
    assert sorted(classes[taken].tolist()) == list(range(0, 28, 2))


def test_stratified_take_from_no_rows_takes_nothing():
    empty = np.arange(0)
    taken, rest = stratified_take(empty, empty, 3, np.random.default_rng(0))
    assert len(taken) == 0 and len(rest) == 0


@pytest.mark.parametrize("rows, val, test, sizes", [
    (10, 0.1, 0.2, (7, 1, 2)),
    (10, 0.0, 0.2, (8, 0, 2)),
    (3, 0.5, 0.5, (1, 0, 2)),  # round(1.5) = 2 test rows, then the last row is kept to train
    (2, 0.1, 0.1, (1, 0, 1)),  # the test takes its one row; nothing is left for validation
    (1, 0.1, 0.2, (1, 0, 0)),  # one row stays a training row whatever the fractions
])
def test_rows_per_client_train_validation_and_local_test(rows, val, test, sizes):
    splits = partition(np.zeros(2 * rows, dtype=int), 2, rows, val_fraction=val,
                       test_fraction=test, seed=3)
    assert [(len(s.train_idx), len(s.val_idx), len(s.test_idx)) for s in splits] == [sizes] * 2


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


def test_regression_scores_are_binned_into_quintiles():
    # quantiles of 0..9 at 20/40/60/80%: 1.8, 3.6, 5.4, 7.2 -> two scores per bin
    assert _class_ids(np.arange(10, dtype=np.float32)).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert _class_ids(np.array([2, 0, 1])).tolist() == [2, 0, 1]  # classes stay as they are


def test_train_rows_whose_text_is_in_the_test_split_are_dropped():
    train = Examples([("a ",), ("b",), ("c", "d")], np.array([0, 1, 0]))
    test = Examples([(" a",), ("c", "d ")], np.array([1, 1]))
    kept, dropped = drop_test_overlap(train, test)
    assert kept.texts == [("b",)] and kept.labels.tolist() == [1] and dropped == 2


def test_partition_errors_name_the_problem():
    with pytest.raises(AtlasError, match=r"^3 training rows cannot be split over 4 clients$"):
        partition(np.zeros(3, dtype=int), 4, 5)
    with pytest.raises(AtlasError, match=r"^partition scheme = 'skew' is invalid; allowed: "
                                         r"iid, dirichlet$"):
        partition(np.zeros(10, dtype=int), 2, 5, scheme="skew")


@pytest.mark.parametrize("rows, fraction, num_val", [
    (1, 0.9, 0),  # one row stays a training row whatever the fraction
    (5, 0.0, 0),  # no fraction, no validation rows
    (2, 0.1, 1),  # round(0.2) = 0, but a positive fraction holds out at least one row
    (10, 0.04, 1),  # round(0.4) = 0: one row, not more
    (10, 0.26, 3),  # round(2.6) = 3
])
def test_validation_rows_per_client(rows, fraction, num_val):
    splits = partition(np.zeros(3 * rows, dtype=int), 3, rows, val_fraction=fraction, seed=1)
    assert [(len(s.train_idx), len(s.val_idx)) for s in splits] == [(rows - num_val, num_val)] * 3


def test_no_validation_rows_by_default():
    splits = partition(np.zeros(20, dtype=int), 2, 10, seed=0)
    assert [(len(s.train_idx), len(s.val_idx)) for s in splits] == [(10, 0)] * 2


@pytest.mark.parametrize("rows, fraction", [(2, 0.9), (2, 0.75), (4, 0.99)])
def test_a_client_keeps_at_least_one_training_row(rows, fraction):
    # round(fraction * rows) == rows would hold out every row
    splits = partition(np.zeros(2 * rows, dtype=int), 2, rows, val_fraction=fraction, seed=0)
    assert [(len(s.train_idx), len(s.val_idx)) for s in splits] == [(1, rows - 1)] * 2


def test_dirichlet_defaults_are_alpha_one_half_and_seed_zero():
    labels = np.arange(200) % 2
    default = partition(labels, 2, 50, scheme="dirichlet")
    explicit = partition(labels, 2, 50, scheme="dirichlet", alpha=0.5, seed=0)
    assert all(np.array_equal(a.train_idx, b.train_idx)
               for a, b in zip(default, explicit, strict=True))


class _Shares:
    """A generator stand-in whose Dirichlet draws are fixed shares."""

    def __init__(self, shares):
        self.shares, self.alphas = np.asarray(shares), []

    def dirichlet(self, alpha):
        self.alphas.append(alpha.tolist())
        return self.shares


def test_dirichlet_needs_two_rows_per_client_and_gives_up_after_100_draws():
    rng = _Shares([1 / 3, 2 / 3])  # 2 and 4 of 6 rows: exactly the minimum
    parts = _dirichlet(np.arange(6), np.zeros(6, dtype=int), 2, 0.5, rng)
    assert [len(p) for p in parts] == [2, 4] and len(rng.alphas) == 1
    rng = _Shares([1 / 6, 5 / 6])  # one row for the first client, every time
    with pytest.raises(AtlasError, match=r"^Dirichlet partition with alpha=0.5 left a client with "
                                         r"fewer than 2 rows in 100 draws; raise data.alpha or "
                                         r"data.samples$"):
        _dirichlet(np.arange(6), np.zeros(6, dtype=int), 2, 0.5, rng)
    assert len(rng.alphas) == 100
