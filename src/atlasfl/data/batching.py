"""Tokenize once, then batch with dynamic padding (padding to a fixed length costs ~4x on CPU).

Training batches are shuffled; with ``bucket`` > 0 the rows of each chunk of ``bucket`` batches
are sorted by length before the chunk is cut into batches, and the batches' order is shuffled
again, so a batch holds rows of similar length (less padding) while every row is still seen once
per epoch in a seeded order. ``pad_multiple`` rounds each batch's length up to a multiple, so the
activation shapes come from a small fixed set (the allocator reuses their blocks).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from atlasfl.data.glue import Examples


class TokenizedSet:
    """Token ids of every row (unpadded) and the labels.

    Rows are kept packed, one flat int32 array with row offsets (4 bytes a token, and token
    types 1 byte), not as Python lists (~36 bytes a token): with a thousand clients the
    tokenised rows would otherwise outweigh the clients' adapters many times.
    """

    def __init__(self, input_ids: Sequence[Sequence[int]],
                 token_type_ids: Sequence[Sequence[int]] | None, labels: np.ndarray,
                 pad_id: int):
        lengths = np.fromiter((len(row) for row in input_ids), dtype=np.int64,
                              count=len(input_ids))
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.ids = np.fromiter(itertools.chain.from_iterable(input_ids), dtype=np.int32,
                               count=int(self.offsets[-1]))
        self.types = None if token_type_ids is None else np.fromiter(
            itertools.chain.from_iterable(token_type_ids), dtype=np.int8,
            count=int(self.offsets[-1]))
        self.labels, self.pad_id = labels, pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Tokens of each row."""
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        """The token ids of row ``i``."""
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    def collate(self, idx: np.ndarray | list[int], *, pad_multiple: int = 1
                ) -> dict[str, Tensor]:
        """Right-padded batch of the rows at ``idx``, its length a multiple of ``pad_multiple``."""
        lengths = self.lengths[np.asarray(idx)]
        length = int(lengths.max())
        length = -(-length // pad_multiple) * pad_multiple
        ids = torch.full((len(idx), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        types = torch.zeros((len(idx), length), dtype=torch.long) if self.types is not None \
            else None
        for row, (i, n) in enumerate(zip(idx, lengths, strict=True)):
            start = self.offsets[i]
            ids[row, :n] = torch.from_numpy(self.ids[start : start + n])
            mask[row, :n] = 1
            if types is not None:
                assert self.types is not None
                types[row, :n] = torch.from_numpy(self.types[start : start + n])
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.as_tensor(self.labels[np.asarray(idx)])}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def length_order(self) -> np.ndarray:
        """Row indices sorted by length: evaluation batches then carry little padding."""
        return np.argsort(self.lengths, kind="stable")

    def batches(self, batch_size: int, *, generator: torch.Generator | None = None,
                bucket: int = 0, pad_multiple: int = 1) -> Iterator[dict[str, Tensor]]:
        """Shuffled batches when ``generator`` is given, else length-sorted (for evaluation).

        ``bucket`` > 0 (training): rows sorted by length within chunks of ``bucket`` batches,
        then the batches shuffled; both draws come from ``generator``.
        """
        for idx in self.batch_indices(batch_size, generator=generator, bucket=bucket):
            yield self.collate(idx, pad_multiple=pad_multiple)

    def batch_indices(self, batch_size: int, *, generator: torch.Generator | None = None,
                      bucket: int = 0) -> list[np.ndarray]:
        """The row indices of each batch ``batches`` yields, in order."""
        if generator is None:
            order = self.length_order()
            return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        order = torch.randperm(len(self), generator=generator).numpy()
        if bucket <= 0:
            return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        lengths = self.lengths
        chunk = bucket * batch_size
        out: list[np.ndarray] = []
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            rows = rows[np.argsort(lengths[rows], kind="stable")]
            out.extend(rows[s : s + batch_size] for s in range(0, len(rows), batch_size))
        shuffle = torch.randperm(len(out), generator=generator).numpy()
        return [out[i] for i in shuffle]


def tokenize(examples: Examples, tokenizer, *, max_length: int, use_token_types: bool
             ) -> TokenizedSet:
    """Tokenize single sentences or sentence pairs, truncating to ``max_length``."""
    if len(examples) == 0:  # e.g. a client's validation split when val_fraction is 0
        return TokenizedSet([], [] if use_token_types else None, examples.labels,
                            int(tokenizer.pad_token_id))
    columns = list(zip(*examples.texts, strict=True))
    if len(columns) == 1:
        enc = tokenizer(list(columns[0]), truncation=True, max_length=max_length)
    else:
        enc = tokenizer(list(columns[0]), list(columns[1]), truncation=True,
                        max_length=max_length)
    types = enc.get("token_type_ids") if use_token_types else None
    return TokenizedSet(enc["input_ids"], types, examples.labels, int(tokenizer.pad_token_id))
