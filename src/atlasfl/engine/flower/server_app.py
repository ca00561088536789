"""The Flower ``ServerApp``: the one round loop (``run_experiment``) over the Flower executor.

Simulation (``run_flower_simulation``, ``atlasfl run --engine flower-sim``) runs the ServerApp in
this process on an experiment already built, with Flower's Ray backend running the ClientApps.
Deployment (``app`` below, ``flwr run``) builds the experiment from its run config:

- ``config``: path of the experiment's YAML on the SuperLink's machine (required, except to
  resume: then the checkpoint's config),
- ``set``: space-separated ``key=value`` overrides (as ``atlasfl run --set``),
- ``out``, ``run-name``: where the run folder goes (as ``atlasfl run --out/--run-name``),
- ``resume``: a run folder or checkpoint to continue,
- ``timeout``: seconds an exchange waits for its replies (0: no limit),
- ``wait``: seconds to wait for one SuperNode per client to connect.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from atlasfl.config import (
    check_same_experiment,
    from_dict,
    from_yaml,
    layered,
    parse_overrides,
)
from atlasfl.engine.checkpoint import find_run, load_checkpoint, resolve_checkpoint
from atlasfl.engine.flower.executor import FlowerExecutor, Nodes, discover
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import Experiment, build_experiment, num_clients
from atlasfl.engine.simulation import RunOutcome, StopFlag, run_experiment
from atlasfl.errors import AtlasError

# Flower's telemetry, update checks and runtime installs of an app's dependencies stay off.
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def flower_executor(grid: Grid, *, timeout: float | None = None, wait: float = 120.0,
                    nodes: Nodes | None = None
                    ) -> Callable[[Experiment, CommLedger], FlowerExecutor]:
    """``run_experiment``'s ``executor_of``: the Flower executor on ``grid`` (over ``nodes``)."""
    def build(exp: Experiment, ledger: CommLedger) -> FlowerExecutor:
        return FlowerExecutor.connect(grid, exp, ledger, timeout=timeout, wait=wait, nodes=nodes)
    return build


@dataclass
class _Result:
    outcome: RunOutcome | None = None
    error: BaseException | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_flower_simulation(exp: Experiment, run_dir: RunDir | None = None, *,
                          resume: Any = None, stop: StopFlag | None = None,
                          timeout: float | None = None,
                          backend_config: dict[str, Any] | None = None) -> RunOutcome:
    """Run ``exp`` on Flower's simulation runtime (Ray), one virtual SuperNode per client.

    The ServerApp runs ``run_experiment`` here on ``exp`` (so its store ends up holding every
    client's final state); the ClientApps (``atlasfl.engine.flower.client_app``) run in Ray
    workers. ``backend_config`` defaults to one CPU for everything.
    """
    from flwr.simulation import run_simulation

    from atlasfl.engine.flower.client_app import app as client_app

    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    result = _Result()
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            result.outcome = run_experiment(exp, run_dir, resume=resume, stop=stop,
                                            executor_of=flower_executor(grid, timeout=timeout))
        except BaseException as exc:  # re-raised below: Flower only logs a ServerApp's errors
            result.error = exc

    config = backend_config or {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                "init_args": {"num_cpus": 1, "include_dashboard": False,
                                              "object_store_memory": 100 * 2**20}}
    run_simulation(server, client_app, num_supernodes=len(exp.clients),
                   backend_config=config)  # type: ignore[arg-type]
    if result.error is not None:
        raise result.error
    if result.outcome is None:
        raise AtlasError("the Flower simulation ended before the ServerApp ran; see its log")
    return result.outcome


def config_of(run_config: dict[str, Any], saved: dict[str, Any] | None = None) -> Any:
    """The experiment config a deployment's run config names (``config`` and ``set``).

    ``saved``: a checkpoint's config, the base when ``config`` is empty (a resumed run).
    """
    path = str(run_config.get("config", ""))
    if not path and saved is None:
        raise AtlasError("run config 'config' is empty: pass the experiment's YAML, e.g. "
                         "flwr run . <superlink> --run-config 'config=\"/abs/quick.yaml\"'")
    raw: dict[str, Any] = from_yaml(path) if path else copy.deepcopy(saved or {})
    overrides = parse_overrides(str(run_config.get("set", "")).split())
    for key, dotted in (("out", "out"), ("run-name", "run_name")):
        if run_config.get(key):
            overrides.update(parse_overrides([f"{dotted}={run_config[key]}"]))
    return from_dict(layered(raw, overrides))


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment: build the experiment from the run config and run it over the SuperNodes."""
    rc = dict(context.run_config)
    snapshot, run_dir = None, None
    if rc.get("resume"):
        checkpoint = resolve_checkpoint(find_run(str(rc["resume"])))
        snapshot, run_dir = load_checkpoint(checkpoint), RunDir(checkpoint.parent.parent)
    cfg = config_of(rc, None if snapshot is None else snapshot.config)
    if snapshot is not None:
        check_same_experiment(snapshot.config, cfg)
    wait = float(rc.get("wait", 120))
    nodes = discover(grid, cfg, num_clients(cfg), wait=wait)  # and the profiles they report
    exp = build_experiment(cfg, devices=nodes.profiles)
    if run_dir is None:
        run_dir = RunDir.create(cfg)
    timeout = float(rc.get("timeout", 0)) or None
    outcome = run_experiment(exp, run_dir, resume=snapshot, executor_of=flower_executor(
        grid, timeout=timeout, wait=wait, nodes=nodes))
    print(f"atlasfl: {outcome.completed_rounds} rounds done; run folder {run_dir.path}")
