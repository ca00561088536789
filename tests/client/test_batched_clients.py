"""Batched clients (``train.batch_clients``): each client ends a batched round with the adapter,
head, AdamW moments and train loss it gets training alone (dropout off), whatever its ranks and
the lengths of its rows; the LoRA layers run peft's own forward again afterwards.

tiny-bert, cola and mrpc (single sentences and sentence pairs: rows of other lengths in one
batch), 18 training rows a client: batches of 8, 8 and 2 rows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from atlasfl.client import client_seed
from atlasfl.client.batched import group_by_key, stacked_lora, step_sizes
from atlasfl.client.runtime import ClientRuntime
from atlasfl.client.training import round_batches
from atlasfl.data.batching import TokenizedSet
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.errors import AtlasError
from atlasfl.messages import Train
from atlasfl.models.lora import plan_adapter

ROUND = 3
TOL = dict(rtol=1e-4, atol=1e-5)


def _experiment(tiny_cfg, **extra):
    """A tiny experiment with every dropout off (backbone, head, LoRA)."""
    # length buckets off: batches of 8, 8, 2 rows in that order for every client, so the
    # hand-built groups below have equal sizes step for step
    exp = build_experiment(tiny_cfg(**{"model.head_dropout": 0.0, "model.lora.dropout": 0.0,
                                       "train.length_bucket": 0, **extra}))
    for module in exp.runtime.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return exp


def _mixed_clients(exp):
    """The four clients, each with its own per-module ranks (1 to 4) and a random B."""
    gen = torch.Generator().manual_seed(11)
    modules = sorted(exp.binder.layers)
    for cid, client in exp.clients.items():
        ranks = {m: 1 + (cid + j) % 4 for j, m in enumerate(modules)}
        client.replace_adapter(plan_adapter(exp.runtime.model, exp.cfg.model.lora, ranks,
                                            seed=exp.cfg.seed))
        client.load_adapter({k: torch.randn(v.shape, generator=gen) * 0.3
                             for k, v in client.adapter.items() if ".lora_B." in k})
    return [exp.clients[c] for c in sorted(exp.clients)]


def _assert_same_client(alone, batched):
    for key, param in alone.adapter.items():
        torch.testing.assert_close(batched.adapter[key], param, **TOL)
    for key, value in alone.head.state_dict().items():
        torch.testing.assert_close(batched.head.state_dict()[key], value, **TOL)
    moments = [(alone.optimizer.state[p], batched.optimizer.state[q]) for p, q in
               zip([*alone.adapter.values(), *alone.head.parameters()],
                   [*batched.adapter.values(), *batched.head.parameters()], strict=True)]
    for mine, theirs in moments:
        assert int(theirs["step"]) == int(mine["step"])
        torch.testing.assert_close(theirs["exp_avg"], mine["exp_avg"], **TOL)
        torch.testing.assert_close(theirs["exp_avg_sq"], mine["exp_avg_sq"], rtol=1e-4,
                                   atol=1e-9)


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_a_batched_group_trains_each_client_as_it_trains_alone(tiny_cfg, max_grad_norm):
    # Prepare: four clients of two tasks with ranks 1-4 per module (12 differ per module)
    exp = _experiment(tiny_cfg, **{"train.max_grad_norm": max_grad_norm})
    runtime: ClientRuntime = exp.runtime
    clients = _mixed_clients(exp)
    assert len({tuple(c.ranks().values()) for c in clients}) == 4
    alone = copy.deepcopy(clients)
    plans = [Train(c.client_id, epochs=1) for c in clients]
    # the group's rows differ in length: clients pad to one length per step
    orders = [round_batches(c.train_set, runtime.train, epochs=1, steps=0,
                            generator=torch.Generator().manual_seed(
                                client_seed(runtime.seed, ROUND, c.client_id)))
              for c in clients]
    widths = [{int(c.train_set.lengths[o[s]].max()) for c, o in zip(clients, orders, strict=True)}
              for s in range(3)]
    assert all(len(w) > 1 for w in widths)

    for round_idx in (ROUND, ROUND + 1):  # the second round starts from AdamW moments
        # Execute: one by one, as ClientRuntime.handle does; then as one group
        expected = [runtime.train_round(c, p, client_seed(runtime.seed, round_idx, c.client_id))
                    for c, p in zip(alone, plans, strict=True)]
        replies = runtime.train_group(clients, plans, round_idx)

        # Assert
        for want, got, one, together in zip(expected, replies, alone, clients, strict=True):
            assert got.client_id == want.client_id
            assert got.record.keys() == want.record.keys()
            assert got.record["steps"] == want.record["steps"] == 3
            assert got.record["train_loss"] == pytest.approx(want.record["train_loss"], abs=1e-5)
            assert got.update.num_examples == want.update.num_examples == 18
            for key, value in want.update.adapter.items():
                torch.testing.assert_close(got.update.adapter[key], value, **TOL)
            _assert_same_client(one, together)


def test_each_slice_of_the_batch_is_computed_with_its_own_adapter(tiny_cfg):
    # Prepare: three clients' rows, one batch each, of other lengths
    exp = _experiment(tiny_cfg)
    clients = _mixed_clients(exp)[:3]
    model = exp.runtime.model.eval()
    parts = [c.train_set.collate([0, 1]) for c in clients]
    assert len({p["input_ids"].shape[1] for p in parts}) > 1
    width = max(p["input_ids"].shape[1] for p in parts)
    alone = []
    for client, part in zip(clients, parts, strict=True):
        exp.binder.bind(client.adapter)
        inputs = {k: v for k, v in part.items() if k != "labels"}
        alone.append(model(**inputs).last_hidden_state)  # (2, T_c, H)
    from atlasfl.client.batched import join_batches
    joined = join_batches(parts, clients[0].train_set.pad_id)

    # Execute
    with torch.no_grad(), stacked_lora(exp.binder, [c.adapter for c in clients]):
        together = model(**joined).last_hidden_state  # (6, width, H)

    # Assert: each client's rows, on its real tokens, as its model alone gives them
    assert together.shape[:2] == (6, width)
    for c, (part, mine) in enumerate(zip(parts, alone, strict=True)):
        rows = together[2 * c : 2 * c + 2]
        mask = part["attention_mask"].bool()
        torch.testing.assert_close(rows[:, : mine.shape[1]][mask], mine[mask], **TOL)


def test_the_lora_layers_forward_is_restored_after_the_batched_step(tiny_cfg):
    exp = _experiment(tiny_cfg)
    clients = _mixed_clients(exp)
    model = exp.runtime.model.eval()
    probe = clients[0].train_set.collate([0, 1, 2])
    inputs = {k: v for k, v in probe.items() if k != "labels"}
    fixed = {k: torch.nn.Parameter(v.detach().clone()) for k, v in clients[1].adapter.items()}

    def forward():
        exp.binder.bind(fixed)
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    before = forward()
    exp.runtime.train_group(clients[1:], [Train(c.client_id) for c in clients[1:]], ROUND)
    with pytest.raises(RuntimeError, match="boom"), stacked_lora(exp.binder, [fixed, fixed]):
        raise RuntimeError("boom")  # an error inside restores the layers too
    assert all("forward" not in vars(layer) for layer in exp.binder.layers.values())
    assert torch.equal(forward(), before)


@pytest.mark.parametrize(("resident", "expected"), [(0, [[0, 1, 2, 3]]),
                                                    (2, [[0, 1], [2, 3]])])
def test_a_run_with_batched_clients_equals_the_run_without(tiny_cfg, monkeypatch, resident,
                                                            expected):
    # hetlora, device budget: clients of other per-module ranks (rank plans received first);
    # resident 2: the others spilled to disk, groups of two
    groups = []
    original = ClientRuntime.train_group

    def spy(self, clients, plans, round_idx):
        groups.append([c.client_id for c in clients])
        return original(self, clients, plans, round_idx)

    monkeypatch.setattr(ClientRuntime, "train_group", spy)

    def run(batch_clients):
        exp = _experiment(tiny_cfg, method="hetlora", **{
            "model.lora.rslora": True, "ranks.r_max": 12, "ranks.budget": "device",
            "devices.assignment": ["cpu-2gb", "gpu-16gb", "gpu-16gb", "cpu-2gb"],
            "federation.rounds": 2, "federation.resident_clients": resident,
            "train.batch_clients": batch_clients})
        summary = run_experiment(exp).summary
        return exp, summary

    one_by_one, plain = run(0)
    assert groups == []
    batched_exp, batched = run(4)
    assert groups == expected * 2  # both rounds trained in groups
    assert len({tuple(c.ranks().values()) for c in batched_exp.clients.values()}) > 1
    for key in ("bytes_up", "bytes_down", "bytes_by_kind"):
        assert batched[key] == plain[key]
    for task, metrics in plain["tasks"].items():
        assert batched["tasks"][task] == pytest.approx(metrics, abs=1e-6)
    for want, got in zip(plain["clients"], batched["clients"], strict=True):
        for key, value in want.items():
            if key.endswith("seconds"):
                continue
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert got[key] == value, key
    for cid in one_by_one.clients:
        _assert_same_client(one_by_one.clients[cid], batched_exp.clients[cid])


def test_groups_hold_equal_keys_in_order_at_most_size_each():
    keys = [(8, 2), None, (8, 2), (8, 8), (8, 2), (8, 8), (8, 2), (4,)]
    assert group_by_key(keys, 3) == [[0, 2, 4], [3, 5]]  # 6 alone, 7 alone: left out
    assert group_by_key(keys, 2) == [[0, 2], [3, 5], [4, 6]]
    assert group_by_key(keys, 1) == []


@pytest.mark.parametrize("bucket", [0, 2])
def test_step_sizes_are_the_batches_round_batches_gives(tiny_cfg, bucket):
    cfg = tiny_cfg(**{"train.batch_size": 4, "train.length_bucket": bucket}).train
    rng = np.random.default_rng(0)
    data = TokenizedSet([list(range(int(n))) for n in rng.integers(1, 30, size=23)], None,
                        np.zeros(23, dtype=np.int64), pad_id=0)
    for epochs, steps, seed in [(1, 0, 5), (2, 0, 6), (1, 9, 7)]:
        batches = round_batches(data, cfg, epochs=epochs, steps=steps,
                                generator=torch.Generator().manual_seed(seed))
        assert step_sizes(23, cfg, epochs=epochs, steps=steps, seed=seed) == tuple(
            len(b) for b in batches)
    assert step_sizes(23, cfg, epochs=1, steps=0, seed=1) in {
        (4, 4, 4, 4, 4, 3), (4, 4, 3, 4, 4, 4), (4, 4, 4, 4, 3, 4), (3, 4, 4, 4, 4, 4),
        (4, 3, 4, 4, 4, 4), (4, 4, 4, 3, 4, 4)}


def test_split_plans_and_simulated_faults_train_one_by_one(tiny_cfg):
    from atlasfl.engine.executor import make_executor
    from atlasfl.engine.ledger import CommLedger
    from atlasfl.messages import SplitPlan

    exp = _experiment(tiny_cfg, **{"train.batch_clients": 3})
    executor = make_executor(exp, CommLedger())
    split = SplitPlan(cut=1, tail=0, activation_dtype="fp32", server_model="all", outputs=2)
    plans = [Train(0), Train(1), Train(2, split=split), Train(3)]
    assert executor._groups(ROUND, plans) == {0: [0, 1, 3], 1: [0, 1, 3], 3: [0, 1, 3]}
    assert executor._groups(ROUND, [Train(0, steps=2), Train(1, steps=3)]) == {}
    exp = _experiment(tiny_cfg, **{"train.batch_clients": 3, "faults.drop_during": 0.5})
    assert make_executor(exp, CommLedger())._groups(ROUND, plans) == {}
    # a group is live at once: no larger than federation.resident_clients
    exp = _experiment(tiny_cfg, **{"train.batch_clients": 4, "federation.resident_clients": 2})
    assert make_executor(exp, CommLedger())._groups(ROUND, [Train(c) for c in range(4)]) == {
        0: [0, 1], 1: [0, 1], 2: [2, 3], 3: [2, 3]}


@pytest.mark.parametrize("value", [-1, -4])
def test_a_negative_batch_clients_is_refused_by_name(tiny_cfg, value):
    with pytest.raises(AtlasError, match=r"train\.batch_clients.*allowed: 0 \(off\)"):
        tiny_cfg(**{"train.batch_clients": value})


def test_batched_clients_run_under_bf16_autocast(tiny_cfg):
    # bf16 rounds differently in another batch shape: the same losses to bf16 precision only
    exp = _experiment(tiny_cfg, **{"train.precision": "bf16"})
    clients = _mixed_clients(exp)
    alone = copy.deepcopy(clients)
    plans = [Train(c.client_id) for c in clients]
    runtime = exp.runtime
    expected = [runtime.train_round(c, p, client_seed(runtime.seed, ROUND, c.client_id))
                for c, p in zip(alone, plans, strict=True)]
    replies = runtime.train_group(clients, plans, ROUND)
    for want, got in zip(expected, replies, strict=True):
        assert got.record["train_loss"] == pytest.approx(want.record["train_loss"], rel=2e-3)
