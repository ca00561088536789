"""Backbones, heads and LoRA wiring."""

from atlasfl.models.head import ClassificationHead, init_head
from atlasfl.models.lora import AdapterBinder, inject_lora
from atlasfl.models.registry import PRESETS, Backbone, load_backbone

__all__ = ["PRESETS", "AdapterBinder", "Backbone", "ClassificationHead", "inject_lora",
           "init_head", "load_backbone"]
