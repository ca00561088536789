"""Fingerprint math on toy layers, values worked out by hand (no model, no engine).

A linear layer y = w . x with loss = mean_i y_i has per-example weight gradient x_i (the loss is
summed over the batch before differentiating), so every statistic below is a sum over x_i.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from torch import nn

from atlasfl.errors import AtlasError
from atlasfl.phases import fingerprint
from atlasfl.phases.fingerprint import (
    _generate_block,
    _projection_block,
    _sampling_variance,
    compute_fingerprint,
    fingerprint_modules,
    gaussian_sigma,
    per_example_grads,
    project,
    select_blocks,
    transformer_blocks,
)
from atlasfl.phases.ranks import ImportanceMeter

X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [2.0, 2.0], [1.0, 0.0]])  # four examples, two batches


@pytest.fixture(autouse=True)
def _fresh_projection_cache():
    # blocks cached by an earlier test would hide what the code generates now
    fingerprint._cached_block.cache_clear()


def _toy():
    layer = nn.Linear(2, 1, bias=False)
    batches = [{"x": X[:2], "labels": torch.zeros(2)}, {"x": X[2:], "labels": torch.zeros(2)}]
    return layer, batches, lambda b: layer(b["x"]).mean()


def _block(seed, name, dim, numel):
    """The shared JL matrix as documented: N(0, 1/dim), generator seeded by crc32('seed/name')."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return (torch.randn(dim, numel, generator=gen) / math.sqrt(dim)).double()  # float32 matrix


def test_projection_block_is_the_documented_seeded_gaussian_matrix():
    block = _generate_block(3, "0.q.lora_B", 4, 5)
    torch.testing.assert_close(block.double(), _block(3, "0.q.lora_B", 4, 5))
    torch.testing.assert_close(_projection_block(3, "0.q.lora_B", 4, 5).double(),
                               _block(3, "0.q.lora_B", 4, 5))


def test_large_projection_blocks_are_regenerated_not_cached():
    numel = (1 << 21) + 1  # 2 * numel floats: just over the cache limit
    big = _projection_block(5, "w", 2, numel)
    assert fingerprint._cached_block.cache_info().currsize == 0
    torch.testing.assert_close(big[:, :3].double(), _block(5, "w", 2, numel)[:, :3])
    assert big.shape == (2, numel)


def test_project_normalises_each_tensor_and_sums_their_projections():
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(3), "c": torch.tensor([[2.0]])}
    out = project(grads, dim=6, seed=9)
    expected = _block(9, "a", 6, 2) @ torch.tensor([0.6, 0.8], dtype=torch.float64) \
        + _block(9, "c", 6, 1) @ torch.tensor([1.0], dtype=torch.float64)  # b is zero: nothing
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_sampling_variance_by_hand():
    # tensor a: ||total||^2 = 4, sum_j ||a_j||^2 = 10 -> spread 10 / 4 = 2.5; one non-zero tensor
    # (b is zero and skipped): (2.5 - 2 * 1) / (2 * 1) = 0.25
    total = {"a": torch.tensor([2.0, 0.0]), "b": torch.zeros(2)}
    assert _sampling_variance(total, {"a": 10.0, "b": 0.0}, 2) == pytest.approx(0.25)
    assert _sampling_variance(total, {"a": 6.0, "b": 0.0}, 2) == 0.0  # below n ||mean||^2: 0
    assert _sampling_variance(total, {"a": 10.0, "b": 0.0}, 1) == 0.0  # one example: no spread


def test_fingerprint_of_a_toy_client_by_hand():
    # mean gradient x = (1, 1); sum_j ||x_j||^2 = 14, so the sampling variance of the unit
    # statistic is (14 / ||(1, 1)||^2 - 4 * 1) / (4 * 3) = 1/4, before the projection's norm
    layer, batches, loss_fn = _toy()
    fp = compute_fingerprint(loss_fn, batches, {"w": layer}, dim=8, seed=4, blocks=(0,),
                             statistic="gradient")
    v = _block(4, "w", 8, 2) @ torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2)
    assert float(v.norm()) < 1  # so an unnormalised vector would show
    np.testing.assert_allclose(fp.vector, (v / v.norm()).numpy(), rtol=1e-6)
    assert fp.noise_var == pytest.approx(0.25 / float(v.norm()) ** 2)
    assert (fp.num_samples, fp.blocks, fp.num_params) == (4, (0,), 2)
    assert (fp.noise_std, fp.epsilon, fp.delta, fp.importance) == (0.0, None, None, {})


def test_statistics_of_bf16_weights_are_summed_in_float32():
    # bf16 base weights (precision "bf16"): mean x = (1 + 2^-9, 1) is not a bf16 number
    # (1 + 2^-7 is the next one after 1); summed in bf16 it would collapse to (1, 1)
    layer = nn.Linear(2, 1, bias=False).to(torch.bfloat16)
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0 + 2**-7, 1.0]])
    batches = [{"x": x.to(torch.bfloat16), "labels": torch.zeros(4)}]
    fp = compute_fingerprint(lambda b: layer(b["x"]).float().mean(), batches, {"w": layer},
                             dim=8, seed=4, blocks=(0,), statistic="gradient")
    mean = torch.tensor([1.0 + 2**-9, 1.0], dtype=torch.float64)
    v = _block(4, "w", 8, 2) @ (mean / mean.norm())
    np.testing.assert_allclose(fp.vector, (v / v.norm()).numpy(), rtol=1e-6, atol=1e-7)


def test_fingerprint_feeds_the_importance_meter_from_the_same_pass():
    # batch-mean gradients of w: (0.5, 1) and (1.5, 1); mean squared norm (1.25 + 3.25) / 2
    layer, batches, loss_fn = _toy()
    meter = ImportanceMeter({"w": layer.weight}, "norm")
    fp = compute_fingerprint(loss_fn, batches, {"w": layer}, dim=8, seed=4, blocks=(0,),
                             importance=meter)
    assert fp.importance == {"w": pytest.approx(2.25)}


def test_a_single_example_is_enough_and_none_is_refused():
    layer, batches, loss_fn = _toy()
    one = [{"x": X[:1], "labels": torch.zeros(1)}]
    fp = compute_fingerprint(loss_fn, one, {"w": layer}, dim=8, seed=4, blocks=(0,))
    assert fp.num_samples == 1 and fp.noise_var == 0.0
    with pytest.raises(AtlasError, match=r"^a client needs at least one example to compute a "
                                         r"fingerprint$"):
        compute_fingerprint(loss_fn, [], {"w": layer}, dim=8, seed=4, blocks=(0,))
    with pytest.raises(AtlasError, match=r"^clustering\.statistic = 'mean' is invalid"):
        compute_fingerprint(loss_fn, batches, {"w": layer}, dim=8, seed=4, blocks=(0,),
                            statistic="mean")


@pytest.mark.parametrize("clip", [0.5, 1.5])
def test_private_fingerprint_is_the_mean_of_clipped_unit_vectors_plus_gaussian_noise(clip):
    layer, batches, loss_fn = _toy()
    fp = compute_fingerprint(loss_fn, batches, {"w": layer}, dim=8, seed=4, blocks=(0,),
                             statistic="gradient", epsilon=2.0, delta=1e-3, clip=clip,
                             generator=torch.Generator().manual_seed(7))
    ys = [_block(4, "w", 8, 2) @ (x.double() / x.double().norm()) for x in X]
    assert min(float(y.norm()) for y in ys) < 1  # so an unnormalised y would show
    private = sum(y / y.norm() * min(1.0, clip) for y in ys) / 4
    sigma = (2 * clip / 4) * math.sqrt(2 * math.log(1.25 / 1e-3)) / 2.0
    noise = torch.randn(8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    np.testing.assert_allclose(fp.vector, (private + sigma * noise).numpy(), rtol=1e-6, atol=1e-7)
    assert fp.noise_std == pytest.approx(sigma) and fp.noise_var == pytest.approx(8 * sigma**2)
    assert (fp.epsilon, fp.delta) == (2.0, 1e-3)


def test_private_fingerprint_clips_at_norm_one_by_default():
    layer, batches, loss_fn = _toy()
    fp = compute_fingerprint(loss_fn, batches, {"w": layer}, dim=8, seed=4, blocks=(0,),
                             epsilon=1.0, generator=torch.Generator().manual_seed(0))
    assert fp.noise_std == pytest.approx(2 * 1.0 / 4 * math.sqrt(2 * math.log(1.25 / 1e-5)))
    assert fp.delta == 1e-5


def test_per_example_grads_also_writes_batch_mean_gradients():
    layer, batches, loss_fn = _toy()
    also = {"w": layer.weight}
    grads = per_example_grads(loss_fn, batches[1], {"w": layer}, also)
    torch.testing.assert_close(grads["w"], X[2:, None, :])  # (B, out, in): x_i
    torch.testing.assert_close(also["w"], torch.tensor([[1.5, 1.0]]))  # mean of (2, 2), (1, 0)


def test_gaussian_sigma_by_hand():
    # Delta = 2 * 0.5 / 10 = 0.1; sigma = 0.1 * sqrt(2 ln(1.25 / 0.01)) / 0.5
    expected = 0.1 * math.sqrt(2 * math.log(125.0)) / 0.5
    assert gaussian_sigma(epsilon=0.5, delta=0.01, clip=0.5, num_samples=10) == pytest.approx(
        expected)
    assert gaussian_sigma(epsilon=1.0, delta=0.5, clip=1.0, num_samples=1) > 0


@pytest.mark.parametrize("kwargs", [dict(epsilon=0.0), dict(delta=0.0), dict(delta=1.0),
                                    dict(clip=0.0)])
def test_gaussian_sigma_refuses_settings_outside_the_mechanism(kwargs):
    args = dict(epsilon=1.0, delta=1e-5, clip=1.0, num_samples=4) | kwargs
    with pytest.raises(AtlasError, match=r"^privacy settings invalid: epsilon="):
        gaussian_sigma(**args)


def test_select_blocks_counts_from_the_last():
    assert select_blocks(4, 2) == (2, 3)
    assert select_blocks(3, 5) == (0, 1, 2)
    with pytest.raises(AtlasError, match=r"^clustering\.layers = 0 is invalid; allowed: an "
                                         r"integer >= 1$"):
        select_blocks(3, 0)


class _LoraLinear(nn.Module):
    """The two attributes peft's LoRA layers have that ``fingerprint_modules`` reads."""

    def __init__(self, adapter: str = "default"):
        super().__init__()
        self.base_layer = nn.Linear(3, 3)
        self.lora_B = nn.ModuleDict({adapter: nn.Linear(2, 3, bias=False)})


def _toy_model():
    blocks = nn.ModuleList(nn.ModuleDict({"attn": _LoraLinear(), "other": _LoraLinear("x"),
                                          "mlp": nn.Linear(3, 3)}) for _ in range(3))
    return nn.ModuleDict({"embed": nn.ModuleList([nn.Linear(1, 1)]), "layers": blocks}), blocks


def test_transformer_blocks_are_found_by_their_number():
    model, blocks = _toy_model()
    assert transformer_blocks(model, 3) is blocks
    with pytest.raises(AtlasError, match=r"^no list of 7 transformer blocks found in the model$"):
        transformer_blocks(model, 7)


def test_fingerprint_modules_picks_the_lora_factor_or_the_base_weight():
    model, blocks = _toy_model()
    lora = fingerprint_modules(model, 3, (1, 2), params="lora")
    assert lora == {"1.attn.lora_B": blocks[1]["attn"].lora_B["default"],
                    "2.attn.lora_B": blocks[2]["attn"].lora_B["default"]}
    weights = fingerprint_modules(model, 3, (2,), params="weights")
    assert weights == {"2.attn.weight": blocks[2]["attn"].base_layer}
    with pytest.raises(AtlasError, match=r"^clustering\.params = 'bias' is invalid"):
        fingerprint_modules(model, 3, (2,), params="bias")
    bare = nn.ModuleDict({"layers": nn.ModuleList(nn.Linear(2, 2) for _ in range(3))})
    with pytest.raises(AtlasError, match=r"^no lora parameters in blocks \[0, 1\]: is LoRA "
                                         r"injected\?$"):
        fingerprint_modules(bare, 3, (0, 1), params="lora")
