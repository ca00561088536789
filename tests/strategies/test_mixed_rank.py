"""homolora / hetlora: per-module ranks really reach the peft model, every client receives the
exact aggregate cut to its own ranks, and a device that cannot train is refused or excluded."""

from __future__ import annotations

import json

import pytest
import torch

from atlasfl.engine import RunDir, build_experiment, run_experiment
from atlasfl.engine.executor import make_executor
from atlasfl.engine.ledger import CommLedger
from atlasfl.errors import AtlasError
from atlasfl.messages import FingerprintSpec, ImportanceSpec, Probe, TrainReply
from atlasfl.models.lora import ADAPTER


def _het(tiny_cfg, **extra):
    # the Phase 2 setting these tests check: parity budget, linear utility unless named
    return tiny_cfg(method="hetlora", **{"model.lora.rslora": True, "ranks.r_max": 12,
                                         "ranks.grouping": "task", "ranks.budget": "parity",
                                         "ranks.utility": "linear", **extra})


@pytest.mark.parametrize("utility", ["linear", "spectrum"])
def test_allocated_ranks_differ_per_module_in_the_peft_model(tiny_cfg, tmp_path, utility):
    cfg = _het(tiny_cfg, out=str(tmp_path), run_name="het", **{"ranks.utility": utility})
    exp = build_experiment(cfg)
    run = RunDir.create(exp.cfg)
    run_experiment(exp, run)
    records = json.loads((run.path / "clients.json").read_text())
    for cid, client in exp.clients.items():
        planned = records[str(cid)]["ranks"]
        assert client.ranks() == planned
        assert len(set(planned.values())) > 1, "ranks must differ between modules"
        exp.binder.bind(client.adapter)
        for path, layer in exp.binder.layers.items():  # what the model computes with
            assert layer.r[ADAPTER] == planned[path]
            assert layer.lora_A[ADAPTER].weight.shape[0] == planned[path]
            assert layer.lora_B[ADAPTER].weight.shape[1] == planned[path]
        rec = records[str(cid)]
        assert rec["device"] in ("cpu-2gb", "tablet-4gb", "laptop-8gb", "gpu-16gb")
        assert 0 < rec["memory_estimate_bytes"] <= rec["budget_bytes"]
        # parity: no more LoRA parameters than rank model.lora.r everywhere
        shapes = exp.binder.shapes()
        assert rec["lora_params"] <= cfg.model.lora.r * sum(sum(s) for s in shapes.values())


def test_device_budget_shares_homolora_total_in_proportion_to_memory(tiny_cfg):
    devices = ["cpu-2gb", "gpu-16gb", "gpu-16gb", "cpu-2gb"]  # 4 clients: 36 GiB in all
    cfg = _het(tiny_cfg, **{"ranks.budget": "device", "ranks.r_max": 64,
                            "devices.assignment": devices})
    exp = build_experiment(cfg)
    run_experiment(exp)
    shapes = exp.binder.shapes()
    total = len(devices) * cfg.model.lora.r * sum(sum(s) for s in shapes.values())
    for cid, client in exp.clients.items():
        params = sum(r * sum(shapes[m]) for m, r in client.ranks().items())
        share = total * (2 if devices[cid] == "cpu-2gb" else 16) / 36
        assert params <= share
        if devices[cid] == "gpu-16gb":  # the greedy fills its share up to one rank unit
            assert params > share - max(sum(s) for s in shapes.values())
    ranks = {devices[c]: sum(cl.ranks().values()) for c, cl in exp.clients.items()}
    assert ranks["gpu-16gb"] > 4 * ranks["cpu-2gb"]


@pytest.mark.parametrize("method", ["stack", "svd"])
def test_each_client_holds_the_best_rank_r_approximation_of_its_group_sum(tiny_cfg, updates_of,
                                                                          method):
    exp = build_experiment(_het(tiny_cfg, **{"ranks.aggregation": method,
                                             "data.partition": "dirichlet"}))
    seen = updates_of(exp)
    run_experiment(exp)
    updates = {c: (u.num_examples, u.adapter) for c, u in seen[0].items()}
    scaling = exp.strategy.scaling
    for _cid, client in exp.clients.items():
        group = {c: u for c, u in updates.items()
                 if exp.clients[c].task.name == client.task.name}
        total = sum(n for n, _ in group.values())
        for module, rank in client.ranks().items():
            target = sum(n / total * scaling(s[f"{module}.lora_A.weight"].shape[0])
                         * s[f"{module}.lora_B.weight"].double() @ s[f"{module}.lora_A.weight"]
                         .double() for n, s in group.values())
            u, sv, vh = torch.linalg.svd(target)
            best = u[:, :rank] @ torch.diag(sv[:rank]) @ vh[:rank]
            got = (scaling(rank) * client.adapter[f"{module}.lora_B.weight"].double()
                   @ client.adapter[f"{module}.lora_A.weight"].double())
            torch.testing.assert_close(got, best, rtol=1e-4, atol=1e-6)


def test_zero_pad_clients_hold_the_first_rows_of_the_padded_mean(tiny_cfg, updates_of):
    exp = build_experiment(_het(tiny_cfg, **{"ranks.aggregation": "zero-pad"}))
    seen = updates_of(exp)
    run_experiment(exp)
    updates = {c: (u.num_examples, u.adapter) for c, u in seen[0].items()}
    for _cid, client in exp.clients.items():
        group = [u for c, u in updates.items() if exp.clients[c].task.name == client.task.name]
        total = sum(n for n, _ in group)
        for module, rank in client.ranks().items():
            key = f"{module}.lora_A.weight"
            padded = torch.zeros(client.adapter[key].shape[0], client.adapter[key].shape[1],
                                 dtype=torch.float64)
            for n, s in group:
                r = min(rank, s[key].shape[0])
                padded[:r] += n / total * s[key][:r].double()
            torch.testing.assert_close(client.adapter[key].double(), padded, rtol=1e-5,
                                       atol=1e-7)


def test_homolora_trains_one_rank_everywhere(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="homolora", **{"model.lora.r": 4}))
    run_experiment(exp)
    assert all(set(c.ranks().values()) == {4} for c in exp.clients.values())


def _tiny_device(tiny_cfg, method, on_infeasible):
    return tiny_cfg(method=method, **{
        "devices.custom": [{"name": "watch", "memory_gb": 1e-4}],
        "devices.profiles": ["watch", "gpu-16gb"], "ranks.on_infeasible": on_infeasible,
        "seed": 3})


@pytest.mark.parametrize("method", ["homolora", "hetlora"])
def test_a_device_too_small_is_refused_with_a_clear_message(tiny_cfg, method):
    cfg = _tiny_device(tiny_cfg, method, "error")
    with pytest.raises(AtlasError, match=r"client \d+ on device watch needs [\d.]+ [KM]iB"):
        run_experiment(build_experiment(cfg))


@pytest.mark.parametrize("method", ["homolora", "hetlora"])
def test_or_excluded_it_trains_nothing_and_receives_nothing(tiny_cfg, method):
    exp = build_experiment(_tiny_device(tiny_cfg, method, "exclude"))
    small = [c for c, p in exp.strategy.ctx.devices.items() if p.name == "watch"]
    assert 0 < len(small) < len(exp.clients), "precondition: some clients on the small device"
    before = {c: {k: v.clone() for k, v in exp.clients[c].adapter.items()} for c in small}
    outcome = run_experiment(exp)
    rows = outcome.summary["clients"]
    assert all(not r.get("steps") for r in rows if r["client"] in small)
    for c in small:
        for k, v in exp.clients[c].adapter.items():
            assert torch.equal(v, before[c][k])


@pytest.mark.parametrize("kind, params", [("norm", "lora"), ("spectrum", "lora"),
                                          ("spectrum", "weights")])  # weights: shared tensors
def test_importance_from_the_fingerprint_pass_equals_a_separate_pass(tiny_cfg, kind, params):
    cfg = _het(tiny_cfg, **{"ranks.grouping": "cluster", "clustering.params": params})
    exp = build_experiment(cfg)
    ledger = CommLedger()
    executor = make_executor(exp, ledger)
    settings = cfg.clustering
    frozen = {n for n, p in exp.model.named_parameters() if not p.requires_grad}
    importance = ImportanceSpec(kind, settings.samples, 5, settings.batch_size)
    fingerprint = FingerprintSpec.from_config(settings)
    (together,) = executor.run(1, [Probe(0, fingerprint, importance)])
    (alone,) = executor.run(1, [Probe(0, None, importance)])
    together, alone = together.importance, alone.importance
    assert together.keys() == alone.keys() == set(exp.binder.layers)
    for key in together:
        assert together[key] == pytest.approx(alone[key], rel=1e-4)
    # alone, a client uploads one float32 (norm) or 5 (spectrum) per module
    per_module = 5 if kind == "spectrum" else 1
    fingerprint_bytes = 4 * (settings.dim + 1)
    assert ledger.get(1, 0, "up") == 2 * 4 * per_module * len(together) + fingerprint_bytes
    values = [v for s in together.values() for v in ([s] if kind == "norm" else s)]
    assert all(v > 0 for v in values)
    if kind == "spectrum":
        assert all(len(s) == 5 and s == sorted(s, reverse=True) for s in together.values())
    # the frozen weights were differentiated for this pass only
    assert frozen == {n for n, p in exp.model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("method", ["stack", "zero-pad"])
def test_delta_update_adds_the_clients_change_to_the_kept_aggregate(tiny_cfg, method):
    """ranks.update=delta, end to end: round 2's group aggregate is round 1's plus the weighted
    change of each client from what it received, so what its ranks cut off is not lost."""
    devices = ["cpu-2gb", "gpu-16gb", "gpu-16gb", "cpu-2gb"]  # ranks differ within each task
    exp = build_experiment(_het(tiny_cfg, **{
        "ranks.aggregation": method, "ranks.update": "delta", "federation.rounds": 2,
        "ranks.budget": "device", "ranks.r_max": 64, "devices.assignment": devices}))
    seen, states = [], []
    original = exp.strategy.aggregate_round

    def record(state, rnd, replies, served=None):
        outcome = original(state, rnd, replies, served)
        if replies and isinstance(replies[0], TrainReply):
            seen.append({r.client_id: (r.update.num_examples,
                                       {k: v.double() for k, v in r.update.adapter.items()})
                         for r in replies})
            states.append(outcome.state)
        return outcome

    exp.strategy.aggregate_round = record
    run_experiment(exp)
    first, second = states[0].groups.adapters, states[1].groups.adapters
    scaling = exp.strategy.scaling

    checked = 0
    for group in second:
        members = {c: u for c, u in seen[1].items() if states[0].groups.group(c) == group}
        assert any(len({s[f"{m}.lora_A.weight"].shape[0] for _, s in members.values()}) > 1
                   for m in exp.strategy.model.shapes), "ranks must differ within the group"
        total = sum(n for n, _ in members.values())
        prev, new = first[group], second[group]
        for module in exp.strategy.model.shapes:
            key_a, key_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
            if method == "stack":  # products: the stored aggregate is B @ A with scaling inside
                want = prev[key_b].double() @ prev[key_a].double()
                for n, s in members.values():
                    r = s[key_a].shape[0]
                    sent = prev[key_b].double()[:, :r] @ prev[key_a].double()[:r]
                    want = want + n / total * (scaling(r) * s[key_b] @ s[key_a] - sent)
                got = new[key_b].double() @ new[key_a].double()
            else:  # factors: each padded factor moves by the weighted change of its rows
                want = prev[key_a].double().clone()
                for n, s in members.values():
                    r = s[key_a].shape[0]
                    want[:r] += n / total * (s[key_a] - prev[key_a].double()[:r])
                got = new[key_a].double()
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked == 2 * len(exp.strategy.model.shapes)
