"""Simulation engine: setup, the round loop, executor, channel, ledger, run folder."""

from atlasfl.engine.ledger import CommLedger, state_bytes
from atlasfl.engine.rundir import RunDir, read_run
from atlasfl.engine.setup import Experiment, build_experiment
from atlasfl.engine.simulation import run_experiment, sample_clients

__all__ = ["CommLedger", "Experiment", "RunDir", "build_experiment", "read_run",
           "run_experiment", "sample_clients", "state_bytes"]
