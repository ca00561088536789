"""``atlasfl sweep``: the grid, one folder per point, finished points skipped, interrupted ones
resumed, one table; and a lambda sweep whose runs differ."""

from __future__ import annotations

import json

import pytest
import yaml

from atlasfl.cli import main
from atlasfl.engine.checkpoint import load_checkpoint
from atlasfl.engine.grid import choose_on_validation, expand_grid, grid_table, point_name
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
    assert expand_grid(["data.tasks=[cola],[cola, sst2]", "device=cuda:0,null"]) == [
        {"data.tasks": ["cola"], "device": "cuda:0"}, {"data.tasks": ["cola"], "device": None},
        {"data.tasks": ["cola", "sst2"], "device": "cuda:0"},
        {"data.tasks": ["cola", "sst2"], "device": None}]
    with pytest.raises(AtlasError, match=r"--set data.tasks: '\[cola' is not values separated"):
        expand_grid(["data.tasks=[cola"])
    with pytest.raises(AtlasError, match="--set seed: no value given"):
        expand_grid(["seed="])


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
    assert table[0].startswith("| laplacian.lam | val metric | chosen on val | local test metric "
                               "(reported) | global test metric (reported) |")
    assert len(table) == 6 and table[-1].startswith("Chosen on the validation metric")
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


def _summary(val, local, glob):
    return {"average": {"val_metric": val, "local_metric": local, "global_metric": glob,
                        "global_accuracy": glob}, "bytes_up": 0, "bytes_down": 0,
            "wall_seconds": 1.0}


def test_a_sweep_chooses_on_validation_whatever_the_test_columns_say(tmp_path):
    # lr 0.01 is better on validation (mean over seeds 0.70 vs 0.65); both test columns would
    # flip the choice to 0.001
    results = [({"train.lr": 0.001, "seed": 0}, tmp_path, _summary(0.66, 0.90, 0.90)),
               ({"train.lr": 0.001, "seed": 1}, tmp_path, _summary(0.64, 0.92, 0.91)),
               ({"train.lr": 0.01, "seed": 0}, tmp_path, _summary(0.75, 0.50, 0.40)),
               ({"train.lr": 0.01, "seed": 1}, tmp_path, _summary(0.65, 0.52, 0.41))]
    assert choose_on_validation([(p, s["average"]["val_metric"]) for p, s, in
                                 [(p, s) for p, _, s in results]]) == {"train.lr": 0.01}
    markdown, _ = grid_table(results)
    rows = [line for line in markdown.splitlines() if line.startswith("| 0.0")]
    assert [r.split(" | ")[3] for r in rows] == ["", "", "yes", "yes"]  # the chosen column
    assert markdown.endswith("train.lr=0.01. Test columns are reported, not used to choose.")


def test_the_choice_skips_a_setting_with_an_unscored_seed_and_keeps_the_first_on_ties():
    assert choose_on_validation([({"a": 1}, 0.5), ({"a": 2}, 0.5)]) == {"a": 1}
    assert choose_on_validation([({"a": 1, "seed": 0}, 0.9), ({"a": 1, "seed": 1}, None),
                                 ({"a": 2, "seed": 0}, 0.1)]) == {"a": 2}
    assert choose_on_validation([({"a": 1}, None)]) is None


def test_method_settings_apply_to_their_method_and_overrides_win(tiny_cfg, tmp_path, capsys):
    from atlasfl.config import from_dict, layered

    raw = tiny_cfg().to_dict() | {"method_settings": {"local": {"train.lr": 0.5},
                                                      "fedavg": {"train.lr": 0.25}}}
    assert from_dict(raw).train.lr == 0.25  # the file's method: fedavg
    assert from_dict(layered(raw, {"method": "local"})).train.lr == 0.5
    assert from_dict(layered(raw, {"method": "local"}, {"train.lr": 0.1})).train.lr == 0.1
    assert from_dict(layered(raw, {"method": "fedavg-task"})).train.lr == 0.01  # none of its own
    assert "method_settings" not in layered(raw)
    with pytest.raises(AtlasError, match="unknown method.s. loca; allowed: .*local"):
        layered(raw | {"method_settings": {"loca": {}}})
    with pytest.raises(AtlasError, match="unknown config key 'train.rl'"):
        layered(raw | {"method_settings": {"local": {"train.rl": 1}}})
    with pytest.raises(AtlasError, match="must map each method to a mapping"):
        layered(raw | {"method_settings": {"local": 3}})
    # compare: each method runs with its own settings, recorded in its run folder
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--methods", "local,fedavg-task",
                 "--seeds", "0", "--out", str(out), "--set", "federation.rounds=1"]) == 0
    lrs = {p.name: yaml.safe_load((p / "config.yaml").read_text())["train"]["lr"]
           for p in out.iterdir() if (p / "config.yaml").is_file()}
    assert lrs == {"method=local_seed=0": 0.5, "method=fedavg-task_seed=0": 0.01}
