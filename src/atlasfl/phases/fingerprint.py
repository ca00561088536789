"""Phase 1, client side: a gradient fingerprint of the client's task.

After MIRA (Elbakary et al., "MIRA: A Method of Federated MultI-Task Learning for LaRge
LAnguage Models", arXiv:2410.15524) and the gradient-based task similarity of clustered FL
(Sattler et al., "Clustered Federated Learning", arXiv:1910.01991): from the common seeded
initial adapter and head, in eval mode, each client computes the gradient of its loss over a
few examples for parameters of the last L transformer blocks, normalises each tensor, and
uploads only a seeded Johnson-Lindenstrauss projection to ``dim`` dimensions (the same random
matrix on every client, generated from the shared seed, never sent).

Parameters (``params``):
- ``lora``: the LoRA B factors of the target modules. With B initialised to zero the gradient of
  A is zero, but grad B = G A^T where G is the gradient of the frozen weight: a random sketch of
  G through the shared seeded A, computed by the backward pass LoRA training runs anyway.
- ``weights``: the frozen base weights of the target modules in those blocks (G itself).

Statistic (``statistic``): ``fisher`` averages the squared per-example gradients — the diagonal
empirical Fisher information, as Task2Vec embeds tasks (Achille et al., arXiv:1902.03545); it is
sign-free, so it reflects which weights the task's inputs drive. ``gradient`` is the mean gradient,
whose sign follows the labels through the shared random head.

Noise level (``Fingerprint.noise_var``, uploaded with the vector, 4 bytes): the expected squared
distance between the released vector and the one an infinite sample of the same client would
give. Without privacy it is the sampling variance of a mean over n examples, sum_j ||a_j - a||^2 /
(n (n - 1)), with a_j each example's per-tensor-normalised statistic (computed in the gradient
space, which the JL projection preserves in expectation, from one scalar per tensor); with privacy
it is the Gaussian mechanism's dim * sigma^2, which is public, so nothing data-dependent leaks. The
server subtracts it from each fingerprint's squared norm (``atlasfl.phases.clustering``): a client
with few examples, or DP noise, otherwise looks less like its task than it is.

Optional privacy: with ``epsilon`` set, every example's projected gradient is clipped to norm
``clip``, the clipped vectors are averaged, and Gaussian noise is added with the standard
Gaussian mechanism (Dwork & Roth 2014, Thm A.1): sigma = Delta * sqrt(2 ln(1.25/delta)) / epsilon
with replace-one sensitivity Delta = 2 * clip / n, i.e. (epsilon, delta) example-level
differential privacy of the released fingerprint.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor, nn

from atlasfl.errors import AtlasError, check_choice
from atlasfl.phases.ranks import ImportanceMeter
from atlasfl.types import FingerprintParams, FingerprintStatistic


@dataclass(frozen=True)
class Fingerprint:
    """What a client uploads (``vector``) and what it knows about it."""

    vector: np.ndarray  # (dim,) float32
    num_samples: int
    importance: dict[str, float | list[float]]  # Phase 2 module importance, same pass (if asked)
    blocks: tuple[int, ...]
    num_params: int  # gradient coordinates before projection
    noise_std: float  # 0.0 without privacy
    noise_var: float  # expected ||vector - its noise-free value||^2 (see the module docstring)
    epsilon: float | None
    delta: float | None


def transformer_blocks(model: nn.Module, num_layers: int) -> nn.ModuleList:
    """The module list holding the model's transformer blocks, found by its length.

    Works for every architecture without naming it: BERT ``encoder.layer``, DistilBERT
    ``transformer.layer``, GPT-2 ``h``, Llama/Qwen ``layers``.
    """
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise AtlasError(f"no list of {num_layers} transformer blocks found in the model")


def select_blocks(num_layers: int, last: int) -> tuple[int, ...]:
    """Indices of the last ``last`` blocks (all of them when ``last`` >= num_layers)."""
    if last < 1:
        raise AtlasError(f"clustering.layers = {last} is invalid; allowed: an integer >= 1")
    return tuple(range(max(0, num_layers - last), num_layers))


def fingerprint_modules(model: nn.Module, num_layers: int, blocks: Iterable[int], *,
                        params: str) -> dict[str, nn.Module]:
    """The layers whose weight gradient forms the fingerprint, by name, in a fixed order."""
    check_choice("clustering.params", params, FingerprintParams)
    module_list = transformer_blocks(model, num_layers)
    out: dict[str, nn.Module] = {}
    for i in blocks:
        for name, module in module_list[i].named_modules():
            if not hasattr(module, "lora_B") or "default" not in module.lora_B:
                continue
            if params == "lora":
                out[f"{i}.{name}.lora_B"] = module.lora_B["default"]
            else:
                out[f"{i}.{name}.weight"] = module.base_layer
    if not out:
        raise AtlasError(f"no {params} parameters in blocks {list(blocks)}: is LoRA injected?")
    return out


def per_example_grads(loss_fn, batch: dict[str, Tensor], modules: dict[str, nn.Module],
                      also: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Weight gradient of every example of a batch, for linear layers, in one backward pass.

    A linear layer's weight gradient is a sum over examples and tokens of (output grad) x
    (input); hooks keep both per example (the trick of Goodfellow, arXiv:1510.01799, used by
    Opacus), so no example-by-example loop is needed. Padded positions get zero output grads.
    Shapes: (batch, *weight.shape). The same backward pass also writes the batch-mean gradient
    of every tensor of ``also`` into it (replacing the tensors), e.g. for Phase 2's importance.
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    handles = []

    def hook(name):
        def forward_hook(module, args, output):
            inputs[name] = args[0].detach()
            output.register_hook(lambda grad: outputs.__setitem__(name, grad.detach()))
        return forward_hook

    for name, module in modules.items():
        handles.append(module.register_forward_hook(hook(name)))
    try:
        mean_loss = loss_fn(batch)
        loss = mean_loss * len(batch["labels"])  # a sum over examples, not a mean
        extra = also if also is not None else {}
        wanted = [_weight(m) for m in modules.values()] + list(extra.values())
        grads = torch.autograd.grad(loss, wanted)
        for name, g in zip(list(extra), grads[len(modules):], strict=True):
            extra[name] = g.detach() / len(batch["labels"])
    finally:
        for handle in handles:
            handle.remove()
    out = {}
    for name, module in modules.items():
        x, g = inputs[name].float(), outputs[name].float()  # (B, T, in), (B, T, out)
        if x.dim() == 2:  # pooled inputs: one position per example
            x, g = x[:, None], g[:, None]
        if not isinstance(module, nn.Linear):  # GPT-2's Conv1D stores its weight as (in, out)
            out[name] = torch.einsum("bti,bto->bio", x, g)
        else:  # nn.Linear: (out, in)
            out[name] = torch.einsum("bto,bti->boi", g, x)
    return out


def _weight(module: nn.Module) -> Tensor:
    return cast(Tensor, module.weight)


_CACHE_LIMIT = 1 << 22  # floats (16 MiB) per cached block; larger blocks are regenerated


def _projection_block(seed: int, name: str, dim: int, numel: int) -> Tensor:
    """Columns of the shared JL matrix for one tensor: N(0, 1/dim), seeded by (seed, name)."""
    if dim * numel <= _CACHE_LIMIT:  # every client of a simulation reuses the same blocks
        return _cached_block(seed, name, dim, numel)
    return _generate_block(seed, name, dim, numel)


def _generate_block(seed: int, name: str, dim: int, numel: int) -> Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return torch.randn(dim, numel, generator=gen) / math.sqrt(dim)  # (dim, numel)


_cached_block = functools.lru_cache(maxsize=256)(_generate_block)


def project(grads: dict[str, Tensor], *, dim: int, seed: int) -> Tensor:
    """Normalise each tensor to unit norm, concatenate, and project to ``dim`` (JL)."""
    out = torch.zeros(dim, dtype=torch.float64)
    for name, grad in grads.items():
        flat = grad.detach().reshape(-1).double().cpu()
        norm = flat.norm()
        if norm > 0:
            flat = flat / norm
        out += _projection_block(seed, name, dim, flat.numel()).double() @ flat
    return out


def gaussian_sigma(*, epsilon: float, delta: float, clip: float, num_samples: int) -> float:
    """Noise std of the Gaussian mechanism for a mean of ``num_samples`` clipped vectors."""
    if epsilon <= 0 or not 0 < delta < 1 or clip <= 0 or num_samples < 1:
        raise AtlasError(f"privacy settings invalid: epsilon={epsilon} (> 0), delta={delta} "
                         f"(0 < delta < 1), clip={clip} (> 0)")
    sensitivity = 2.0 * clip / num_samples
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def compute_fingerprint(loss_fn, batches: list, modules: dict[str, nn.Module], *, dim: int,
                        seed: int, blocks: tuple[int, ...], statistic: str = "fisher",
                        epsilon: float | None = None, delta: float = 1e-5, clip: float = 1.0,
                        generator: torch.Generator | None = None,
                        importance: ImportanceMeter | None = None) -> Fingerprint:
    """Fingerprint of one client.

    Args:
        loss_fn: ``batch -> mean loss`` of the client's model in eval mode (no dropout).
        batches: the client's fingerprint examples, batched.
        modules: linear layers whose weight gradient is used (``fingerprint_modules``); their
            weights must require grad.
        dim: projected dimension.
        seed: the shared projection seed (identical on every client).
        blocks: which blocks the layers belong to (for the record).
        statistic: "fisher" (mean of squared per-example gradients) or "gradient" (mean
            gradient).
        epsilon: privacy budget; None for no noise.
        delta: privacy delta.
        clip: per-example norm bound of the projected statistic (privacy only).
        generator: randomness of the privacy noise.
        importance: a Phase 2 meter fed the gradients of its tensors from the same backward
            pass; its result is returned as ``importance``.
    """
    check_choice("clustering.statistic", statistic, FingerprintStatistic)
    num = sum(len(b["labels"]) for b in batches)
    if num == 0:
        raise AtlasError("a client needs at least one example to compute a fingerprint")
    names = list(modules)
    total = {name: torch.zeros_like(_weight(m), dtype=torch.float32)
             for name, m in modules.items()}
    squares = dict.fromkeys(names, 0.0)  # sum over examples of ||statistic||^2, per tensor
    private = torch.zeros(dim, dtype=torch.float64)
    for batch in batches:
        also = dict(importance.params) if importance is not None else {}
        grads = per_example_grads(loss_fn, batch, modules, also)  # name -> (B, *shape)
        if importance is not None:
            importance.add(also)
        if statistic == "fisher":
            grads = {k: g * g for k, g in grads.items()}
        if epsilon is None:
            for name in names:
                total[name] += grads[name].sum(0) / num
                squares[name] += float(grads[name].double().pow(2).sum())
            continue
        # example-level privacy: each example's projected statistic is clipped on its own
        for i in range(len(batch["labels"])):
            y = project({name: grads[name][i] for name in names}, dim=dim, seed=seed)
            y = y / y.norm().clamp_min(1e-12)  # unit norm, so clip >= 1 keeps it whole
            private += y * min(1.0, clip / float(y.norm())) / num
    if epsilon is None:
        sigma = 0.0
        vector = project(total, dim=dim, seed=seed)
        noise_var = _sampling_variance(total, squares, num) / float(vector.norm() ** 2 or 1.0)
        vector = vector / vector.norm().clamp_min(1e-12)
    else:
        sigma = gaussian_sigma(epsilon=epsilon, delta=delta, clip=clip, num_samples=num)
        noise = torch.randn(dim, generator=generator, dtype=torch.float64)
        vector = private + sigma * noise
        noise_var = dim * sigma**2
    return Fingerprint(vector.float().numpy(), num,
                       importance.result() if importance is not None else {}, blocks,
                       sum(_weight(m).numel() for m in modules.values()), sigma, noise_var,
                       epsilon, delta if epsilon is not None else None)


def _sampling_variance(total: dict[str, Tensor], squares: dict[str, float], num: int) -> float:
    """sum_j ||a_j - mean||^2 / (n (n - 1)) for a_j the per-tensor-normalised statistics.

    Each tensor t is divided by ||total_t|| (as ``project`` does), so ||mean||^2 is the number of
    non-zero tensors and sum_j ||a_j||^2 = sum_t squares_t / ||total_t||^2.
    """
    if num < 2:
        return 0.0
    spread, count = 0.0, 0
    for name, t in total.items():
        norm2 = float(t.double().pow(2).sum())
        if norm2 > 0:
            spread += squares[name] / norm2
            count += 1
    return max(0.0, spread - num * count) / (num * (num - 1))
