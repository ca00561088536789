"""A run killed at an arbitrary moment (SIGKILL) or stopped by SIGTERM resumes to the same end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from atlasfl.engine import latest_checkpoint, load_checkpoint
from atlasfl.engine.simulation import without_timings

ARGS = ["run", "--model", "tiny-bert", "--tasks", "cola", "mrpc", "--clients-per-task", "2",
        "--samples", "160", "--eval-samples", "64", "--max-length", "48", "--rounds", "8",
        "--method", "fedavg-task", "--no-progress"]


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "atlasfl.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _final_clients(run: Path) -> dict:
    tensors = load_file(str(latest_checkpoint(run) / "state.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("client/")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    proc = _cli(*ARGS, "--out", str(out), "--run-name", "ref")
    assert proc.wait(timeout=600) == 0, proc.communicate()
    return out / "ref"


def _same_end(run: Path, reference: Path) -> None:
    a, b = _final_clients(run), _final_clients(reference)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    def strip(history):
        return [[without_timings(row) for row in rnd] for rnd in history]

    assert strip(load_checkpoint(run).meta["history"]) == strip(
        load_checkpoint(reference).meta["history"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_to_the_uninterrupted_end(tmp_path, reference, sig):
    proc = _cli(*ARGS, "--out", str(tmp_path), "--run-name", "cut")
    run = tmp_path / "cut"
    _wait_for(run / "checkpoints" / "round-000002", proc)
    proc.send_signal(sig)  # lands inside round 3 (or while saving it)
    code = proc.wait(timeout=120)
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), proc.communicate()
    assert not (run / "summary.json").exists(), "precondition: the run was cut short"
    stopped_at = load_checkpoint(run).round_idx
    assert 2 <= stopped_at < 8
    resumed = _cli("resume", str(run), "--no-progress")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "average" in out
    _same_end(run, reference)
