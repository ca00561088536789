"""Worker processes (``train.workers``): the same run as in this process, only spread out."""

from __future__ import annotations

import pytest
import torch

from atlasfl.config import from_dict
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.engine.pool import worker_config
from atlasfl.engine.setup import resolve_workers
from atlasfl.engine.simulation import without_timings
from atlasfl.errors import AtlasError


def _run(cfg):
    exp = build_experiment(cfg)
    summary = run_experiment(exp).summary
    states = {cid: exp.clients.checkpoint(cid)[0] for cid in exp.clients}
    return summary, states


@pytest.mark.parametrize("dotted", [
    # every plan kind: probes (Phases 1-2, new ranks), training, evaluation, the Laplacian step
    {"method": "atlas", "federation.rounds": 2},
    # simulated failures (drawn here, acted on by the executor) and clients spilled to disk
    {"method": "fedavg", "federation.rounds": 2, "faults.drop_before": 0.25,
     "faults.drop_during": 0.25, "federation.resident_clients": 2},
])
def test_workers_give_the_results_of_one_process(tiny_cfg, dotted):
    """Two workers of one thread each: every row and every client state as one 1-thread process.

    The clients' states must come back from the workers into the executor's store: the final
    states (adapter, head, optimizer moments) are compared tensor by tensor.
    """
    base = tiny_cfg(**dotted)
    one, one_states = _run(base.replace(**{"train.threads": 1, "train.workers": 1}))
    two, two_states = _run(base.replace(**{"train.threads": 2, "train.workers": 2}))
    assert "workers_peak_rss_mb" not in one
    assert two["workers_peak_rss_mb"] > 100  # two processes that each loaded torch and the model
    assert [without_timings(c) for c in two["clients"]] == [without_timings(c)
                                                           for c in one["clients"]]
    assert two["tasks"] == one["tasks"]
    trained = 0
    for cid, tensors in one_states.items():
        assert tensors.keys() == two_states[cid].keys()
        for key, value in tensors.items():
            assert torch.equal(value, two_states[cid][key]), (cid, key)
        trained += any(k.startswith("opt/") for k in tensors)
    assert trained > 0  # optimizer moments exist: the states compared are trained ones


def test_worker_config_splits_the_threads_and_keeps_one_client_in_memory(tiny_cfg):
    raw = worker_config(tiny_cfg(), workers=2, threads=5)
    cfg = from_dict(raw)
    assert (cfg.train.workers, cfg.train.threads, cfg.federation.resident_clients) == (1, 2, 1)
    assert from_dict(worker_config(tiny_cfg(), workers=4, threads=2)).train.threads == 1
    assert cfg.progress is False


def test_resolve_workers(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_workers(0, 0, cpu) == 3  # auto: one per core the threads setting gives
    assert resolve_workers(0, 2, cpu) == 2
    assert resolve_workers(0, 0, cuda) == 1  # clients share the card in one process
    assert resolve_workers(4, 0, cpu) == 4
    assert resolve_workers(1, 0, cuda) == 1
    with pytest.raises(AtlasError, match=r"train.workers = 2 .* device is cuda"):
        resolve_workers(2, 0, cuda)


def test_negative_workers_are_refused(tiny_cfg):
    with pytest.raises(AtlasError, match="train.workers"):
        tiny_cfg(**{"train.workers": -1})
