"""The report from run folders: statistics by hand, arms, tables, figures, unfinished runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from atlasfl.errors import AtlasError
from atlasfl.report import find_runs, write_report
from atlasfl.report.figures import draw_figures
from atlasfl.report.stats import paired, spread
from atlasfl.report.tables import arms, comparisons, latex, markdown, method_table, to_csv

TASKS = {"sst2": "accuracy", "cola": "mcc"}


GLOBAL_GAP = 0.2  # a fake client's global metric is its local one minus this: never confused


def fake_run(root: Path, name: str, *, method: str, seed: int, clients: list[tuple[str, float]],
             lam: float | None = None, finished: bool = True, rounds: int = 2,
             train: dict | None = None, summary_extra: dict | None = None,
             data: dict | None = None) -> Path:
    """A run folder as the runner writes it: clients' final local metrics given (global ones
    ``GLOBAL_GAP`` lower), earlier rounds lower; references depend on the seed only."""
    path = root / name
    path.mkdir(parents=True)
    config = {"method": method, "seed": seed, "out": str(root), "run_name": name,
              "data": {"tasks": list(TASKS), **(data or {})}}
    if lam is not None:
        config["laplacian"] = {"lam": lam}
    if train is not None:
        config["train"] = train
    (path / "config.yaml").write_text(yaml.safe_dump(config))

    def scores(metric: float) -> dict:
        return {"local_metric": metric, "local_accuracy": metric,
                "global_metric": metric - GLOBAL_GAP, "global_accuracy": metric - GLOBAL_GAP,
                "val_metric": metric + 0.05}

    rows = [{"round": r, "client": i, "task": task, **scores(metric - 0.1 * (rounds - r)),
             "bytes_up": 1000 * (i + 1), "bytes_down": 500}
            for r in range(1, rounds + 1) for i, (task, metric) in enumerate(clients)]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        final = [{"client": i, "task": t, **scores(m)} for i, (t, m) in enumerate(clients)]
        tasks = {}
        for task, name_ in TASKS.items():
            values = [m for t, m in clients if t == task]
            tasks[task] = {"clients": len(values), "metric_name": name_,
                           **scores(sum(values) / len(values))}
        average = {k: sum(t[k] for t in tasks.values()) / len(tasks) for k in scores(0)}
        refs = {name: {"tasks": {t: {"local_metric": base + seed / 10, "global_metric": base}
                                 for t in TASKS},
                       "average": {"local_metric": base + seed / 10, "global_metric": base}}
                for name, base in (("majority", 0.5), ("own_majority", 0.6))}
        summary = {"tasks": tasks, "average": average, "references": refs, "method": method,
                   "seed": seed, "clients": final, "bytes_up": sum(r["bytes_up"] for r in rows),
                   "bytes_down": sum(r["bytes_down"] for r in rows), "wall_seconds": 10.0 + seed,
                   "peak_rss_mb": 100.0, **(summary_extra or {})}
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_spread_and_a_paired_comparison_by_hand():
    s = spread([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.sd == pytest.approx(math.sqrt(7 / 3)) and s.n == 3
    assert spread([0.5]).sd is None
    assert math.isnan(spread([0.5, math.nan]).mean)  # shown as nan, never dropped or a crash
    # differences 0.1, 0.2, 0.3: mean 0.2, SD 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641 on 2 df
    p = paired({0: 1.1, 1: 1.2, 2: 1.3, 7: 9.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert p.n == 3 and p.mean_diff == pytest.approx(0.2) and p.wins == 3
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} = 4.3027
    assert (p.ci_low, p.ci_high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))
    assert p.t_p == pytest.approx(0.07417990022744853)  # 2 (1 - F_t2(3.4641))
    assert p.wilcoxon_p == pytest.approx(0.25)  # exact: all 3 signs positive, 2 / 2^3
    assert p.cohens_d == pytest.approx(2.0)
    one = paired({0: 0.4}, {0: 0.5, 1: 0.6})
    assert one.n == 1 and one.mean_diff == pytest.approx(-0.1) and one.ci_low is None
    assert paired({0: 1.0}, {1: 1.0}) is None


def test_sd_is_across_seeds_and_client_sd_across_clients(tmp_path):
    # two seeds whose clients are identical within a run but differ between the seeds
    for seed, value in ((0, 0.6), (1, 0.8)):
        fake_run(tmp_path, f"a{seed}", method="fedavg", seed=seed,
                 clients=[("sst2", value), ("sst2", value), ("cola", value), ("cola", value)])
    table = method_table(find_runs([tmp_path]))
    row = next(r for r in table.rows if r[0] == "fedavg")
    sd = math.sqrt(((0.6 - 0.7) ** 2 + (0.8 - 0.7) ** 2) / 1)
    assert table.header[2:4] == ["sst2 accuracy local", "sst2 accuracy global"]
    assert row[1] == "2" and row[2] == f"0.700 ± {sd:.3f}"  # sst2 local, across seeds
    assert row[3] == f"{0.7 - GLOBAL_GAP:.3f} ± {sd:.3f}"  # sst2 global, beside it
    assert row[table.header.index("client SD local")] == "0.000"  # identical clients
    # the references lead: one per seed (0.5 and 0.6 local, 0.5 global for the task's majority)
    assert [r[0] for r in table.rows[:2]] == ["majority class (task's)",
                                              "majority class (each client's own)"]
    assert table.rows[0][1:4] == ["2", "0.550 ± 0.071", "0.500 ± 0.000"]
    assert "± is the SD across seeds" in table.title and "± is the SD across seeds" in table.note


def test_arms_keep_settings_apart_and_refuse_a_seed_twice(tmp_path):
    for lam in (0.5, 1.0):
        for seed in (0, 1):
            fake_run(tmp_path / "sweep", f"lam={lam}_seed={seed}", method="atlas", seed=seed,
                     lam=lam, clients=[("sst2", 0.7 + lam / 10), ("cola", 0.1)])
    grouped = arms(find_runs([tmp_path / "sweep"]))
    assert list(grouped) == ["atlas lam=0.5", "atlas lam=1.0"]
    assert [r.seed for r in grouped["atlas lam=1.0"]] == [0, 1]
    diff = comparisons(find_runs([tmp_path / "sweep"]), "atlas lam=1.0")["atlas lam=0.5"]
    assert diff.mean_diff == pytest.approx(-0.025) and diff.n == 2  # (-0.05 on sst2) / 2 tasks
    fake_run(tmp_path / "sweep", "again", method="atlas", seed=0, lam=0.5,
             clients=[("sst2", 0.7), ("cola", 0.1)])
    with pytest.raises(AtlasError, match="two runs of seed 0"):
        arms(find_runs([tmp_path / "sweep"]))


def test_unfinished_and_broken_runs_are_listed_not_averaged(tmp_path):
    fake_run(tmp_path, "done", method="local", seed=0, clients=[("sst2", 0.9), ("cola", 0.3)])
    fake_run(tmp_path, "stopped", method="local", seed=1, finished=False,
             clients=[("sst2", 0.1), ("cola", 0.1)])
    broken = fake_run(tmp_path, "broken", method="local", seed=2,
                      clients=[("sst2", 0.1), ("cola", 0.1)])
    (broken / "summary.json").write_text("{not json")
    records = {r.path.name: r for r in find_runs([tmp_path])}
    assert {n: r.status for n, r in records.items()} == {
        "done": "finished", "stopped": "unfinished", "broken": "failed"}
    report = write_report([tmp_path], tmp_path / "report", figures=False)
    row = next(line for line in report.splitlines() if line.startswith("| local |"))
    assert "| local | 1 | 0.900 | 0.700 |" in row  # only the finished run
    assert "stopped | unfinished | 2 rounds written, no summary" in report
    assert "broken | failed | JSONDecodeError" in report
    assert (tmp_path / "report" / "tables" / "not_finished.csv").is_file()


def test_markdown_csv_and_latex_of_one_table(tmp_path):
    fake_run(tmp_path, "x", method="fedavg_task", seed=0, clients=[("sst2", 0.9), ("cola", 0.3)])
    fake_run(tmp_path, "y", method="fedavg_task", seed=1, clients=[("sst2", 0.7), ("cola", 0.1)])
    table = method_table(find_runs([tmp_path]))
    assert "| fedavg_task | 2 | 0.800 ± 0.141 | 0.600 ± 0.141 |" in markdown(table)
    assert to_csv(table).splitlines()[3].startswith("fedavg_task,2,0.800 ± 0.141,")
    tex = latex(table)
    assert "\\toprule" in tex and "\\bottomrule" in tex
    assert "fedavg\\_task & 2 & 0.800 $\\pm$ 0.141 &" in tex


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_are_valid_files_and_missing_data_is_skipped_with_a_reason(tmp_path):
    for seed in (0, 1):
        for method, value in (("local", 0.6), ("atlas", 0.8)):
            fake_run(tmp_path / "runs", f"{method}{seed}", method=method, seed=seed,
                     clients=[("sst2", value + seed / 20), ("cola", value / 4)])
    written, skipped = draw_figures(find_runs([tmp_path / "runs"]), tmp_path / "fig")
    names = {p.name for p in written}
    for name in ("convergence", "task_bars", "local_vs_global", "bytes_vs_metric",
                 "memory_vs_metric", "client_heatmap"):
        assert {f"{name}.png", f"{name}.pdf"} <= names
    assert all(_is_png(p) for p in written if p.suffix == ".png")
    assert all(p.read_bytes()[:5] == b"%PDF-" for p in written if p.suffix == ".pdf")
    assert any(s.startswith("fingerprint_map: skipped, no run wrote clusters.json")
               for s in skipped)
    assert any(s.startswith("graph_heatmap: skipped") for s in skipped)
    assert not (tmp_path / "fig" / "fingerprint_map.png").exists()


def test_compare_runs_the_grid_skips_what_finished_and_reports(tiny_cfg, tmp_path, capsys):
    from atlasfl.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_cfg(**{"federation.rounds": 1}).to_dict()))
    argv = ["compare", "--config", str(config), "--methods", "local,fedavg-task",
            "--seeds", "0,1", "--out", str(tmp_path / "cmp"), "--vs", "fedavg-task"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert first.err.count(": running") == 4
    summaries = {p.parent.name: json.loads(p.read_text())
                 for p in (tmp_path / "cmp").glob("*/summary.json")}
    assert sorted(summaries) == ["method=fedavg-task_seed=0", "method=fedavg-task_seed=1",
                                 "method=local_seed=0", "method=local_seed=1"]
    local = [summaries[f"method=local_seed={s}"]["average"]["local_metric"] for s in (0, 1)]
    row = next(line for line in first.out.splitlines() if line.startswith("| local |"))
    assert row.startswith("| local | 2 | ") and f"{spread(local).mean:.3f} ± " in row
    assert "each method minus `fedavg-task`, average metric on the local test" in first.out
    assert "each method minus `fedavg-task`, average metric on the global test" in first.out
    assert (tmp_path / "cmp" / "report" / "figures" / "convergence.pdf").is_file()
    assert main(argv) == 0  # again: every run is finished, nothing runs
    assert capsys.readouterr().err.count("finished, skipped") == 4
    assert main(["report", str(tmp_path / "cmp"), "--vs", "nope", "--no-figures"]) == 2
    assert "--vs 'nope' is not among the arms: fedavg-task, local" in capsys.readouterr().err


def test_the_publication_notebook_executes_on_a_compare_folder(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for seed in (0, 1):
        for method, value in (("fedavg", 0.6), ("atlas", 0.8)):
            fake_run(tmp_path / "cmp", f"{method}{seed}", method=method, seed=seed,
                     clients=[("sst2", value + seed / 20), ("cola", value / 4)])
    path = Path(__file__).resolve().parents[2] / "examples" / "publication.ipynb"
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")  # stripped
    monkeypatch.setenv("ATLASFL_COMPARE", str(tmp_path / "cmp"))
    NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    text = "".join(o.get("text", "") + str(o.get("data", {}).get("text/markdown", ""))
                   for c in notebook.cells for o in c.get("outputs", []))
    assert "4 runs, 4 finished" in text
    assert "| atlas | 2 |" in text and "convergence.png" in text
    assert (tmp_path / "cmp" / "report" / "figures" / "task_bars.pdf").is_file()


def test_an_arm_label_names_only_what_differs_within_its_method(tmp_path):
    fake_run(tmp_path, "local0", method="local", seed=0, lam=1.0,
             clients=[("sst2", 0.7), ("cola", 0.1)])
    for lam in (0.5, 1.0):
        fake_run(tmp_path, f"atlas{lam}", method="atlas", seed=0, lam=lam,
                 clients=[("sst2", 0.7), ("cola", 0.1)])
    assert list(arms(find_runs([tmp_path]))) == ["atlas lam=0.5", "atlas lam=1.0", "local"]


def test_a_key_added_since_an_old_run_was_written_does_not_split_its_arm(tmp_path):
    fake_run(tmp_path, "old", method="local", seed=0, clients=[("sst2", 0.7), ("cola", 0.1)])
    fake_run(tmp_path, "new", method="local", seed=1, clients=[("sst2", 0.7), ("cola", 0.1)],
             train={"length_bucket": 0})  # written by a version that has the key: its default
    fake_run(tmp_path, "other", method="local", seed=2, clients=[("sst2", 0.7), ("cola", 0.1)],
             train={"length_bucket": 8})
    assert list(arms(find_runs([tmp_path]))) == ["local length_bucket=0", "local length_bucket=8"]
    assert [r.seed for r in arms(find_runs([tmp_path]))["local length_bucket=0"]] == [0, 1]


def test_runs_that_auto_ran_in_other_precisions_are_two_arms(tmp_path):
    clients = [("sst2", 0.7), ("cola", 0.1)]
    fake_run(tmp_path, "old-cpu", method="local", seed=0, clients=clients)  # auto was fp32 on CPU
    fake_run(tmp_path, "new-cpu", method="local", seed=1, clients=clients,
             summary_extra={"precision": "fp32"})
    fake_run(tmp_path, "bf16-cpu", method="local", seed=0, clients=clients,
             summary_extra={"precision": "bf16"})
    fake_run(tmp_path, "old-gpu", method="local", seed=2, clients=clients,
             summary_extra={"device": "cuda:0"})  # auto was bf16 on CUDA
    found = arms(find_runs([tmp_path]))
    assert list(found) == ["local precision=bf16", "local precision=fp32"]
    assert [r.seed for r in found["local precision=fp32"]] == [0, 1]
    assert [r.seed for r in found["local precision=bf16"]] == [0, 2]


def test_quartiles_by_hand():
    from atlasfl.report.stats import quartiles

    # exclusive method on 1..7: positions 2 and 6 of the sorted values
    assert quartiles([7.0, 1.0, 5.0, 3.0, 2.0, 6.0, 4.0]) == (2.0, 6.0)
    assert quartiles([1.0, 9.0, 4.0]) == (1.0, 9.0)  # too few: min and max


def test_wilcoxon_p_is_shown_only_from_six_seeds_and_every_table_labels_its_plus_minus(tmp_path):
    from atlasfl.report.tables import comparison_table
    from atlasfl.report.write import report_tables

    for seed in range(6):
        fake_run(tmp_path, f"a{seed}", method="atlas", seed=seed,
                 clients=[("sst2", 0.8), ("cola", 0.2)])
        fake_run(tmp_path, f"l{seed}", method="local", seed=seed,
                 clients=[("sst2", 0.7 + seed / 100), ("cola", 0.2)])
    six = find_runs([tmp_path])
    (row,) = comparison_table(six, "atlas").rows
    assert row[1] == "6" and row[5] == "0.031"  # exact: all 6 signs alike, 2 / 2^6
    five = [r for r in six if r.seed < 5]
    (row,) = comparison_table(five, "atlas").rows
    assert row[1] == "5" and row[5] == "n < 6"  # min two-sided p is 2 / 2^5 = 0.0625
    for table in report_tables(six).values():
        if any("±" in cell for row in table.rows for cell in row):
            assert "± is the SD across seeds" in table.title


def test_references_come_once_per_data_setting(tmp_path):
    for partition in ("iid", "dirichlet"):
        for method in ("local", "atlas"):
            fake_run(tmp_path, f"{partition}-{method}", method=method, seed=0,
                     clients=[("sst2", 0.7), ("cola", 0.1)], data={"partition": partition})
    labels = [r[0] for r in method_table(find_runs([tmp_path])).rows]
    assert labels[:4] == ["majority class (task's) partition=dirichlet",
                          "majority class (each client's own) partition=dirichlet",
                          "majority class (task's) partition=iid",
                          "majority class (each client's own) partition=iid"]


def test_a_summary_from_before_local_tests_reads_as_global_scores(tmp_path):
    from atlasfl.report.runs import upgrade_summary

    old = {"tasks": {"sst2": {"clients": 2, "metric_name": "accuracy", "metric": 0.8,
                              "accuracy": 0.8, "majority_metric": 0.5, "majority_accuracy": 0.5,
                              "own_metric": 0.9}},
           "average": {"metric": 0.8, "accuracy": 0.8, "majority_metric": 0.5,
                       "majority_accuracy": 0.5, "own_metric": 0.9, "val_metric": 0.7},
           "clients": [{"client": 0, "task": "sst2", "metric": 0.8, "own_accuracy": 0.9}]}
    new = upgrade_summary(old)
    assert new["average"] == {"global_metric": 0.8, "global_accuracy": 0.8, "val_metric": 0.7}
    assert new["clients"] == [{"client": 0, "task": "sst2", "global_metric": 0.8}]
    assert new["references"] == {"majority": {
        "tasks": {"sst2": {"global_metric": 0.5, "global_accuracy": 0.5}},
        "average": {"global_metric": 0.5, "global_accuracy": 0.5}}}
    assert upgrade_summary(new) is new
