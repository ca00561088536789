"""Simulated failures by hand: seeded draws, simulated time, and the channel that applies them."""

from __future__ import annotations

import math

import pytest
import torch

from atlasfl.config import FaultsConfig
from atlasfl.devices import BUILTIN_PROFILES
from atlasfl.engine.faults import (
    ClientVanished,
    FaultyChannel,
    active,
    draw_fault,
    simulated_seconds,
)
from atlasfl.messages import (
    Activations,
    Evaluate,
    EvaluateReply,
    SplitPlan,
    Train,
    TrainReply,
    Update,
)


def test_faults_are_drawn_per_round_and_client_at_their_rates():
    cfg = FaultsConfig(drop_before=0.2, drop_during=0.1)
    draws = [draw_fault(cfg, seed=3, round_idx=r, client_id=c)
             for r in range(1, 101) for c in range(20)]
    before = sum(d is not None and d.kind == "before" for d in draws)
    during = sum(d is not None and d.kind == "during" for d in draws)
    n = len(draws)  # 2000: 3 SD of a binomial count is ~54 at p 0.2, ~40 at p 0.1
    assert abs(before - 0.2 * n) < 3 * math.sqrt(n * 0.2 * 0.8)
    assert abs(during - 0.1 * n) < 3 * math.sqrt(n * 0.1 * 0.9)
    assert draws[7] == draw_fault(cfg, seed=3, round_idx=1, client_id=7)  # a function of its key
    assert draw_fault(FaultsConfig(), seed=3, round_idx=1, client_id=7) is None


def test_simulated_time_is_compute_over_speed_plus_upload():
    cfg = FaultsConfig(step_seconds=0.5, jitter=0.0)
    phone = BUILTIN_PROFILES["cpu-2gb"]  # compute 0.1, uplink 5 Mbit/s
    seconds = simulated_seconds(cfg, phone, steps=12, bytes_up=1_000_000, seed=0, round_idx=1,
                                client_id=0)
    assert seconds == pytest.approx(12 * 0.5 / 0.1 + 8e6 / 5e6)  # 60 s + 1.6 s


def test_faults_are_active_when_any_can_happen():
    assert not active(FaultsConfig())
    assert active(FaultsConfig(drop_before=0.1))
    assert active(FaultsConfig(drop_during=0.1))
    assert active(FaultsConfig(deadline_seconds=1.0))


class _Counting:
    """A channel that records what it carried."""

    def __init__(self):
        self.carried = []

    def send(self, round_idx, client_id, direction, message):
        self.carried.append((client_id, direction, type(message).__name__))
        return message


def _faulty(cfg, messages=4, devices=None):
    inner = _Counting()
    return inner, FaultyChannel(inner, cfg, seed=3, devices=devices or {},
                                messages=lambda plan: messages)


SPLIT = SplitPlan(cut=1, tail=0, activation_dtype="float32", server_model="all", outputs=2)


def _activations(cid, evaluating=False):
    return Activations(cid, torch.zeros(1, 2, 3), evaluating=evaluating)


def test_a_plan_that_never_arrives_is_not_carried():
    inner, channel = _faulty(FaultsConfig(drop_before=1.0))
    with pytest.raises(ClientVanished, match="vanished before training"):
        channel.send(1, 0, "down", Train(0))
    assert inner.carried == []
    channel.send(1, 0, "down", Evaluate(0))  # only Train plans fail
    assert inner.carried == [(0, "down", "Evaluate")]


def test_a_client_vanishing_after_training_never_uploads_and_its_next_plan_is_clean():
    inner, channel = _faulty(FaultsConfig(drop_during=1.0))
    channel.send(1, 0, "down", Train(0))
    reply = TrainReply(0, Update(0, {"a": torch.ones(2)}, {}, 5))
    with pytest.raises(ClientVanished, match="after training, before its upload"):
        channel.send(1, 0, "up", reply)
    channel.send(1, 0, "down", Evaluate(0))
    channel.send(1, 0, "up", EvaluateReply(0, {}))
    assert inner.carried == [(0, "down", "Train"), (0, "down", "Evaluate"),
                             (0, "up", "EvaluateReply")]


def test_a_split_client_vanishes_at_its_drawn_message_and_evaluates_afterwards():
    cfg = FaultsConfig(drop_during=1.0)
    fault = draw_fault(cfg, seed=3, round_idx=1, client_id=0)
    assert fault is not None and fault.kind == "during"
    fail_at = min(int(fault.fraction * 8), 7)  # of 8 link calls, at least one short
    inner, channel = _faulty(cfg, messages=8)
    channel.send(1, 0, "down", Train(0, split=SPLIT))
    for _ in range(fail_at):
        channel.send(1, 0, "up", _activations(0))
    with pytest.raises(ClientVanished, match=f"after {fail_at} of 8 split messages"):
        channel.send(1, 0, "up", _activations(0))
    assert [c for c in inner.carried if c[2] == "Activations"] == [(0, "up", "Activations")] \
        * fail_at
    channel.send(1, 0, "down", Evaluate(0, split=SPLIT))  # its evaluation is not the training
    for _ in range(10):
        channel.send(1, 0, "up", _activations(0, evaluating=True))
    other = _faulty(FaultsConfig(), messages=8)[1]  # no faults: every message passes
    other.send(1, 0, "down", Train(0, split=SPLIT))
    for _ in range(10):
        other.send(1, 0, "up", _activations(0))


def test_a_late_update_is_carried_then_taken_out_of_its_reply():
    phone, gpu = BUILTIN_PROFILES["cpu-2gb"], BUILTIN_PROFILES["gpu-16gb"]
    cfg = FaultsConfig(deadline_seconds=5.0, jitter=0.0)
    inner, channel = _faulty(cfg, devices={0: phone, 1: gpu})
    for cid in (0, 1):
        channel.send(1, cid, "down", Train(cid))
    late = channel.send(1, 0, "up", TrainReply(0, Update(0, {"a": torch.ones(2)}, {}, 5),
                                               {"steps": 12}))
    on_time = channel.send(1, 1, "up", TrainReply(1, Update(1, {"a": torch.ones(2)}, {}, 5),
                                                  {"steps": 12}))
    assert late.update is None and late.record["late"].startswith("simulated 60.0 s > ")
    assert on_time.update is not None and "late" not in on_time.record
    assert inner.carried[-2:] == [(0, "up", "TrainReply"), (1, "up", "TrainReply")]  # both sent
