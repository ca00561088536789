"""train.precision: what auto resolves to, what runs in bf16, and resume across machines."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from atlasfl.client import training
from atlasfl.client.training import autocast, bf16_fast, resolve_precision
from atlasfl.config import check_same_experiment
from atlasfl.engine import RunDir, build_experiment, load_checkpoint, run_experiment
from atlasfl.errors import AtlasError

CPU = torch.device("cpu")


@pytest.fixture
def fast(monkeypatch):
    """Set what ``bf16_fast`` answers (cached per device type, so patched where it is used)."""
    def set_to(value: bool) -> None:
        monkeypatch.setattr(training, "bf16_fast", lambda device_type: value)
    return set_to


@pytest.mark.parametrize(("asked", "is_fast", "expected"), [
    ("auto", True, "bf16"), ("auto", False, "fp32"),
    ("fp32", True, "fp32"), ("bf16", False, "bf16"),
])
def test_auto_follows_the_machine_and_an_explicit_choice_wins(fast, asked, is_fast, expected):
    fast(is_fast)
    assert resolve_precision(asked, CPU) == expected


def test_bf16_fast_reads_torchs_cpu_probes(monkeypatch):
    bf16_fast.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert bf16_fast("cpu")
    bf16_fast.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not bf16_fast("cpu")
    assert not bf16_fast("mps")  # neither CUDA nor CPU: fp32
    bf16_fast.cache_clear()


def test_bf16_runs_the_products_and_the_weights_stay_fp32(fast):
    fast(True)
    layer = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(CPU, "auto"):
        y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32
    fast(False)
    with autocast(CPU, "auto"):
        assert layer(x).dtype == torch.float32


def test_a_run_records_its_precision_and_refuses_to_resume_under_another(
        fast, tiny_cfg, tmp_path):
    fast(True)
    cfg = tiny_cfg(**{"train.precision": "auto", "federation.rounds": 2, "out": str(tmp_path)})
    run_dir = RunDir.create(cfg)
    outcome = run_experiment(build_experiment(cfg.replace(**{"session.max_rounds": 1})), run_dir)
    assert outcome.summary is None  # stopped after round 1
    snapshot = load_checkpoint(outcome.checkpoint)
    assert snapshot.meta["precision"] == "bf16"

    fast(False)  # the same run continued on a machine without bf16 fast paths
    with pytest.raises(AtlasError, match=r"train.precision resolves to 'fp32'.*'bf16'"):
        run_experiment(build_experiment(cfg), run_dir, resume=snapshot)
    # pinned to what the checkpoint was trained in, it continues and says so in its summary
    pinned = cfg.replace(**{"train.precision": "bf16"})
    check_same_experiment(snapshot.config, pinned)  # auto against what it resolved to: allowed
    with pytest.raises(AtlasError, match="train.precision"):
        check_same_experiment(snapshot.config | {"train": {**snapshot.config["train"],
                                                           "precision": "fp32"}}, pinned)
    done = run_experiment(build_experiment(pinned), run_dir, resume=snapshot)
    assert done.summary["precision"] == "bf16"
    assert json.loads((run_dir.path / "summary.json").read_text())["precision"] == "bf16"


def test_a_checkpoint_from_before_precision_was_saved_resumes_as_fp32_on_cpu(
        fast, tiny_cfg, tmp_path):
    import hashlib

    from atlasfl.engine.checkpoint import MANIFEST, META

    fast(False)  # written when auto meant fp32 on CPU
    cfg = tiny_cfg(**{"train.precision": "auto", "federation.rounds": 2, "out": str(tmp_path)})
    run_dir = RunDir.create(cfg)
    outcome = run_experiment(build_experiment(cfg.replace(**{"session.max_rounds": 1})), run_dir)
    state = outcome.checkpoint / META
    meta = json.loads(state.read_text())
    del meta["precision"]  # as written before checkpoints recorded it
    state.write_text(json.dumps(meta))
    manifest = json.loads((outcome.checkpoint / MANIFEST).read_text())
    manifest["files"][META] = hashlib.sha256(state.read_bytes()).hexdigest()
    (outcome.checkpoint / MANIFEST).write_text(json.dumps(manifest))
    snapshot = load_checkpoint(outcome.checkpoint)

    fast(True)  # today auto is bf16 here: the old run must not switch precision silently
    with pytest.raises(AtlasError, match=r"resolves to 'bf16'.*trained in 'fp32'"):
        run_experiment(build_experiment(cfg), run_dir, resume=snapshot)
    pinned = cfg.replace(**{"train.precision": "fp32"})
    assert run_experiment(build_experiment(pinned), run_dir,
                          resume=snapshot).summary["precision"] == "fp32"


@pytest.mark.parametrize(("asked", "device", "recorded", "expected"), [
    ("auto", "cpu", "bf16", "bf16"),   # recorded wins
    ("auto", "cpu", None, "fp32"),     # before runs recorded it: auto was fp32 off CUDA
    ("auto", "cuda", None, "bf16"),    # and bf16 on CUDA
    ("auto", "cuda:1", None, "bf16"),  # a summary's device names the card
    ("bf16", "cpu", None, "bf16"),     # an explicit choice ran as asked
])
def test_precision_ran_by_hand(asked, device, recorded, expected):
    from atlasfl.config import precision_ran

    assert precision_ran(asked, device, recorded) == expected
