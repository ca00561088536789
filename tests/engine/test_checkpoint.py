"""Exact checkpoint/resume: a run split over sessions equals the uninterrupted run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from atlasfl.cli import main
from atlasfl.engine import (
    RunDir,
    build_experiment,
    latest_checkpoint,
    load_checkpoint,
    run_experiment,
)
from atlasfl.engine import checkpoint as ckpt
from atlasfl.engine.simulation import without_timings
from atlasfl.errors import AtlasError


def _strip_timing(history):
    return [[without_timings(row) for row in rnd] for rnd in history]


def _client_tensors(exp):
    out = {}
    for cid, client in exp.clients.items():
        tensors, meta = client.checkpoint()
        out.update({f"{cid}/{k}": v.clone() for k, v in tensors.items()})
    return out


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method", [
    "local", "fedavg", "fedavg-task", "fedavg-cluster", "centralized", "homolora", "hetlora",
    "hetlora:ranks.update=delta", "splitlora:split.cut=1",
    "splitlora:split.mode=u-shape,split.min_cut=0", "hetlora:split.enabled=always", "mira",
    "atlas", "atlas:split.enabled=always,split.min_cut=0,laplacian.cross_weight=0.5", "fedsa",
    "fedavg-task:train.length_bucket=2,train.pad_multiple=8",
    "hetlora:faults.drop_before=0.3,faults.drop_during=0.3,faults.deadline_seconds=2",
    "atlas:federation.resident_clients=2"])
def test_six_rounds_equal_three_plus_resumed_three(tiny_cfg, tmp_path, method):
    method, _, settings = method.partition(":")  # then key=value,... overrides
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=") for kv in settings.split(","))
             } if settings else {}
    cfg = tiny_cfg(method=method, out=str(tmp_path), **extra, **{"federation.rounds": 6,
                                                      "federation.fraction": 0.75,
                                                      "federation.eval_every": 2})
    straight = build_experiment(cfg.replace(run_name="straight"))
    straight_run = RunDir.create(straight.cfg)
    full = run_experiment(straight, straight_run)
    assert full.completed_rounds == 6

    first = build_experiment(cfg.replace(run_name="split", **{"session.max_rounds": 3}))
    split_run = RunDir.create(first.cfg)
    part = run_experiment(first, split_run)
    assert part.summary is None and part.completed_rounds == 3
    snapshot = load_checkpoint(split_run.path)
    assert snapshot.round_idx == 3
    second = build_experiment(cfg.replace(run_name="split"))  # a fresh process would do this
    rest = run_experiment(second, split_run, resume=snapshot)
    assert rest.completed_rounds == 6

    _assert_same_tensors(_client_tensors(straight), _client_tensors(second))
    # the server state too (group models; split: the server-side adapters and their moments)
    server_a, server_b = {}, {}
    assert ckpt.flatten_state(full.state, server_a) == ckpt.flatten_state(rest.state, server_b)
    _assert_same_tensors(server_a, server_b)
    history_a = load_checkpoint(straight_run.path).meta["history"]
    history_b = load_checkpoint(split_run.path).meta["history"]
    assert _strip_timing(history_a) == _strip_timing(history_b)
    rows = [json.loads(x) for x in (split_run.path / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * len(second.clients)  # no round recorded twice
    assert full.summary["tasks"] == rest.summary["tasks"]
    assert full.summary["bytes_up"] == rest.summary["bytes_up"]


def test_keeps_the_last_k_checkpoints_and_manifest_hashes(tiny_cfg, tmp_path):
    cfg = tiny_cfg(out=str(tmp_path), run_name="k", **{"federation.rounds": 4,
                                                       "session.keep_checkpoints": 2})
    run = RunDir.create(cfg)
    run_experiment(build_experiment(cfg), run)
    names = sorted(p.name for p in (run.path / "checkpoints").iterdir())
    assert names == ["round-000003", "round-000004"]
    manifest = json.loads((run.path / "checkpoints/round-000004/manifest.json").read_text())
    assert set(manifest["files"]) == {"state.safetensors", "state.json"}


def test_a_crash_while_saving_leaves_the_previous_checkpoint_valid(tiny_cfg, tmp_path,
                                                                  monkeypatch):
    cfg = tiny_cfg(out=str(tmp_path), run_name="crash", **{"federation.rounds": 3})
    run = RunDir.create(cfg)
    exp = build_experiment(cfg.replace(**{"session.max_rounds": 2}))
    run_experiment(exp, run)
    good = latest_checkpoint(run.path)
    assert good.name == "round-000002"

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken_save)
    with pytest.raises(OSError):
        run_experiment(build_experiment(cfg), run, resume=load_checkpoint(run.path))
    assert latest_checkpoint(run.path) == good  # the half-written one does not look complete
    assert load_checkpoint(run.path).round_idx == 2


def _finished_run(tiny_cfg, tmp_path, name="r", rounds=3):
    cfg = tiny_cfg(out=str(tmp_path), run_name=name, **{"federation.rounds": rounds,
                                                        "session.max_rounds": 2})
    run = RunDir.create(cfg)
    run_experiment(build_experiment(cfg), run)
    return run.path


def _snapshot_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("damage", ["truncate", "edit-tensors", "edit-json"])
def test_damaged_checkpoint_is_refused_and_nothing_is_overwritten(tiny_cfg, tmp_path, capsys,
                                                                  damage):
    run = _finished_run(tiny_cfg, tmp_path)
    ckdir = latest_checkpoint(run)
    if damage == "truncate":
        target = ckdir / "state.safetensors"
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "edit-tensors":
        target = ckdir / "state.safetensors"
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    else:
        target = ckdir / "state.json"
        target.write_text(target.read_text().replace('"round": 2', '"round": 1'))
    before = _snapshot_files(run)
    assert main(["resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint file {target} fails its SHA-256 check" in err
    assert "Traceback" not in err
    assert _snapshot_files(run) == before


def test_resume_refuses_a_changed_experiment_and_lists_the_keys(tiny_cfg, tmp_path, capsys):
    run = _finished_run(tiny_cfg, tmp_path)
    code = main(["run", "--resume", str(run), "--lr", "0.5", "--seed", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "seed: checkpoint 0, now 3" in err and "train.lr: checkpoint 0.01, now 0.5" in err


def test_resume_allows_session_keys_and_finishes(tiny_cfg, tmp_path, capsys):
    run = _finished_run(tiny_cfg, tmp_path)
    assert main(["resume", str(run), "--no-progress", "--keep-checkpoints", "3"]) == 0
    assert "average" in capsys.readouterr().out
    assert (run / "summary.json").is_file()
    assert load_checkpoint(run).round_idx == 3


def test_state_classes_outside_atlasfl_are_refused():
    bad = {"__dataclass__": "os:PathLike", "fields": {}}
    with pytest.raises(AtlasError, match="outside atlasfl"):
        ckpt.unflatten_state(bad, {}, torch.device("cpu"))
    gone = {"__dataclass__": "atlasfl.strategies.mixed_rank:RankState", "fields": {}}
    with pytest.raises(AtlasError, match="unknown state class"):  # a module of format 1
        ckpt.unflatten_state(gone, {}, torch.device("cpu"))


def test_a_checkpoint_of_another_format_is_refused_with_what_to_do(tiny_cfg, tmp_path, capsys):
    run = _finished_run(tiny_cfg, tmp_path)
    manifest = latest_checkpoint(run) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 3', '"format": 1'))
    before = _snapshot_files(run)
    assert main(["resume", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has format 1; this atlasfl reads format 3" in err and "start the run over" in err
    assert _snapshot_files(run) == before


def test_server_state_round_trips_through_flatten():
    from atlasfl.strategies.groups import Groups

    state = Groups({"0": "all"}, torch.eye(2, dtype=torch.float64),
                   {"all": {"w": torch.arange(6.0).reshape(2, 3)}},
                   {"all/head2x4": {"out.bias": torch.ones(2)}}, {"all": 3})
    tensors: dict = {}
    skeleton = ckpt.flatten_state(state, tensors)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = ckpt.unflatten_state(skeleton, tensors, torch.device("cpu"))
    assert isinstance(back, Groups)
    assert torch.equal(back.adapters["all"]["w"], state.adapters["all"]["w"])
    assert torch.equal(back.heads["all/head2x4"]["out.bias"], torch.ones(2))
    assert back.similarity.dtype == torch.float64 and torch.equal(back.similarity, torch.eye(2))
    assert (back.members, back.versions) == (state.members, state.versions)


def test_checkpoint_tensors_are_plain_safetensors(tiny_cfg, tmp_path):
    run = _finished_run(tiny_cfg, tmp_path)
    tensors = load_file(str(latest_checkpoint(run) / "state.safetensors"))
    assert any(k.startswith("client/0/opt/") for k in tensors)  # optimizer moments are saved
    assert "rng/torch" in tensors


def test_no_code_executing_loader_in_the_package():
    src = Path(__file__).resolve().parents[2] / "src" / "atlasfl"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        loader = "torch" + ".load("  # spelled in two parts so this test is not a hit itself
        for line in text.splitlines():
            if loader in line:
                assert "weights_only=True" in line, (path, line)
