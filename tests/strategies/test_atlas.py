"""Phase 4 in the strategies: the Laplacian step on each client's own model, written back to it;
lambda 0 is ``local``; mixed ranks pass through ``product``; ATLAS writes its plan to the run
folder; FedSA shares only the A factors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atlasfl.engine import RunDir, build_experiment, run_experiment
from atlasfl.phases.laplacian import laplacian_step
from atlasfl.strategies import METHODS
from atlasfl.strategies.personal import laplacian_space


def _own_tensors(exp):
    return {c: {**client.adapter_state(), **{f"head/{k}": v for k, v in
                                             client.head_state().items()}}
            for c, client in exp.clients.items()}


def _run(cfg):
    exp = build_experiment(cfg)
    return exp, run_experiment(exp)


def test_lambda_zero_is_exactly_local(tiny_cfg):
    local, _ = _run(tiny_cfg(method="local", **{"federation.rounds": 2}))
    mira, outcome = _run(tiny_cfg(method="mira", **{"federation.rounds": 2, "laplacian.lam": 0}))
    a, b = _own_tensors(local), _own_tensors(mira)
    for c in a:
        for key in a[c]:
            assert torch.equal(a[c][key], b[c][key]), (c, key)
    # every client already holds what it trained: nothing is sent down after the first round
    assert outcome.summary["bytes_down"] == 0


def test_the_step_is_mira_on_each_clients_own_upload_and_is_written_back(tiny_cfg, updates_of):
    cfg = tiny_cfg(method="mira", **{"laplacian.lam": 0.5, "laplacian.eta": 0.5})
    exp = build_experiment(cfg)
    seen = updates_of(exp)
    outcome = run_experiment(exp)
    state = outcome.state
    ids = sorted(exp.clients)
    adj = state.personal.adjacency.numpy()
    assert adj.shape == (len(ids), len(ids)) and (adj[~np.eye(len(ids), dtype=bool)] > 0).all()
    uploads = seen[0]
    for k in ids:  # by hand: W_k - eta lam sum_l a_kl (W_k - W_l), adapter and head alike
        for part in ("adapter", "head"):
            for key, w_k in getattr(uploads[k], part).items():
                pull = sum(adj[k, j] * (w_k.double() - getattr(uploads[j], part)[key].double())
                           for j in ids)
                expected = (w_k.double() - 0.25 * pull).float()
                own = (state.personal.models if part == "adapter"
                       else state.personal.heads)[str(k)][key]
                assert torch.allclose(own, expected, atol=1e-6), (k, key)
                held = (exp.clients[k].adapter_state() if part == "adapter"
                        else exp.clients[k].head_state())[key]
                assert torch.equal(held, own)  # the client evaluated the model it was sent
                assert not torch.equal(held, w_k)  # and it is not what it trained
    assert outcome.summary["bytes_down"] > 0


def test_a_lambda_sweep_changes_the_models(tiny_cfg):
    runs = [_own_tensors(_run(tiny_cfg(method="mira", **{"laplacian.lam": lam}))[0])
            for lam in (0.1, 1.0)]
    assert any(not torch.equal(runs[0][c][k], runs[1][c][k]) for c in runs[0] for k in runs[0][c])


def test_clients_not_sampled_keep_their_models_and_still_pull_their_neighbours(tiny_cfg,
                                                                               updates_of):
    cfg = tiny_cfg(method="mira", **{"federation.rounds": 2, "federation.fraction": 0.5,
                                     "laplacian.lam": 0.5, "laplacian.eta": 0.5})
    exp = build_experiment(cfg)
    seen = updates_of(exp)
    snapshots = []
    original = exp.strategy.aggregate_round

    def keep(state, rnd, replies, served=None):
        outcome = original(state, rnd, replies, served)
        snapshots.append((rnd, outcome.state.personal))
        return outcome

    exp.strategy.aggregate_round = keep
    run_experiment(exp)
    after = [s for rnd, s in snapshots if rnd.exchange == len(exp.strategy.stages(rnd)) - 1]
    first, second = after
    trained_2 = set(seen[1])
    present = sorted(int(c) for c in first.models | {str(c): 0 for c in trained_2})
    for c in map(str, present):
        if int(c) not in trained_2 and c in first.models:  # not sampled: its model is kept
            for key in first.models[c]:
                assert torch.equal(second.models[c][key], first.models[c][key])
    # a round-2 client's step includes the kept models of the clients that did not train
    idx = {c: i for i, c in enumerate(sorted(exp.clients))}
    models = {c: (seen[1][c].adapter if c in trained_2 else first.models[str(c)])
              for c in present}
    adj = first.adjacency.numpy()[np.ix_([idx[c] for c in present], [idx[c] for c in present])]
    by_hand = laplacian_step([models[c] for c in present], adj, eta=0.5, lam=0.5)
    for i, c in enumerate(present):
        if c in trained_2:
            for key in by_hand[i]:
                assert torch.allclose(second.models[str(c)][key], by_hand[i][key], atol=1e-6)
    assert set(present) - trained_2  # the check above did include a kept neighbour


def _mixed_rank_cfg(tiny_cfg, method="atlas", **extra):
    return tiny_cfg(method=method, **{"devices.assignment": ["cpu-2gb", "gpu-16gb"] * 2,
                                      "ranks.budget": "device", "ranks.r_max": 8,
                                      "laplacian.lam": 0.5, "laplacian.eta": 0.5, **extra})


def test_mixed_ranks_pass_through_the_product_space(tiny_cfg, updates_of):
    exp = build_experiment(_mixed_rank_cfg(tiny_cfg))
    seen = updates_of(exp)
    outcome = run_experiment(exp)
    state = outcome.state
    ranks = {c: state.plan.ranks[c] for c in state.personal.models}
    assert len({tuple(sorted(r.items())) for r in ranks.values()}) > 1  # ranks do differ
    assert laplacian_space(exp.strategy.ctx, list(state.personal.models.values())) == "product"
    ids = sorted(exp.clients)
    by_hand = laplacian_step([seen[0][c].adapter for c in ids], state.personal.adjacency.numpy(),
                             eta=0.5, lam=0.5, space="product", scaling=exp.strategy.scaling)
    for i, c in enumerate(ids):
        own = state.personal.models[str(c)]
        for key, value in by_hand[i].items():
            assert own[key].shape[0 if key.endswith("lora_A.weight") else 1] == \
                ranks[str(c)][key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")]
            assert torch.allclose(own[key], value, atol=1e-6)
        assert any(not torch.equal(own[k], seen[0][c].adapter[k]) for k in own)  # it moved


def test_an_atlas_run_writes_clusters_graph_ranks_and_cuts(tiny_cfg, weak_device, tmp_path):
    base = {"seed": 3, "split.min_cut": 0, "devices.profiles": ["weak", "gpu-16gb"],
            "out": str(tmp_path), "run_name": "atlas"}
    memory_gb = weak_device(tiny_cfg, base)
    cfg = tiny_cfg(method="atlas", **base, **{
        "devices.custom": [{"name": "weak", "memory_gb": memory_gb}]})
    exp = build_experiment(cfg)
    run = RunDir.create(exp.cfg)
    outcome = run_experiment(exp, run)
    graph = json.loads((run.path / "graph.json").read_text())
    clients = json.loads((run.path / "clients.json").read_text())
    ids = sorted(exp.clients)
    assert graph["clients"] == ids and len(graph["group"]) == len(ids)
    assert graph["group"] == [outcome.state.groups.group(c) for c in ids]
    assert np.allclose(graph["adjacency"], outcome.state.personal.adjacency.numpy(), atol=1e-6)
    adj = outcome.state.personal.adjacency.numpy()
    top = np.linalg.eigvalsh(np.diag(adj.sum(1)) - adj).max()
    assert graph["lambda_max"] == pytest.approx(top)
    assert graph["eta"] == outcome.state.personal.eta == pytest.approx(1 / top)  # eta auto
    assert all(clients[str(c)]["ranks"] for c in ids)
    split = {c for c in ids if clients[str(c)]["split"] is not None}
    weak = {c for c, p in exp.strategy.ctx.devices.items() if p.name == "weak"}
    assert split == weak and {int(c) for c in outcome.state.split.cuts} == weak
    rows = [json.loads(x) for x in (run.path / "rounds.jsonl").read_text().splitlines()]
    assert all("server_graph_edges" in r and "server_laplacian_change" in r for r in rows)
    assert all(r["bytes_up_activations"] > 0 for r in rows if r["client"] in weak)
    clusters = json.loads((run.path / "clusters.json").read_text())
    assert clusters["clients"] == ids and len(clusters["fingerprints"]) == len(ids)
    assert [f"cluster={label}" for label in clusters["labels"]] == graph["group"]
    assert clusters["k"] == len(set(clusters["labels"]))
    assert clusters["tasks"] == [exp.clients[c].task.name for c in ids]
    # the report draws every phase figure from this folder, and only from it
    from atlasfl.report import find_runs
    from atlasfl.report.figures import draw_figures

    written, skipped = draw_figures(find_runs([run.path]), tmp_path / "figures")
    drawn = {p.stem for p in written}
    assert {"fingerprint_map", "graph_heatmap", "rank_map", "cut_points"} <= drawn
    assert skipped == ["lambda_sweep: skipped, the runs do not differ in laplacian.lam"]


def test_a_diverging_step_is_refused_naming_the_keys(tiny_cfg):
    from atlasfl.errors import AtlasError

    with pytest.raises(AtlasError, match="laplacian.eta \\* laplacian.lam"):
        _run(tiny_cfg(method="mira", **{"laplacian.eta": 1.0, "laplacian.lam": 50.0}))


def test_fedsa_shares_the_a_factors_and_keeps_b_and_head_on_each_client(tiny_cfg, updates_of):
    exp = build_experiment(tiny_cfg(method="fedsa", **{"federation.rounds": 1}))
    seen = updates_of(exp)
    run_experiment(exp)
    uploads = seen[0]
    assert all(u.head == {} and u.adapter and all(k.endswith(".lora_A.weight") for k in u.adapter)
               for u in uploads.values())
    weights = {c: u.num_examples for c, u in uploads.items()}
    total = sum(weights.values())
    for client in exp.clients.values():
        held = client.adapter_state()
        for key, value in held.items():
            if key.endswith(".lora_A.weight"):
                mean = sum(uploads[d].adapter[key] * w for d, w in weights.items()) / total
                assert torch.allclose(value, mean, atol=1e-6)
    b_keys = [k for k in exp.clients[0].adapter_state() if k.endswith(".lora_B.weight")]
    assert not torch.equal(exp.clients[0].adapter_state()[b_keys[0]],
                           exp.clients[1].adapter_state()[b_keys[0]])  # B stays personal


def test_every_method_is_listed_with_its_parts_and_each_ablation_swaps_one(capsys):
    from atlasfl.cli import main
    from atlasfl.strategies.methods import PARTS, differing_parts

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:len(PARTS) + 1] == ["method", *PARTS]
    rows = {line.split()[0]: line.split() for line in lines[1:] if not line.startswith(" " * 10)}
    assert sorted(rows) == sorted(METHODS)
    assert rows["atlas"][1:7] == ["cluster", "device", "config", "mixed", "laplacian", "plain"]
    assert rows["fedsa"][1:7] == ["global", "none", "never", "fedavg", "shared-a", "plain"]
    notes = [line.split() for line in lines[1:] if line.startswith(" " * 10)]
    assert ["=", "atlas", "with", "split", "never"] in notes  # atlas-no-split
    ablations = {n: r for n, r in METHODS.items() if n.startswith("atlas-")}
    assert len(ablations) == 4
    for name, recipe in ablations.items():
        assert recipe.ablates == "atlas"
        assert len(differing_parts(recipe, METHODS["atlas"])) == 1, name


def test_the_parts_that_plan_or_serve_nothing_refuse_to_be_asked():
    from atlasfl.strategies.aggregators import Mean
    from atlasfl.strategies.rank_plan import NoPlan

    class Ctx:
        method = "fedavg"

    with pytest.raises(RuntimeError, match="plans no ranks"):
        NoPlan().plan(Ctx(), 0, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="serves no split server model"):
        Mean().server_share(Ctx(), {}, None)  # type: ignore[arg-type]
