"""``atlasfl tune``: successive halving over rounds, scored on validation rows only."""

from __future__ import annotations

import json

import pytest
import yaml

from atlasfl.cli import main
from atlasfl.engine.checkpoint import latest_checkpoint, load_checkpoint
from atlasfl.engine.tune import (
    candidates,
    halving_rungs,
    parse_space,
    rows_of_round,
    rung_score,
    survivors,
)
from atlasfl.errors import AtlasError


def test_rungs_by_hand():
    assert halving_rungs(5, 1, 3) == [1, 3, 5]
    assert halving_rungs(9, 1, 3) == [1, 3, 9]
    assert halving_rungs(20, 2, 2) == [2, 4, 8, 16, 20]
    assert halving_rungs(1, 1, 3) == [1]
    with pytest.raises(AtlasError, match="--eta = 1"):
        halving_rungs(5, 1, 1)


def test_survivors_keep_the_best_share_first_on_ties_and_never_an_unscored_one():
    scores = [0.5, None, 0.7, 0.7, 0.1]
    assert survivors(scores, 2) == [0, 2, 3]  # ceil(5 / 2) = 3
    assert survivors(scores, 3) == [2, 3]
    assert survivors([0.7, 0.7, 0.1], 3) == [0]  # one kept: the first of the tie
    assert survivors([None, None], 2) == []


def test_the_rung_score_is_the_mean_over_tasks_of_validation_only():
    rows = [{"task": "cola", "val_metric": 0.2, "global_metric": 0.9},
            {"task": "cola", "val_metric": 0.4, "global_metric": 0.9},
            {"task": "mrpc", "val_metric": 0.9, "global_metric": 0.0}]
    assert rung_score(rows) == pytest.approx((0.3 + 0.9) / 2)
    flipped = [r | {"global_metric": 1 - r["global_metric"]} for r in rows]
    assert rung_score(flipped) == rung_score(rows)  # test columns play no part
    assert rung_score([*rows, {"task": "mrpc"}]) is None  # a client not scored on validation


def test_candidates_grid_and_seeded_draws():
    space = parse_space(["train.lr=0.001,0.01", "laplacian.lam=0,1"])
    assert candidates(space, "grid") == [
        {"train.lr": 0.001, "laplacian.lam": 0}, {"train.lr": 0.001, "laplacian.lam": 1},
        {"train.lr": 0.01, "laplacian.lam": 0}, {"train.lr": 0.01, "laplacian.lam": 1}]
    space = parse_space(["train.lr=log:1e-4:1e-2", "laplacian.lam=0,1", "x=uniform:2:3"])
    drawn = candidates(space, "random", trials=20, seed=7)
    assert drawn == candidates(space, "random", trials=20, seed=7) != candidates(
        space, "random", trials=20, seed=8)
    assert all(1e-4 <= p["train.lr"] <= 1e-2 and p["laplacian.lam"] in (0, 1)
               and 2 <= p["x"] <= 3 for p in drawn)
    assert all(float(f"{p['train.lr']:.3g}") == p["train.lr"] for p in drawn)
    with pytest.raises(AtlasError, match="a grid needs values"):
        candidates(space, "grid")
    with pytest.raises(AtlasError, match="--trials = 0"):
        candidates(space, "random")
    with pytest.raises(AtlasError, match=r"log:LOW:HIGH with LOW < HIGH and LOW > 0"):
        parse_space(["train.lr=log:0:1"])
    with pytest.raises(AtlasError, match="uniform:LOW:HIGH"):
        parse_space(["a=uniform:2:1"])
    with pytest.raises(AtlasError, match="--space expects key=value"):
        parse_space(["train.lr"])
    with pytest.raises(AtlasError, match="--searcher = 'optuna'"):
        candidates(space, "optuna")


def _config(tiny_cfg, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 3, "train.threads": 1,
                                                 "method": "fedavg"}).to_dict()))
    return str(config)


def _rows(run):
    return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")}
            for line in (run / "rounds.jsonl").read_text().splitlines()]


def test_tune_prunes_on_validation_and_its_winner_is_the_uninterrupted_run(tiny_cfg, tmp_path,
                                                                         capsys):
    config = _config(tiny_cfg, tmp_path)
    out = tmp_path / "t"
    argv = ["tune", "--config", config, "--space", "train.lr=0.001,0.3,0.05,0.1",
            "--out", str(out)]
    assert main(argv) == 0
    table = (out / "tune.md").read_text()
    rung1 = {}
    for line in table.splitlines()[2:6]:
        lr, first, last, chosen = (c.strip() for c in line.strip("|").split("|"))
        rung1[float(lr)] = (float(first), last, chosen)
    # rungs [1, 3]: ceil(4 / 3) = 2 go on, the two best at round 1; the rest stop at round 1
    went_on = sorted(rung1, key=lambda lr: -rung1[lr][0])[:2]
    for lr, (_, last, _) in rung1.items():
        run = out / f"lr={lr}_seed=0"
        assert (last != "pruned") == (lr in went_on)
        assert load_checkpoint(run).round_idx == (3 if lr in went_on else 1)
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())["method_settings"]["fedavg"]
    best = max(went_on, key=lambda lr: (float(rung1[lr][1]), -went_on.index(lr)))
    assert chosen == {"train.lr": best} and rung1[best][2] == "yes"
    assert "Rounds run: 8 of the 12" in table  # 4 x 1 + 2 x 2
    summary = json.loads((out / f"lr={best}_seed=0" / "summary.json").read_text())
    assert float(rung1[best][1]) == pytest.approx(summary["average"]["val_metric"], abs=5e-5)
    # the rung score of the last round is the summary's validation average, as it computes it
    assert rung_score(rows_of_round(out / f"lr={best}_seed=0", 3)) == pytest.approx(
        summary["average"]["val_metric"], rel=1e-12)
    # the winner paused at round 1 and resumed: the rows and weights of one sweep run of it
    sweep = tmp_path / "s"
    assert main(["sweep", "--config", config, "--set", f"train.lr={best}", "--fixed",
                 "federation.eval_every=1", "--out", str(sweep)]) == 0
    assert _rows(sweep / f"lr={best}") == _rows(out / f"lr={best}_seed=0")
    a = load_checkpoint(latest_checkpoint(sweep / f"lr={best}")).tensors
    b = load_checkpoint(latest_checkpoint(out / f"lr={best}_seed=0")).tensors
    assert all((a[k] == b[k]).all() for k in a if k.startswith("client/"))
    # again: nothing runs, the same choice
    capsys.readouterr()
    assert main(argv) == 0
    assert ": running" not in capsys.readouterr().err
    assert "Rounds run: 8 of the 12" in (out / "tune.md").read_text()
    assert yaml.safe_load((out / "chosen.yaml").read_text())["method_settings"]["fedavg"] == \
        chosen


def test_tune_checks_every_candidate_before_running(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "t"
    code = main(["tune", "--config", _config(tiny_cfg, tmp_path), "--space",
                 "train.lr=0.01,-1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "point 2 of 2 (lr=-1_seed=0)" in err
