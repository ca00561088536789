"""The client side of the protocol: answer a plan with a reply, for clients sharing one backbone.

``ClientRuntime`` holds what every client of this process shares (the frozen backbone with its
injected LoRA layers, the common seeded initialisation, the test splits) and answers a message for
one client: it first writes what the plan carries into the client's model (``Model``: a rank plan,
then adapter and head), then trains, probes or evaluates. The same runtime serves the in-process
executor and a Flower ``ClientApp``; it never sees the server's state.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass, field

import torch
from peft import PeftModel

from atlasfl.client.probe import probe_client
from atlasfl.client.split import Link, evaluate_split, train_split_client
from atlasfl.client.state import ClientState
from atlasfl.client.training import Scored, evaluate, train_client
from atlasfl.config import LoraSettings, TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.metrics import label_mix_weights
from atlasfl.messages import (
    Evaluate,
    EvaluateReply,
    Model,
    Probe,
    Reply,
    SplitPlan,
    Train,
    TrainReply,
    Update,
)
from atlasfl.messages import Plan as PlanT
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder, plan_adapter
from atlasfl.models.split import split_tensors
from atlasfl.types import AdapterState, ClientId


def client_seed(seed: int, round_idx: int, client_id: ClientId) -> int:
    """Seed of one client's round: independent of the order clients run in (exact resume)."""
    return zlib.crc32(f"{seed}/{round_idx}/{client_id}".encode())


def _digest(*states: AdapterState) -> str:
    h = hashlib.blake2b(digest_size=16)
    for state in states:
        for name in sorted(state):
            h.update(name.encode())
            h.update(state[name].detach().cpu().contiguous().view(-1).view(torch.uint8)
                     .numpy().tobytes())
    return h.hexdigest()


@dataclass
class ClientRuntime:
    """What the clients of one process share, and the handlers of the three plans."""

    model: PeftModel  # the backbone with LoRA layers injected, shared by all clients
    binder: AdapterBinder
    train: TrainConfig
    lora: LoraSettings
    seed: int  # the run's seed: shared initialisation and projections, per-client streams
    device: torch.device
    num_layers: int
    initial_adapter: AdapterState  # the common seeded start (Phases 1 and 2 probe from it)
    initial_heads: dict[int, ClassificationHead]  # per number of outputs
    test_sets: dict[str, TokenizedSet]
    # Clients of one group often hold bit-identical models after aggregation: the shared test
    # split is scored once per distinct (task, model), keyed by a digest of the tensors.
    # (task, model digest) -> its predictions on the test rows and their unweighted metrics
    _test_cache: dict[tuple[str, str], tuple[Scored, dict[str, float]] | None] = field(
        default_factory=dict)
    _val_cache: dict[ClientId, tuple[str, Scored | None]] = field(default_factory=dict)

    def handle(self, client: ClientState, plan: PlanT, round_idx: int,
               link: Link | None = None) -> Reply:
        """Answer one plan for ``client`` in round ``round_idx``.

        ``link`` reaches the server's half of split learning when the plan splits the model.
        """
        seed = client_seed(self.seed, round_idx, client.client_id)
        match plan:
            case Probe():  # the seed draws the probe's examples (and DP noise)
                return probe_client(self, client, plan, torch.Generator().manual_seed(seed))
            case Train():
                self.receive(client, plan.model)
                return self.train_round(client, plan, seed, link)
            case Evaluate():
                self.receive(client, plan.model)
                return self.evaluate_round(client, plan.split, link)
        raise TypeError(f"no handler for {type(plan).__name__}")  # internal: a new plan type

    def receive(self, client: ClientState, model: Model) -> None:
        """Write what the server sent into the client's model: ranks, then adapter and head."""
        if model.ranks is not None and model.ranks != client.ranks():
            client.replace_adapter(plan_adapter(self.model, self.lora, model.ranks,
                                                seed=self.seed))
        if model.adapter is not None:
            client.load_adapter(model.adapter)
        if model.head is not None:
            client.load_head(model.head)

    def train_round(self, client: ClientState, plan: Train, seed: int,
                    link: Link | None = None) -> TrainReply:
        """Local training; the update is what the client trained (if it uploads).

        ``seed`` (per run, round and client) fixes the batch order and the dropout masks. A
        split client (``plan.split``) trains across the cut through ``link`` and uploads only
        the modules of its own blocks (and its head in U-shape; the server holds it in vanilla).
        """
        torch.manual_seed(seed)  # dropout
        gen = torch.Generator().manual_seed(seed)
        split = plan.split
        if split is None:
            metrics = train_client(self.model, self.binder, client, self.train,
                                   epochs=plan.epochs, steps=plan.steps, generator=gen,
                                   device=self.device)
        else:
            if link is None:  # internal: the executor opened no link
                raise RuntimeError(f"client {client.client_id} trains split without a link")
            metrics = train_split_client(self.model, self.binder, client, self.train, split,
                                         link, num_layers=self.num_layers, epochs=plan.epochs,
                                         steps=plan.steps, generator=gen, device=self.device)
        update = None
        if plan.upload:
            adapter = client.adapter_state()
            if split is not None:  # only the modules of its own blocks
                adapter, _ = split_tensors(adapter, self.num_layers, split.cut, split.tail)
            head = client.head_state() if split is None or split.u_shape else {}
            if plan.shares == "lora_A":  # B factors and head stay on the client
                adapter = {k: v for k, v in adapter.items() if k.endswith(".lora_A.weight")}
                head = {}
            update = Update(client.client_id, adapter, head, client.num_examples)
        record = {"trained": True, "train_loss": metrics["train_loss"], "steps": metrics["steps"],
                  **({"cut": split.cut} if split is not None else {})}
        return TrainReply(client.client_id, update, record, metrics["train_seconds"])

    def evaluate_round(self, client: ClientState, split: SplitPlan | None = None,
                       link: Link | None = None) -> EvaluateReply:
        """The client's own model on its task's test split (and its validation split).

        Split: the model is the client's part and the server model ``split`` names, evaluated
        across the cut through ``link``; the cache key names that server model's version.
        """
        start = time.perf_counter()

        def run(data: TokenizedSet) -> Scored | None:
            if split is None:
                return evaluate(self.model, self.binder, client.adapter, client.head, data,
                                client.task, self.train, device=self.device)
            if link is None:  # internal: the executor opened no link
                raise RuntimeError(f"client {client.client_id} evaluates split without a link")
            return evaluate_split(self.model, self.binder, client, data, split, link,
                                  self.train, num_layers=self.num_layers, device=self.device)

        key = (client.task.name, _digest(client.adapter_state(), client.head_state())
               + ("" if split is None else f"/{split}"))
        if key not in self._test_cache:  # clients holding one model share its predictions
            scored = run(self.test_sets[client.task.name])
            self._test_cache[key] = None if scored is None else (scored, scored.metrics())
        cached = self._test_cache[key]
        out: dict[str, float] = {}
        if cached is not None:
            test, metrics = cached
            out = {f"eval_{k}" if k == "loss" else k: v for k, v in metrics.items()}
            weights = label_mix_weights(client.task, client.train_set.labels, test.labels)
            if weights is not None:  # the same predictions, weighted to the client's label mix
                own = test.metrics(weights)
                out["own_metric"] = own["metric"]
                if "accuracy" in own:
                    out["own_accuracy"] = own["accuracy"]
        last = self._val_cache.get(client.client_id)
        if last is not None and last[0] == key[1]:
            val = last[1]  # the same model on the same rows: its scores are known
        else:
            val = run(client.val_set)
            self._val_cache[client.client_id] = (key[1], val)
        if client.scored == key[1]:  # not trained or sent anything new since its last scores
            out["unchanged"] = 1.0  # (a resumed process recomputes them, to the same values)
        client.scored = key[1]
        if val is not None:
            scores = val.metrics()
            out["val_loss"], out["val_metric"] = scores["loss"], scores["metric"]
        return EvaluateReply(client.client_id, out, time.perf_counter() - start)
