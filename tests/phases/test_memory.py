import re
from types import SimpleNamespace

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from atlasfl.errors import AtlasError
from atlasfl.phases.memory import ModelDims, estimate_memory, model_dims

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
    lora = kwargs.pop("lora", [(4, H, H)])
    args = dict(batch_size=2, seq_len=8) | kwargs
    with pytest.raises(AtlasError, match=field):
        estimate_memory(dims, lora, **args)


def test_unknown_model_type_lists_the_supported_ones():
    with pytest.raises(AtlasError, match=r"'t5'.*bert.*distilbert.*gpt2.*llama.*qwen2.*roberta"):
        model_dims(SimpleNamespace(model_type="t5"))
