"""After a round, every client's model holds exactly what the strategy says: the hand-computed
example-weighted mean of the uploaded updates within its group (FedAvg), or its own training
result (local). Catches an aggregate that is computed but never written back."""

import pytest
import torch

from atlasfl.client import HEAD_PREFIX
from atlasfl.engine import build_experiment, run_experiment


def _recording(exp):
    seen = []
    original = exp.strategy.aggregate_round

    def record(state, round_idx, updates):
        seen.append([(u.client_id, u.num_examples, {k: v.clone() for k, v in u.state.items()})
                     for u in updates])
        return original(state, round_idx, updates)

    exp.strategy.aggregate_round = record
    return seen


def _mean(items):
    total = sum(n for _, n, _ in items)
    return {k: sum(s[k].double() * n for _, n, s in items) / total for k in items[0][2]}


@pytest.mark.parametrize("method, group_of", [
    ("fedavg", lambda task: "all"),
    ("fedavg-task", lambda task: task),
])
def test_every_client_holds_the_weighted_mean_of_its_group(tiny_cfg, method, group_of):
    # Dirichlet shares give clients unequal example counts, so weighting matters.
    exp = build_experiment(tiny_cfg(method=method, **{"data.partition": "dirichlet",
                                                      "data.alpha": 0.5}))
    sizes = [c.num_examples for c in exp.clients.values()]
    assert len(set(sizes)) > 1, "precondition: unequal client sizes"
    seen = _recording(exp)
    run_experiment(exp)
    (updates,) = seen
    assert len(updates) == len(exp.clients)
    for client in exp.clients.values():
        group = [u for u in updates
                 if group_of(exp.clients[u[0]].task.name) == group_of(client.task.name)]
        expected = _mean(group)
        state = client.state()
        for key, value in state.items():
            if key.startswith(HEAD_PREFIX):
                same_head = [u for u in group
                             if exp.clients[u[0]].task.num_labels == client.task.num_labels]
                want = _mean(same_head)[key]
            else:
                want = expected[key]
            torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
        # and it differs from what the client itself uploaded (the mean is not a no-op)
        own = next(u[2] for u in updates if u[0] == client.client_id)
        assert any(not torch.equal(own[k], state[k]) for k in state if "lora_B" in k)


def test_local_clients_keep_their_own_training_and_send_nothing(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="local"))
    init = exp.initial_adapter
    summary = run_experiment(exp).summary
    assert summary["bytes_up"] == 0 and summary["bytes_down"] == 0
    states = [c.state() for c in exp.clients.values()]
    for state in states:  # trained: B moved away from its zero initialisation
        assert any(state[k].abs().sum() > 0 for k in init if "lora_B" in k)
    assert not torch.equal(states[0][next(iter(init))], states[1][next(iter(init))])


def test_centralized_pools_each_task_into_one_trainer(tiny_cfg):
    fed = build_experiment(tiny_cfg(method="fedavg-task"))
    central = build_experiment(tiny_cfg(method="centralized"))
    assert len(central.clients) == 2  # one per task
    for task in ("cola", "mrpc"):
        pooled = [c for c in central.clients.values() if c.task.name == task]
        parts = [c for c in fed.clients.values() if c.task.name == task]
        assert len(pooled) == 1
        assert pooled[0].num_examples == sum(c.num_examples for c in parts)


def test_fedavg_cluster_averages_within_found_clusters_only(tiny_cfg):
    cfg = tiny_cfg(method="fedavg-cluster", **{"clustering.k": 2, "clustering.samples": 8,
                                               "clustering.dim": 32})
    exp = build_experiment(cfg)
    seen = _recording(exp)
    summary = run_experiment(exp).summary
    rows = summary["clients"]
    assert all(r["server_k"] == 2.0 for r in rows)
    assert all(r["bytes_up"] >= 32 * 4 for r in rows)  # fingerprint counted in the upload
    (updates,) = seen
    # recover the assignment the strategy used from its write-backs: same adapter = same cluster
    states = {cid: c.state() for cid, c in exp.clients.items()}
    key = next(k for k in states[0] if "lora_B" in k)
    groups: dict = {}
    for cid, st in states.items():
        groups.setdefault(tuple(st[key].flatten()[:4].tolist()), []).append(cid)
    assert len(groups) == 2
    for members in groups.values():
        expected = _mean([u for u in updates if u[0] in members])
        for cid in members:
            torch.testing.assert_close(states[cid][key].double(), expected[key], rtol=1e-5,
                                       atol=1e-6)
