"""Split federated learning end to end: what crosses the network, what is written back, who
splits and where, and that weak devices join instead of being excluded."""

from __future__ import annotations

import json

import pytest
import torch

from atlasfl.engine import RunDir, build_experiment, run_experiment
from atlasfl.engine.channel import InProcessChannel
from atlasfl.messages import Activations, Evaluate, Gradients, Logits, Train, TrainReply
from atlasfl.models.blocks import client_side


def _split_cfg(tiny_cfg, mode="vanilla", **extra):
    return tiny_cfg(method="splitlora", **{"split.mode": mode, "split.cut": "1",
                                           "split.min_cut": 0, "ranks.aggregation": "zero-pad",
                                           "federation.rounds": 2, **extra})


@pytest.fixture
def recorded(monkeypatch):
    """Every message the in-process channel carries: (direction, client, message, payload)."""
    seen = []
    original = InProcessChannel.send

    def send(self, round_idx, client_id, direction, message):
        seen.append((direction, client_id, message, message.payload()))
        return original(self, round_idx, client_id, direction, message)

    monkeypatch.setattr(InProcessChannel, "send", send)
    return seen


@pytest.mark.parametrize("mode", ["vanilla", "u-shape"])
def test_payload_audit_no_tokens_no_labels_in_u_shape_no_server_weights_down(tiny_cfg, recorded,
                                                                            mode):
    exp = build_experiment(_split_cfg(tiny_cfg, mode, **{"split.cut": "0" if mode == "u-shape"
                                                         else "1"}))
    run_experiment(exp)
    cut, tail = (0, 1) if mode == "u-shape" else (1, 0)
    layers = exp.runtime.num_layers
    kinds = {kind for _, _, _, payload in recorded for kind in payload}
    assert {"activations", "activation_grads", "eval_activations"} <= kinds
    for direction, _, message, payload in recorded:
        for kind, tensors in payload.items():
            # token ids never cross: no tensor by that name, and no integer tensor but masks
            # (0/1) and labels
            assert not {"input_ids", "token_type_ids"} & set(tensors), kind
            for name, t in tensors.items():
                if not t.is_floating_point() and kind not in ("rank_plan", "labels"):
                    assert name == "attention_mask" and set(t.unique().tolist()) <= {0, 1}
        if mode == "u-shape":
            assert "labels" not in payload and "eval_logits" not in payload
            assert not isinstance(message, Logits)
            if isinstance(message, Gradients):
                assert message.loss is None  # the server never saw the loss
        if direction == "down" and isinstance(message, (Train, Evaluate)):
            adapter = payload.get("adapter", {})
            # the client part never receives server weights: only its own blocks' modules
            assert all(client_side(k.rsplit(".lora_", 1)[0], layers, cut, tail)
                       for k in adapter), sorted(adapter)[:3]
            if mode == "vanilla":
                assert "head" not in payload
    splits = [m for d, _, m, _ in recorded if isinstance(m, (Activations, Gradients))]
    assert splits, "split training sent no per-batch message"


def test_round_end_writes_the_merged_model_back_to_clients_and_server(tiny_cfg):
    exp = build_experiment(_split_cfg(tiny_cfg, **{"federation.rounds": 1}))
    seen = []
    original = exp.strategy.aggregate_round

    def record(state, rnd, replies, served=None):
        if replies and isinstance(replies[0], TrainReply):
            seen.append(({r.client_id: r.update for r in replies}, served))
        return original(state, rnd, replies, served)

    exp.strategy.aggregate_round = record
    outcome = run_experiment(exp)
    (updates, served), = seen
    layers = exp.runtime.num_layers
    total = sum(u.num_examples for u in updates.values())
    server_before = served["all"].adapter
    server_after = outcome.state.split.server["all"].adapter
    for key in exp.initial_adapter:
        module = key.rsplit(".lora_", 1)[0]
        if client_side(module, layers, 1, 0):
            # the clients' own copies, weighted by examples (zero-pad at equal ranks: the mean)
            assert all(key in u.adapter for u in updates.values())
            expected = sum(u.adapter[key] * u.num_examples for u in updates.values()) / total
        else:
            assert not any(key in u.adapter for u in updates.values())  # never uploaded
            expected = server_before[key]  # every client's copy of it is the server's
        torch.testing.assert_close(server_after[key], expected, rtol=1e-5, atol=1e-7)
        for client in exp.clients.values():  # received with the evaluation plan
            if client_side(module, layers, 1, 0):
                torch.testing.assert_close(client.adapter[key].detach(), expected, rtol=1e-5,
                                           atol=1e-7)
    # vanilla: one head, on the server, trained on every client's batches
    head = outcome.state.split.server["all"].heads["2"]
    assert not torch.equal(head["out.weight"], exp.runtime.initial_heads[2].out.weight)


def test_clients_json_records_each_cut_memory_time_and_bytes(tiny_cfg, tmp_path):
    cfg = _split_cfg(tiny_cfg, **{"split.cut": "auto", "federation.rounds": 1,
                                  "out": str(tmp_path), "run_name": "s"})
    exp = build_experiment(cfg)
    run = RunDir.create(exp.cfg)
    run_experiment(exp, run)
    records = json.loads((run.path / "clients.json").read_text())
    for rec in records.values():
        split = rec["split"]
        chosen = split["chosen"]
        assert split["cut"] == chosen["cut"] and split["mode"] == "vanilla"
        assert [o["cut"] for o in split["options"]] == list(range(0, exp.runtime.num_layers))
        fitting = [o for o in split["options"] if o["fits"]]
        assert chosen["seconds_per_batch"] == min(o["seconds_per_batch"] for o in fitting)
        assert chosen["memory_bytes"] == rec["memory_estimate_bytes"] <= rec["budget_bytes"]
        assert chosen["up_bytes"] > 0 and chosen["down_bytes"] > 0


@pytest.mark.parametrize("enabled", ["never", "auto"])
def test_weak_devices_are_excluded_without_split_and_join_with_split_auto(tiny_cfg, weak_device,
                                                                        enabled):
    base = {"ranks.on_infeasible": "exclude", "seed": 3, "split.min_cut": 0,
            "devices.profiles": ["weak", "gpu-16gb"]}
    memory_gb = weak_device(tiny_cfg, base)
    cfg = tiny_cfg(method="homolora", **base, **{
        "devices.custom": [{"name": "weak", "memory_gb": memory_gb}], "split.enabled": enabled})
    exp = build_experiment(cfg)
    weak = {c for c, p in exp.strategy.ctx.devices.items() if p.name == "weak"}
    assert 0 < len(weak) < len(exp.clients)
    outcome = run_experiment(exp)
    rows = {r["client"]: r for r in outcome.summary["clients"]}
    state = outcome.state
    if enabled == "never":
        assert set(state.plan.excluded) == weak
        assert all(not rows[c].get("steps") for c in weak)
    else:  # a hybrid federation: the weak clients split, the others train whole models
        assert not state.plan.excluded
        assert {int(c) for c in state.split.cuts} == weak
        assert all(rows[c]["steps"] > 0 for c in exp.clients)


def test_server_optimizer_moments_carry_over_rounds(tiny_cfg):
    exp = build_experiment(_split_cfg(tiny_cfg, **{"federation.rounds": 2}))
    outcome = run_experiment(exp)
    history_steps = sum(r["steps"] for r in outcome.summary["clients"]) * 2  # equal each round
    moments = outcome.state.split.server["all"].moments
    layers = exp.runtime.num_layers
    server_keys = [k for k in exp.initial_adapter
                   if not client_side(k.rsplit(".lora_", 1)[0], layers, 1, 0)]
    assert server_keys
    for key in server_keys:  # one AdamW step per batch of every client, in both rounds
        assert int(moments[f"adapter/{key}/step"]) == history_steps
    assert int(moments["head/2/out.weight/step"]) == history_steps


def test_server_models_follow_their_group_also_in_rounds_without_split_clients(tiny_cfg,
                                                                             weak_device):
    # seed 5: client 0 (cola) is the weak one; round 4 samples clients 1 (cola, whole) and 2
    base = {"ranks.on_infeasible": "exclude", "seed": 5, "split.min_cut": 0,
            "devices.profiles": ["weak", "gpu-16gb"]}
    memory_gb = weak_device(tiny_cfg, base)
    cfg = tiny_cfg(method="homolora", **base, **{
        "devices.custom": [{"name": "weak", "memory_gb": memory_gb}], "split.enabled": "auto",
        "ranks.aggregation": "zero-pad", "federation.rounds": 4, "federation.fraction": 0.5})
    exp = build_experiment(cfg)
    outcome = run_experiment(exp)
    state = outcome.state
    assert list(state.split.cuts) == ["0"]
    last = [r for r in outcome.summary["clients"] if r.get("steps")]
    assert [r["client"] for r in last] == [1, 2]  # the split client did not train last
    groups = {state.groups.group(int(c)) for c in state.split.cuts}
    assert set(state.split.server) == groups
    for group in groups:  # zero-pad at equal ranks: the server model IS the group aggregate
        aggregate = state.groups.adapters[group]
        for key, value in state.split.server[group].adapter.items():
            assert torch.equal(value, aggregate[key]), (group, key)


def test_a_cut_past_the_model_is_refused_naming_the_key(tiny_cfg):
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match=r"split.cut = 2 leaves the server no block of 2 "
                                         r"\(tail 0\); allowed: auto or 0..1"):
        run_experiment(build_experiment(_split_cfg(tiny_cfg, **{"split.cut": "2"})))
