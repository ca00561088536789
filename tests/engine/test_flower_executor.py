"""The Flower executor against a grid that runs the real ClientApp in this process.

No Ray, no network: ``LocalGrid`` hands each message to ``client_app`` with one ``Context`` per
node (as a SuperNode keeps it), and can make a node fail or stay silent for a message type.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from atlasfl.engine import (  # noqa: E402
    RunDir,
    build_experiment,
    load_checkpoint,
    run_experiment,
)
from atlasfl.engine.flower.client_app import app as client_app  # noqa: E402
from atlasfl.engine.flower.executor import FlowerExecutor, discover  # noqa: E402
from atlasfl.engine.ledger import CommLedger  # noqa: E402
from atlasfl.engine.setup import num_clients  # noqa: E402
from atlasfl.errors import AtlasError  # noqa: E402

pytestmark = pytest.mark.flower


class LocalGrid:
    """Nodes 100, 101, ... serving partitions 0, 1, ...; ``faults[(node, type, round)]``."""

    def __init__(self, partitions, faults=None, node_configs=None):
        extra = node_configs or [{}] * len(partitions)
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i,
                                          node_config={"partition-id": p, **extra[i]},
                                          state=RecordDict(), run_config={})
                         for i, p in enumerate(partitions)}
        self.faults = faults or {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            fault = self.faults.get((node, kind, msg.metadata.group_id))
            if fault == "silent":
                continue
            if fault == "error":
                out.append(Message(Error(code=0, reason="boom"), reply_to=msg))
                continue
            try:  # as a SuperNode does: a ClientApp's exception becomes an error reply
                out.append(client_app(msg, self.contexts[node]))
            except Exception as exc:  # noqa: BLE001
                out.append(Message(Error(code=1, reason=str(exc)), reply_to=msg))
        return out


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # a ServerApp process has these set by Flower; messages are stamped with them
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def test_a_failing_or_silent_client_is_recorded_and_the_round_goes_on(tiny_cfg, tmp_path,
                                                                      capsys):
    cfg = tiny_cfg(method="fedavg-task", **{"federation.rounds": 2, "train.threads": 1,
                                            "out": str(tmp_path)})
    exp = build_experiment(cfg)
    run_dir = RunDir.create(cfg)
    # node 101 serves client 1, node 102 client 2, node 103 client 3
    grid = LocalGrid([0, 1, 2, 3], {(101, "train", "1"): "error",
                                    (102, "train", "2"): "silent",
                                    (103, "evaluate", "2"): "error",
                                    (101, "query.state", ""): "silent"})
    outcome = run_experiment(exp, run_dir, executor_of=lambda e, ledger: FlowerExecutor.connect(
        grid, e, ledger, timeout=5.0))
    assert outcome.completed_rounds == 2
    err = capsys.readouterr().err
    assert "client 1 did not send its state (no reply); the checkpoint keeps" in err
    history = [json.loads(line) for line in (run_dir.path / "rounds.jsonl").read_text()
               .splitlines()]
    rows = {(r["round"], r["client"]): r for r in history}
    assert rows[(1, 1)]["dropped"] == "flower: its ClientApp failed: boom"
    assert rows[(1, 1)]["trained"] is False and rows[(1, 1)]["bytes_up"] == 0
    assert rows[(1, 1)]["bytes_down"] > 0  # the plan was sent (and counted)
    assert rows[(2, 2)]["dropped"] == "flower: no reply within 5 s"
    assert rows[(2, 2)]["bytes_up"] == 0
    assert all(rows[(r, c)]["trained"] for r, c in rows if (r, c) not in {(1, 1), (2, 2)})
    assert rows[(2, 3)]["failed"] == "flower: its ClientApp failed: boom"
    assert "global_metric" not in rows[(2, 3)] and "local_metric" not in rows[(2, 3)]
    # the task of client 3 is scored on the client that answered (client 2) only
    mrpc = [r for r in history if r["round"] == 2 and r["task"] == "mrpc"]
    assert outcome.summary["tasks"]["mrpc"]["clients"] == 1
    for key in ("global_metric", "local_metric"):
        assert outcome.summary["tasks"]["mrpc"][key] == next(r[key] for r in mrpc if key in r)


def test_two_nodes_serving_one_client_are_refused_naming_the_setting(tiny_cfg):
    exp = build_experiment(tiny_cfg(**{"data.tasks": ["cola"]}))
    grid = LocalGrid([0, 0])
    with pytest.raises(AtlasError, match="both serve client 0.*partition-id"):
        FlowerExecutor.connect(grid, exp, None, wait=1.0)


def test_a_node_with_a_partition_id_outside_the_clients_fails_at_setup(tiny_cfg):
    exp = build_experiment(tiny_cfg(**{"data.tasks": ["cola"]}))
    grid = LocalGrid([0, 7])
    with pytest.raises(AtlasError, match="partition-id = 7 is invalid; allowed: 0..1"):
        FlowerExecutor.connect(grid, exp, None, wait=1.0)


def _bits(exp):
    return {f"{cid}/{k}": v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            for cid in exp.clients
            for k, v in {**exp.clients[cid].adapter_state(), **exp.clients[cid].head_state()
                         }.items()}


def test_checkpoint_and_resume_on_fresh_nodes_end_where_one_in_process_run_ends(tiny_cfg,
                                                                               tmp_path):
    cfg = tiny_cfg(method="fedavg-task", **{"federation.rounds": 2, "train.threads": 1,
                                            "out": str(tmp_path), "session.max_rounds": 1})
    whole = build_experiment(cfg.replace(**{"session.max_rounds": 0}))
    run_experiment(whole)
    first = build_experiment(cfg)
    run_dir = RunDir.create(cfg)
    done = run_experiment(first, run_dir, executor_of=lambda e, ledger: FlowerExecutor.connect(
        LocalGrid([0, 1, 2, 3]), e, ledger))
    assert done.summary is None and done.completed_rounds == 1
    # a new session: new nodes (empty context.state) take back the checkpointed client states
    second = build_experiment(cfg.replace(**{"session.max_rounds": 0}))
    nodes = LocalGrid([0, 1, 2, 3])
    end = run_experiment(second, run_dir, resume=load_checkpoint(done.checkpoint),
                         executor_of=lambda e, ledger: FlowerExecutor.connect(nodes, e, ledger))
    assert end.completed_rounds == 2
    assert _bits(second) == _bits(whole)


def test_deployment_server_app_runs_from_its_run_config_and_resumes_from_the_checkpoint(
        tiny_cfg, tmp_path):
    from flwr.app import Context

    from atlasfl.engine.flower.server_app import main

    cfg = tiny_cfg(method="fedavg-task", **{"federation.rounds": 2, "train.threads": 1})
    whole = build_experiment(cfg)
    run_experiment(whole)
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))

    def context(**run_config):
        return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                       run_config={"config": "", "set": "", "out": str(tmp_path / "runs"),
                                   "run-name": "dep", "resume": "", "timeout": 0, "wait": 5,
                                   **run_config})

    # session 1 stops after round 1; session 2 (new nodes) resumes from the run folder with the
    # checkpoint's own config (no 'config' given)
    main(LocalGrid([0, 1, 2, 3]), context(config=str(config), set="session.max_rounds=1"))
    run = tmp_path / "runs" / "dep"
    assert not (run / "summary.json").exists()
    main(LocalGrid([0, 1, 2, 3]), context(resume=str(run), set="session.max_rounds=0"))
    assert (run / "summary.json").exists()
    snapshot = load_checkpoint(run)
    assert snapshot.round_idx == 2
    for cid in whole.clients:
        for name, t in whole.clients[cid].adapter_state().items():
            assert torch.equal(snapshot.tensors[f"client/{cid}/adapter/{name}"], t), (cid, name)


def test_deployment_server_app_without_a_config_names_the_run_config_key():
    from flwr.app import Context

    from atlasfl.engine.flower.server_app import main

    with pytest.raises(AtlasError, match="run config 'config' is empty"):
        main(LocalGrid([0]), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                     run_config={"config": ""}))


def test_device_profiles_nodes_report_plan_the_ranks_as_the_same_assignment_in_process(tiny_cfg):
    # ranks by device (Phase 2): what the nodes report must be what the strategy plans with
    devices = ["cpu-2gb", "gpu-16gb", "gpu-16gb", "cpu-2gb"]
    cfg = tiny_cfg(method="hetlora", **{"model.lora.rslora": True, "ranks.grouping": "task",
                                        "ranks.budget": "device", "ranks.r_max": 64,
                                        "ranks.utility": "linear", "train.threads": 1,
                                        "federation.rounds": 2})
    local = build_experiment(cfg.replace(**{"devices.assignment": devices}))
    run_experiment(local)
    seeded = build_experiment(cfg)  # its seeded draw differs from the nodes' profiles
    assert [seeded.strategy.clients[c].device for c in range(4)] != devices
    grid = LocalGrid([0, 1, 2, 3], node_configs=[{"device-profile": d} for d in devices])
    with pytest.raises(AtlasError, match="client 0: its node reports device-profile 'cpu-2gb' "
                                         "but the experiment was built with"):
        FlowerExecutor.connect(grid, seeded, CommLedger(), wait=1.0)
    nodes = discover(grid, cfg, num_clients(cfg), wait=1.0)
    assert nodes.profiles == dict(enumerate(devices))
    exp = build_experiment(cfg, devices=nodes.profiles)  # resolved once, into the clients' info
    run_experiment(exp, executor_of=lambda e, ledger: FlowerExecutor.connect(grid, e, ledger,
                                                                             nodes=nodes))
    assert [exp.strategy.clients[c].device for c in range(4)] == devices
    assert _bits(exp) == _bits(local)
    assert {k: v.shape for k, v in exp.clients[0].adapter_state().items()} != \
        {k: v.shape for k, v in exp.clients[1].adapter_state().items()}  # ranks differ


def test_an_unknown_device_profile_is_refused_naming_the_setting(tiny_cfg):
    exp = build_experiment(tiny_cfg(**{"data.tasks": ["cola"]}))
    grid = LocalGrid([0, 1], node_configs=[{}, {"device-profile": "toaster"}])
    with pytest.raises(AtlasError, match="client 1: node_config device-profile = 'toaster' is "
                                         "unknown; allowed: .*gpu-16gb"):
        FlowerExecutor.connect(grid, exp, None, wait=1.0)
    with pytest.raises(AtlasError, match="unknown device profile 'toaster'"):
        build_experiment(exp.cfg, devices={1: "toaster"})
    with pytest.raises(AtlasError, match="reported for client 2; allowed: client ids 0..1"):
        build_experiment(exp.cfg, devices={2: "gpu-16gb"})


def test_num_clients_is_what_build_experiment_creates(tiny_cfg):
    for method in ("fedavg-task", "centralized"):
        cfg = tiny_cfg(method=method, **{"data.clients_per_task": 3})
        assert num_clients(cfg) == len(build_experiment(cfg).clients) == (6 if method ==
                                                                          "fedavg-task" else 2)


class CountingGrid(LocalGrid):
    """``LocalGrid`` counting the messages it carries by type."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent = {}

    def send_and_receive(self, messages, *, timeout=None):
        for msg in messages:
            kind = msg.metadata.message_type
            self.sent[kind] = self.sent.get(kind, 0) + 1
        return super().send_and_receive(messages, timeout=timeout)


def _split_cfg(tiny_cfg, mode, window, **extra):
    return tiny_cfg(method="splitlora", **{
        "federation.rounds": 2, "train.threads": 1, "split.mode": mode, "split.window": window,
        "split.cut": "1" if mode == "vanilla" else "0", "split.min_cut": 0,
        "data.samples": 40, **extra})


@pytest.mark.parametrize(("mode", "window"), [("vanilla", 1), ("u-shape", 1), ("vanilla", 3),
                                              ("u-shape", 2)])
def test_split_learning_over_flower_ends_with_the_in_process_models_bit_for_bit(
        tiny_cfg, mode, window):
    # every message reaches the ClientApp with only context.state: the client recomputes its
    # forward when the gradients come, where the in-process client kept its graph
    cfg = _split_cfg(tiny_cfg, mode, window)
    local = build_experiment(cfg)
    expected = run_experiment(local)
    exp = build_experiment(cfg)
    grid = CountingGrid([0, 1, 2, 3])
    got = run_experiment(exp, executor_of=lambda e, ledger: FlowerExecutor.connect(
        grid, e, ledger))
    assert got.completed_rounds == 2
    assert _bits(exp) == _bits(local)
    assert got.summary["bytes_by_kind"] == expected.summary["bytes_by_kind"]
    assert got.summary["bytes_by_kind"]["up_activations"] > 0
    for a, b in zip(got.summary["clients"], expected.summary["clients"], strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("seconds")} == \
            {k: v for k, v in b.items() if not k.endswith("seconds")}
    # one message pair per window (two in U-shape): 4 clients x 2 rounds, 1 local epoch
    windows = sum(-(-len(exp.clients[c].train_set) // (8 * window)) for c in exp.clients)
    assert grid.sent["train"] == 8
    assert grid.sent["train.split"] == 2 * windows * (2 if mode == "u-shape" else 1)
    assert grid.sent["evaluate.split"] > 0  # split clients are scored across the cut too


def test_a_split_client_failing_mid_exchange_is_recorded_and_trains_again_next_round(
        tiny_cfg, tmp_path, capsys):
    cfg = _split_cfg(tiny_cfg, "vanilla", 1, out=str(tmp_path))
    exp = build_experiment(cfg)
    run_dir = RunDir.create(cfg)
    grid = LocalGrid([0, 1, 2, 3], {(101, "train.split", "1"): "error"})
    outcome = run_experiment(exp, run_dir, executor_of=lambda e, ledger: FlowerExecutor.connect(
        grid, e, ledger))
    assert outcome.completed_rounds == 2
    assert ("client 1 (Flower node 101) its ClientApp failed: boom after 1 split windows"
            in capsys.readouterr().err)
    rows = {(r["round"], r["client"]): r for r in map(
        json.loads, (run_dir.path / "rounds.jsonl").read_text().splitlines())}
    assert rows[(1, 1)]["dropped"] == "flower: its ClientApp failed: boom"
    assert rows[(1, 1)]["bytes_up"] > 0  # its first window of activations was counted
    assert rows[(2, 1)]["trained"] is True and "dropped" not in rows[(2, 1)]
