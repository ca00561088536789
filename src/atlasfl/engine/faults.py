"""Simulated client failures: vanishing before or while training, and missing the deadline.

Each sampled client's fate in a round is drawn from a generator seeded by (seed, round, client),
never by the order clients run in, so a resumed run meets the same failures. ``faults.drop_before``
is the probability that the plan never arrives (the client keeps its model, nothing is sent);
``faults.drop_during`` that the client vanishes while training: a split client after a uniformly
drawn number of its per-batch messages (the server discards the unfinished batch), any other
client after training, before its upload. With ``faults.deadline_seconds`` > 0 a client's
simulated time is its optimizer steps x ``faults.step_seconds`` / its device's compute, times a
lognormal jitter, plus its upload over its device's uplink; an update later than the deadline
arrives but is discarded. Every event is recorded in the client's row with its reason.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from atlasfl.config import FaultsConfig
from atlasfl.devices import DeviceProfile


class ClientVanished(Exception):
    """Raised by a split client's link when the client vanishes mid-training (simulated)."""


@dataclass(frozen=True)
class Fault:
    """A client's failure in one round."""

    kind: Literal["before", "during"]
    fraction: float  # during: the share of its messages sent before it vanishes


def _rng(seed: int, round_idx: int, client_id: int) -> np.random.Generator:
    return np.random.default_rng([seed, round_idx, client_id, zlib.crc32(b"faults")])


def draw_fault(cfg: FaultsConfig, *, seed: int, round_idx: int, client_id: int
               ) -> Fault | None:
    """Whether (and how) a sampled client fails in this round; None: it does not."""
    if cfg.drop_before <= 0 and cfg.drop_during <= 0:
        return None
    rng = _rng(seed, round_idx, client_id)
    u, fraction = rng.random(), rng.random()
    if u < cfg.drop_before:
        return Fault("before", 0.0)
    if u < cfg.drop_before + cfg.drop_during:
        return Fault("during", fraction)
    return None


def simulated_seconds(cfg: FaultsConfig, device: DeviceProfile, *, steps: int, bytes_up: int,
                      seed: int, round_idx: int, client_id: int) -> float:
    """A client's simulated round time: compute (with jitter) plus its upload."""
    rng = _rng(seed, round_idx, client_id)
    rng.random(), rng.random()  # the draws of draw_fault, so both use independent numbers
    jitter = math.exp(cfg.jitter * float(rng.standard_normal()))
    compute = steps * cfg.step_seconds / device.compute * jitter
    return compute + bytes_up * 8 / (device.uplink_mbps * 1e6)
