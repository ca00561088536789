"""A loopback deployment: SuperLink, two SuperNodes and ``flwr run``, all on 127.0.0.1.

``Loopback`` starts every process on free ports, each in its own session, and stops them with
their children by PID (process group) when the block ends, failed or not. The run's status is
read with ``flwr ls``: ``flwr run`` returns once the run is submitted, and its exit code says
nothing of how the run ended.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from atlasfl.engine import build_experiment, load_checkpoint, run_experiment  # noqa: E402
from atlasfl.engine.checkpoint import latest_checkpoint  # noqa: E402
from atlasfl.engine.flower.loopback import Loopback  # noqa: E402

pytestmark = pytest.mark.flower


def test_loopback_deployment_runs_two_rounds_equal_to_in_process(tiny_cfg, glue_root,
                                                                 tmp_path):
    cfg = tiny_cfg(method="fedavg-task", **{
        "data.tasks": ["cola"], "federation.rounds": 2, "train.threads": 1,
        "data.data_dir": str(glue_root), "out": str(tmp_path / "runs"), "run_name": "deploy"})
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    with Loopback(tmp_path / "deploy", [f'partition-id={i} data-dir="{glue_root}"'
                                        for i in range(2)]) as nodes:
        run_id = nodes.submit(f'config="{config}" timeout=600 wait=120')
        info = nodes.wait(run_id, 600)
        assert info["status"] == "finished:completed", f"{info}\n{nodes.log_tails()}"
    assert nodes.procs and all(p.poll() is not None for p in nodes.procs)
    # the run folder the ServerApp wrote: 2 rounds, and every client's final state (fetched
    # from its SuperNode for the checkpoint) equal to one in-process run's, bit for bit
    run = tmp_path / "runs" / "deploy"
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rows}) == [1, 2]
    assert all(r["trained"] for r in rows)
    local = build_experiment(cfg)
    expected = run_experiment(local).summary
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bytes_by_kind"] == expected["bytes_by_kind"]  # counted at the same place
    snapshot = load_checkpoint(latest_checkpoint(run))
    for cid in local.clients:
        client = local.clients[cid]
        for name, t in client.adapter_state().items():
            got = snapshot.tensors[f"client/{cid}/adapter/{name}"]
            assert torch.equal(got, t), (cid, name)
