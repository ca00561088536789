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

The failures live in a channel (``FaultyChannel``) wrapped around the one that carries and counts
the messages: a plan that never arrives is refused at the channel (nothing counted), a vanishing
client's message raises ``ClientVanished`` where it would have been sent, and a late update is
taken out of its reply once it has arrived (its bytes were spent). Executors only catch
``ClientVanished`` and record it; they draw nothing.
"""

from __future__ import annotations

import math
import zlib
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from atlasfl.config import FaultsConfig
from atlasfl.devices import DeviceProfile
from atlasfl.engine.channel import Channel
from atlasfl.engine.ledger import state_bytes
from atlasfl.messages import Activations, Gradients, Logits, M, Train, TrainReply
from atlasfl.types import ClientId


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


def active(cfg: FaultsConfig) -> bool:
    """Whether any simulated failure can happen."""
    return cfg.drop_before > 0 or cfg.drop_during > 0 or cfg.deadline_seconds > 0


@dataclass
class _Fate:
    """A client's failure during its current Train plan."""

    fail_at: int  # split messages it sends before it vanishes
    total: int  # split messages its training makes
    sent: int = 0


class FaultyChannel:
    """``channel`` with simulated failures (``faults.*``); every other message passes as it is.

    ``messages(plan)``: the split messages (link calls) a client's training on ``plan`` makes, from
    which the message a client vanishing during training fails at is drawn.
    """

    def __init__(self, channel: Channel, cfg: FaultsConfig, *, seed: int,
                 devices: Mapping[ClientId, DeviceProfile], messages: Callable[[Train], int]):
        self.channel, self.cfg, self.seed = channel, cfg, seed
        self.devices, self.messages = devices, messages
        self._fates: dict[ClientId, _Fate] = {}

    def send(self, round_idx: int, client_id: ClientId, direction: str, message: M) -> M:
        """Carry ``message`` unless its client fails first (``ClientVanished``); see the class."""
        if direction == "down" and not isinstance(message, (Activations, Gradients, Logits)):
            self._fates.pop(client_id, None)  # a new plan: the last one's fate is over
        if isinstance(message, Train) and direction == "down":
            fault = draw_fault(self.cfg, seed=self.seed, round_idx=round_idx,
                               client_id=client_id)
            if fault is not None and fault.kind == "before":
                raise ClientVanished("vanished before training")
            if fault is not None:
                total = self.messages(message) if message.split is not None else 0
                # fraction < 1: it sends at least one message fewer than its training makes
                self._fates[client_id] = _Fate(int(fault.fraction * total), total)
        elif isinstance(message, (Activations, Gradients, Logits)) and direction == "up":
            fate = self._fates.get(client_id)
            if fate is not None:
                if fate.sent >= fate.fail_at:
                    raise ClientVanished(f"vanished during training, after {fate.sent} of "
                                         f"{fate.total} split messages")
                fate.sent += 1
        elif isinstance(message, TrainReply) and direction == "up":
            if self._fates.pop(client_id, None) is not None:
                raise ClientVanished("vanished after training, before its upload")
            return self._on_time(round_idx, self.channel.send(round_idx, client_id, direction,
                                                              message))
        return self.channel.send(round_idx, client_id, direction, message)

    def _on_time(self, round_idx: int, reply: M) -> M:
        """The reply, or without its update when it came after ``faults.deadline_seconds``."""
        cfg = self.cfg
        if cfg.deadline_seconds <= 0 or not isinstance(reply, TrainReply) or reply.update is None:
            return reply
        cid = reply.client_id
        seconds = simulated_seconds(
            cfg, self.devices[cid], steps=int(reply.record.get("steps", 0)),
            bytes_up=sum(state_bytes(t) for t in reply.payload().values()), seed=self.seed,
            round_idx=round_idx, client_id=cid)
        if seconds <= cfg.deadline_seconds:
            return reply
        late: M = dataclasses.replace(reply, update=None, record={  # type: ignore[assignment]
            **reply.record, "late": f"simulated {seconds:.1f} s > faults.deadline_seconds = "
                                    f"{cfg.deadline_seconds:g}"})
        return late
