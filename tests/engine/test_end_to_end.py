"""Whole runs on tiny models, checked against values recomputed by hand from what they left."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from atlasfl.client import forward_logits
from atlasfl.config import from_dict, from_yaml
from atlasfl.data.tasks import resolve_tasks
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.models.registry import PRESETS
from atlasfl.strategies import get_method

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def _predict(exp, client, data):
    """The client's model on ``data``, one row at a time, in row order."""
    exp.binder.bind(client.adapter)
    exp.model.eval()
    client.head.eval()
    with torch.no_grad():
        return np.array([forward_logits(exp.model, client.head, data.collate([i]))
                         .squeeze().item() for i in range(len(data))])


def _classes(exp, client, data):
    """The client's predicted class of each row of ``data``, one row at a time."""
    exp.binder.bind(client.adapter)
    exp.model.eval()
    client.head.eval()
    with torch.no_grad():
        return np.array([int(forward_logits(exp.model, client.head, data.collate([i])).argmax())
                         for i in range(len(data))])


def test_regression_task_is_trained_with_mse_and_scored_by_correlation(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="fedavg-task", **{"data.tasks": ["stsb", "cola"],
                                                             "federation.rounds": 2}))
    summary = run_experiment(exp).summary
    assert summary["tasks"]["stsb"]["metric_name"] == "pearson"
    assert "accuracy" not in summary["tasks"]["stsb"]
    for row in summary["clients"]:
        client = exp.clients[row["client"]]
        if client.task.name != "stsb":
            continue
        assert tuple(client.head.out.weight.shape) == (1, client.head.out.in_features)
        test = exp.runtime.test_sets["stsb"]
        preds = _predict(exp, client, test)
        assert row["global_pearson"] == pytest.approx(pearsonr(preds, test.labels)[0], abs=1e-5)
        assert row["global_spearman"] == pytest.approx(spearmanr(preds, test.labels)[0],
                                                       abs=1e-5)
        assert row["global_loss"] == pytest.approx(np.mean((preds - test.labels) ** 2),
                                                   rel=1e-4)
        own = _predict(exp, client, client.local_set)
        assert row["local_pearson"] == pytest.approx(
            pearsonr(own, client.local_set.labels)[0], abs=1e-5)


@pytest.mark.parametrize("method", ["fedavg-task", "local", "centralized"])
def test_each_client_is_scored_on_its_local_test_and_on_the_shared_rows(tiny_cfg, method):
    # label skew: a task's clients hold different label mixes, and so do their local tests
    exp = build_experiment(tiny_cfg(method=method, **{"data.partition": "dirichlet",
                                                      "data.alpha": 0.3}))
    summary = run_experiment(exp).summary
    for row in summary["clients"]:
        client = exp.clients[row["client"]]
        test = exp.runtime.test_sets[client.task.name]
        shared = _classes(exp, client, test) == test.labels
        assert row["global_accuracy"] == pytest.approx(shared.mean())
        own = _classes(exp, client, client.local_set) == client.local_set.labels
        bounds = np.cumsum([0, *(client.local_parts or [len(own)])])
        # a pooled trainer is scored on each pooled client's local test on its own
        assert row["local_accuracy"] == pytest.approx(np.mean([own[a:b].mean() for a, b in
                                                               zip(bounds[:-1], bounds[1:],
                                                                   strict=True)]))
        assert row["local_accuracy"] != pytest.approx(row["global_accuracy"])  # not the same rows
    for task, entry in summary["tasks"].items():
        rows = [r for r in summary["clients"] if r["task"] == task]
        for key in ("local_accuracy", "global_accuracy", "local_metric", "global_metric"):
            assert entry[key] == pytest.approx(np.mean([r[key] for r in rows]))
    assert summary["average"]["local_metric"] == pytest.approx(
        np.mean([t["local_metric"] for t in summary["tasks"].values()]))
    assert summary["host"]["torch_threads"] == torch.get_num_threads()  # the machine is named
    assert summary["host"]["cpu"]


def test_a_pooled_trainer_holds_its_clients_local_tests_in_parts(tiny_cfg):
    pooled = build_experiment(tiny_cfg(method="centralized"))
    apart = build_experiment(tiny_cfg(method="local"))
    for task in ("cola", "mrpc"):
        (one,) = [c for c in pooled.clients.values() if c.task.name == task]
        each = [c for c in apart.clients.values() if c.task.name == task]
        assert one.local_parts == tuple(len(c.local_set) for c in each) == (6, 6)
        assert one.local_set.labels.tolist() == [x for c in each
                                                 for x in c.local_set.labels.tolist()]
        assert len(one.train_set) == sum(len(c.train_set) for c in each)


def test_local_steps_replace_epochs_and_cross_epoch_boundaries(tiny_cfg):
    # 18 training rows per client, batch 8: an epoch is 3 steps; 5 steps run into the second
    exp = build_experiment(tiny_cfg(method="local", **{"train.local_steps": 5,
                                                       "train.local_epochs": 4,
                                                       "federation.rounds": 2}))
    assert {c.num_examples for c in exp.clients.values()} == {18}
    run_experiment(exp)
    for client in exp.clients.values():
        (state,) = {id(p): s for p, s in client.optimizer.state.items()
                    if p is next(iter(client.adapter.values()))}.values()
        assert int(state["step"]) == 2 * 5  # two rounds of five optimizer steps
    exp = build_experiment(tiny_cfg(method="local", **{"train.local_epochs": 2}))
    rows = run_experiment(exp).summary["clients"]
    assert all(r["steps"] == 2 * 3 for r in rows)  # epochs when local_steps is 0


def test_head_lr_moves_the_head_on_its_own_rate(tiny_cfg):
    def head_change(head_lr):
        exp = build_experiment(tiny_cfg(method="local", **{"train.head_lr": head_lr}))
        before = {c: cl.head.out.weight.detach().clone() for c, cl in exp.clients.items()}
        run_experiment(exp)
        groups = exp.clients[0].optimizer.param_groups
        assert [g["lr"] for g in groups] == [0.01, head_lr or 0.01]
        return max(float((cl.head.out.weight.detach() - before[c]).abs().max())
                   for c, cl in exp.clients.items())

    assert head_change(1e-9) < 1e-7  # AdamW moves a weight by about lr per step
    assert head_change(None) > 1e-3  # head_lr null: the adapter's lr


@pytest.mark.parametrize("grouping", ["global", "cluster"])
def test_rank_strategies_aggregate_within_the_configured_groups(tiny_cfg, updates_of, grouping):
    cfg = tiny_cfg(method="homolora", **{"ranks.grouping": grouping, "clustering.k": 2,
                                         "clustering.samples": 8, "clustering.dim": 32,
                                         "data.partition": "dirichlet"})
    exp = build_experiment(cfg)
    seen = updates_of(exp)
    outcome = run_experiment(exp)
    members = outcome.state.groups.members
    assert len(set(members.values())) == (1 if grouping == "global" else 2)
    (updates,) = seen
    r = cfg.model.lora.r
    scaling = exp.strategy.scaling(r)
    module = next(iter(exp.strategy.model.shapes))
    a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    for cid, client in exp.clients.items():
        group = [u for c, u in updates.items() if members[str(c)] == members[str(cid)]]
        total = sum(u.num_examples for u in group)
        mean = sum(u.num_examples / total * scaling * u.adapter[b].double()
                   @ u.adapter[a].double() for u in group)
        u_, s_, vh = torch.linalg.svd(mean)  # its group's mean update, cut to rank r
        want = u_[:, :r] @ torch.diag(s_[:r]) @ vh[:r]
        got = scaling * client.adapter[b].double() @ client.adapter[a].double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_recluster_every_round_uploads_fresh_fingerprints_each_time(tiny_cfg, tmp_path):
    from atlasfl.engine import RunDir
    from atlasfl.runfiles import read_run

    cfg = tiny_cfg(method="fedavg-cluster", out=str(tmp_path), run_name="re", **{
        "clustering.recluster_every": 2, "clustering.samples": 8, "clustering.dim": 16,
        "federation.rounds": 3, "data.tasks": ["cola", "mrpc", "rte"]})
    exp = build_experiment(cfg)
    run_experiment(exp, RunDir.create(cfg))
    _, rows, _ = read_run(tmp_path / "re")
    fingerprint = {r["round"] for r in rows if r.get("bytes_up_fingerprint") == 17 * 4}
    assert fingerprint == {1, 3}  # rounds 1 and 1 + 2
    assert all(r.get("bytes_up_fingerprint", 0) == 0 for r in rows if r["round"] == 2)
    assert {r["round"] for r in rows if "server_k" in r} == {1, 3}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_names_what_exists(path):
    cfg = from_dict(from_yaml(path))
    get_method(cfg.method)
    resolve_tasks(cfg.data.tasks + tuple(cfg.data.task_samples), cfg.data.custom_tasks)
    assert cfg.model.name in PRESETS


def test_the_shipped_configs_are_the_ones_tested():
    assert {p.name for p in CONFIGS} >= {"quick.yaml", "quick-dirichlet.yaml", "medium.yaml",
                                         "paper.yaml"}


def test_clients_whose_model_did_not_change_are_marked_and_scored_the_same(tiny_cfg, tmp_path):
    from atlasfl.engine import RunDir, load_checkpoint
    exp = build_experiment(tiny_cfg(method="local", out=str(tmp_path),
                                    **{"federation.rounds": 4, "federation.fraction": 0.5}))
    run_dir = RunDir.create(exp.cfg)
    run_experiment(exp, run_dir)
    history = load_checkpoint(run_dir.path).meta["history"]
    seen = 0
    for prev, rows in zip(history, history[1:], strict=False):
        for before, row in zip(prev, rows, strict=True):
            # local: a client's model changes exactly when it trains
            assert row.get("unchanged") == (None if row["trained"] else 1.0)
            if not row["trained"]:
                seen += 1
                for key in ("global_metric", "local_metric", "val_metric", "global_loss"):
                    assert row[key] == before[key]
    assert seen > 0 and all("unchanged" not in r for r in history[0])


def test_threads_follow_the_setting_then_the_environment(tiny_cfg, monkeypatch):
    from atlasfl.engine.setup import resolve_threads
    before = torch.get_num_threads()
    try:
        build_experiment(tiny_cfg(**{"train.threads": 1}))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert resolve_threads(0) == 3 and resolve_threads(2) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert resolve_threads(0) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_without_a_terminal_progress_is_one_line_per_round(tiny_cfg, capsys):
    exp = build_experiment(tiny_cfg(progress=True, **{"federation.rounds": 2}))
    rows = run_experiment(exp).summary["clients"]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedavg: round")]
    assert [line.split(",")[0] for line in lines] == ["fedavg: round 1/2 done",
                                                      "fedavg: round 2/2 done"]
    means = {k: sum(r[k] for r in rows) / len(rows)
             for k in ("local_metric", "global_metric", "val_metric")}
    assert lines[-1].endswith(f"{len(rows)} clients trained, mean client local_metric "
                              f"{means['local_metric']:.3f}, mean client global_metric "
                              f"{means['global_metric']:.3f}, mean client val_metric "
                              f"{means['val_metric']:.3f}")
    assert "\r" not in err  # no bar redrawn into the log


def test_early_stopping_ends_the_run_and_reports_each_clients_round_best_on_validation(
        tiny_cfg, tmp_path):
    from atlasfl.engine import RunDir, load_checkpoint
    from atlasfl.runfiles import read_run

    # a learning rate that moves nothing: each validation metric stays where round 1 put it, so
    # round 1 stays every client's best (ties keep the earliest) and two evaluations later the
    # run stops
    cfg = tiny_cfg(method="centralized", out=str(tmp_path), run_name="still",
                   **{"federation.rounds": 6, "federation.patience": 2, "train.lr": 1e-12})
    run_dir = RunDir.create(cfg)
    outcome = run_experiment(build_experiment(cfg), run_dir)
    assert outcome.completed_rounds == 3 and outcome.summary is not None
    assert outcome.summary["rounds_run"] == 3
    assert set(outcome.summary["reported_rounds"].values()) == {1}
    assert (run_dir.path / "summary.json").is_file()
    assert load_checkpoint(run_dir.path).round_idx == 3  # the state it stopped in is saved
    again = run_experiment(build_experiment(cfg), RunDir(run_dir.path),
                           resume=load_checkpoint(run_dir.path))
    assert again.completed_rounds == 3  # resumed, it has nothing left to run
    assert again.summary["clients"] == outcome.summary["clients"]
    # learning: each client reports its round best on its validation rows, not the last
    cfg = tiny_cfg(method="centralized", out=str(tmp_path), run_name="learns",
                   **{"federation.rounds": 4, "federation.patience": 4, "train.lr": 0.05})
    summary = run_experiment(build_experiment(cfg), RunDir.create(cfg)).summary
    _, rows, _ = read_run(tmp_path / "learns")
    assert summary["rounds_run"] == 4
    for reported in summary["clients"]:
        mine = [x for x in rows if x["client"] == reported["client"]]
        best = max(mine, key=lambda x: (x["val_metric"], -x["round"]))
        assert summary["reported_rounds"][str(reported["client"])] == best["round"]
        assert reported["global_metric"] == best["global_metric"]
