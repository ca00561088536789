"""The bench scripts that turn committed rows into the README's tables (tune.py, atlas.py)."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tune_row(method, lr, seed, val, local, glob):
    return {"point": {"method": method, "train.lr": lr, "seed": seed}, "val_metric": val,
            "local_metric": local, "global_metric": glob}


def test_the_tuning_table_chooses_on_the_validation_mean_and_reports_the_test_there():
    tune = _script("tune")
    rows = [  # lr 0.002 wins on validation (mean 0.60 vs 0.55); the test columns favour 0.001
        _tune_row("atlas", 0.001, 0, 0.50, 0.90, 0.80),
        _tune_row("atlas", 0.001, 1, 0.60, 0.70, 0.60),
        _tune_row("atlas", 0.002, 0, 0.65, 0.40, 0.30),
        _tune_row("atlas", 0.002, 1, 0.55, 0.20, 0.10),
        _tune_row("local", 0.001, 0, 0.70, 0.10, 0.10),
        _tune_row("local", 0.002, 0, None, 0.99, 0.99),
    ]
    lines = tune.pivot(rows, "train.lr").splitlines()
    assert lines[0] == ("| method | val, lr 0.001 | val, lr 0.002 | chosen lr | local test at it "
                        "(reported) | global test at it (reported) |")
    assert lines[2] == "| `atlas` | 0.550 | **0.600** | 0.002 | 0.300 | 0.200 |"
    # an unfinished point is never chosen, and its empty cell shows it
    assert lines[3] == "| `local` | **0.700** |  | 0.001 | 0.100 | 0.100 |"
    # a second axis would mix its points into one cell: refused, naming it
    rows[0]["point"]["train.head_lr"] = 0.01
    with pytest.raises(SystemExit, match="also vary train.head_lr"):
        tune.pivot(rows, "train.lr")


def _run_row(method, seed, value):
    return {"run": f"method={method}_seed={seed}",
            "config": {"method": method, "seed": seed},
            "summary": {"average": {"global_metric": value}}}


def test_rebuild_writes_only_the_seeds_asked_for_and_keeps_this_sessions_runs(tmp_path):
    atlas = _script("atlas")
    rows = tmp_path / "rows"
    rows.mkdir()
    for m in ("atlas", "local"):
        (rows / f"{m}.jsonl").write_text("".join(json.dumps(_run_row(m, s, 0.1 * s)) + "\n"
                                                 for s in (0, 1, 2)))
    into = tmp_path / "runs"
    assert atlas.rebuild(rows, into, seeds=[1]) == 2
    assert sorted(p.name for p in into.iterdir()) == ["method=atlas_seed=1", "method=local_seed=1"]
    saved = into / "method=atlas_seed=1"
    assert yaml.safe_load((saved / "config.yaml").read_text()) == {"method": "atlas", "seed": 1}
    assert json.loads((saved / "summary.json").read_text())["average"]["global_metric"] == 0.1
    # a folder of this session's run is left as it is; the others are restored
    (into / "method=local_seed=1" / "summary.json").write_text("{}")
    assert atlas.rebuild(rows, into, missing_only=True) == 4
    assert (into / "method=local_seed=1" / "summary.json").read_text() == "{}"
    assert len(list(into.iterdir())) == 6


def test_export_writes_a_file_per_method_that_rebuild_reads_back(tmp_path):
    atlas = _script("atlas")
    runs, rows = tmp_path / "runs", tmp_path / "rows"
    for m, s in (("atlas", 0), ("atlas", 1), ("local", 0)):
        run = runs / f"method={m}_seed={s}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"method": m, "seed": s}))
        (run / "summary.json").write_text(json.dumps(
            {"average": {"global_metric": s}, "clients": [{"client": 0, "kept": 1}]}))
    (runs / "method=mira_seed=0").mkdir()  # unfinished: no summary, not exported
    rows.mkdir()
    (rows / "fedavg.jsonl").write_text("{}\n")  # rows of an earlier export are replaced
    assert atlas.export(runs, rows) == 3
    assert sorted(p.name for p in rows.iterdir()) == ["atlas.jsonl", "local.jsonl"]
    assert [json.loads(line)["run"] for line in (rows / "atlas.jsonl").read_text().splitlines()
            ] == ["method=atlas_seed=0", "method=atlas_seed=1"]
    into = tmp_path / "into"
    assert atlas.rebuild(rows, into) == 3
    summary = json.loads((into / "method=atlas_seed=1" / "summary.json").read_text())
    assert summary == {"average": {"global_metric": 1}, "clients": [{"client": 0}]}


def test_every_studied_method_runs_at_the_rate_its_committed_validation_rows_chose():
    from atlasfl.engine.grid import choose_on_validation

    atlas, root = _script("atlas"), BENCH.parent
    rows = [json.loads(line) for line in
            (root / "bench" / "results" / "tune_quick_iid.jsonl").read_text().splitlines()]
    for config in ("quick.yaml", "quick-dirichlet.yaml"):
        settings = yaml.safe_load((root / "configs" / config).read_text())["method_settings"]
        for method in atlas.STUDY:  # a method added without its tuning run fails here
            mine = [({"train.lr": r["point"]["train.lr"]}, r["val_metric"]) for r in rows
                    if r["point"]["method"] == method]
            assert len(mine) == 3, (config, method)  # the same grid for every method
            chosen = choose_on_validation(mine)
            assert settings[method]["train.lr"] == chosen["train.lr"], (config, method)
