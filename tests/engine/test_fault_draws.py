"""Simulated failures by hand: seeded draws, simulated time, and the channel that applies them."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from atlasfl.config import FaultsConfig
from atlasfl.devices import BUILTIN_PROFILES
from atlasfl.engine.faults import (
    ClientVanished,
    Fault,
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
        assert round_idx == 1  # every message is carried in its own round
        self.carried.append((client_id, direction, type(message).__name__))
        return message


def _faulty(cfg, messages=4, devices=None):
    inner = _Counting()

    def count(plan):  # only a split plan's training sends split messages
        assert plan.split is not None, plan
        return messages
    return inner, FaultyChannel(inner, cfg, seed=3, devices=devices or {}, messages=count)


SPLIT = SplitPlan(cut=1, tail=0, activation_dtype="float32", server_model="all", outputs=2)


def _activations(cid, evaluating=False):
    return Activations(cid, torch.zeros(1, 2, 3), evaluating=evaluating)


def test_a_plan_that_never_arrives_is_not_carried():
    inner, channel = _faulty(FaultsConfig(drop_before=1.0))
    with pytest.raises(ClientVanished, match="^vanished before training$"):
        channel.send(1, 0, "down", Train(0))
    assert inner.carried == []
    channel.send(1, 0, "down", Evaluate(0))  # only Train plans fail
    assert inner.carried == [(0, "down", "Evaluate")]


def test_a_client_vanishing_after_training_never_uploads_and_its_next_plan_is_clean():
    inner, channel = _faulty(FaultsConfig(drop_during=1.0))
    channel.send(1, 0, "down", Train(0))
    reply = TrainReply(0, Update(0, {"a": torch.ones(2)}, {}, 5))
    with pytest.raises(ClientVanished, match="^vanished after training, before its upload$"):
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


def _uniforms_and_normal(seed, round_idx, client_id):
    """The documented stream: (seed, round, client, crc32("faults")), two uniforms, a normal."""
    rng = np.random.default_rng([seed, round_idx, client_id, zlib.crc32(b"faults")])
    return rng.random(), rng.random(), rng.standard_normal()


def test_a_fault_is_drawn_from_the_seeded_stream_by_hand():
    cfg = FaultsConfig(drop_before=0.3, drop_during=0.4)
    kinds = set()
    for cid in range(40):
        u, fraction, _ = _uniforms_and_normal(5, 2, cid)
        want = (Fault("before", 0.0) if u < 0.3 else Fault("during", fraction) if u < 0.7
                else None)
        assert draw_fault(cfg, seed=5, round_idx=2, client_id=cid) == want
        kinds.add(None if want is None else want.kind)
    assert kinds == {None, "before", "during"}


def test_simulated_seconds_with_jitter_by_hand():
    cfg = FaultsConfig(step_seconds=0.5, jitter=0.3)
    phone = BUILTIN_PROFILES["cpu-2gb"]  # compute 0.1, uplink 5 Mbit/s
    _, _, z = _uniforms_and_normal(2, 3, 4)
    seconds = simulated_seconds(cfg, phone, steps=7, bytes_up=10**9, seed=2, round_idx=3,
                                client_id=4)
    assert seconds == pytest.approx(7 * 0.5 / 0.1 * math.exp(0.3 * z) + 8e9 / 5e6, rel=1e-12)


def _reply(cid, steps=None, update=True):
    record = {} if steps is None else {"steps": steps}
    return TrainReply(cid, Update(cid, {"a": torch.ones(2)}, {}, 5) if update else None, record)


def test_the_deadline_by_hand_at_its_edge_and_what_it_leaves_alone():
    phone = BUILTIN_PROFILES["cpu-2gb"]
    exact = simulated_seconds(FaultsConfig(jitter=0.0), phone, steps=12, bytes_up=8, seed=3,
                              round_idx=1, client_id=0)
    _, at_edge = _faulty(FaultsConfig(deadline_seconds=exact, jitter=0.0), devices={0: phone})
    at_edge.send(1, 0, "down", Train(0))
    assert at_edge.send(1, 0, "up", _reply(0, steps=12)).update is not None  # on time: <=
    _, half = _faulty(FaultsConfig(deadline_seconds=0.5, jitter=0.0), devices={0: phone})
    half.send(1, 0, "down", Train(0))
    assert half.send(1, 0, "up", _reply(0, steps=1)).update is None  # 5 s > 0.5 s
    half.send(1, 0, "down", Train(0))
    assert half.send(1, 0, "up", _reply(0)).update is not None  # no steps recorded: upload only
    half.send(1, 0, "down", Train(0))
    refused = half.send(1, 0, "up", _reply(0, steps=100, update=False))
    assert refused.update is None and "late" not in refused.record  # nothing to be late
    half.send(1, 0, "down", Evaluate(0))
    assert half.send(1, 0, "up", EvaluateReply(0, {"x": 1.0})).record == {"x": 1.0}
    _, off = _faulty(FaultsConfig(deadline_seconds=0.0, drop_before=0.5, jitter=0.0),
                     devices={3: phone})
    fate = draw_fault(FaultsConfig(drop_before=0.5), seed=3, round_idx=1, client_id=3)
    assert fate is None  # client 3 trains in round 1
    off.send(1, 3, "down", Train(3))
    assert off.send(1, 3, "up", _reply(3, steps=100)).update is not None  # no deadline


def test_a_split_client_late_in_its_training_fails_at_its_last_message():
    cfg = FaultsConfig(drop_during=1.0)
    cid = next(c for c in range(100) if draw_fault(cfg, seed=3, round_idx=1, client_id=c)
               .fraction >= 0.5)  # int(2 fraction) = 1: one of its 2 messages goes out
    inner, channel = _faulty(cfg, messages=2)
    channel.send(1, cid, "down", Train(cid, split=SPLIT))
    channel.send(1, cid, "up", _activations(cid))
    with pytest.raises(ClientVanished, match="^vanished during training, after 1 of 2 split "
                                            "messages$"):
        channel.send(1, cid, "up", _activations(cid))
