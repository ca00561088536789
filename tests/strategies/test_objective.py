"""FedProx as a recipe: one part (the proximal objective), checked by hand and against FedAvg."""

import pytest
import torch

from atlasfl.client.training import proximal_term
from atlasfl.engine import build_experiment, run_experiment
from atlasfl.strategies import METHODS
from atlasfl.strategies.methods import differing_parts


def test_the_proximal_term_and_its_gradient_by_hand():
    w = [torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([[3.0]], requires_grad=True)]
    anchor = [torch.zeros(2), torch.tensor([[1.0]])]
    term = proximal_term(w, anchor, 0.5)
    assert float(term) == pytest.approx(0.25 * (1 + 4 + 4))  # mu/2 (1^2 + 2^2 + 2^2)
    term.backward()
    assert w[0].grad.tolist() == [0.5, 1.0]  # mu (w - anchor)
    assert w[1].grad.tolist() == [[1.0]]


def test_fedprox_is_fedavg_with_one_part_swapped():
    assert differing_parts(METHODS["fedprox"], METHODS["fedavg"]) == ["objective"]


def _uploads(tiny_cfg, updates_of, method, mu):
    exp = build_experiment(tiny_cfg(method=method, **{"federation.rounds": 2,
                                                      "train.prox_mu": mu}))
    seen = updates_of(exp)
    outcome = run_experiment(exp)
    return exp, seen, outcome


def test_fedprox_at_mu_zero_is_fedavg_bit_for_bit(tiny_cfg, updates_of):
    exp_a, _, _ = _uploads(tiny_cfg, updates_of, "fedavg", 0.0)
    exp_b, _, _ = _uploads(tiny_cfg, updates_of, "fedprox", 0.0)
    for cid in exp_a.clients:
        a, b = exp_a.clients[cid].adapter_state(), exp_b.clients[cid].adapter_state()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_proximal_term_keeps_each_client_near_the_model_it_received(tiny_cfg, updates_of):
    def drift(method, mu):
        exp, seen, _ = _uploads(tiny_cfg, updates_of, method, mu)
        first, second = seen
        weights = {c: u.num_examples for c, u in first.items()}
        received = {k: sum(first[c].adapter[k] * w for c, w in weights.items())
                    / sum(weights.values()) for k in first[0].adapter}  # round 1's average
        return {c: sum(float((u.adapter[k] - received[k]).pow(2).sum()) for k in received)
                for c, u in second.items()}

    plain, pulled = drift("fedavg", 0.0), drift("fedprox", 100.0)
    assert all(pulled[c] < plain[c] for c in plain), (pulled, plain)
