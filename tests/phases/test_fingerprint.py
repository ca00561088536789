import math

import numpy as np
import pytest
import torch

from atlasfl.engine import CommLedger, build_experiment
from atlasfl.engine.executor import make_executor
from atlasfl.messages import FingerprintSpec, Probe
from atlasfl.phases.fingerprint import (
    _projection_block,
    compute_fingerprint,
    fingerprint_modules,
    gaussian_sigma,
    per_example_grads,
    select_blocks,
    transformer_blocks,
)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("params", ["lora", "weights"])
def test_layers_chosen_by_index_and_gradients_collected(tiny_cfg, model, params):
    cfg = tiny_cfg(method="fedavg-cluster", **{"model.name": model, "clustering.params": params,
                                               "clustering.layers": 1, "clustering.dim": 32,
                                               "clustering.samples": 8})
    exp = build_experiment(cfg)
    num_layers = exp.backbone.num_layers
    assert len(transformer_blocks(exp.model, num_layers)) == num_layers
    blocks = select_blocks(num_layers, 1)
    assert blocks == (num_layers - 1,)
    names = fingerprint_modules(exp.model, num_layers, blocks, params=params)
    assert names and all(n.startswith(f"{num_layers - 1}.") for n in names)
    ledger = CommLedger()
    executor = make_executor(exp, ledger)
    spec = FingerprintSpec.from_config(cfg.clustering)
    vectors = [r.fingerprint for r in executor.run(1, [Probe(c, spec) for c in exp.clients])]
    for v in vectors:
        assert v.shape == (32,) and np.isfinite(v).all()
        assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-4)  # a gradient was collected
    assert not np.allclose(vectors[0], vectors[-1])  # different tasks, different fingerprints
    assert ledger.get(1, 0, "up") == 32 * 4 + 4  # the projected vector and its noise variance
    assert all(not p.requires_grad for n, p in exp.model.named_parameters() if "lora_" not in n)


def test_projection_is_identical_across_clients_with_the_same_seed():
    a = _projection_block(7, "0.attention.query.lora_B", 16, 100)
    b = _projection_block(7, "0.attention.query.lora_B", 16, 100)
    c = _projection_block(8, "0.attention.query.lora_B", 16, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.std().item() == pytest.approx(1 / math.sqrt(16), rel=0.1)


def test_dp_noise_scale_matches_the_gaussian_mechanism():
    sigma = gaussian_sigma(epsilon=8.0, delta=1e-5, clip=1.0, num_samples=64)
    assert sigma == pytest.approx((2 * 1.0 / 64) * math.sqrt(2 * math.log(1.25 / 1e-5)) / 8.0)
    # a toy client: one linear layer, loss = mean of its outputs
    layer = torch.nn.Linear(5, 1, bias=False)
    batch = {"x": torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
             "labels": torch.zeros(4)}

    def loss_fn(b):
        return layer(b["x"]).mean()

    draws = np.stack([
        compute_fingerprint(loss_fn, [batch], {"w": layer}, dim=64, seed=1, blocks=(0,),
                            epsilon=2.0, delta=1e-5, clip=0.5,
                            generator=torch.Generator().manual_seed(i)).vector
        for i in range(300)])
    expected = gaussian_sigma(epsilon=2.0, delta=1e-5, clip=0.5, num_samples=4)
    assert draws.std(axis=0).mean() == pytest.approx(expected, rel=0.05)
    signal = draws.mean(axis=0)  # mean of the 4 clipped unit vectors: norm <= clip
    assert np.linalg.norm(signal) <= 0.5 + 8 * expected / np.sqrt(300) * 8


@pytest.mark.parametrize("statistic", ["fisher", "gradient"])
def test_noise_variance_is_the_sampling_variance_of_the_released_vector(statistic):
    # a toy client: two linear layers; the brute force projects every example on its own
    torch.manual_seed(0)
    layers = {"a": torch.nn.Linear(6, 3, bias=False), "b": torch.nn.Linear(3, 2, bias=False)}
    x = torch.randn(40, 6)
    target = torch.randn(40, 2)
    batches = [{"x": x[i : i + 8], "y": target[i : i + 8], "labels": target[i : i + 8, 0]}
               for i in range(0, 40, 8)]

    def loss_fn(b):
        return (layers["b"](torch.tanh(layers["a"](b["x"]))) - b["y"]).pow(2).sum(1).mean()

    dim = 4096  # large, so the JL projection preserves the spread closely
    fp = compute_fingerprint(loss_fn, batches, layers, dim=dim, seed=3, blocks=(0,),
                             statistic=statistic)
    per = {n: torch.cat([per_example_grads(loss_fn, b, layers)[n] for b in batches])
           for n in layers}
    if statistic == "fisher":
        per = {n: g * g for n, g in per.items()}
    mean = {n: g.mean(0) for n, g in per.items()}
    unit = torch.cat([(per[n] / mean[n].norm()).reshape(40, -1) for n in layers], 1).double()
    released = torch.cat([(mean[n] / mean[n].norm()).reshape(-1) for n in layers]).double()
    expected = (unit - released).pow(2).sum() / (40 * 39) / released.norm() ** 2
    assert fp.noise_var == pytest.approx(float(expected), rel=0.1)
    assert fp.noise_var > 0


def test_dp_noise_variance_is_the_mechanisms_and_public():
    layer = torch.nn.Linear(5, 1, bias=False)
    batch = {"x": torch.randn(4, 5), "labels": torch.zeros(4)}
    fp = compute_fingerprint(lambda b: layer(b["x"]).mean(), [batch], {"w": layer}, dim=64,
                             seed=1, blocks=(0,), epsilon=2.0, clip=0.5,
                             generator=torch.Generator().manual_seed(0))
    assert fp.noise_var == pytest.approx(64 * fp.noise_std**2)


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2"])
@pytest.mark.parametrize("params", ["lora", "weights"])
def test_batched_per_example_grads_equal_one_by_one(tiny_cfg, model, params):
    from atlasfl.client import forward_logits, task_loss

    exp = build_experiment(tiny_cfg(**{"model.name": model}))
    client = exp.clients[0]
    exp.binder.bind(client.adapter)
    exp.model.eval()
    client.head.eval()
    with torch.no_grad():  # make B non-zero so LoRA A matters too
        for p in client.adapter.values():
            p.add_(0.1 * torch.randn_like(p))
    modules = fingerprint_modules(exp.model, exp.backbone.num_layers, (1,), params=params)
    for m in modules.values():
        m.weight.requires_grad_(True)
    batch = client.train_set.collate(list(range(5)))

    def loss_fn(b):
        return task_loss(forward_logits(exp.model, client.head, b), b["labels"], False)

    batched = per_example_grads(loss_fn, batch, modules)
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        one = {k: v[:, : int(one["attention_mask"].sum())] if v.dim() == 2 and k != "labels"
               else v for k, v in one.items()}  # unpadded: padding must not change anything
        grads = torch.autograd.grad(loss_fn(one), [m.weight for m in modules.values()])
        for name, g in zip(modules, grads, strict=True):
            torch.testing.assert_close(batched[name][i], g, rtol=1e-4, atol=1e-6)
    for m in modules.values():
        if params == "weights":
            m.weight.requires_grad_(False)
