import torch

from atlasfl.engine import build_experiment, run_experiment, sample_clients


def _run(cfg):
    exp = build_experiment(cfg)
    summary = run_experiment(exp).summary
    return summary, {cid: {**c.adapter_state(), **c.head_state()} for cid, c in exp.clients.items()}


def test_same_seed_gives_identical_results(tiny_cfg):
    cfg = tiny_cfg(method="fedavg-task", **{"federation.rounds": 2})
    s1, states1 = _run(cfg)
    s2, states2 = _run(cfg)
    assert s1["tasks"] == s2["tasks"]
    assert [c["train_loss"] for c in s1["clients"]] == [c["train_loss"] for c in s2["clients"]]
    for cid in states1:
        for key in states1[cid]:
            assert torch.equal(states1[cid][key], states2[cid][key])
    s3, states3 = _run(cfg.replace(seed=1))
    assert any(not torch.equal(states1[0][k], states3[0][k]) for k in states1[0])


def test_client_sampling_is_seeded_per_round():
    ids = list(range(10))
    a = [sample_clients(ids, 0.3, 0, r) for r in range(1, 6)]
    assert a == [sample_clients(ids, 0.3, 0, r) for r in range(1, 6)]
    assert all(len(s) == 3 for s in a) and len({tuple(s) for s in a}) > 1
    assert sample_clients(ids, 1.0, 0, 1) == ids


def test_partial_participation_still_broadcasts_to_everyone(tiny_cfg):
    exp = build_experiment(tiny_cfg(method="fedavg", **{"federation.fraction": 0.5}))
    summary = run_experiment(exp).summary
    trained = [c for c in summary["clients"] if c.get("bytes_up")]
    assert len(trained) == 2
    assert all(c["bytes_down"] > 0 for c in summary["clients"])
    states = [c.adapter_state() for c in exp.clients.values()]
    for key in states[0]:
        assert all(torch.equal(states[0][key], s[key]) for s in states)


def test_no_validation_split_runs(tiny_cfg):
    exp = build_experiment(tiny_cfg(**{"data.val_fraction": 0.0}))
    assert all(len(c.val_set) == 0 for c in exp.clients.values())
    summary = run_experiment(exp).summary
    assert all("val_loss" not in c for c in summary["clients"])
