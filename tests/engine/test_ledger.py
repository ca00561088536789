import json

import pytest
import torch

from atlasfl.engine import RunDir, build_experiment, run_experiment, sample_clients, state_bytes
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.messages import Model, ProbeReply, Train


def test_state_bytes_is_numel_times_element_size():
    state = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}
    assert state_bytes(state) == 3 * 4 * 4 + 5 * 2


def test_channel_copies_and_counts_each_kind():
    ledger = CommLedger()
    channel = InProcessChannel(ledger)
    adapter = {"m.lora_A.weight": torch.ones(2, 3)}
    plan = Train(5, Model(ranks={"m": 2, "n": 4}, adapter=adapter, head=None))
    got = channel.send(1, 5, "down", plan)
    assert got.model.ranks == {"m": 2, "n": 4}  # names travel with the values
    assert torch.equal(got.model.adapter["m.lora_A.weight"], adapter["m.lora_A.weight"])
    assert got.model.adapter["m.lora_A.weight"].data_ptr() != adapter["m.lora_A.weight"].data_ptr()
    reply = ProbeReply(5, importance={"m": 0.5, "n": [3.0, 2.0, 1.0]})
    back = channel.send(1, 5, "up", reply)
    assert back.importance == {"m": 0.5, "n": [3.0, 2.0, 1.0]}
    assert ledger.kinds(1, 5) == {"down_adapter": 24, "down_rank_plan": 8, "up_importance": 16}
    assert ledger.get(1, 5, "down") == 32 and ledger.get(1, 5, "up") == 16
    assert ledger.get(2, 5, "down") == 0 and ledger.get(1, 4, "up") == 0


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
        adapter = sum(p.numel() * 4 for p in client.adapter.values())
        head = sum(p.numel() * 4 for p in client.head.parameters())
        assert state_bytes(client.adapter_state()) + state_bytes(client.head_state()) == (
            adapter + head)
        assert row["bytes_up"] == adapter + head  # every client trains and uploads once per round
        assert row["bytes_up_adapter"] == adapter and row["bytes_up_head"] == head
        # the aggregate comes down once per round, with the evaluation plan, nothing twice
        assert row["bytes_down"] == adapter + head
        assert row["bytes_down_adapter"] == adapter and row["bytes_down_head"] == head
    assert summary["bytes_up"] == sum(r["bytes_up"] for r in rows)
    assert summary["bytes_by_kind"] == {"down_adapter": sum(r["bytes_down_adapter"] for r in rows),
                                        "down_head": sum(r["bytes_down_head"] for r in rows),
                                        "up_adapter": sum(r["bytes_up_adapter"] for r in rows),
                                        "up_head": sum(r["bytes_up_head"] for r in rows)}


def test_a_client_is_charged_only_when_a_plan_reaches_it(tiny_cfg):
    """Half the clients train per round and nobody is evaluated before round 4: a client pays
    for the aggregate only when it is sampled to train on it, or evaluated."""
    cfg = tiny_cfg(method="fedavg", **{"federation.rounds": 4, "federation.fraction": 0.5,
                                       "federation.eval_every": 4})
    exp = build_experiment(cfg)
    summary = run_experiment(exp).summary
    size = state_bytes(exp.clients[0].adapter_state()) + state_bytes(exp.clients[0].head_state())
    assert all(r["bytes_down"] >= size for r in summary["clients"])  # all evaluated in round 4
    sampled = {r: sample_clients(sorted(exp.clients), 0.5, cfg.seed, r) for r in range(1, 5)}
    # a client sampled in rounds 2-4 gets the previous round's aggregate (nobody held it: no
    # evaluation in rounds 1-3), and everyone gets round 4's with its evaluation plan
    expected = sum(len(sampled[r]) for r in (2, 3, 4)) * size + len(exp.clients) * size
    assert summary["bytes_down"] == expected
    assert summary["bytes_down"] < 4 * len(exp.clients) * size  # not every member every round


def test_ledger_rejects_unknown_direction():
    with pytest.raises(ValueError):
        CommLedger().record(1, 0, "sideways", "adapter", 10)
