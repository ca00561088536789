"""Simulation engine: setup, the round loop, executor, channel, ledger, run folder."""

from atlasfl.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from atlasfl.engine.ledger import CommLedger, state_bytes
from atlasfl.engine.rundir import RunDir
from atlasfl.engine.setup import Experiment, build_experiment
from atlasfl.engine.simulation import (
    RunOutcome,
    StopFlag,
    run_exchange,
    run_experiment,
    sample_clients,
)

__all__ = ["CommLedger", "Experiment", "RunDir", "RunOutcome", "StopFlag", "build_experiment",
           "latest_checkpoint", "load_checkpoint", "run_exchange", "run_experiment",
           "sample_clients", "save_checkpoint", "state_bytes"]
