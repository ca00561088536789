"""Sequence classification head: pooling + dropout + linear, owned per client.

Pooling follows what each family was trained for: mean over real tokens for sentence encoders
(all-MiniLM-L6-v2 was trained with mean pooling), the first token for ``cls``, and the last real
token for decoders, as Hugging Face's ``*ForSequenceClassification`` does for GPT-2 and Llama.
Rows are right-padded, so the last real token sits at ``attention_mask.sum(1) - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from atlasfl.errors import choices
from atlasfl.types import HeadPooling

POOLINGS: tuple[str, ...] = choices(HeadPooling)


def pool(hidden: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """Pool (batch, seq, hidden) states into (batch, hidden)."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.sum(1).long() - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling {pooling!r} not in {POOLINGS}")


class ClassificationHead(nn.Module):
    """Pool, dropout, linear: (batch, seq, hidden) -> (batch, num_labels)."""

    def __init__(self, hidden_size: int, num_labels: int, *, pooling: str, dropout: float):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} not in {POOLINGS}")
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:  # noqa: D102
        return self.out(self.dropout(pool(hidden, attention_mask, self.pooling)))


def init_head(hidden_size: int, num_labels: int, *, pooling: str, dropout: float, seed: int
              ) -> ClassificationHead:
    """A head with the seeded initialisation every client of a label space starts from."""
    gen = torch.Generator().manual_seed(seed)
    head = ClassificationHead(hidden_size, num_labels, pooling=pooling, dropout=dropout)
    with torch.no_grad():
        head.out.weight.normal_(0.0, 0.02, generator=gen)  # as HF initialises classifiers
        head.out.bias.zero_()
    return head
