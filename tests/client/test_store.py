"""Clients spilled to disk and rebuilt give the run it would have been with all in memory."""

from __future__ import annotations

import pytest
import torch

from atlasfl.engine import build_experiment, run_experiment
from atlasfl.engine.simulation import without_timings


@pytest.mark.parametrize("method", ["fedavg-task", "hetlora", "atlas"])
def test_one_resident_client_gives_the_same_run_as_all_in_memory(tiny_cfg, tmp_path, method):
    from atlasfl.engine import RunDir, load_checkpoint

    runs = {}
    for resident in (0, 1):
        cfg = tiny_cfg(method=method, out=str(tmp_path), run_name=f"r{resident}", **{
            "federation.rounds": 2, "federation.fraction": 0.75,
            "federation.resident_clients": resident})
        exp = build_experiment(cfg)
        if resident:
            assert list(exp.clients.live) == []  # nothing built before it is needed
            seen = []
            handle = exp.runtime.handle

            def spy(client, plan, round_idx, link=None, handle=handle, exp=exp, seen=seen):
                seen.append(len(exp.clients.live))
                return handle(client, plan, round_idx, link)
            exp.runtime.handle = spy
        run = RunDir.create(exp.cfg)
        run_experiment(exp, run)
        runs[resident] = load_checkpoint(run.path)
        if resident:
            assert seen and max(seen) == 1  # never more than one client's state in memory
    a, b = runs[0], runs[1]
    assert [[without_timings(r) for r in rnd] for rnd in a.meta["history"]] == \
        [[without_timings(r) for r in rnd] for rnd in b.meta["history"]]
    clients = [k for k in a.tensors if k.startswith("client/")]
    assert clients and all(torch.equal(a.tensors[k], b.tensors[k]) for k in clients)
