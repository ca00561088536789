"""Split training as windows: it trains the unsplit model, and survives a process per message.

tiny-bert, 20 rows in batches of 4 (5 batches), one client against a ``SplitServer`` on the one
shared backbone, through the in-process channel.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from atlasfl.client import make_client
from atlasfl.client.split_training import SplitTraining, drive
from atlasfl.client.training import round_batches, train_client
from atlasfl.config import LoraSettings, TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.tasks import resolve_tasks
from atlasfl.engine.channel import InProcessChannel
from atlasfl.engine.ledger import CommLedger
from atlasfl.engine.split_server import ServerModel, SplitServer
from atlasfl.messages import SplitPlan
from atlasfl.models.head import init_head
from atlasfl.models.lora import AdapterBinder, inject_lora
from atlasfl.models.registry import load_backbone
from atlasfl.models.blocks import client_side

WORDS = "the film was a delight dull not bad at all really an utterly tedious mess".split()
CPU = torch.device("cpu")


class Bench:
    """A backbone with LoRA (``dropout``: keep its dropout or set it to 0) and 20 rows."""

    def __init__(self, dropout: bool):
        torch.manual_seed(0)
        backbone = load_backbone("tiny-bert")
        self.settings = LoraSettings(r=4, alpha=8.0)
        self.model = inject_lora(backbone, self.settings, seed=0)
        if not dropout:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        self.binder = AdapterBinder(self.model, self.settings)
        gen = torch.Generator().manual_seed(1)
        self.adapter = {k: torch.randn(v.shape, generator=gen) * 0.1 if ".lora_B." in k else v
                        for k, v in self.binder.initial_state().items()}
        self.layers = backbone.num_layers
        self.head = init_head(backbone.hidden_size, 2, pooling="mean", dropout=0.0, seed=3)
        rng = np.random.default_rng(0)
        rows = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) for _ in range(20)]
        ids = backbone.tokenizer(rows)["input_ids"]
        self.data = TokenizedSet(ids, None, rng.integers(0, 2, size=20),
                                 backbone.tokenizer.pad_token_id)
        self.train = TrainConfig(batch_size=4, lr=0.01, max_grad_norm=0.0)
        self.task = resolve_tasks(("sst2",))[0]

    def client(self):
        empty = TokenizedSet([], None, np.zeros(0, dtype=np.int64), 0)
        return make_client(0, self.task, self.adapter, copy.deepcopy(self.head), self.data,
                           empty, self.train, CPU)

    def unsplit(self):
        client = self.client()
        torch.manual_seed(5)
        train_client(self.model, self.binder, client, self.train, epochs=1,
                     generator=torch.Generator().manual_seed(7), device=CPU)
        return client

    def split(self, cut, tail, window, fresh_process=False):
        """Train one epoch split; ``fresh_process``: rebuild the session from ``export``
        before every answer, as a Flower node that keeps only ``context.state`` does."""
        client = self.client()
        server = SplitServer(self.model, self.binder, num_layers=self.layers, train=self.train,
                             initial_adapter=self.binder.initial_state(),
                             initial_heads={2: self.head}, device=CPU,
                             models={"all": ServerModel(
                                 adapter={k: v.clone() for k, v in self.adapter.items()},
                                 heads={} if tail else {"2": copy.deepcopy(self.head)
                                                        .state_dict()})})
        plan = SplitPlan(cut, tail, "fp32", "all", 2, window=window)  # type: ignore[arg-type]
        server.open(0, plan, seed=11)
        channel = InProcessChannel(CommLedger())
        order = round_batches(self.data, self.train, epochs=1, steps=0,
                              generator=torch.Generator().manual_seed(7))

        def session():
            return SplitTraining(self.model, self.binder, client, self.train, plan,
                                 num_layers=self.layers, device=CPU,
                                 batch_of=lambda i: self.data.collate(order[i]),
                                 count=len(order), seed=11)

        def link(message):
            return channel.send(1, 0, "down", server.handle(0, channel.send(1, 0, "up", message)))
        run = session()
        if not fresh_process:
            drive(run, link)
        else:
            requests = run.begin()
            while requests:
                tensors, meta = run.export()
                run = session()
                run.load({k: v.clone() for k, v in tensors.items()}, meta)
                requests = run.answer([link(m) for m in requests])
        return client, server.snapshot()["all"], run.metrics()


def _merged(bench, client, server, cut, tail):
    """The split model as one: the client's own modules, the server's others, and the head."""
    adapter = {k: (client.adapter[k] if client_side(k.rsplit(".lora_", 1)[0], bench.layers,
                                                    cut, tail) else server.adapter[k]).detach()
               for k in bench.adapter}
    head = client.head.state_dict() if tail else server.heads["2"]
    return adapter, head


@pytest.mark.parametrize(("cut", "tail"), [(1, 0), (0, 1)])
def test_sequential_split_training_trains_the_unsplit_model(cut, tail):
    bench = Bench(dropout=False)  # no random masks: both sides compute the same function
    whole = bench.unsplit()
    client, server, metrics = bench.split(cut, tail, window=1)
    assert metrics["steps"] == 5 and metrics["examples"] == 20
    adapter, head = _merged(bench, client, server, cut, tail)
    for key, value in whole.adapter_state().items():
        assert not torch.equal(value, bench.adapter[key]), key  # every module trained
        assert torch.allclose(adapter[key], value, rtol=1e-4, atol=1e-6), key
    for key, value in whole.head_state().items():
        assert torch.allclose(head[key], value, rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize(("cut", "tail", "window"), [(1, 0, 2), (1, 0, 5), (0, 1, 3)])
def test_a_process_per_message_ends_where_one_process_ends_bit_for_bit(cut, tail, window):
    bench = Bench(dropout=True)  # per-batch seeds: a recomputed forward draws the same masks
    kept = bench.split(cut, tail, window)
    fresh = bench.split(cut, tail, window, fresh_process=True)
    for (a, b) in ((kept[0].adapter_state(), fresh[0].adapter_state()),
                   (kept[1].adapter, fresh[1].adapter),
                   (kept[0].head_state(), fresh[0].head_state())):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert kept[2]["train_loss"] == fresh[2]["train_loss"]


def test_windows_train_on_stale_forwards_so_they_change_the_result():
    bench = Bench(dropout=False)
    one = bench.split(1, 0, window=1)
    five = bench.split(1, 0, window=5)  # one message pair for the epoch: every forward at start
    own = [k for k in bench.adapter if client_side(k.rsplit(".lora_", 1)[0], bench.layers, 1, 0)]
    assert own
    assert one[2]["steps"] == five[2]["steps"] == 5
    assert any(not torch.equal(one[0].adapter[k], five[0].adapter[k]) for k in own)
    assert one[2]["train_loss"] != five[2]["train_loss"]
