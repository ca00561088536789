"""The grouping-and-mixing component by hand: rows of weights, group aggregates, delivery."""

import numpy as np
import pytest
import torch

from atlasfl.messages import Update
from atlasfl.phases.clustering import cluster_fingerprints
from atlasfl.strategies.base import ClientInfo
from atlasfl.strategies.groups import (
    Groups,
    cluster_groups,
    fedavg_rows,
    head_key,
    initial_members,
    mix,
    recluster_due,
)
from atlasfl.strategies.holdings import Holdings

CLIENTS = {0: ClientInfo(0, "sst2", 10, (2, 8)), 1: ClientInfo(1, "sst2", 30, (2, 8)),
           2: ClientInfo(2, "stsb", 20, (1, 8)), 3: ClientInfo(3, "rte", 40, (2, 8))}


def _update(cid, value, n=None):
    return Update(cid, {"w": torch.full((2,), float(value))}, {"b": torch.tensor([float(value)])},
                  CLIENTS[cid].num_examples if n is None else n)


def test_initial_members_by_grouping():
    assert initial_members("global", CLIENTS) == dict.fromkeys(["0", "1", "2", "3"], "all")
    assert initial_members("task", CLIENTS) == {"0": "task=sst2", "1": "task=sst2",
                                                "2": "task=stsb", "3": "task=rte"}
    assert initial_members("cluster", CLIENTS) == {}  # known after the first fingerprints


def test_fedavg_rows_are_example_counts_per_target_in_arrival_order():
    updates = [_update(3, 0), _update(0, 0), _update(1, 0)]
    rows = fedavg_rows({0: "a", 1: "a", 3: "b"}, updates)
    assert rows == {"b": {3: 40}, "a": {0: 10, 1: 30}}
    assert list(rows["a"]) == [0, 1]


def test_mix_is_the_weighted_mean_of_each_row_and_takes_any_matrix():
    tensors = {0: {"w": torch.tensor([1.0, 0.0])}, 1: {"w": torch.tensor([3.0, 4.0])}}
    out = mix({"g": {0: 1.0, 1: 3.0}, "h": {1: 2.0}}, tensors)
    assert torch.allclose(out["g"]["w"], torch.tensor([2.5, 3.0]))  # (1*1 + 3*3) / 4, 12/4
    assert torch.equal(out["h"]["w"], tensors[1]["w"])
    # a Laplacian-like matrix: one row per client over itself and its neighbour
    personal = mix({0: {0: 0.75, 1: 0.25}, 1: {0: 0.5, 1: 0.5}}, tensors)
    assert torch.allclose(personal[0]["w"], torch.tensor([1.5, 1.0]))
    assert torch.allclose(personal[1]["w"], torch.tensor([2.0, 2.0]))
    seen = []
    mix({"g": {1: 1.0, 0: 2.0}}, tensors, lambda t, s, w: seen.append((t, s, w)) or s[0])
    assert seen == [("g", [tensors[1], tensors[0]], [1.0, 2.0])]


def test_aggregate_averages_adapters_per_group_and_heads_per_group_and_shape():
    groups = Groups({"0": "all", "1": "all", "2": "all", "3": "all"})
    updates = [_update(0, 1), _update(1, 5), _update(2, 7), _update(3, 2)]
    new = groups.aggregate(updates, CLIENTS, round_idx=3)
    want = (10 * 1 + 30 * 5 + 20 * 7 + 40 * 2) / 100
    assert torch.allclose(new.adapters["all"]["w"], torch.full((2,), want))
    two = (10 * 1 + 30 * 5 + 40 * 2) / 80  # the three heads of shape (2, 8)
    assert torch.allclose(new.heads[head_key("all", (2, 8))]["b"], torch.tensor([two]))
    assert torch.equal(new.heads[head_key("all", (1, 8))]["b"], torch.tensor([7.0]))
    assert new.versions == {"all": 3}
    assert groups.adapters == {}  # frozen: the old state is untouched


def test_a_client_lacks_its_group_model_until_it_has_received_the_latest_aggregate():
    groups = Groups({"0": "task=sst2", "1": "task=sst2", "3": "task=rte"})
    held = Holdings()
    assert not held.lacks_group(groups, 0)  # no aggregate yet: nothing to send
    groups = groups.aggregate([_update(0, 1)], CLIENTS, round_idx=1)
    assert held.lacks_group(groups, 0) and held.lacks_group(groups, 1)
    assert not held.lacks_group(groups, 3)
    held = held.received([0, 3], groups, stepped={})
    assert not held.lacks_group(groups, 0) and held.lacks_group(groups, 1)
    assert held.group == {"0": "task=sst2@1"} and held.own == {}  # rte has no aggregate yet
    groups = groups.aggregate([_update(1, 2)], CLIENTS, round_idx=2)
    assert held.lacks_group(groups, 0) and groups.tag(0) == "task=sst2@2"


def test_own_models_and_ranks_received_and_a_refused_client_forgotten():
    groups = Groups({"0": "all", "1": "all"}).aggregate([_update(0, 1)], CLIENTS, round_idx=2)
    held = Holdings().received([0, 1], groups, stepped={"1": 2})
    assert held.group == {"0": "all@2", "1": "all@2"} and held.own == {"1": 2}
    held = held.with_ranks([1]).with_ranks([0, 1])
    assert held.ranks == (0, 1)
    forgot = held.forget([1])
    assert forgot.group == {"0": "all@2"} and forgot.own == {} and forgot.ranks == (0, 1)
    assert forgot.lacks_group(groups, 1) and not forgot.lacks_group(groups, 0)


def test_outbox_shares_are_dropped_when_the_group_aggregates_again_or_on_delivery():
    groups = Groups({"0": "all", "1": "all"}, outbox={"0": {"w": torch.zeros(1)}})
    groups = groups.aggregate([_update(1, 1)], CLIENTS, round_idx=4)
    assert groups.outbox == {}  # superseded by the new aggregate
    groups = Groups({"0": "all", "1": "all"}).aggregate([_update(1, 1)], CLIENTS, round_idx=4)
    groups = Groups(**{**vars(groups), "outbox": {"1": {"w": torch.ones(1)}}})
    assert set(groups.delivered([1]).outbox) == set()
    assert set(groups.delivered([0]).outbox) == {"1"}


def test_regroup_keeps_models_only_when_nobody_moved():
    groups = Groups({"0": "cluster=0", "1": "cluster=1"}).aggregate(
        [_update(0, 1), _update(1, 2)], CLIENTS, round_idx=1)
    sim = torch.eye(2)
    same = groups.regroup({"0": "cluster=0", "1": "cluster=1"}, sim)
    assert same.adapters.keys() == {"cluster=0", "cluster=1"} and same.similarity is sim
    moved = groups.regroup({"0": "cluster=0", "1": "cluster=0"}, sim)
    assert moved.adapters == {} and moved.versions == {}
    assert not Holdings().lacks_group(moved, 0)  # nothing to send before its first aggregate


@pytest.mark.parametrize("every, due", [(0, [1]), (1, [1, 2, 3, 4, 5]), (2, [1, 3, 5]),
                                        (3, [1, 4])])
def test_recluster_due(tiny_cfg, every, due):
    cfg = tiny_cfg(**{"clustering.recluster_every": every})
    assert [r for r in range(1, 6) if recluster_due(cfg, r)] == due


def test_head_keys_name_the_group_and_the_shape():
    assert head_key("task=sst2", (2, 384)) == "task=sst2/head2x384"
    assert head_key("all", (1,)) == "all/head1"


def test_aggregate_uses_the_combiner_it_is_given_per_group():
    groups = Groups({"0": "a", "1": "a", "3": "b"})
    seen = []

    def combine(group, states, weights):
        seen.append((group, weights))
        return {"w": sum(s["w"] for s in states)}  # a plain sum, not a mean

    new = groups.aggregate([_update(0, 1), _update(3, 2), _update(1, 3)], CLIENTS, 7, combine)
    assert seen == [("a", [10, 30]), ("b", [40])]
    assert torch.equal(new.adapters["a"]["w"], torch.full((2,), 4.0))
    assert torch.equal(new.adapters["b"]["w"], torch.full((2,), 2.0))
    # heads are always averaged (only their group and shape differ)
    assert torch.allclose(new.heads[head_key("a", (2, 8))]["b"], torch.tensor([2.5]))


def test_regroup_to_new_members_keeps_the_new_similarity():
    sim = torch.tensor([[1.0, 0.2], [0.2, 1.0]])
    moved = Groups({"0": "cluster=0", "1": "cluster=1"}).regroup({"0": "c", "1": "c"}, sim)
    assert moved.members == {"0": "c", "1": "c"} and moved.similarity is sim


def _planted(seed=0, per=3, dim=16, centers=2):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(centers, dim))
    return np.concatenate([c + 0.05 * rng.normal(size=(per, dim)) for c in centers])


def test_cluster_groups_names_clusters_and_returns_the_clustering_geometry(tiny_cfg):
    x = _planted()
    infos = {i: ClientInfo(i, "sst2" if i < 3 else "rte", 10, (2, 8)) for i in range(6)}
    cfg = tiny_cfg(**{"clustering.k": 0})
    shuffled = {i: (x[i].astype(np.float32), 0.0) for i in (4, 0, 5, 2, 1, 3)}
    members, similarity, metrics, labels = cluster_groups(shuffled, infos, cfg)
    assert {f"cluster={labels[i]}" for i in range(6)} == set(members.values())
    assert sorted(members) == [str(i) for i in range(6)]
    assert all(m.startswith("cluster=") for m in members.values())
    assert members["0"] == members["1"] == members["2"] != members["3"] == members["4"]
    assert metrics == {"k": 2.0, "ari": 1.0, "nmi": 1.0, "purity": 1.0}
    want = cluster_fingerprints(x.astype(np.float32), seed=cfg.seed, noise_var=np.zeros(6))
    assert similarity.dtype == torch.float64
    np.testing.assert_allclose(similarity.numpy(), want.similarity)  # rows in client-id order


def test_cluster_groups_passes_k_and_the_noise_variances_as_configured(tiny_cfg):
    x = _planted(seed=1, per=2, centers=3)
    infos = {i: ClientInfo(i, "t", 10, (2, 8)) for i in range(6)}
    noisy = {i: (x[i], float(i) * 0.02 * (x[i] ** 2).sum()) for i in range(6)}
    assert cluster_groups(noisy, infos, tiny_cfg())[2]["k"] == 3.0  # chosen
    members, _, metrics, _ = cluster_groups(noisy, infos, tiny_cfg(**{"clustering.k": 2}))
    assert metrics["k"] == 2.0 and len(set(members.values())) == 2
    debiased = cluster_groups(noisy, infos, tiny_cfg()).similarity
    raw = cluster_groups(noisy, infos, tiny_cfg(**{"clustering.debias": False})).similarity
    noise = np.array([noisy[i][1] for i in range(6)])
    np.testing.assert_allclose(debiased.numpy(),
                               cluster_fingerprints(x, noise_var=noise).similarity)
    np.testing.assert_allclose(raw.numpy(), cluster_fingerprints(x).similarity)
    assert not np.allclose(debiased.numpy(), raw.numpy())


def test_cluster_groups_forwards_every_clustering_setting(tiny_cfg, monkeypatch):
    import atlasfl.strategies.groups as groups_module

    seen = {}

    def spy(fingerprints, **kwargs):
        seen.update(kwargs)
        return cluster_fingerprints(fingerprints, **kwargs)

    monkeypatch.setattr(groups_module, "cluster_fingerprints", spy)
    x = _planted(seed=2, per=3, centers=2)
    infos = {i: ClientInfo(i, f"t{i % 2}", 10, (2, 8)) for i in range(6)}
    cfg = tiny_cfg(seed=5, **{"clustering.k_min": 3, "clustering.k_max": 4,
                              "clustering.method": "spectral", "clustering.center": False,
                              "clustering.criteria": ["eigengap", "silhouette"],
                              "clustering.min_signal": 0.25})
    cluster_groups({i: (x[i], 0.5) for i in range(6)}, infos, cfg)
    assert seen.pop("noise_var").tolist() == [0.5] * 6
    assert seen == {"k": None, "k_range": (3, 4), "method": "spectral", "seed": 5,
                    "true_labels": ["t0", "t1", "t0", "t1", "t0", "t1"], "center": False,
                    "criteria": ("eigengap", "silhouette"), "min_signal": 0.25}
