"""Flower simulation (Ray) runs the same round loop and client code: results equal in-process."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr")

from atlasfl.engine import build_experiment, run_experiment  # noqa: E402
from atlasfl.engine.flower.server_app import run_flower_simulation  # noqa: E402

pytestmark = pytest.mark.flower

def _bits(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _states(exp) -> dict[str, bytes]:
    """Every client's adapter and head tensors, by name, as raw bytes."""
    out = {}
    for cid in exp.clients:
        client = exp.clients[cid]
        for name, t in {**client.adapter_state(), **client.head_state()}.items():
            out[f"{cid}/{name}"] = _bits(t)
    return out


@pytest.mark.parametrize("method", ["fedavg-task", "atlas", "splitlora"])
def test_flower_simulation_ends_with_the_in_process_adapters_bit_for_bit(tiny_cfg, method):
    # 4 clients (2 tasks x 2), 2 rounds; one torch thread on both sides (the sums' order)
    cfg = tiny_cfg(method=method, **{"federation.rounds": 2, "train.threads": 1})
    local = build_experiment(cfg)
    expected = run_experiment(local)
    exp = build_experiment(cfg)
    got = run_flower_simulation(exp)
    assert got.completed_rounds == 2
    want, have = _states(local), _states(exp)
    assert sorted(have) == sorted(want)
    differ = [k for k in want if want[k] != have[k]]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    # the server's view too: metrics of every client and bytes by kind
    assert got.summary["bytes_by_kind"] == expected.summary["bytes_by_kind"]
    assert got.summary["bytes_up"] > 0
    if method == "atlas":  # its probe crossed Flower as query.fingerprint / query.importance
        assert got.summary["bytes_by_kind"]["up_fingerprint"] > 0
        assert got.summary["bytes_by_kind"]["up_importance"] > 0
    for a, b in zip(got.summary["clients"], expected.summary["clients"], strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("seconds")} == \
            {k: v for k, v in b.items() if not k.endswith("seconds")}


def test_cli_engine_flower_sim_writes_the_rows_an_in_process_run_writes(tmp_path):
    from atlasfl.cli import main

    tiny = ["run", "--model", "tiny-bert", "--tasks", "cola", "mrpc", "--clients-per-task", "2",
            "--samples", "16", "--eval-samples", "16", "--max-length", "32", "--rounds", "2",
            "--method", "fedavg-task", "--no-progress", "--set", "train.threads=1",
            "--set", "train.precision=fp32",  # the Ray workers resolve auto for this CPU
            "--out", str(tmp_path)]
    assert main([*tiny, "--run-name", "local"]) == 0
    assert main([*tiny, "--run-name", "flower", "--engine", "flower-sim"]) == 0

    def rows(name):
        lines = (tmp_path / name / "rounds.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if not k.endswith("seconds")}
                for x in lines]
    assert len(rows("flower")) == 2 * 4
    assert rows("flower") == rows("local")
