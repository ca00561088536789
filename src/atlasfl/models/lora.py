"""LoRA through peft, with one shared frozen backbone and per-client adapter tensors.

peft injects LoRA layers into the backbone once. Each client then owns only its adapter tensors
(and head and optimizer state); ``AdapterBinder.bind`` points the injected layers at one client's
tensors (no copy), so memory grows with the number of clients by adapter size, not model size.
Binding also sets each layer's scaling from the bound rank, so clients may hold different ranks
per module (peft's ``rank_pattern``) over the same injected layers.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from atlasfl.config import LoraSettings
from atlasfl.errors import AtlasError
from atlasfl.models.registry import Backbone, default_targets

ADAPTER = "default"
_PREFIX = "base_model.model."


def lora_config(settings: LoraSettings, family: str,
                rank_pattern: dict[str, int] | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` for an architecture family; ``rank_pattern`` maps modules to ranks."""
    targets = list(settings.target_modules or default_targets(family))
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, use_rslora=settings.rslora, bias="none",
                      rank_pattern=dict(rank_pattern or {}))


def inject_lora(backbone: Backbone, settings: LoraSettings, *, seed: int,
                rank_pattern: dict[str, int] | None = None) -> nn.Module:
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

    def keys(self) -> list[str]:
        """Names of the adapter tensors, in a fixed order (``<module>.lora_A.weight`` ...)."""
        return [f"{path}.lora_{ab}.weight" for path in self.layers for ab in "AB"]

    def initial_state(self) -> dict[str, Tensor]:
        """Copies of the adapter tensors the layers hold now.

        Called right after injection (before any ``bind``) this is the seeded initialisation
        every client starts from; the experiment keeps it as ``initial_adapter``.
        """
        return {f"{p}.lora_{ab}.weight": getattr(layer, f"lora_{ab}")[ADAPTER].weight.detach()
                .clone() for p, layer in self.layers.items() for ab in "AB"}

    def scaling(self, rank: int) -> float:
        """LoRA scaling of a rank: alpha/r, or alpha/sqrt(r) with rsLoRA (arXiv:2312.03732)."""
        return self.alpha / (math.sqrt(rank) if self.rslora else rank)

    def bind(self, params: dict[str, nn.Parameter]) -> None:
        """Make the shared model compute with ``params`` (a client's adapter), without copying."""
        for path, layer in self.layers.items():
            a, b = params[f"{path}.lora_A.weight"], params[f"{path}.lora_B.weight"]
            layer.lora_A[ADAPTER].weight = a  # (r, in)
            layer.lora_B[ADAPTER].weight = b  # (out, r)
            rank = a.shape[0]
            layer.r[ADAPTER] = rank
            layer.scaling[ADAPTER] = self.scaling(rank)
