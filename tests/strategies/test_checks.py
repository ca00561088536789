"""The server refuses updates that are not as planned, before any aggregation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlasfl.engine import build_experiment, run_experiment
from atlasfl.messages import Update
from atlasfl.strategies.checks import check_update

SHAPES = {"m1": (4, 6), "m2": (4, 6)}  # in 4, out 6


def _update(rank=2, head=(3, 5), **changes):
    adapter = {"m1.lora_A.weight": torch.ones(rank, 4), "m1.lora_B.weight": torch.ones(6, rank)}
    out = Update(0, adapter, {"out.weight": torch.ones(*head), "out.bias": torch.ones(head[0])},
                 10)
    return dataclasses.replace(out, **changes)


def check(update, ranks=None, max_norm=0.0):
    return check_update(update, shapes=SHAPES, ranks=ranks if ranks is not None else {"m1": 2,
                                                                                      "m2": 2},
                        head_shape=(3, 5), max_norm=max_norm)


def test_an_update_as_planned_passes_and_each_fault_is_named():
    assert check(_update()) is None  # m2 absent: a subset of the modules is fine
    assert check(_update(rank=3)) == ("adapter 'm1.lora_A.weight' has shape (3, 4), the plan "
                                      "says (2, 4)")
    assert "no LoRA factor" in check(_update(adapter={"m9.lora_A.weight": torch.ones(2, 4)}))
    assert "no LoRA factor" in check(_update(adapter={"m1.bias": torch.ones(6)}))
    assert check(_update(), ranks={"m2": 2}) == ("adapter key 'm1.lora_A.weight': module not in "
                                                 "the client's rank plan")
    mixed = {"m1.lora_A.weight": torch.ones(2, 4), "m1.lora_B.weight": torch.ones(6, 3)}
    assert check_update(_update(adapter=mixed), shapes=SHAPES, ranks=None, head_shape=None) == \
        "module 'm1': A has rank 2, B 3"
    assert "is not the client's" in check(_update(head=(2, 5)))
    nan = _update()
    nan.adapter["m1.lora_B.weight"][0, 0] = float("nan")
    assert check(nan) == "m1.lora_B.weight holds non-finite values"
    assert check(_update(num_examples=0)) == "num_examples = 0, expected > 0"
    # norm over all tensors: 8 + 12 ones in the adapter, 15 + 3 in the head: sqrt(38) = 6.164
    assert check(_update(), max_norm=6.2) is None
    assert check(_update(), max_norm=6.1) == ("L2 norm 6.164 exceeds faults.max_update_norm = "
                                              "6.1")


def _corrupt(exp, round_idx, clients):
    """These clients train to NaN in ``round_idx`` (their own model too) and upload it."""
    original = exp.runtime.train_round
    seen = {}

    def train_round(client, plan, seed):
        reply = original(client, plan, seed)
        if seed == exp.runtime_seed(round_idx, client.client_id) and client.client_id in clients:
            with torch.no_grad():
                for p in client.adapter.values():
                    p.fill_(float("nan"))
            update = dataclasses.replace(reply.update, adapter=client.adapter_state())
            reply = dataclasses.replace(reply, update=update)
        seen.setdefault(client.client_id, []).append(reply)
        return reply
    exp.runtime.train_round = train_round
    return seen


@pytest.mark.parametrize("method", ["fedavg-task", "mira"])
def test_a_refused_update_is_recorded_never_averaged_and_the_client_is_reset(
        tiny_cfg, tmp_path, capsys, method):
    from atlasfl.client import client_seed
    from atlasfl.engine import RunDir, load_checkpoint

    exp = build_experiment(tiny_cfg(method=method, out=str(tmp_path),
                                    **{"federation.rounds": 3}))
    exp.runtime_seed = lambda r, c: client_seed(exp.cfg.seed, r, c)
    cola = sorted(c for c, s in exp.clients.items() if s.task.name == "cola")
    _corrupt(exp, 2, set(cola))  # every cola client: its group gets no valid update in round 2
    run = RunDir.create(exp.cfg)
    run_experiment(exp, run)
    history = load_checkpoint(run.path).meta["history"]
    refused = {(row["round"], row["client"]) for rnd in history for row in rnd
               if "refused" in row}
    assert refused == {(2, c) for c in cola}
    assert all(row["refused"] == f"{next(iter(exp.clients[row['client']].adapter))} holds "
               "non-finite values" for rnd in history for row in rnd if "refused" in row)
    assert "round update of client" in capsys.readouterr().err
    # round 3 started from the server's last accepted model, not from the client's NaN
    for c in cola:
        assert torch.isfinite(torch.tensor(history[2][c]["train_loss"]))
        assert all(bool(torch.isfinite(p).all()) for p in exp.clients[c].adapter.values())
    mrpc = [c for c in exp.clients if c not in cola]
    assert all(torch.isfinite(torch.tensor(history[1][c]["train_loss"])) for c in mrpc)


@st.composite
def rounds_with_a_bad_update(draw):
    """Four good updates of two clients' groups and one bad one (NaN, wrong rank, no rows)."""
    n = 4
    torch.manual_seed(draw(st.integers(0, 10**6)))
    good = [Update(c, {"m1.lora_A.weight": torch.randn(2, 4),
                       "m1.lora_B.weight": torch.randn(6, 2)},
                   {"out.weight": torch.randn(3, 5), "out.bias": torch.randn(3)},
                   draw(st.integers(1, 50))) for c in range(n)]
    bad_id = draw(st.integers(0, n - 1))
    kind = draw(st.sampled_from(["nan", "rank", "rows", "key"]))
    bad = good[bad_id]
    if kind == "nan":
        adapter = {k: v.clone() for k, v in bad.adapter.items()}
        adapter["m1.lora_A.weight"][0, 0] = float("inf")
        bad = dataclasses.replace(bad, adapter=adapter)
    elif kind == "rank":
        bad = dataclasses.replace(bad, adapter={"m1.lora_A.weight": torch.randn(3, 4),
                                                "m1.lora_B.weight": torch.randn(6, 3)})
    elif kind == "rows":
        bad = dataclasses.replace(bad, num_examples=0)
    else:
        bad = dataclasses.replace(bad, adapter={**bad.adapter, "m9.lora_A.weight": torch.ones(1)})
    return good, bad_id, bad


@settings(max_examples=40, deadline=None)
@given(case=rounds_with_a_bad_update())
def test_a_refused_update_never_changes_the_aggregate(case):
    from atlasfl.config import from_dict
    from atlasfl.engine.simulation import _checked
    from atlasfl.messages import TrainReply
    from atlasfl.strategies import ClientInfo, ModelInfo, RoundInfo, Strategy, get_method

    good, bad_id, bad = case
    cfg = from_dict({"method": "fedavg", "model": {"lora": {"r": 2}}})
    infos = [ClientInfo(c, "t", 10, (3, 5)) for c in range(len(good))]
    strategy = Strategy(get_method("fedavg"), infos, cfg, ModelInfo(None, dict(SHAPES), {3: 18}))
    rnd = RoundInfo(1, tuple(range(len(good))), False)

    def aggregate(updates):
        replies = [_checked(strategy, strategy.init(), TrainReply(u.client_id, u))
                   for u in updates]
        return strategy.aggregate_train(strategy.init(), rnd, replies).state.groups

    with_bad = aggregate([bad if u.client_id == bad_id else u for u in good])
    without = aggregate([u for u in good if u.client_id != bad_id])
    for key, value in without.adapters["all"].items():
        assert torch.equal(with_bad.adapters["all"][key], value)
    for key, value in without.heads.items():
        assert all(torch.equal(with_bad.heads[key][k], v) for k, v in value.items())


def test_a_rank_plan_without_a_memory_model_is_refused_when_the_strategy_is_built(tiny_cfg):
    from atlasfl.errors import AtlasError
    from atlasfl.strategies import ClientInfo, ModelInfo, Strategy, get_method

    infos = [ClientInfo(0, "t", 10, (2, 8))]
    no_dims = ModelInfo(None, dict(SHAPES), {2: 18})
    for method in ("homolora", "hetlora", "atlas", "mira"):
        with pytest.raises(AtlasError, match=f"method {method} needs a memory model"):
            Strategy(get_method(method), infos, tiny_cfg(method=method), no_dims)
    Strategy(get_method("fedavg"), infos, tiny_cfg(), no_dims)  # FedAvg plans no ranks
