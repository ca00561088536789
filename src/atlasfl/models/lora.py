"""LoRA through peft, with one shared frozen backbone and per-client adapter tensors.

peft injects LoRA layers into the backbone once. Each client then owns only its adapter tensors
(and head and optimizer state); ``AdapterBinder.bind`` points the injected layers at one client's
tensors (no copy), so memory grows with the number of clients by adapter size, not model size.
Binding also sets each layer's scaling from the bound rank, so clients may hold different ranks
per module (peft's ``rank_pattern``) over the same injected layers.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import TYPE_CHECKING, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from atlasfl.config import LoraSettings
from atlasfl.errors import AtlasError
from atlasfl.models.registry import Backbone, default_targets

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER = "default"
_PREFIX = "base_model.model."
MAX_RANK_DRAW = 256  # rows of the shared seeded A matrix; the largest rank a plan may use


def lora_config(settings: LoraSettings, family: str,
                rank_pattern: dict[str, int] | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` for an architecture family; ``rank_pattern`` maps modules to ranks."""
    targets = list(settings.target_modules or default_targets(family))
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha,  # type: ignore[arg-type]
                      lora_dropout=settings.dropout,
                      target_modules=targets, use_rslora=settings.rslora, bias="none",
                      rank_pattern=dict(rank_pattern or {}))


def inject_lora(backbone: Backbone, settings: LoraSettings, *, seed: int,
                rank_pattern: dict[str, int] | None = None) -> PeftModel:
    """Wrap the backbone with peft LoRA layers, initialised from ``seed``."""
    cfg = lora_config(settings, backbone.family, rank_pattern)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = get_peft_model(backbone.model, cfg)
        except ValueError as exc:
            raise AtlasError(f"model.lora.target_modules = {cfg.target_modules} does not match "
                             f"model {backbone.name!r}: {exc}") from None
    return model


def lora_scaling(alpha: float, rank: int, *, rslora: bool) -> float:
    """alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski, arXiv:2312.03732).

    rsLoRA keeps the update's magnitude comparable across ranks (with alpha/r a rank-64 update
    is damped 8x more than a rank-8 one), which matters when clients train different ranks.
    """
    return alpha / (math.sqrt(rank) if rslora else rank)


def seeded_lora_a(seed: int, module: str, rank: int, in_features: int) -> Tensor:
    """The first ``rank`` rows of a module's shared A initialisation.

    peft's default (Kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn from a
    generator seeded by (seed, module) so every client, whatever its rank, starts from rows of
    the same matrix: HetLoRA's common initialisation (arXiv:2401.06432).
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/lora_A/{module}".encode()))
    bound = 1.0 / math.sqrt(in_features)
    full = torch.rand(MAX_RANK_DRAW, in_features, generator=gen) * 2 * bound - bound
    if rank > MAX_RANK_DRAW:
        raise AtlasError(f"rank {rank} of module {module} exceeds {MAX_RANK_DRAW}")
    return full[:rank].clone()  # (rank, in)


def plan_adapter(peft_model: PeftModel, settings: LoraSettings, ranks: dict[str, int], *,
                 seed: int) -> dict[str, Tensor]:
    """A client's initial adapter with per-module ranks, created through peft's ``rank_pattern``.

    peft adds a temporary adapter whose ``LoraConfig.rank_pattern`` maps every module path to
    its rank (keys escaped, so ``layer.1`` never matches ``layer.11``); its tensors, with A set
    to the shared seeded rows (``seeded_lora_a``) and B to zero, become the client's adapter and
    the temporary adapter is deleted. Returns ``<module>.lora_A.weight`` (r, in) and
    ``<module>.lora_B.weight`` (out, r) for every module of ``ranks``.
    """
    pattern = {re.escape(path): rank for path, rank in ranks.items()}
    cfg = lora_config(settings, _family(peft_model), pattern)
    cfg.r = min(ranks.values())
    name = "atlasfl_plan"
    with torch.random.fork_rng(devices=[]):  # peft's initialisation must not move the run's RNG
        peft_model.add_adapter(name, cfg)
    try:
        out: dict[str, Tensor] = {}
        for module_name, module in peft_model.named_modules():
            path = module_name.removeprefix(_PREFIX)
            if not isinstance(module, LoraLayer) or name not in module.lora_A or path not in ranks:
                continue
            a = cast(Tensor, module.lora_A[name].weight)
            if a.shape[0] != ranks[path]:
                raise AtlasError(f"peft gave module {path} rank {a.shape[0]}, planned "
                                 f"{ranks[path]}")
            out[f"{path}.lora_A.weight"] = seeded_lora_a(seed, path, a.shape[0], a.shape[1]
                                                         ).to(a.device, a.dtype)
            b = cast(Tensor, module.lora_B[name].weight)
            out[f"{path}.lora_B.weight"] = torch.zeros_like(b)
    finally:
        peft_model.delete_adapter(name)
        peft_model.set_adapter(ADAPTER)
    missing = sorted(set(ranks) - {k.removesuffix(".lora_A.weight") for k in out})
    if missing:
        raise AtlasError(f"rank plan names modules that hold no LoRA layer: {missing[:3]}")
    return out


def _family(peft_model: PeftModel) -> str:
    return str(cast("PreTrainedModel", peft_model.get_base_model()).config.model_type)


class AdapterBinder:
    """Points the injected LoRA layers of a shared model at one client's tensors."""

    def __init__(self, peft_model: nn.Module, settings: LoraSettings):
        self.alpha = settings.alpha
        self.rslora = settings.rslora
        self.layers: dict[str, LoraLayer] = {}
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                self.layers[name.removeprefix(_PREFIX)] = module
        if not self.layers:
            raise AtlasError("no LoRA layer was injected; check model.lora.target_modules")

    def initial_state(self) -> dict[str, Tensor]:
        """Copies of the adapter tensors the layers hold now.

        Called right after injection (before any ``bind``) this is the seeded initialisation
        every client starts from; the experiment keeps it as ``initial_adapter``.
        """
        return {f"{p}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[ADAPTER].weight.detach()
                .clone() for p, layer in self.layers.items() for ab in "AB"}

    def scaling(self, rank: int) -> float:
        """LoRA scaling of a rank (``lora_scaling``)."""
        return lora_scaling(self.alpha, rank, rslora=self.rslora)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every LoRA-wrapped module, by module path."""
        return {path: (int(cast(int, layer.in_features)), int(cast(int, layer.out_features)))
                for path, layer in self.layers.items()}

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """Make the shared model compute with ``params`` (a client's adapter), without copying."""
        for path, layer in self.layers.items():
            a, b = params[f"{path}.lora_A.weight"], params[f"{path}.lora_B.weight"]
            layer.lora_A[ADAPTER].weight = a  # (r, in)
            layer.lora_B[ADAPTER].weight = b  # (out, r)
            rank = a.shape[0]
            layer.r[ADAPTER] = rank
            layer.scaling[ADAPTER] = self.scaling(rank)
