"""A grid checked whole before it starts, and ``--jobs N``: points side by side in processes,
with the results of a sequential grid."""

from __future__ import annotations

import json

import pytest
import yaml

from atlasfl.cli import main
from atlasfl.engine.checkpoint import load_checkpoint
from atlasfl.engine.grid import GridJob, GridProgress, plan_grid
from atlasfl.engine.jobs import run_parallel, threads_per_job
from atlasfl.errors import AtlasError

# 1 round, one torch thread per client in every process: sequential and parallel runs must agree
FAST = {"federation.rounds": 1, "train.threads": 1}


def _config(tiny_cfg, tmp_path, **dotted):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**(FAST | dotted)).to_dict()))
    return str(config)


@pytest.mark.parametrize("last, says", [
    ("method=local,fedavgg", "point 2 of 2 (method=fedavgg): unknown method 'fedavgg'"),
    ("data.clients_per_task=2,100000", "point 2 of 2 (clients_per_task=100000): task 'cola'"),
    ("data.data_dir=null,/nowhere", "point 2 of 2 (data_dir=-nowhere): data.data_dir = "
     "'/nowhere' is not a directory"),
    ("model.name=tiny-bert,tiny-bertt", "point 2 of 2 (name=tiny-bertt): unknown model "
     "'tiny-bertt'"),
    ("data.tasks=[cola],[cola,sst22]", None),  # one value: a single point, refused whole
])
def test_a_bad_last_point_stops_the_grid_before_anything_runs(tiny_cfg, tmp_path, capsys,
                                                               last, says):
    out = tmp_path / "s"
    code = main(["sweep", "--config", _config(tiny_cfg, tmp_path), "--set", last,
                 "--out", str(out), "--jobs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists(), err  # nothing run, nothing written
    assert "running" not in err
    assert (says or "unknown task 'sst22'") in err
    assert len([line for line in err.splitlines() if line.startswith("atlasfl: error")]) == 1


def test_compare_names_the_first_point_whose_method_settings_fail(tiny_cfg, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**FAST).to_dict() | {"method_settings": {
        "atlas": {"data.clients_per_task": 100000}}}))
    out = tmp_path / "c"
    code = main(["compare", "--config", str(config), "--methods", "local,atlas",
                 "--seeds", "0,1", "--out", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "point 3 of 4 (method=atlas_seed=0): task 'cola': 8535 training rows cannot be " \
           "split over 100000 clients" in err and "running" not in err


def test_two_points_with_one_folder_name_are_refused(tiny_cfg, tmp_path):
    with pytest.raises(AtlasError, match=r"point 2 of 2 \(seed=0\): its folder name is that of "
                                         r"point 1"):
        plan_grid(tiny_cfg(**FAST).to_dict(), [{"seed": 0}, {"seed": 0}], tmp_path / "s")


def test_a_folder_that_is_not_a_run_is_found_before_earlier_points_run(tiny_cfg, tmp_path,
                                                                        capsys):
    out = tmp_path / "s"
    (out / "seed=1").mkdir(parents=True)
    (out / "seed=1" / "notes.txt").write_text("mine")
    code = main(["sweep", "--config", _config(tiny_cfg, tmp_path), "--set", "seed=0,1",
                 "--out", str(out)])
    assert code == 2 and "point 2 of 2 (seed=1)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["seed=1"]  # seed=0 did not run


def _clients(run):
    snap = load_checkpoint(run)
    return {k: v for k, v in snap.tensors.items() if k.startswith("client/")}


def _scores(rows):
    """Every field of the rows but how long and how much memory they took."""
    return [{k: v for k, v in row.items() if not k.endswith(("seconds", "_mb"))} for row in rows]


def test_jobs_give_the_rows_and_weights_of_a_sequential_grid(tiny_cfg, tmp_path, capsys):
    config = _config(tiny_cfg, tmp_path, method="mira")
    grid = ["--set", "seed=0,1", "--set", "laplacian.lam=0,0.5"]
    assert main(["sweep", "--config", config, *grid, "--out", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    assert main(["sweep", "--config", config, *grid, "--out", str(tmp_path / "two"),
                 "--jobs", "2"]) == 0
    err = capsys.readouterr().err
    assert err.count(": finished in ") == 4 and "(done 4, running 0, left 0)" in err
    assert (tmp_path / "one" / "sweep.csv").read_text().splitlines()[1:] != []
    for name in ("seed=0_lam=0", "seed=0_lam=0.5", "seed=1_lam=0", "seed=1_lam=0.5"):
        a = json.loads((tmp_path / "one" / name / "summary.json").read_text())
        b = json.loads((tmp_path / "two" / name / "summary.json").read_text())
        assert _scores(a["clients"]) == _scores(b["clients"]), name
        assert _scores([a["average"]]) == _scores([b["average"]]), name
        rows = [[json.loads(line) for line in
                 (out / name / "rounds.jsonl").read_text().splitlines()]
                for out in (tmp_path / "one", tmp_path / "two")]
        assert _scores(rows[0]) == _scores(rows[1]) != [], name
        ta, tb = _clients(tmp_path / "one" / name), _clients(tmp_path / "two" / name)
        assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
    # the two sweeps' tables differ only in the wall-time column
    one = [r.rsplit(",", 1)[0] for r in (tmp_path / "one" / "sweep.csv").read_text().split()]
    two = [r.rsplit(",", 1)[0] for r in (tmp_path / "two" / "sweep.csv").read_text().split()]
    assert one == two


def test_a_session_limit_stops_running_points_and_starts_no_new_one(tiny_cfg, tmp_path,
                                                                    capsys):
    config = _config(tiny_cfg, tmp_path, **{"federation.rounds": 2})
    out = tmp_path / "s"
    argv = ["sweep", "--config", config, "--set", "seed=0,1,2", "--out", str(out), "--jobs", "2"]
    assert main([*argv, "--fixed", "session.max_rounds=1"]) == 0
    err = capsys.readouterr().err
    assert err.count("stopped after") == 2 and not (out / "seed=2").exists()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "[1/3] seed=0: resuming after round 1" in err
    assert "[2/3] seed=1: resuming after round 1" in err and "[3/3] seed=2: running" in err
    assert all((out / f"seed={s}" / "summary.json").is_file() for s in range(3))


def test_a_point_that_fails_in_its_process_is_named_and_the_others_finish(tiny_cfg, tmp_path):
    jobs = plan_grid(tiny_cfg(**FAST).to_dict(), [{"seed": 0}, {"seed": 1}], tmp_path / "s")
    # a data folder removed after the check: the second point fails once it runs
    broken = GridJob(jobs[1].index, jobs[1].point,
                     jobs[1].cfg.replace(**{"data.data_dir": str(tmp_path / "gone")}),
                     jobs[1].path, jobs[1].state)
    progress = GridProgress(jobs, parallel=2)
    with pytest.raises(AtlasError, match=r"point 2 of 2 \(seed=1\): data.data_dir = .*gone"):
        run_parallel([jobs[0], broken], 2, progress)
    assert (tmp_path / "s" / "seed=0" / "summary.json").is_file()


def test_progress_counts_and_estimate_by_hand(tiny_cfg, tmp_path, capsys):
    jobs = plan_grid(tiny_cfg(**FAST).to_dict(), [{"seed": s} for s in range(5)], tmp_path)
    jobs[0].state = "finished"  # as if it had run in an earlier call
    progress = GridProgress(jobs, parallel=2)
    summary = {"average": {"val_metric": 0.5}}
    progress.started(jobs[1])
    progress.started(jobs[2])
    progress.ended(jobs[1], summary, 60.0)
    progress.ended(jobs[2], summary, 120.0)
    # 2 of 5 left at a mean of 90 s, 2 at once: 90 s
    assert capsys.readouterr().err.splitlines()[-1] == (
        "atlasfl sweep: [3/5] seed=2: finished in 2.0 min, val metric 0.5000 "
        "(done 3, running 0, left 2; about 1.5 min left)")
    progress.started(jobs[3])
    progress.ended(jobs[3], None, 30.0)
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "stopped after 30 s; resumes on the next call (done 3, running 0, stopped 1, left 1; "
        "about 1.5 min left)")


def test_threads_per_job_share_the_cores():
    assert [threads_per_job(n, cores=2) for n in (1, 2, 3)] == [2, 1, 1]
    assert threads_per_job(3, cores=16) == 5


def test_jobs_below_one_are_refused(tiny_cfg, tmp_path, capsys):
    assert main(["sweep", "--config", _config(tiny_cfg, tmp_path), "--set", "seed=0",
                 "--out", str(tmp_path / "s"), "--jobs", "0"]) == 2
    assert "--jobs = 0; allowed: 1 or more" in capsys.readouterr().err
