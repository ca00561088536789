import re
from types import SimpleNamespace

import hypothesis.strategies as st
import pytest
import torch
import transformers
from hypothesis import assume, example, given, settings
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from atlasfl.errors import AtlasError
from atlasfl.phases.memory import _ARCHS as ARCHS
from atlasfl.phases.memory import (
    MemoryEstimate,
    ModelDims,
    _get,
    _lora_input_elements,
    estimate_memory,
    model_dims,
)

H, MLP, HEADS = 32, 48, 4
TINY = {
    "bert": (transformers.BertConfig, dict(vocab_size=50, hidden_size=H, num_hidden_layers=3,
                                           num_attention_heads=HEADS, intermediate_size=MLP,
                                           max_position_embeddings=64, type_vocab_size=3),
             ["query", "value"]),
    "roberta": (transformers.RobertaConfig, dict(vocab_size=50, hidden_size=H,
                                                 num_hidden_layers=3, num_attention_heads=HEADS,
                                                 intermediate_size=MLP, max_position_embeddings=70),
                ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                 "output.dense"]),
    "distilbert": (transformers.DistilBertConfig, dict(vocab_size=50, dim=H, n_layers=3,
                                                       n_heads=HEADS, hidden_dim=MLP,
                                                       max_position_embeddings=64),
                   ["q_lin", "v_lin"]),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=50, n_embd=H, n_layer=3, n_head=HEADS,
                                           n_positions=64, bos_token_id=0, eos_token_id=0),
             ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]),
    "llama": (transformers.LlamaConfig, dict(vocab_size=50, hidden_size=H, num_hidden_layers=3,
                                             num_attention_heads=HEADS, num_key_value_heads=2,
                                             intermediate_size=MLP, attention_bias=True),
              ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "qwen2": (transformers.Qwen2Config, dict(vocab_size=50, hidden_size=H, num_hidden_layers=3,
                                             num_attention_heads=HEADS, num_key_value_heads=2,
                                             intermediate_size=MLP),
              ["q_proj", "v_proj"]),
}
BLOCK = re.compile(r"(^|\.)(layer|layers|h)\.0\.")
FINAL = re.compile(r"^(pooler|norm|ln_f)\.")


def tiny(family):
    cls, kwargs, targets = TINY[family]
    return cls(**kwargs), targets


@pytest.mark.parametrize("family", sorted(TINY))
def test_param_counts_match_automodel(family):
    # Prepare
    config, _ = tiny(family)
    model = transformers.AutoModel.from_config(config)
    named = dict(model.named_parameters())
    # Execute
    dims = model_dims(config)
    # Assert
    assert dims.family == family
    assert dims.num_params == sum(p.numel() for p in named.values())
    assert dims.block_params == sum(p.numel() for n, p in named.items() if BLOCK.search(n))
    assert dims.final_params == sum(p.numel() for n, p in named.items() if FINAL.match(n))
    assert (dims.hidden, dims.num_layers, dims.num_heads) == (H, 3, HEADS)


@pytest.mark.parametrize("family", sorted(TINY))
def test_activation_term_matches_what_autograd_saves(family):
    # Prepare: one forward of the tiny model with LoRA, counting saved tensors once each
    torch.manual_seed(0)
    config, targets = tiny(family)
    model = get_peft_model(transformers.AutoModel.from_config(config, attn_implementation="eager"),
                           LoraConfig(r=4, target_modules=targets))
    model.train()
    head = torch.nn.Linear(H, 2)
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *head.parameters()]}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    batch, seq = 3, 16
    ids, mask = torch.randint(0, 50, (batch, seq)), torch.ones(batch, seq, 1)
    modules = [(m.r["default"], m.in_features, m.out_features) for m in model.modules()
               if isinstance(m, LoraLayer)]
    # Execute
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = model(input_ids=ids, attention_mask=mask[..., 0]).last_hidden_state
        head((hidden * mask).sum(1) / mask.sum(1)).sum()
    est = estimate_memory(model_dims(config), modules, batch_size=batch, seq_len=seq,
                          head_params=2 * H + 2)
    # Assert: an upper bound (the first block saves a little less), and a tight one
    assert 0.99 <= est.activations / sum(seen.values()) <= 1.1


def test_hand_computed_tiny_case():
    # Prepare: a 2-block BERT with dropout, LoRA rank 2 on query and value, batch 2, seq 3
    dims = ModelDims(family="bert", hidden=4, intermediate=8, num_layers=2, num_heads=2,
                     num_kv_heads=2, vocab_size=10, embedding_params=100, block_params=200,
                     final_params=20, hidden_act="gelu", attention_dropout=0.1,
                     hidden_dropout=0.1)
    lora = [(2, 4, 4)] * 4  # (rank, in, out) for query and value of both blocks
    # Execute
    est = estimate_memory(dims, lora, batch_size=2, seq_len=3, head_params=10)
    # Assert
    tokens, scores = 2 * 3, 2 * 2 * 3 * 3  # B T = 6, B heads T^2 = 36
    trainable = 4 * 2 * (4 + 4) + 10  # 74
    per_block = (3 * tokens * 4  # Q, K, V: 72
                 + 3 * scores  # softmax output, dropout noise, dropped probs: 108
                 + 2 * (tokens * 4 + 2 * tokens)  # two LayerNorms, input + mean/rstd: 72
                 + 2 * tokens * 4  # two hidden dropout masks: 48
                 + tokens * 8)  # GELU input: 48
    lora_act = 4 * tokens * 2 + 2 * tokens * 4  # B-factor inputs 48, one shared A input/block 48
    pooler, head = 2 * 4, 2 * 4 + tokens  # tanh output; pooled hidden and mask
    assert per_block == 348
    assert est.weights == (100 + 2 * 200 + 20) * 4 == 2080
    assert est.lora == est.gradients == trainable * 4 == 296
    assert est.optimizer == 2 * trainable * 4 == 592
    assert est.activations == (2 * per_block + lora_act + pooler + head) * 4 == 3256
    # larger of forward end 3 B T H = 72 and backward B T H + 2 max(B T I, S) = 24 + 96 = 120
    assert est.workspace == 120 * 4
    assert est.total == 2080 + 296 + 296 + 592 + 3256 + 480
    assert est.as_dict()["total"] == est.total
    sgd = estimate_memory(dims, lora, batch_size=2, seq_len=3, head_params=10, optimizer="sgd")
    assert sgd.optimizer == 0 and sgd.total == est.total - 592


def llama_modules(dims, rank, blocks):
    h, i, a, kv = dims.hidden, dims.intermediate, dims.attention_width, dims.kv_width
    per_block = [(rank, h, a), (rank, h, kv), (rank, h, kv), (rank, a, h), (rank, h, i),
                 (rank, h, i), (rank, i, h)]
    return per_block * blocks


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_monotonic_in_rank_batch_and_blocks(family):
    # Prepare
    dims = model_dims(tiny(family)[0])

    def total(rank=8, batch=4, blocks=None):
        held = dims.num_layers if blocks is None else blocks
        modules = (llama_modules(dims, rank, held) if family == "llama"
                   else [(rank, H, H)] * (2 * held))
        return estimate_memory(dims, modules, batch_size=batch, seq_len=16, blocks_held=blocks,
                               head_params=66).total

    # Execute
    by_rank = [total(rank=r) for r in (1, 2, 4, 8, 16, 64)]
    by_batch = [total(batch=b) for b in (1, 2, 4, 8, 32)]
    by_blocks = [total(blocks=n) for n in range(dims.num_layers + 1)] + [total()]
    # Assert
    for series in (by_rank, by_batch, by_blocks):
        assert all(a <= b for a, b in zip(series, series[1:], strict=False)), series
    assert by_rank[0] < by_rank[-1] and by_batch[0] < by_batch[-1]


def test_split_holds_only_the_first_blocks():
    dims = model_dims(tiny("llama")[0])
    whole = estimate_memory(dims, [], batch_size=2, seq_len=8)
    none = estimate_memory(dims, [], batch_size=2, seq_len=8, blocks_held=0)
    assert none.weights == dims.embedding_params * 4 and none.activations == 0
    assert whole.weights == dims.num_params * 4


def test_lora_dropout_and_bytes_scale_activations():
    dims = model_dims(tiny("bert")[0])
    lora = [(4, H, H)] * 6
    plain = estimate_memory(dims, lora, batch_size=2, seq_len=8)
    dropped = estimate_memory(dims, lora, batch_size=2, seq_len=8, lora_dropout=True)
    half = estimate_memory(dims, lora, batch_size=2, seq_len=8, act_bytes=2, param_bytes=2)
    # dropout: each of 6 modules saves mask + dropped input (2 B T H) instead of 3 shared inputs
    assert dropped.activations - plain.activations == (6 * 2 - 3) * 2 * 8 * H * 4
    assert half.activations * 2 == plain.activations and half.weights * 2 == plain.weights
    assert half.lora == plain.lora  # trainable parameters stay fp32


@pytest.mark.parametrize("kwargs, field", [
    (dict(lora=[(0, H, H)]), "rank"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_len=0), "seq_len"),
    (dict(optimizer="lion"), "optimizer"),
    (dict(blocks_held=4), "blocks_held"),
    (dict(act_bytes=0), "act_bytes"),
])
def test_bad_input_names_the_field(kwargs, field):
    dims = model_dims(tiny("bert")[0])
    kwargs = dict(kwargs)  # a copy: the parametrised dict is shared by every run of this test
    lora = kwargs.pop("lora", [(4, H, H)])
    args = dict(batch_size=2, seq_len=8) | kwargs
    with pytest.raises(AtlasError, match=field):
        estimate_memory(dims, lora, **args)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(AtlasError, match=r"'t5'.*bert.*distilbert.*gpt2.*llama.*qwen2.*roberta"):
        model_dims(SimpleNamespace(model_type="t5"))


# -- configs read by hand, and small estimates worked out term by term --------------------------

BERT = dict(model_type="bert", hidden_size=4, intermediate_size=8, max_position_embeddings=16,
            vocab_size=10, num_attention_heads=2, num_hidden_layers=2)
DISTILBERT = dict(model_type="distilbert", dim=4, hidden_dim=8, max_position_embeddings=16,
                  vocab_size=10, n_heads=2, n_layers=2)
GPT2 = dict(model_type="gpt2", n_embd=4, n_positions=16, vocab_size=10, n_head=2, n_layer=2)
LLAMA = dict(model_type="llama", hidden_size=8, intermediate_size=16, num_attention_heads=2,
             vocab_size=10, num_hidden_layers=2)


def _dims(family, hidden, intermediate, heads, kv_heads, embedding, block, final, **kw):
    return ModelDims(family=family, hidden=hidden, intermediate=intermediate, num_layers=2,
                     num_heads=heads, num_kv_heads=kv_heads, vocab_size=10,
                     embedding_params=embedding, block_params=block, final_params=final, **kw)


@pytest.mark.parametrize("config, expected", [
    # optional fields absent: the defaults. BERT: embeddings (10 + 16 + 0 types) * 4 + LayerNorm 8;
    # block 4 (16 + 4) + (32 + 8) + (32 + 4) + 2 LayerNorms 16; pooler 16 + 4
    (BERT, _dims("bert", 4, 8, 2, 2, 112, 172, 20)),
    (BERT | dict(type_vocab_size=2, hidden_act="relu", attention_probs_dropout_prob=0.1,
                 hidden_dropout_prob=0.2),
     _dims("bert", 4, 8, 2, 2, 120, 172, 20, hidden_act="relu", attention_dropout=0.1,
           hidden_dropout=0.2)),
    (DISTILBERT, _dims("distilbert", 4, 8, 2, 2, 112, 172, 0)),
    (DISTILBERT | dict(activation="relu", attention_dropout=0.1, dropout=0.2),
     _dims("distilbert", 4, 8, 2, 2, 112, 172, 0, hidden_act="relu", attention_dropout=0.1,
           hidden_dropout=0.2)),
    # GPT-2: MLP width 4 h = 16 unless n_inner; block c_attn 48 + 12, c_proj 16 + 4, c_fc, c_proj,
    # two LayerNorms 16; ln_f 8
    (GPT2, _dims("gpt2", 4, 16, 2, 2, 104, 60 + 20 + 80 + 68 + 16, 8, hidden_act="gelu_new")),
    (GPT2 | dict(n_inner=6, activation_function="relu", attn_pdrop=0.1, resid_pdrop=0.2,
                 use_cache=True),
     _dims("gpt2", 4, 6, 2, 2, 104, 60 + 20 + 30 + 28 + 16, 8, hidden_act="relu",
           attention_dropout=0.1, hidden_dropout=0.2, use_cache=True)),
    # Llama: no biases, kv heads = heads, head_dim = 8 / 2: attention 4 * 64, MLP 3 * 128, 2 norms
    (LLAMA, _dims("llama", 8, 16, 2, 2, 80, 256 + 384 + 16, 8, head_dim=4, hidden_act="silu")),
    # one kv head of width 2 and every bias: q 32 + 4, k and v 16 + 2 each, o 32 + 8;
    # gate and up 128 + 16 each, down 128 + 8
    (LLAMA | dict(num_key_value_heads=1, head_dim=2, attention_bias=True, mlp_bias=True,
                  hidden_act="gelu", attention_dropout=0.1, use_cache=True),
     _dims("llama", 8, 16, 2, 1, 80, 36 + 36 + 40 + 288 + 136 + 16, 8, head_dim=2,
           hidden_act="gelu", attention_dropout=0.1, use_cache=True)),
])
def test_model_dims_read_by_hand(config, expected):
    assert model_dims(SimpleNamespace(**config)) == expected


def test_model_dims_names_what_is_missing():
    with pytest.raises(AtlasError, match=r"^unknown model_type for the memory model 'None'"):
        model_dims(SimpleNamespace(hidden_size=4))
    with pytest.raises(AtlasError, match=r"^unknown model_type for the memory model 't5' "
                                         r"\(allowed: bert, distilbert, gpt2, llama, qwen2, "
                                         r"roberta\)$"):
        model_dims(SimpleNamespace(model_type="t5"))
    with pytest.raises(AtlasError, match=r"^model config SimpleNamespace has none of "
                                         r"hidden_size$"):
        model_dims(SimpleNamespace(model_type="bert"))
    with pytest.raises(AtlasError, match=r"^model config SimpleNamespace has none of a, b$"):
        _get(SimpleNamespace(), "a", "b")


def test_decoder_estimate_by_hand():
    # Llama-like, one block, no LoRA, batch 2, sequence 2: B T = 4, S = B heads T^2 = 16,
    # a = 2 * 4 = 8, kv = 1 * 4 = 4
    dims = ModelDims(family="llama", hidden=8, intermediate=4, num_layers=1, num_heads=2,
                     num_kv_heads=1, vocab_size=10, embedding_params=80, block_params=100,
                     final_params=8, hidden_act="silu", use_cache=True)
    est = estimate_memory(dims, [], batch_size=2, seq_len=2)
    per_block = (3 * 4 * 8  # Q, K, V: 96
                 + 16  # softmax output (no attention dropout)
                 + 2 * (4 * 8 + 1 * 4)  # two RMSNorms, input + one statistic: 72
                 + 3 * 4 * 4)  # SwiGLU: 48
    final_norm = 4 * 8 + 4  # 36
    forward_end = 3 * 4 * 8 + 2 * 2 * 2 + 1 * 2 * 4 * 4  # embedding output, causal mask, KV: 136
    backward = 4 * 8 + 2 * max(4 * 4, 16)  # 64
    assert est == MemoryEstimate(weights=(80 + 100 + 8) * 4, lora=0, gradients=0, optimizer=0,
                                 activations=(per_block + final_norm) * 4,
                                 workspace=max(forward_end, backward) * 4)
    assert est.activations == 1072 and est.workspace == 544


def test_encoder_without_dropout_estimate_by_hand():
    # BERT-like, one block, no dropout: no masks; batch 2, sequence 3: B T = 6, S = 36
    dims = ModelDims(family="bert", hidden=4, intermediate=8, num_layers=1, num_heads=2,
                     num_kv_heads=2, vocab_size=10, embedding_params=100, block_params=200,
                     final_params=20)
    est = estimate_memory(dims, [], batch_size=2, seq_len=3)
    per_block = 3 * 6 * 4 + 36 + 2 * (6 * 4 + 2 * 6) + 6 * 8  # 72 + 36 + 72 + 48 = 228
    pooler = 2 * 4
    assert est.activations == (per_block + pooler) * 4 == 944
    assert est.workspace == (6 * 4 + 2 * max(6 * 8, 36)) * 4 == 480
    # holding no block: only the embeddings, and the forward's end is the peak
    none = estimate_memory(dims, [], batch_size=2, seq_len=3, blocks_held=0)
    assert (none.weights, none.activations, none.workspace) == (400, 0, 3 * 6 * 4 * 4)


def test_python_gelu_saves_four_tensors_of_mlp_width():
    def dims(act):
        return ModelDims(family="gpt2", hidden=4, intermediate=16, num_layers=2, num_heads=2,
                         num_kv_heads=2, vocab_size=10, embedding_params=1, block_params=1,
                         final_params=1, hidden_act=act)

    acts = {act: estimate_memory(dims(act), [], batch_size=2, seq_len=3).activations
            for act in ("gelu", "gelu_new", "gelu_fast")}
    # 3 more B T I tensors per block (B T I = 96), 2 blocks, 4 bytes
    assert acts["gelu_new"] - acts["gelu"] == acts["gelu_fast"] - acts["gelu"] == 3 * 96 * 2 * 4


def test_estimate_accepts_width_one_and_names_every_bad_input():
    dims = ModelDims(family="bert", hidden=4, intermediate=8, num_layers=1, num_heads=2,
                     num_kv_heads=2, vocab_size=10, embedding_params=1, block_params=1,
                     final_params=1)
    args = dict(batch_size=2, seq_len=3)
    assert estimate_memory(dims, [(1, 1, 1)], **args).lora == 1 * (1 + 1) * 4
    for name in ("batch_size", "seq_len", "param_bytes", "act_bytes"):
        with pytest.raises(AtlasError, match=rf"^{name} = 0 must be at least 1$"):
            estimate_memory(dims, [], **(args | {name: 0}))
    with pytest.raises(AtlasError, match=r"^head_params = -1 must be at least 0$"):
        estimate_memory(dims, [], head_params=-1, **args)
    with pytest.raises(AtlasError, match=r"^lora module \(rank, in, out\) = \(2, 0, 3\): all must "
                                         r"be at least 1$"):
        estimate_memory(dims, [(2, 0, 3)], **args)
    with pytest.raises(AtlasError, match=r"^blocks_held = 2 must be in 0\.\.1 \(or None for the "
                                         r"whole model\)$"):
        estimate_memory(dims, [], blocks_held=2, **args)
    with pytest.raises(AtlasError, match=r"^unknown optimizer 'lion'"):
        estimate_memory(dims, [], optimizer="lion", **args)
    t5 = ModelDims(**{**dims.__dict__, "family": "t5"})
    with pytest.raises(AtlasError, match=r"^unknown model family for the memory model 't5' "
                                         r"\(allowed: bert, distilbert, gpt2, llama, qwen2, "
                                         r"roberta\)$"):
        estimate_memory(t5, [], **args)


ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@settings(max_examples=300, deadline=None)
@example(family="llama", hidden=8, mlp=16, heads=2, gqa=False, wide_heads=True, roles={"o"},
         blocks=2)  # o alone, attention width 12 != hidden 8: the ``only_o`` count
@given(family=st.sampled_from(["llama", "gpt2"]), hidden=st.sampled_from([8, 12]),
       mlp=st.sampled_from([16, 24]), heads=st.sampled_from([2, 4]), gqa=st.booleans(),
       wide_heads=st.booleans(), roles=st.sets(st.sampled_from(ROLES), min_size=1),
       blocks=st.integers(1, 3))
def test_lora_inputs_counted_from_shapes_match_the_roles(family, hidden, mlp, heads, gqa,
                                                         wide_heads, roles, blocks):
    """Brute force by role: per block one input for q/k/v, one for o, one for gate/up, and the
    input of down; the function sees only shapes (same targets in every held block)."""
    fused = family == "gpt2"
    head_dim = 0 if fused else hidden // heads + (2 if wide_heads else 0)
    kv_heads = 1 if gqa and not fused else heads
    dims = ModelDims(family=family, hidden=hidden, intermediate=mlp, num_layers=3,
                     num_heads=heads, num_kv_heads=kv_heads, vocab_size=10, embedding_params=1,
                     block_params=1, final_params=1, head_dim=head_dim)
    h, a, kv = hidden, dims.attention_width, dims.kv_width
    # an attention width equal to the MLP width is another ambiguity
    assume(mlp not in (a, kv) and not (fused and mlp == 3 * h))
    if fused:  # GPT-2: c_attn (h, 3h) makes q, k and v; attn.c_proj is o
        roles = {"q" if r in ("k", "v") else r for r in roles} - {"gate"}
        assume(roles)
        shape = {"q": (h, 3 * h), "o": (h, h), "up": (h, mlp), "down": (mlp, h)}
    else:
        shape = {"q": (h, a), "k": (h, kv), "v": (h, kv), "o": (a, h), "gate": (h, mlp),
                 "up": (h, mlp), "down": (mlp, h)}
        # documented ambiguity: an (h, h) o is taken for q/k/v while a square q/k/v slot is free
        square = {r for r in ("q", "k", "v") if shape[r] == (h, h)}
        assume("o" not in roles or a != h or square <= roles)
    modules = [(4, *shape[r]) for r in sorted(roles)] * blocks
    per_block = (h * bool(roles & {"q", "k", "v"}) + a * ("o" in roles)
                 + h * bool(roles & {"gate", "up"}) + mlp * ("down" in roles))
    assert _lora_input_elements(dims, ARCHS[family], modules, blocks) == blocks * per_block
