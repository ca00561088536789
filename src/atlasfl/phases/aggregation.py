"""Aggregation of client states.

``weighted_average`` is FedAvg's server step (McMahan et al., "Communication-Efficient Learning of
Deep Networks from Decentralized Data", arXiv:1602.05629): the example-weighted mean of every
tensor, for clients that hold tensors of equal shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atlasfl.errors import AtlasError
from atlasfl.types import AdapterState


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Return sum_i w_i * state_i / sum_i w_i for every tensor name.

    Args:
        states: client states with identical names and shapes.
        weights: non-negative weights (e.g. example counts), not all zero.

    Returns:
        A new state; inputs are not modified.
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states, {len(weights)}")
    total = float(sum(weights))
    if total <= 0 or min(weights) < 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise AtlasError(f"update {i} holds tensors {sorted(set(state) ^ set(keys))} that the "
                             f"first update does not (or the reverse); cannot average")
    out: AdapterState = {}
    for key in keys:
        ref = states[0][key]
        for state in states[1:]:
            if state[key].shape != ref.shape:
                raise AtlasError(f"tensor {key!r}: shapes {tuple(ref.shape)} and "
                                 f"{tuple(state[key].shape)} differ; use a mixed-rank aggregation")
        acc = torch.zeros_like(ref, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += state[key].to(torch.float64) * (w / total)
        out[key] = acc.to(ref.dtype)
    return out
