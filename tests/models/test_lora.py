import pytest
import torch

from atlasfl.config import LoraSettings
from atlasfl.models.head import init_head, pool
from atlasfl.models.lora import AdapterBinder, inject_lora
from atlasfl.models.registry import load_backbone

TINY = ["tiny-bert", "tiny-gpt2", "tiny-llama"]


@pytest.fixture(scope="module", params=TINY)
def shared(request):
    backbone = load_backbone(request.param)
    model = inject_lora(backbone, LoraSettings(r=4, alpha=8), seed=0)
    return backbone, model, AdapterBinder(model, LoraSettings(r=4, alpha=8))


def _batch(backbone):
    enc = backbone.tokenizer(["a short one", "a somewhat longer sentence here"], padding=True,
                             return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_lora_injected_per_family_and_b_starts_at_zero(shared):
    backbone, _, binder = shared
    expected = {"bert": "query", "gpt2": "c_attn", "llama": "q_proj"}[backbone.family]
    assert any(path.endswith(expected) for path in binder.layers)
    state = binder.initial_state()
    assert all(v.abs().sum() == 0 for k, v in state.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_A" in k)
    assert backbone.tokenizer.pad_token is not None


def test_binding_switches_clients_without_touching_the_backbone(shared):
    backbone, model, binder = shared
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    init = binder.initial_state()
    a = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    b = {k: torch.nn.Parameter(v.clone() + 0.5) for k, v in init.items()}
    model.eval()
    batch = _batch(backbone)
    binder.bind(a)
    out_a = model(**batch).last_hidden_state
    binder.bind(b)
    out_b = model(**batch).last_hidden_state
    binder.bind(a)
    assert torch.equal(model(**batch).last_hidden_state, out_a)
    assert not torch.allclose(out_a, out_b)
    # the bound tensors ARE the client's (no copy), so gradients land in the client's params
    out = model(**batch).last_hidden_state.sum()
    out.backward()
    assert all(p.grad is not None for k, p in a.items() if "lora_A" in k or "lora_B" in k)
    assert all(p.grad is None for p in b.values())
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]) and not p.requires_grad


def test_last_token_pooling_reads_the_last_real_token():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "cls"), hidden[:, 0])


def test_heads_from_the_same_seed_are_identical():
    h1 = init_head(16, 3, pooling="mean", dropout=0.1, seed=7)
    h2 = init_head(16, 3, pooling="mean", dropout=0.1, seed=7)
    pairs = zip(h1.state_dict().values(), h2.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("rslora, rank, scale", [(False, 2, 8 / 2), (False, 4, 8 / 4),
                                                 (True, 2, 8 / 2**0.5), (True, 16, 8 / 4)])
def test_a_bound_rank_r_adapter_adds_scaling_r_times_b_a(rslora, rank, scale):
    """Injected at r=4, alpha=8: a client of another rank must get its own scaling."""
    settings = LoraSettings(r=4, alpha=8, rslora=rslora)
    model = inject_lora(load_backbone("tiny-bert"), settings, seed=0)
    binder = AdapterBinder(model, settings)
    gen = torch.Generator().manual_seed(1)
    params = {}
    for path, (fan_in, fan_out) in binder.shapes().items():
        params[f"{path}.lora_A.weight"] = torch.nn.Parameter(torch.randn(rank, fan_in,
                                                                         generator=gen))
        params[f"{path}.lora_B.weight"] = torch.nn.Parameter(torch.randn(fan_out, rank,
                                                                         generator=gen))
    binder.bind(params)
    model.eval()
    path, layer = next(iter(binder.layers.items()))
    x = torch.randn(3, layer.in_features, generator=gen)
    a, b = params[f"{path}.lora_A.weight"], params[f"{path}.lora_B.weight"]
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        expected = scale * x @ a.T @ b.T  # scaling(r) x B A applied to x
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)
