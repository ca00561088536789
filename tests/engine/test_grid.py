"""``atlasfl sweep``: the grid, one folder per point, finished points skipped, interrupted ones
resumed, one table; and a lambda sweep whose runs differ."""

from __future__ import annotations

import json

import pytest
import yaml

from atlasfl.cli import main
from atlasfl.engine.checkpoint import load_checkpoint
from atlasfl.engine.grid import expand_grid, point_name
from atlasfl.errors import AtlasError


def test_expand_grid_is_the_cartesian_product_in_order():
    points = expand_grid(["laplacian.lam=0,0.5", "seed=1,2", "data.tasks=[sst2,mrpc]"])
    assert points == [
        {"laplacian.lam": 0, "seed": 1, "data.tasks": ["sst2", "mrpc"]},
        {"laplacian.lam": 0, "seed": 2, "data.tasks": ["sst2", "mrpc"]},
        {"laplacian.lam": 0.5, "seed": 1, "data.tasks": ["sst2", "mrpc"]},
        {"laplacian.lam": 0.5, "seed": 2, "data.tasks": ["sst2", "mrpc"]}]
    assert point_name(points[2]) == "lam=0.5_seed=1_tasks=sst2+mrpc"
    with pytest.raises(AtlasError, match="twice"):
        expand_grid(["seed=1", "seed=2"])
    with pytest.raises(AtlasError, match="key=value"):
        expand_grid(["seed"])


def _client_tensors(run):
    snap = load_checkpoint(run)
    return {k: v for k, v in snap.tensors.items() if k.startswith("client/")
            and "/opt/" not in k}


def test_sweep_runs_skips_and_resumes_and_its_runs_differ(tiny_cfg, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(method="mira", **{"federation.rounds": 2})
                                     .to_dict()))
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--set", "laplacian.lam=0,0.5", "--out", str(out)]
    # a first session stops after one round of the first point
    assert main([*argv, "--fixed", "session.max_rounds=1"]) == 0
    assert not (out / "lam=0" / "summary.json").exists()
    assert not (out / "lam=0.5").exists()
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[1/2] lam=0: resuming after round 1" in err and "[2/2] lam=0.5: running" in err
    table = (out / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| laplacian.lam | val metric | test metric |") and len(table) == 4
    assert (out / "sweep.csv").read_text().splitlines()[1].startswith("0,")
    stamps = {p: (out / p / "summary.json").stat().st_mtime_ns for p in ("lam=0", "lam=0.5")}
    assert main(argv) == 0
    assert capsys.readouterr().err.count("finished, skipped") == 2
    assert stamps == {p: (out / p / "summary.json").stat().st_mtime_ns for p in stamps}
    a, b = _client_tensors(out / "lam=0"), _client_tensors(out / "lam=0.5")
    assert a.keys() == b.keys()
    assert sum(not (a[k] == b[k]).all() for k in a) > 0  # lambda > 0 moved the models
    summary = json.loads((out / "lam=0.5" / "summary.json").read_text())
    assert summary["method"] == "mira" and "val_metric" in summary["average"]


def test_sweep_refuses_an_unknown_key_before_running(tiny_cfg, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg().to_dict()))
    code = main(["sweep", "--config", str(config), "--set", "laplacian.lamda=0,1",
                 "--out", str(tmp_path / "s")])
    assert code == 2 and "laplacian.lam" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sweep_refuses_a_foreign_folder_and_a_checkpoint_of_another_config(tiny_cfg, tmp_path,
                                                                          capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(method="mira", **{"federation.rounds": 2})
                                     .to_dict()))
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--set", "laplacian.lam=0", "--out", str(out)]
    (out / "lam=0").mkdir(parents=True)
    (out / "lam=0" / "notes.txt").write_text("mine")
    assert main(argv) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert (out / "lam=0" / "notes.txt").read_text() == "mine"  # nothing deleted
    (out / "lam=0" / "notes.txt").unlink()
    (out / "lam=0").rmdir()
    assert main([*argv, "--fixed", "session.max_rounds=1"]) == 0
    capsys.readouterr()
    assert main([*argv, "--fixed", "train.lr=0.5"]) == 2
    assert "train.lr: checkpoint 0.01, now 0.5" in capsys.readouterr().err


def test_a_finished_point_of_another_config_is_refused_and_a_new_default_key_is_not(
        tiny_cfg, tmp_path, capsys):
    from atlasfl.config import check_same_experiment

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 1}).to_dict()))
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--set", "seed=0", "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # the same experiment: skipped
    assert "finished, skipped" in capsys.readouterr().err
    assert main([*argv, "--fixed", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run of another experiment" in err and "train.lr" in err
    # a key added to the config after a run was saved (at its default) is no difference
    saved = yaml.safe_load((out / "seed=0" / "config.yaml").read_text())
    del saved["train"]["batch_clients"]
    check_same_experiment(saved, tiny_cfg(**{"federation.rounds": 1}))
    saved["train"]["length_bucket"] = 4
    with pytest.raises(AtlasError, match="train.length_bucket: checkpoint 4, now 8"):
        check_same_experiment(saved, tiny_cfg(**{"federation.rounds": 1}))
    # a key whose default changed since: a run saved before the key existed ran without it
    del saved["train"]["length_bucket"]
    with pytest.raises(AtlasError, match="train.length_bucket: checkpoint 0, now 8"):
        check_same_experiment(saved, tiny_cfg(**{"federation.rounds": 1}))
    check_same_experiment(saved, tiny_cfg(**{"federation.rounds": 1, "train.length_bucket": 0}))


def test_a_finished_run_in_another_precision_is_refused(tiny_cfg, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 1,
                                                 "train.precision": "auto"}).to_dict()))
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--set", "seed=0", "--out", str(out)]
    assert main(argv) == 0
    summary_file = out / "seed=0" / "summary.json"
    summary = json.loads(summary_file.read_text())
    assert summary["precision"] == "fp32"  # auto in the test process
    assert main(argv) == 0 and "finished, skipped" in capsys.readouterr().err
    summary_file.write_text(json.dumps(summary | {"precision": "bf16"}))  # as on a bf16 machine
    assert main(argv) == 2
    assert "train.precision: the run trained in 'bf16'" in capsys.readouterr().err
