"""Phase 2, device side: how much memory one client needs to train its LoRA adapter.

A client's training peak is modelled as the sum of six terms (bytes)::

    M = weights + lora + gradients + optimizer + activations + workspace

    weights     = P_frozen * param_bytes        P_frozen = E + n * P_block (+ P_final if n = L)
    lora        = P_train * 4                   P_train = sum_m r_m (in_m + out_m) + head_params
    gradients   = P_train * 4
    optimizer   = s * P_train * 4               s = 2 (AdamW: exp_avg, exp_avg_sq), 0 (SGD)
    activations = act_bytes * [n * A_block + A_lora + A_final + A_head]
    workspace   = act_bytes * W

with ``n`` the blocks the client holds (HSplitLoRA's split point: the client keeps the
embeddings and the first ``n`` blocks, Lin et al., "HSplitLoRA: A Heterogeneous Split
Parameter-Efficient Fine-Tuning Framework for Large Language Models", arXiv:2505.02795), B the
batch, T the sequence, H the hidden width, I the MLP width, a = heads * head_dim the attention
width and S = B * heads * T^2 the attention-score elements of one block.

Activations are the tensors autograd saves for backward, after the accounting of Korthikanti et
al., "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198, Sec. 4.1),
adapted to what LoRA training on CPU actually keeps (checked tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks``):

- fp32 everywhere and eager attention (no flash attention): the softmax output (S) is saved, and
  with attention dropout also the dropout mask and the dropped probabilities (2 S more). On CPU
  ``torch.dropout`` multiplies by a float noise tensor, so a mask costs ``act_bytes`` per element,
  not Korthikanti's one byte.
- The base weights are frozen, so a frozen linear does not save its input; only LoRA's A factor
  does (below). Everything after the first trainable op needs its inputs: Q, K and V for the two
  attention matmuls (3 B T a; repeated K/V of grouped-query attention are materialised at full
  width), the input of each norm plus its per-token statistics (2 per LayerNorm, 1 per RMSNorm),
  the float mask of each hidden dropout (B T H each), and the MLP activation's inputs: GELU saves
  its input (B T I), the gated SiLU of Llama/Qwen2 saves the SiLU input, its output and the up
  projection (3 B T I), GPT-2's tanh-GELU written in Python saves four B T I tensors.
- LoRA: each module saves the input of its B factor (B T r). Its A factor saves its input: one
  B T in per distinct input (q, k and v read the same hidden state, so do gate and up), or with
  LoRA dropout, per module, the dropout mask and the dropped input (2 B T in).
- Every held block is counted as if its input required grad; the first block of the model saves
  slightly less (its input comes from frozen embeddings), so this is a small over-estimate.

Per block, in elements::

    A_block = 3 B T a + S (1 + 2 [p_attn > 0]) + N_norm (B T H + k_norm B T)
              + N_drop [p_hidden > 0] B T H + g_act B T I

and A_final = B T H + k_norm B T for a final norm (or B H for BERT's pooler), A_head = B H + B T.

The workspace W is what is alive at the peak without being saved for backward. The measured
peaks fall at the end of the forward or in the backward of the last block, so W is the larger of

    W_fwd = 3 B T H + [decoder] B T^2 + [use_cache] 2 n B T kv
    W_bwd = B T H + 2 max(B T I, S)                                   (0 when n = 0)

W_fwd: the embedding output (the model's forward holds it until it returns), the two temporaries
of the last norm, a decoder's materialised (B, 1, T, T) causal mask, and the KV cache (kv = K/V
width) that transformers' decoders fill even in training when ``use_cache`` is on (a
``DynamicCache`` that lives until the forward returns). W_bwd: the grad of the hidden state and
two grads of MLP width (of the output projection's input and of the activation's input), or of
score width for long sequences. These terms were identified, not fitted: they are the live
tensors the allocation trace shows at the measured peaks of ``bench/memory.py`` (full AdamW
steps of all-MiniLM-L6-v2 and SmolLM2-135M on CPU, ranks 4-64, batches 4-16, sequence 128;
``bench/results/memory_cpu.jsonl``), with no coefficient tuned per model. The gradients are
counted in full although with ``zero_grad(set_to_none=True)`` they only appear during backward,
while activations are being freed, so for large ranks the total leans high (the safe side).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from atlasfl.errors import AtlasError, unknown_name

OPTIMIZER_STATES: dict[str, int] = {"adamw": 2, "adam": 2, "sgd": 0}
TRAIN_BYTES = 4  # trainable parameters, their gradients and optimizer states stay fp32


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a transformer that the memory model needs (``model_dims`` reads a config).

    The last five fields have defaults so a caller can write dims by hand; ``model_dims`` fills
    them from the config because they change what autograd saves.
    """

    family: str  # config.model_type
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    embedding_params: int  # token (+position, +type) embeddings and embedding norm
    block_params: int  # parameters of ONE transformer block
    final_params: int  # anything after the blocks (final norm, pooler if AutoModel has one)
    head_dim: int = 0  # 0: hidden // num_heads
    hidden_act: str = "gelu"
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    use_cache: bool = False  # a decoder builds its KV cache during the training forward too

    @property
    def attention_width(self) -> int:
        """Width of the concatenated query heads (heads * head_dim)."""
        return self.num_heads * (self.head_dim or self.hidden // self.num_heads)

    @property
    def kv_width(self) -> int:
        """Width of the concatenated key (or value) heads."""
        return self.num_kv_heads * (self.head_dim or self.hidden // self.num_heads)

    @property
    def num_params(self) -> int:
        """Parameters of the whole bare model (``AutoModel``, no LM head)."""
        return self.embedding_params + self.num_layers * self.block_params + self.final_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Result of ``estimate_memory``: the peak of one training step by component, in bytes."""

    weights: int
    lora: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        """The estimated peak, in bytes."""
        return (self.weights + self.lora + self.gradients + self.optimizer + self.activations
                + self.workspace)

    def as_dict(self) -> dict[str, int]:
        """The components and the total, in bytes."""
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class _Arch:
    """What one architecture family saves for backward, beyond its dims."""

    read: Callable[[object], dict[str, Any]]  # config -> ModelDims fields
    norm_stats: int  # per-token statistics a norm saves: 2 (LayerNorm mean, rstd), 1 (RMSNorm)
    hidden_dropouts: int  # dropouts on the residual branch per block
    final_norm: bool  # a norm after the last block
    pooler: bool  # BERT's tanh pooler after the last block
    gated: bool  # SwiGLU MLP (gate, up, down)
    fused_qkv: bool  # one projection makes q, k and v (GPT-2's c_attn)
    causal: bool  # a decoder: materialises a (B, 1, T, T) causal mask for eager attention


def _get(config: object, *names: str, default: Any = None) -> Any:
    """The first of ``names`` the config sets, else ``default`` (an error when there is none)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is None:
        raise AtlasError(f"model config {type(config).__name__} has none of {', '.join(names)}")
    return default


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _read_bert(config: object) -> dict[str, Any]:
    h, i = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size"))
    positions = int(_get(config, "max_position_embeddings"))
    types = int(_get(config, "type_vocab_size", default=0))
    vocab = int(_get(config, "vocab_size"))
    heads = int(_get(config, "num_attention_heads"))
    return {
        "hidden": h, "intermediate": i, "num_layers": int(_get(config, "num_hidden_layers")),
        "num_heads": heads, "num_kv_heads": heads, "vocab_size": vocab,
        "embedding_params": (vocab + positions + types) * h + 2 * h,
        "block_params": 4 * _linear(h, h) + _linear(h, i) + _linear(i, h) + 2 * 2 * h,
        "final_params": _linear(h, h),  # pooler dense
        "hidden_act": str(_get(config, "hidden_act", default="gelu")),
        "attention_dropout": float(_get(config, "attention_probs_dropout_prob", default=0.0)),
        "hidden_dropout": float(_get(config, "hidden_dropout_prob", default=0.0)),
    }


def _read_distilbert(config: object) -> dict[str, Any]:
    h, i = int(_get(config, "dim")), int(_get(config, "hidden_dim"))
    vocab, positions = int(_get(config, "vocab_size")), int(_get(config, "max_position_embeddings"))
    heads = int(_get(config, "n_heads"))
    return {
        "hidden": h, "intermediate": i, "num_layers": int(_get(config, "n_layers")),
        "num_heads": heads, "num_kv_heads": heads, "vocab_size": vocab,
        "embedding_params": (vocab + positions) * h + 2 * h,
        "block_params": 4 * _linear(h, h) + _linear(h, i) + _linear(i, h) + 2 * 2 * h,
        "final_params": 0,
        "hidden_act": str(_get(config, "activation", default="gelu")),
        "attention_dropout": float(_get(config, "attention_dropout", default=0.0)),
        "hidden_dropout": float(_get(config, "dropout", default=0.0)),
    }


def _read_gpt2(config: object) -> dict[str, Any]:
    h = int(_get(config, "n_embd"))
    i = int(_get(config, "n_inner", default=4 * h))
    vocab, positions = int(_get(config, "vocab_size")), int(_get(config, "n_positions"))
    heads = int(_get(config, "n_head"))
    return {
        "hidden": h, "intermediate": i, "num_layers": int(_get(config, "n_layer")),
        "num_heads": heads, "num_kv_heads": heads, "vocab_size": vocab,
        "embedding_params": (vocab + positions) * h,
        "block_params": _linear(h, 3 * h) + _linear(h, h) + _linear(h, i) + _linear(i, h)
        + 2 * 2 * h,
        "final_params": 2 * h,  # ln_f
        "hidden_act": str(_get(config, "activation_function", default="gelu_new")),
        "attention_dropout": float(_get(config, "attn_pdrop", default=0.0)),
        "hidden_dropout": float(_get(config, "resid_pdrop", default=0.0)),
        "use_cache": bool(_get(config, "use_cache", default=False)),
    }


def _read_llama(config: object) -> dict[str, Any]:
    h, i = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=h // heads))
    vocab = int(_get(config, "vocab_size"))
    attn_bias = bool(_get(config, "attention_bias", default=False))
    mlp_bias = bool(_get(config, "mlp_bias", default=False))
    a, kv = heads * head_dim, kv_heads * head_dim
    attention = _linear(h, a, attn_bias) + 2 * _linear(h, kv, attn_bias) + _linear(a, h, attn_bias)
    return {
        "hidden": h, "intermediate": i, "num_layers": int(_get(config, "num_hidden_layers")),
        "num_heads": heads, "num_kv_heads": kv_heads, "vocab_size": vocab,
        "embedding_params": vocab * h,
        "block_params": attention + 2 * _linear(h, i, mlp_bias) + _linear(i, h, mlp_bias) + 2 * h,
        "final_params": h,  # final RMSNorm
        "head_dim": head_dim,
        "hidden_act": str(_get(config, "hidden_act", default="silu")),
        "attention_dropout": float(_get(config, "attention_dropout", default=0.0)),
        "hidden_dropout": 0.0,
        "use_cache": bool(_get(config, "use_cache", default=False)),
    }


def _read_qwen2(config: object) -> dict[str, Any]:
    """Llama's layout, but q, k and v always have biases and o and the MLP never do."""
    fields = _read_llama(config)
    h, i = fields["hidden"], fields["intermediate"]
    a = fields["num_heads"] * fields["head_dim"]
    kv = fields["num_kv_heads"] * fields["head_dim"]
    attention = _linear(h, a) + 2 * _linear(h, kv) + _linear(a, h, bias=False)
    fields["block_params"] = attention + 2 * _linear(h, i, False) + _linear(i, h, False) + 2 * h
    return fields


_ARCHS: dict[str, _Arch] = {
    "bert": _Arch(_read_bert, 2, 2, False, True, False, False, False),
    # RoBERTa's position table is max_position_embeddings long (its offset is inside it)
    "roberta": _Arch(_read_bert, 2, 2, False, True, False, False, False),
    "distilbert": _Arch(_read_distilbert, 2, 1, False, False, False, False, False),
    "gpt2": _Arch(_read_gpt2, 2, 2, True, False, False, True, True),
    "llama": _Arch(_read_llama, 1, 0, True, False, True, False, True),
    "qwen2": _Arch(_read_qwen2, 1, 0, True, False, True, False, True),
}


def model_dims(config: object) -> ModelDims:
    """Read the sizes the memory model needs from a transformers ``PretrainedConfig``.

    Parameter counts are those of ``transformers.AutoModel.from_config(config)``: the bare
    model, with BERT's pooler and without any LM head (so ``tie_word_embeddings`` does not
    change them). Dropout rates, the activation and ``use_cache`` are read too: they decide
    what a training step keeps in memory.

    Args:
        config: a config of a supported ``model_type`` (bert, roberta, distilbert, gpt2, llama,
            qwen2).

    Returns:
        The model's ``ModelDims``.

    Raises:
        AtlasError: for an unsupported ``model_type``.
    """
    family = str(getattr(config, "model_type", None))
    if family not in _ARCHS:
        raise unknown_name("model_type for the memory model", family, _ARCHS)
    return ModelDims(family=family, **_ARCHS[family].read(config))


def _act_factor(dims: ModelDims, arch: _Arch) -> int:
    """B T I tensors the MLP activation saves (see the module docstring)."""
    if arch.gated:
        return 3  # SiLU input, SiLU output and the up projection for the product
    if dims.hidden_act in ("gelu_new", "gelu_fast"):
        return 4  # Python tanh-GELU: input, tanh output, 0.5 x and 1 + tanh
    return 1  # a fused activation saves its input (ReLU its output)


def _lora_input_elements(dims: ModelDims, arch: _Arch, modules: Sequence[tuple[int, int, int]],
                         blocks: int) -> int:
    """Per-token elements saved as inputs of LoRA A factors, shared inputs counted once.

    Modules are told apart by their shapes, assuming peft's usual layout (the same target
    modules in every held block): modules reading the MLP width are down projections (one
    input each); modules writing the MLP width read the post-attention norm (gate and up share
    it, one per block); the rest are attention projections, q/k/v sharing the block input and
    an output projection reading the attention context. An (H, H) module is taken to be q while
    a block still has a free (H, H) q/k/v slot, so {q, v} shares one input and {q, k, v, o}
    has two; {q, v, o} in a model without grouped queries is counted as one input (ambiguous).
    """
    h, i, a = dims.hidden, dims.intermediate, dims.attention_width
    down = [fan_in for _, fan_in, _ in modules if fan_in == i and i != h]
    mlp_in = sum(1 for _, fan_in, fan_out in modules if fan_in == h and fan_out == i and i != h)
    rest = [(fan_in, fan_out) for _, fan_in, fan_out in modules
            if not (fan_in == i and i != h) and not (fan_in == h and fan_out == i and i != h)]
    square = sum(1 for fan_in, fan_out in rest if fan_in == h and fan_out == h and a == h)
    only_o = sum(1 for fan_in, fan_out in rest if fan_in == a != h and fan_out == h)
    only_qkv = len(rest) - square - only_o
    q_slots = 0 if arch.fused_qkv else 1 + (2 if dims.kv_width == h else 0)
    square_o = max(0, square - q_slots * blocks)
    qkv_sites = min(only_qkv + square - square_o, blocks)
    o_sites = min(only_o + square_o, blocks)
    return sum(down) + min(mlp_in, blocks) * h + qkv_sites * h + o_sites * a


def estimate_memory(dims: ModelDims, lora_modules: Sequence[tuple[int, int, int]], *,
                    batch_size: int, seq_len: int, blocks_held: int | None = None,
                    param_bytes: int = 4, act_bytes: int = 4, lora_dropout: bool = False,
                    head_params: int = 0, optimizer: str = "adamw", final: bool | None = None
                    ) -> MemoryEstimate:
    """Estimate the peak memory of one client's LoRA training step (formula: module docstring).

    Args:
        dims: the model's sizes (``model_dims``).
        lora_modules: one ``(rank, in_features, out_features)`` per LoRA module the client
            trains, only those in the blocks it holds.
        batch_size: examples per step.
        seq_len: tokens per example (padded length).
        blocks_held: the client holds the embeddings and the first ``blocks_held`` blocks
            (split learning); ``None`` holds the whole model including what follows the blocks.
        param_bytes: bytes per frozen weight (4 fp32, 2 bf16, ...).
        act_bytes: bytes per saved activation element.
        lora_dropout: whether the LoRA modules apply dropout to their inputs.
        head_params: trainable parameters of a client-side head (trained like LoRA).
        optimizer: ``adamw`` / ``adam`` (two fp32 states per trainable parameter) or ``sgd``.
        final: it holds the final norm/pooler (U-shape split); ``None``: with the whole model.

    Returns:
        The estimate by component, in bytes.

    Raises:
        AtlasError: for a non-positive batch, sequence, rank or width, a byte size below one,
            ``blocks_held`` outside 0..num_layers or an unknown optimizer.
    """
    if optimizer not in OPTIMIZER_STATES:
        raise unknown_name("optimizer", optimizer, OPTIMIZER_STATES)
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len),
                        ("param_bytes", param_bytes), ("act_bytes", act_bytes)):
        if value < 1:
            raise AtlasError(f"{name} = {value} must be at least 1")
    if head_params < 0:
        raise AtlasError(f"head_params = {head_params} must be at least 0")
    for rank, fan_in, fan_out in lora_modules:
        if rank < 1 or fan_in < 1 or fan_out < 1:
            raise AtlasError(f"lora module (rank, in, out) = {(rank, fan_in, fan_out)}: all must "
                             "be at least 1")
    if blocks_held is not None and not 0 <= blocks_held <= dims.num_layers:
        raise AtlasError(f"blocks_held = {blocks_held} must be in 0..{dims.num_layers} "
                         "(or None for the whole model)")
    arch = _ARCHS.get(dims.family)
    if arch is None:
        raise unknown_name("model family for the memory model", dims.family, _ARCHS)
    whole = blocks_held is None if final is None else final
    blocks: int = dims.num_layers if blocks_held is None else blocks_held

    frozen = dims.embedding_params + blocks * dims.block_params + dims.final_params * whole
    trainable = sum(r * (fan_in + fan_out) for r, fan_in, fan_out in lora_modules) + head_params

    b, t, h, i = batch_size, seq_len, dims.hidden, dims.intermediate
    tokens = b * t
    scores = b * dims.num_heads * t * t  # (B, heads, T, T)
    attn_saved = 1 + (2 if dims.attention_dropout > 0 else 0)  # probs (+ noise, dropped probs)
    drops = arch.hidden_dropouts if dims.hidden_dropout > 0 else 0
    per_block = (3 * tokens * dims.attention_width + attn_saved * scores
                 + 2 * (tokens * h + arch.norm_stats * tokens) + drops * tokens * h
                 + _act_factor(dims, arch) * tokens * i)
    lora_act = sum(tokens * r for r, _, _ in lora_modules)
    if lora_dropout:
        lora_act += sum(2 * tokens * fan_in for _, fan_in, _ in lora_modules)
    else:
        lora_act += tokens * _lora_input_elements(dims, arch, lora_modules, blocks)
    final_act = 0
    if whole:
        final_act = (tokens * h + arch.norm_stats * tokens) if arch.final_norm else 0
        final_act += b * h if arch.pooler else 0
    head_act = b * h + tokens if head_params else 0
    activations = blocks * per_block + lora_act + final_act + head_act

    # alive at the end of the forward: embedding output, the last op's two temporaries, a
    # decoder's causal mask and KV cache; in one block's backward: the hidden-state grad and two
    # grads of the MLP width (or of the attention scores, for long sequences)
    forward_end = 3 * tokens * h
    if arch.causal:
        forward_end += b * t * t
    if dims.use_cache:
        forward_end += blocks * 2 * tokens * dims.kv_width
    backward = tokens * h + 2 * max(tokens * i, scores) if blocks else 0
    workspace = max(forward_end, backward)
    return MemoryEstimate(
        weights=frozen * param_bytes,
        lora=trainable * TRAIN_BYTES,
        gradients=trainable * TRAIN_BYTES,
        optimizer=OPTIMIZER_STATES[optimizer] * trainable * TRAIN_BYTES,
        activations=activations * act_bytes,
        workspace=workspace * act_bytes,
    )
