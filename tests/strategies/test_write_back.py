"""After a round, every client's model holds exactly what the strategy says: the hand-computed
example-weighted mean of the uploaded updates within its group (FedAvg), or its own training
result (local). Catches an aggregate that is computed but never written back."""

import pytest
import torch

from atlasfl.engine import build_experiment, run_experiment


def _mean(updates, part):
    total = sum(u.num_examples for u in updates)
    first = getattr(updates[0], part)
    return {k: sum(getattr(u, part)[k].double() * u.num_examples for u in updates) / total
            for k in first}


def _assert_holds_group_means(exp, updates, group_of):
    for cid, client in exp.clients.items():
        group = [u for c, u in updates.items() if group_of(c) == group_of(cid)]
        same_head = [u for u in group if exp.clients[u.client_id].task.num_labels
                     == client.task.num_labels]
        for key, value in client.adapter_state().items():
            torch.testing.assert_close(value.double(), _mean(group, "adapter")[key], rtol=1e-5,
                                       atol=1e-6)
        for key, value in client.head_state().items():
            torch.testing.assert_close(value.double(), _mean(same_head, "head")[key], rtol=1e-5,
                                       atol=1e-6)
        # and it differs from what the client itself uploaded (the mean is not a no-op)
        own = updates[cid].adapter
        assert len(group) == 1 or any(not torch.equal(own[k], v) for k, v
                                      in client.adapter_state().items() if "lora_B" in k)


@pytest.mark.parametrize("method", ["fedavg", "fedavg-task"])
def test_every_client_holds_the_weighted_mean_of_its_group(tiny_cfg, updates_of, method):
    # Dirichlet shares give clients unequal example counts, so weighting matters.
    exp = build_experiment(tiny_cfg(method=method, **{"data.partition": "dirichlet",
                                                      "data.alpha": 0.5}))
    sizes = [c.num_examples for c in exp.clients.values()]
    assert len(set(sizes)) > 1, "precondition: unequal client sizes"
    seen = updates_of(exp)
    run_experiment(exp)
    (updates,) = seen
    assert sorted(updates) == sorted(exp.clients)
    if method == "fedavg":
        _assert_holds_group_means(exp, updates, lambda cid: "all")
    else:
        _assert_holds_group_means(exp, updates, lambda cid: exp.clients[cid].task.name)


def test_local_clients_keep_their_own_training_and_send_nothing(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="local"))
    init = exp.initial_adapter
    summary = run_experiment(exp).summary
    assert summary["bytes_up"] == 0 and summary["bytes_down"] == 0
    states = [c.adapter_state() for c in exp.clients.values()]
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


def test_fedavg_cluster_averages_within_the_clusters_the_server_found(tiny_cfg, updates_of):
    cfg = tiny_cfg(method="fedavg-cluster", **{"clustering.k": 2, "clustering.samples": 8,
                                               "clustering.dim": 32,
                                               "data.partition": "dirichlet"})
    exp = build_experiment(cfg)
    seen = updates_of(exp)
    outcome = run_experiment(exp)
    rows = outcome.summary["clients"]
    assert all(r["server_k"] == 2.0 for r in rows)
    assert all(r["bytes_up_fingerprint"] == (32 + 1) * 4 for r in rows)  # vector + noise var
    (updates,) = seen
    members = outcome.state.groups.members  # the groups the server decided on, not inferred
    assert sorted(members) == [str(c) for c in sorted(exp.clients)]
    assert len(set(members.values())) == 2
    _assert_holds_group_means(exp, updates, lambda cid: members[str(cid)])
    similarity = outcome.state.groups.similarity
    assert similarity.shape == (4, 4) and torch.allclose(similarity, similarity.T)
