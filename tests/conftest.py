"""Shared fixtures: the real GLUE folder beside the checkout and tiny-model configs."""

from __future__ import annotations

import os
from pathlib import Path

# Tests never reach the Hugging Face hub: a failed lookup must fail fast, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Flower (tests marked flower): no telemetry, no update checks, no installs at run time.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

import pytest

from atlasfl.config import from_dict
from atlasfl.data.glue import default_data_root

GLUE = default_data_root()


@pytest.fixture(autouse=True)
def _auto_precision_is_fp32(monkeypatch):
    """``train.precision=auto`` resolves to fp32 in the test process, whatever the CPU.

    auto is bf16 on CPUs with bf16 fast paths; hand-computed values and comparisons between
    runs must not depend on the machine the tests run on. Tests of auto itself patch it again
    (tests/client/test_precision.py); runs in subprocesses compare with each other only.
    """
    from atlasfl.client import training

    monkeypatch.setattr(training, "bf16_fast", lambda device_type: False)


@pytest.fixture(scope="session")
def glue_root() -> Path:
    if GLUE is None:
        pytest.fail("the shared GLUE folder ../shared/data/glue is missing beside the checkout")
    return GLUE


def tiny_config(**dotted):
    """A fast experiment: tiny-bert, two small tasks, two clients each (18 rows to train on)."""
    raw = {
        "method": "fedavg", "seed": 0, "progress": False,
        "model": {"name": "tiny-bert", "pooling": "mean"},
        "data": {"tasks": ["cola", "mrpc"], "clients_per_task": 2, "samples": 32,
                 "eval_samples": 32, "val_fraction": 0.25, "max_length": 32},
        # fp32 pinned: ``auto`` is bf16 on CPUs with bf16 fast paths, and hand-computed values
        # and bit-identity must not depend on the machine that runs the tests
        "train": {"batch_size": 8, "lr": 0.01, "precision": "fp32"},
        "federation": {"rounds": 1},
    }
    return from_dict(raw).replace(**dotted)


@pytest.fixture
def tiny_cfg():
    return tiny_config


def record_updates(exp):
    """Wrap the strategy's aggregation: returns a list that gets, per round, the uploaded
    updates as the server received them ({client id: Update}, arrival order kept)."""
    from atlasfl.messages import TrainReply

    seen = []
    original = exp.strategy.aggregate_round

    def record(state, rnd, replies, served=None):
        if replies and isinstance(replies[0], TrainReply):
            seen.append({r.client_id: r.update for r in replies if r.update is not None})
        return original(state, rnd, replies, served)

    exp.strategy.aggregate_round = record
    return seen


@pytest.fixture
def updates_of():
    return record_updates


def weak_device_memory(tiny_cfg, exp_cfg_kwargs):
    """GiB of a device that holds a tiny-bert client part (cut 0) but not the whole model."""
    from atlasfl.engine import build_experiment
    from atlasfl.strategies.rank_plan import memory_of

    probe = build_experiment(tiny_cfg(method="homolora", **{**exp_cfg_kwargs,
                                                            "devices.profiles": ["gpu-16gb"]}))
    ctx = probe.strategy.ctx
    whole = memory_of(ctx, 0)(ctx.initial_ranks)
    part = memory_of(ctx, 0, (0, 0))(ctx.initial_ranks)
    assert part < whole
    return (part + whole) / 2 / 2**30


@pytest.fixture
def weak_device():
    return weak_device_memory
