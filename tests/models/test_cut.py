"""A split training step computes the unsplit step: the same loss and every LoRA gradient.

For tiny-bert, tiny-gpt2 and tiny-llama, at every cut, in vanilla and U-shape mode, on a batch
with padding: the client's part and the server's part run on the one shared backbone through the
real protocol (``SplitTraining`` -> in-process channel -> ``SplitServer``), and their gradients,
together, must equal those of one unsplit forward and backward of the same adapter and head.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from atlasfl.client import make_client
from atlasfl.client.split_training import SplitTraining, drive
from atlasfl.client.training import forward_logits, task_loss
from atlasfl.config import LoraSettings, TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.tasks import resolve_tasks
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.split_server import ServerModel, SplitServer
from atlasfl.errors import AtlasError
from atlasfl.messages import SplitPlan
from atlasfl.models.head import init_head
from atlasfl.models.lora import AdapterBinder, inject_lora
from atlasfl.models.registry import load_backbone
from atlasfl.models.blocks import block_of, client_side, run_blocks, split_tensors

MODELS = ("tiny-bert", "tiny-gpt2", "tiny-llama")
EMPTY = TokenizedSet([], None, np.zeros(0, dtype=np.int64), 0)
TEXTS = ["the film was a delight from start to end", "dull", "not bad at all , really",
         "an utterly forgettable , tedious and overlong mess of a movie"]


class Setup:
    """A shared backbone with LoRA, one client and a batch with padding."""

    def __init__(self, name: str):
        torch.manual_seed(0)
        self.backbone = load_backbone(name)
        self.model = inject_lora(self.backbone, LoraSettings(r=4, alpha=8.0), seed=0)
        for module in self.model.modules():  # the server trains in train mode: no dropout, so
            if isinstance(module, torch.nn.Dropout):  # both steps draw no random masks
                module.p = 0.0
        self.binder = AdapterBinder(self.model, LoraSettings(r=4, alpha=8.0))
        init = self.binder.initial_state()
        gen = torch.Generator().manual_seed(1)
        # B = 0 at initialisation makes every A gradient zero: start from a trained-looking B
        self.adapter = {k: torch.randn(v.shape, generator=gen) * 0.1 if ".lora_B." in k else v
                        for k, v in init.items()}
        self.num_layers = self.backbone.num_layers
        pooling = "last" if self.backbone.is_decoder else "mean"
        self.head = init_head(self.backbone.hidden_size, 2, pooling=pooling, dropout=0.0, seed=3)
        tok = self.backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
        assert (tok["attention_mask"] == 0).any()  # the batch holds padding
        self.batch = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"],
                      "labels": torch.tensor([1, 0, 1, 0])}
        self.train = TrainConfig(lr=0.0, max_grad_norm=0.0)  # lr 0: the step leaves weights

    def unsplit(self) -> tuple[float, dict[str, torch.Tensor]]:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in self.adapter.items()}
        head = copy.deepcopy(self.head)
        self.binder.bind(params)
        loss = task_loss(forward_logits(self.model, head, self.batch), self.batch["labels"],
                         False)
        loss.backward()
        grads = {k: p.grad for k, p in params.items()}
        grads.update({f"head.{k}": p.grad for k, p in head.named_parameters()})
        return float(loss.detach()), grads

    def split(self, cut: int, tail: int, dtype: str = "fp32", ledger: CommLedger | None = None
              ) -> tuple[float, dict[str, torch.Tensor]]:
        task = resolve_tasks(("sst2",))[0]
        client = make_client(0, task, self.adapter, copy.deepcopy(self.head),
                             EMPTY, EMPTY, self.train,
                             torch.device("cpu"))
        server_model = ServerModel(
            adapter={k: v.clone() for k, v in self.adapter.items()},
            heads={} if tail else {"2": copy.deepcopy(self.head).state_dict()})
        server = SplitServer(self.model, self.binder, num_layers=self.num_layers,
                             train=self.train, initial_adapter=self.binder.initial_state(),
                             initial_heads={2: self.head}, device=torch.device("cpu"),
                             models={"all": server_model})
        plan = SplitPlan(cut, tail, dtype, "all", 2)  # type: ignore[arg-type]
        server.open(0, plan)
        channel = InProcessChannel(ledger or CommLedger())

        def link(message):
            answer = server.handle(0, channel.send(1, 0, "up", message))
            return channel.send(1, 0, "down", answer)

        session = SplitTraining(self.model, self.binder, client, self.train, plan,
                                num_layers=self.num_layers, device=torch.device("cpu"),
                                batch_of=lambda i: self.batch, count=1, seed=0)
        drive(session, link)  # one batch; lr 0: the step leaves the gradients and weights
        loss = session.losses[0]
        part = server.parts["all"]
        grads = {}
        for key in self.adapter:
            module = key.rsplit(".lora_", 1)[0]
            mine = client_side(module, self.num_layers, cut, tail)
            grads[key] = (client.adapter if mine else part.adapter)[key].grad
        head = client.head if tail else part.heads["2"]
        grads.update({f"head.{k}": p.grad for k, p in head.named_parameters()})
        return float(loss), grads


@pytest.fixture(scope="module", params=MODELS)
def setup(request):
    return Setup(request.param)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("mode", ["vanilla", "u-shape"])
def test_split_step_equals_the_unsplit_step_at_every_cut(setup, mode):
    loss, grads = setup.unsplit()
    tail = 1 if mode == "u-shape" else 0
    assert all(float(g.norm()) > 0 for g in grads.values())  # every gradient is non-trivial
    for cut in range(0, setup.num_layers - tail):
        split_loss, split_grads = setup.split(cut, tail)
        assert abs(split_loss - loss) <= 1e-5 * abs(loss), (mode, cut)
        assert split_grads.keys() == grads.keys()
        for key, g in grads.items():
            assert split_grads[key] is not None, (mode, cut, key)
            assert _relative(split_grads[key], g) <= 1e-5, (mode, cut, key)


def test_half_precision_activations_change_the_step_only_slightly(setup):
    loss, grads = setup.unsplit()
    split_loss, split_grads = setup.split(1, 0, "bf16")
    assert split_loss != loss or any(not torch.equal(split_grads[k], g) for k, g in grads.items())
    assert abs(split_loss - loss) <= 2e-2 * abs(loss)


def test_ledger_counts_every_tensor_of_a_split_batch():
    s = Setup("tiny-bert")
    b, t = s.batch["input_ids"].shape
    h = s.backbone.hidden_size
    for dtype, size in (("fp32", 4), ("fp16", 2)):
        ledger = CommLedger()
        s.split(1, 0, dtype, ledger)
        # hidden states + int64 mask up, int64 labels up; the gradient and a float32 loss down
        assert ledger.kinds(1, 0) == {"down_activation_grads": b * t * h * size + 4,
                                      "up_activations": b * t * h * size + b * t * 8,
                                      "up_labels": b * 8}
        ledger = CommLedger()
        s.split(0, 1, dtype, ledger)
        # U-shape: hidden + mask up, hidden back down, then each cut's gradient; no labels
        assert ledger.kinds(1, 0) == {"down_activation_grads": b * t * h * size,
                                      "down_activations": b * t * h * size,
                                      "up_activation_grads": b * t * h * size,
                                      "up_activations": b * t * h * size + b * t * 8}


def test_run_blocks_composes_to_the_whole_model(setup):
    full = setup.model(**{k: v for k, v in setup.batch.items() if k != "labels"})
    mask = setup.batch["attention_mask"]
    with torch.no_grad():
        embedded = run_blocks(setup.model, setup.num_layers, 0, 0, batch=setup.batch)
        hidden = run_blocks(setup.model, setup.num_layers, 0, setup.num_layers,
                            hidden=embedded, attention_mask=mask)
    assert torch.allclose(hidden, full.last_hidden_state, atol=1e-6)
    with pytest.raises(AtlasError, match="block range"):
        run_blocks(setup.model, setup.num_layers, 1, 1, hidden=embedded, attention_mask=mask)


def test_block_of_and_client_side_read_the_module_path():
    assert block_of("encoder.layer.3.attention.self.query") == 3
    assert block_of("h.11.attn.c_attn") == 11
    assert block_of("score") is None
    # 6 blocks, cut 2, tail 1: blocks 0, 1 and 5 are the client's
    assert [client_side(f"layers.{i}.q_proj", 6, 2, 1) for i in range(6)] == [
        True, True, False, False, False, True]
    state = {f"layers.{i}.q_proj.lora_{ab}.weight": i for i in range(6) for ab in "AB"}
    client, server = split_tensors(state, 6, 2, 1)
    assert sorted(set(client.values())) == [0, 1, 5] and sorted(set(server.values())) == [2, 3, 4]
    assert len(client) + len(server) == len(state)


@pytest.mark.parametrize("family", ["roberta", "distilbert", "qwen2", "gpt2", "llama", "bert"])
def test_every_family_composes_at_every_cut_without_family_code(family):
    import transformers

    configs = {
        "bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
        "distilbert": transformers.DistilBertConfig, "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    small = {"vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 3,
             "num_attention_heads": 2, "intermediate_size": 24, "max_position_embeddings": 64}
    if family in ("llama", "qwen2"):
        small["num_key_value_heads"] = 1
    if family == "distilbert":
        small = {"vocab_size": 60, "dim": 16, "n_layers": 3, "n_heads": 2, "hidden_dim": 24,
                 "max_position_embeddings": 64}
    if family == "gpt2":
        small = {"vocab_size": 60, "n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 64}
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(configs[family](**small)).eval()
    ids = torch.randint(3, 60, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        full = model(**batch).last_hidden_state
        for cut in range(0, 3):
            for stop in range(cut + 1, 4):
                front = run_blocks(model, 3, 0, cut, batch=batch)
                middle = run_blocks(model, 3, cut, stop, hidden=front, attention_mask=mask)
                out = (middle if stop == 3 else
                       run_blocks(model, 3, stop, 3, hidden=middle, attention_mask=mask))
                assert torch.allclose(out, full, atol=1e-5), (family, cut, stop)


def test_the_server_refuses_messages_out_of_protocol():
    from atlasfl.messages import Activations, Gradients

    s = Setup("tiny-bert")
    server = SplitServer(s.model, s.binder, num_layers=s.num_layers, train=s.train,
                         initial_adapter=s.binder.initial_state(), initial_heads={2: s.head},
                         device=torch.device("cpu"), models={})
    hidden = torch.zeros(4, s.batch["input_ids"].shape[1], s.backbone.hidden_size)
    server.open(0, SplitPlan(1, 0, "fp32", "all", 2))
    with pytest.raises(AtlasError, match="client 0: vanilla split training needs the labels"):
        server.handle(0, Activations(0, hidden, s.batch["attention_mask"]))
    with pytest.raises(AtlasError, match="client 0: activations without an attention mask"):
        server.handle(0, Activations(0, hidden, None, s.batch["labels"]))
    server.open(1, SplitPlan(0, 1, "fp32", "all", 2))
    with pytest.raises(AtlasError, match="client 1: a gradient without activations before it"):
        server.handle(1, Gradients(1, hidden))
    server.handle(1, Activations(1, hidden, s.batch["attention_mask"]))
    with pytest.raises(AtlasError, match=r"client 1: more than split.window = 1 batches' "
                                         r"activations before their gradients"):
        server.handle(1, Activations(1, hidden, s.batch["attention_mask"]))
