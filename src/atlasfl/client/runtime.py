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
from atlasfl.client.state import ClientState
from atlasfl.client.training import evaluate, train_client
from atlasfl.config import LoraSettings, TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.messages import (
    Evaluate,
    EvaluateReply,
    Model,
    Probe,
    Reply,
    Train,
    TrainReply,
    Update,
)
from atlasfl.messages import Plan as PlanT
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder, plan_adapter
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
    _test_cache: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    def handle(self, client: ClientState, plan: PlanT, round_idx: int) -> Reply:
        """Answer one plan for ``client`` in round ``round_idx``."""
        seed = client_seed(self.seed, round_idx, client.client_id)
        match plan:
            case Probe():  # the seed draws the probe's examples (and DP noise)
                return probe_client(self, client, plan, torch.Generator().manual_seed(seed))
            case Train():
                self.receive(client, plan.model)
                return self.train_round(client, plan, seed)
            case Evaluate():
                self.receive(client, plan.model)
                return self.evaluate_round(client)
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

    def train_round(self, client: ClientState, plan: Train, seed: int) -> TrainReply:
        """Local training; the update is the client's adapter and head (if it uploads).

        ``seed`` (per run, round and client) fixes the batch order and the dropout masks.
        """
        torch.manual_seed(seed)  # dropout
        metrics = train_client(self.model, self.binder, client, self.train, epochs=plan.epochs,
                               steps=plan.steps, generator=torch.Generator().manual_seed(seed),
                               device=self.device)
        update = (Update(client.client_id, client.adapter_state(), client.head_state(),
                         client.num_examples) if plan.upload else None)
        record = {"trained": True, "train_loss": metrics["train_loss"], "steps": metrics["steps"]}
        return TrainReply(client.client_id, update, record, metrics["train_seconds"])

    def evaluate_round(self, client: ClientState) -> EvaluateReply:
        """The client's own model on its task's test split (and its validation split)."""
        start = time.perf_counter()
        args = (self.model, self.binder, client.adapter, client.head)
        key = (client.task.name, _digest(client.adapter_state(), client.head_state()))
        if key not in self._test_cache:
            self._test_cache[key] = evaluate(*args, self.test_sets[client.task.name],
                                             client.task, self.train, device=self.device)
        test = self._test_cache[key]
        out = {f"eval_{k}" if k == "loss" else k: v for k, v in test.items()}
        if len(client.val_set):
            val = evaluate(*args, client.val_set, client.task, self.train, device=self.device)
            out["val_loss"], out["val_metric"] = val["loss"], val["metric"]
        return EvaluateReply(client.client_id, out, time.perf_counter() - start)
