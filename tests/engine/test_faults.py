"""Simulated failures in runs: recorded, never averaged in (the draws: test_fault_draws.py)."""

from __future__ import annotations


import torch

from atlasfl.engine import RunDir, build_experiment, load_checkpoint, run_experiment


def _history(exp, with_snapshot=False):
    run = RunDir.create(exp.cfg)
    run_experiment(exp, run)
    snapshot = load_checkpoint(run.path)
    return (snapshot.meta["history"], snapshot) if with_snapshot else snapshot.meta["history"]


def test_dropped_clients_are_recorded_and_only_survivors_are_averaged(tiny_cfg, tmp_path,
                                                                      updates_of):
    exp = build_experiment(tiny_cfg(method="fedavg-task", out=str(tmp_path), **{
        "federation.rounds": 4, "faults.drop_before": 0.3, "faults.drop_during": 0.3}))
    seen = updates_of(exp)
    history = _history(exp)
    reasons = {row.get("dropped") for rnd in history for row in rnd} - {None}
    assert reasons == {"vanished before training", "vanished after training, before its upload"}
    for rnd, aggregated in zip(history, seen, strict=True):
        survivors = {row["client"] for row in rnd if row["trained"] and "dropped" not in row}
        assert set(aggregated) == survivors
        for row in rnd:  # a plan that never arrived carried no bytes down
            if row.get("dropped") == "vanished before training":
                assert row["trained"] is False and row.get("bytes_down_adapter", 0) >= 0
                assert "train_loss" not in row


def test_a_split_client_vanishing_mid_training_leaves_the_server_consistent(
        tiny_cfg, tmp_path, weak_device):
    base = {"split.min_cut": 0, "split.mode": "u-shape", "split.enabled": "always",
            "out": str(tmp_path), "federation.rounds": 2, "faults.drop_during": 1.0}
    exp = build_experiment(tiny_cfg(method="hetlora", **base))
    history, snapshot = _history(exp, with_snapshot=True)
    rows = [row for rnd in history for row in rnd if row["trained"]]
    assert rows and all(row["dropped"].startswith("vanished during training, after ")
                        for row in rows)
    assert any(" after 0 of " not in row["dropped"] for row in rows)  # some batches went through
    server = {k: v for k, v in snapshot.tensors.items() if "server" in k}
    assert server and all(bool(torch.isfinite(v).all()) for v in server.values())


def test_updates_after_the_deadline_are_discarded_slow_devices_first(tiny_cfg, tmp_path,
                                                                      updates_of):
    exp = build_experiment(tiny_cfg(method="fedavg-task", out=str(tmp_path), **{
        "devices.assignment": ["cpu-2gb", "gpu-16gb", "cpu-2gb", "gpu-16gb"],
        "faults.deadline_seconds": 5.0,
        "faults.jitter": 0.0, "federation.rounds": 1}))
    seen = updates_of(exp)
    history = _history(exp)
    phones = {cid for cid, info in exp.strategy.clients.items() if info.device == "cpu-2gb"}
    assert phones == {0, 2}
    late = {row["client"] for row in history[0] if "late" in row}
    assert late == phones  # 3 steps x 0.5 s / 0.1 = 15 s > 5 s; on the GPU 0.075 s
    assert set(seen[0]) == set(exp.clients) - phones
    assert all(row["late"].startswith("simulated 15.") for row in history[0] if "late" in row)

