import json

import pytest

from atlasfl.engine import RunDir, build_experiment, run_experiment, state_bytes
from atlasfl.engine.ledger import CommLedger


def test_state_bytes_is_numel_times_element_size():
    import torch

    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}
    assert state_bytes(state) == 3 * 4 * 4 + 5 * 2


@pytest.mark.parametrize("method", ["fedavg", "fedavg-task"])
def test_ledger_counts_exactly_the_tensors_sent(tiny_cfg, tmp_path, method):
    cfg = tiny_cfg(method=method, out=str(tmp_path), run_name="r", **{"federation.rounds": 2})
    exp = build_experiment(cfg)
    run_dir = RunDir.create(cfg)
    summary = run_experiment(exp, run_dir).summary
    rows = [json.loads(line) for line in (run_dir.path / "rounds.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(exp.clients)
    for row in rows:
        client = exp.clients[row["client"]]
        sent = state_bytes(client.state())  # adapter + head, fp32
        expected_adapter = sum(p.numel() * 4 for p in client.adapter.values())
        expected_head = sum(p.numel() * 4 for p in client.head.parameters())
        assert sent == expected_adapter + expected_head
        assert row["bytes_up"] == sent  # every client trains and uploads once per round
        assert row["bytes_down"] == sent  # the aggregate comes back once, nothing twice
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)


def test_ledger_rejects_unknown_direction():
    with pytest.raises(ValueError):
        CommLedger().record(1, 0, "sideways", 10)
