import json
import subprocess
import sys

import pytest

from atlasfl.cli import main

TINY = ["run", "--model", "tiny-bert", "--tasks", "cola", "mrpc", "--clients-per-task", "2",
        "--samples", "16", "--eval-samples", "16", "--max-length", "32", "--rounds", "2",
        "--no-progress"]


def test_end_to_end_run_writes_config_rounds_and_summary(tmp_path, capsys):
    args = [*TINY, "--method", "fedavg-task", "--out", str(tmp_path), "--run-name", "e2e"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "average" in out and f"run folder: {tmp_path / 'e2e'}" in out
    run = tmp_path / "e2e"
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 4  # rounds x clients
    keys = ("train_loss", "global_loss", "global_metric", "global_accuracy", "local_loss",
            "local_metric", "local_accuracy", "val_metric", "bytes_up", "bytes_down", "seconds")
    for key in keys:
        assert all(key in r for r in rows), key
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["tasks"]) == {"cola", "mrpc"}
    assert summary["tasks"]["cola"]["metric_name"] == "mcc"
    assert {"local_metric", "global_metric", "val_metric"} <= set(summary["average"])
    assert set(summary["references"]) == {"majority", "own_majority"}
    assert "federation:\n  rounds: 2" in (run / "config.yaml").read_text()


def test_console_script_lists_tasks_and_models():
    out = subprocess.run([sys.executable, "-m", "atlasfl.cli", "models"], capture_output=True,
                         text=True, check=True).stdout
    assert "minilm" in out and "offline" in out
    out = subprocess.run([sys.executable, "-m", "atlasfl.cli", "tasks"], capture_output=True,
                         text=True, check=True).stdout
    assert "sst2" in out and "mnli" in out


def test_tasks_takes_a_data_dir_and_says_where_files_are(tmp_path, glue_root, capsys):
    assert main(["tasks", "--data-dir", str(glue_root)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["sst2"].endswith("on disk")  # the shared folder holds SST-2 ...
    assert lines["mnli"].endswith("(Hugging Face hub when online)")  # ... but not MNLI
    assert main(["tasks", "--data-dir", str(tmp_path)]) == 0
    assert f"not under {tmp_path}" in capsys.readouterr().out


def test_resume_accepts_the_out_folder_of_a_single_run(tmp_path, capsys):
    args = [*TINY, "--method", "local", "--out", str(tmp_path), "--run-name", "only"]
    assert main([*args, "--max-rounds", "1"]) == 0
    err = capsys.readouterr().err
    assert ("2 clients per task with 16 examples each (10% held out for validation, 20% as "
            "its local test)") in err
    assert main(["resume", str(tmp_path), "--no-progress"]) == 0
    assert f"{tmp_path} holds one run: resuming {tmp_path / 'only'}" in capsys.readouterr().err
    assert (tmp_path / "only" / "summary.json").is_file()
    assert main([*TINY, "--method", "local", "--out", str(tmp_path), "--run-name", "two",
                 "--max-rounds", "1"]) == 0
    (tmp_path / "only" / "summary.json").unlink()
    capsys.readouterr()
    assert main(["resume", str(tmp_path), "--no-progress"]) == 2
    assert "holds 2 runs with checkpoints; name one: only, two" in capsys.readouterr().err


def _custom_task(tmp_path, name, rows):
    """--set arguments for a custom task whose train and test file holds ``rows``."""
    path = tmp_path / f"{name}_train.tsv"
    path.write_text(rows)
    return ["--set", f"data.custom_tasks=[{{name: {name}, train: {path}, test: {path}}}]",
            "--tasks", name]


def _bad_data(tmp_path):
    return _custom_task(tmp_path, "bad", "sentence\tlabel\nfine\t0\nno tab here\n")


def _bad_label(tmp_path):
    return _custom_task(tmp_path, "label", "sentence\tlabel\nfine\t0\nodd\tmaybe\n")


def _empty_task(tmp_path):
    return _custom_task(tmp_path, "few", "sentence\tlabel\na\t0\nb\t1\nc\t0\n")


def _broken_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("method: atlas\ndata: {tasks: [sst2\n")
    return ["--config", str(config)]


SPECK = ("devices.custom=[{name: speck, memory_gb: 0.0001, compute: 1, uplink_mbps: 1, "
         "downlink_mbps: 1}]")


@pytest.mark.parametrize("extra, message", [
    (lambda p: ["--tasks", "sst3"], "unknown task 'sst3'; did you mean sst2"),
    (lambda p: ["--set", "train.lr=abc"], "config key 'train.lr' must be a number, got 'abc'"),
    (_broken_yaml, "broken.yaml, line 3, column 1: not valid YAML"),
    (_empty_task, "task 'few': 0 training rows cannot be split over 2 clients, after dropping 3 "
                  "rows that are also in its test split"),
    (lambda p: ["--method", "hetlora", "--set", SPECK, "--set", "devices.profiles=[speck]"],
     "on device speck needs 5.3 MiB for its smallest adapter, its budget is 104.9 KiB"),
    (lambda p: ["--model", "no-such-model-xyz"], "unknown model 'no-such-model-xyz'"),
    (lambda p: ["--method", "fedavgg"], "unknown method 'fedavgg'; did you mean fedavg"),
    (lambda p: ["--set", "data.sampels=3"],
     "unknown config key 'data.sampels'; did you mean data.samples"),
    (lambda p: ["--clients-per-task", "0"], "data.clients_per_task' = 0 is invalid"),
    (lambda p: ["--samples", "0"], "data.samples' = 0 is invalid"),
    (_bad_data, "bad_train.tsv line 3: expected 2 tab-separated fields"),
    (_bad_label, "label_train.tsv line 3: label 'maybe' is not in the label set"),
    (lambda p: ["--config", str(p / "missing.yaml")], "config file not found"),
])
def test_bad_input_exits_2_with_one_clear_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out_dir = tmp_path / "runs"
    code = main([*TINY, "--out", str(out_dir), *extra(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.count("atlasfl: error:") == 1
    assert not out_dir.exists()


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "taken"
    run.mkdir()
    (run / "summary.json").write_text("precious")
    code = main([*TINY, "--out", str(tmp_path), "--run-name", "taken"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == "precious"
    assert sorted(p.name for p in run.iterdir()) == ["summary.json"]
    # --overwrite replaces run folders only: this one holds no config.yaml
    assert main([*TINY, "--out", str(tmp_path), "--run-name", "taken", "--overwrite"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert (run / "summary.json").read_text() == "precious"
    (run / "config.yaml").write_text("method: local\n")
    assert main([*TINY, "--out", str(tmp_path), "--run-name", "taken", "--overwrite"]) == 0
    assert (run / "summary.json").read_text() != "precious"
