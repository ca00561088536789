"""A loopback deployment: SuperLink, two SuperNodes and ``flwr run``, all on 127.0.0.1.

Every process this test starts gets its own session and is stopped, with its children, by its
PID (process group) in a ``finally``. The run's status is read with ``flwr ls``: ``flwr run``
returns as soon as the run is submitted, and its exit code says nothing of how the run ended.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("flwr")

from atlasfl.engine import build_experiment, load_checkpoint, run_experiment  # noqa: E402
from atlasfl.engine.checkpoint import latest_checkpoint  # noqa: E402
from atlasfl.engine.flower.server_app import FLOWER_ENV  # noqa: E402

pytestmark = pytest.mark.flower

APP = Path(__file__).resolve().parents[2] / "examples" / "flower"
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process this test started, and its children, by its PID (its process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def _status(env: dict[str, str], run_id: str) -> str:
    out = subprocess.run([str(BIN / "flwr"), "ls", "loopback", "--run-id", run_id,
                          "--format", "json"], env=env, capture_output=True, text=True,
                         timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return f"unreadable: {out.stdout[-300:]} {out.stderr[-300:]}"
    return str(runs[0]["status"]) if runs else "absent"


def test_loopback_deployment_runs_two_rounds_equal_to_in_process(tiny_cfg, glue_root,
                                                                 tmp_path):
    cfg = tiny_cfg(method="fedavg-task", **{
        "data.tasks": ["cola"], "federation.rounds": 2, "train.threads": 1,
        "data.data_dir": str(glue_root), "out": str(tmp_path / "runs"), "run_name": "deploy"})
    config = tmp_path / "experiment.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    home = tmp_path / "flwr"
    home.mkdir()
    link, *nodes = _free_ports(3)
    # the SuperLink connection: in FLWR_HOME's config.toml, never in the app's pyproject
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    # the SuperLink and SuperNodes start flower-superexec and flwr-* helpers found on PATH
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with (logs / f"{name}.log").open("w") as log:
            procs.append(subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env,
                                          stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1",
              "--port", str(link))
        _wait_port(link, 60)
        for i, port in enumerate(nodes):
            start(f"supernode{i}", "flower-supernode", "--insecure", "--superlink",
                  f"127.0.0.1:{link}", "--port", str(port), "--node-config",
                  f'partition-id={i} data-dir="{glue_root}"')
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", str(APP), "loopback", "--format", "json",
             "--run-config", f'config="{config}" timeout=600 wait=120'],
            env=env, capture_output=True, text=True, timeout=120)
        answer = json.loads(submitted.stdout)
        assert answer["success"], submitted.stdout + submitted.stderr
        run_id = answer["run-id"]
        deadline = time.monotonic() + 600
        status = _status(env, run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)
            status = _status(env, run_id)
        assert status == "finished:completed", (
            status + "\n" + "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                                      for p in sorted(logs.iterdir())))
    finally:
        for proc in reversed(procs):
            _stop(proc)
    assert all(p.poll() is not None for p in procs)
    # the run folder the ServerApp wrote: 2 rounds, and every client's final state (fetched
    # from its SuperNode for the checkpoint) equal to one in-process run's, bit for bit
    run = tmp_path / "runs" / "deploy"
    rows = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    assert sorted({r["round"] for r in rows}) == [1, 2]
    assert all(r["trained"] for r in rows)
    local = build_experiment(cfg)
    run_experiment(local)
    snapshot = load_checkpoint(latest_checkpoint(run))
    for cid in local.clients:
        client = local.clients[cid]
        for name, t in client.adapter_state().items():
            got = snapshot.tensors[f"client/{cid}/adapter/{name}"]
            assert torch.equal(got, t), (cid, name)
