"""Training batches: plain shuffles, length buckets, padded shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlasfl.data.batching import TokenizedSet

# 40 rows whose lengths are a seeded jumble of 1..40
LENGTHS = np.random.default_rng(3).permutation(np.arange(1, 41))
DATA = TokenizedSet([[7] * n for n in LENGTHS], None, np.arange(40) % 2, pad_id=0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_without_buckets_the_batches_are_the_seeded_permutation_cut_in_order():
    order = torch.randperm(40, generator=_gen()).numpy()
    got = DATA.batch_indices(8, generator=_gen())
    assert [b.tolist() for b in got] == [order[s:s + 8].tolist() for s in range(0, 40, 8)]


def test_buckets_sort_each_chunk_by_length_then_shuffle_the_batches():
    order = torch.randperm(40, generator=_gen()).numpy()
    got = DATA.batch_indices(4, generator=_gen(), bucket=3)  # chunks of 12, 12, 12, 4 rows
    assert sorted(np.concatenate(got).tolist()) == list(range(40))  # each row once
    assert [len(b) for b in got] == [4] * 10
    chunks = [order[s:s + 12] for s in range(0, 40, 12)]
    expected = []  # by hand: each chunk sorted by length, cut into batches of 4
    for chunk in chunks:
        rows = sorted(chunk.tolist(), key=lambda i: LENGTHS[i])
        expected += [rows[s:s + 4] for s in range(0, len(rows), 4)]
    assert sorted(b.tolist() for b in got) == sorted(expected)
    assert [b.tolist() for b in got] != expected  # the batches' order is shuffled
    assert [b.tolist() for b in got] == [b.tolist() for b in
                                         DATA.batch_indices(4, generator=_gen(), bucket=3)]
    other = DATA.batch_indices(4, generator=_gen(1), bucket=3)
    assert [b.tolist() for b in other] != [b.tolist() for b in got]


def test_buckets_cut_the_padding():
    def padded(batches):
        return sum(len(b) * max(LENGTHS[b]) for b in batches)
    plain = padded(DATA.batch_indices(4, generator=_gen()))
    bucketed = padded(DATA.batch_indices(4, generator=_gen(), bucket=5))
    assert LENGTHS.sum() <= bucketed < plain


@pytest.mark.parametrize("multiple,expected", [(1, 5), (4, 8), (8, 8), (16, 16)])
def test_pad_multiple_rounds_the_batch_length_up(multiple, expected):
    data = TokenizedSet([[5, 6, 7], [8, 9, 1, 2, 3]], [[0, 0, 0], [0, 0, 1, 1, 1]],
                        np.array([1, 0]), pad_id=0)
    batch = data.collate([0, 1], pad_multiple=multiple)
    assert batch["input_ids"].shape == (2, expected)
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * (expected - 3),
                                                [1] * 5 + [0] * (expected - 5)]
    assert batch["input_ids"][1, :5].tolist() == [8, 9, 1, 2, 3]
    assert batch["token_type_ids"][1].tolist() == [0, 0, 1, 1, 1] + [0] * (expected - 5)


def test_rows_are_packed_four_bytes_a_token_and_read_back_exactly():
    rows = [[101, 30521, 7], [], [5] * 4]
    data = TokenizedSet(rows, [[0, 1, 1], [], [1] * 4], np.array([1, 0, 1]), pad_id=0)
    assert [data.row(i).tolist() for i in range(3)] == rows
    assert data.lengths.tolist() == [3, 0, 4]
    assert data.ids.nbytes == 4 * 7 and data.types is not None and data.types.nbytes == 7
    batch = data.collate([2, 0])
    assert batch["input_ids"].tolist() == [[5, 5, 5, 5], [101, 30521, 7, 0]]
    assert batch["token_type_ids"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 0]]
    assert batch["input_ids"].dtype == torch.long and batch["labels"].tolist() == [1, 1]
