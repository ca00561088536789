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

from atlasfl.client.batched import train_batched
from atlasfl.client.probe import probe_client
from atlasfl.client.split_training import Link, SplitScoring, SplitTraining, drive
from atlasfl.client.state import ClientState
from atlasfl.client.training import Scored, evaluate, round_batches, train_client
from atlasfl.config import LoraSettings, TrainConfig
from atlasfl.data.batching import TokenizedSet
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
from atlasfl.models.blocks import split_tensors
from atlasfl.types import AdapterState, ClientId


def client_seed(seed: int, round_idx: int, client_id: ClientId) -> int:
    """Seed of one client's round: independent of the order clients run in (exact resume)."""
    return zlib.crc32(f"{seed}/{round_idx}/{client_id}".encode())


def group_seed(seed: int, round_idx: int, client_ids: list[ClientId]) -> int:
    """Seed of a batched group's round (its dropout masks): from its members, not their order."""
    members = "+".join(str(c) for c in sorted(client_ids))
    return zlib.crc32(f"{seed}/{round_idx}/{members}".encode())


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
    test_sets: dict[str, TokenizedSet]  # per task: its shared test rows (the global metric)
    # Clients of one group often hold bit-identical models after aggregation: the shared test
    # split is scored once per distinct (task, model), keyed by a digest of the tensors.
    # (task, model digest) -> the model's metrics on the task's shared test rows
    _test_cache: dict[tuple[str, str], dict[str, float] | None] = field(default_factory=dict)
    # client -> (digest of the model last scored, its metrics on the client's own rows: "val"
    # and "local"); the same model on the same rows scores the same, so they are kept
    _own_cache: dict[ClientId, tuple[str, dict[str, dict[str, float] | None]]] = field(
        default_factory=dict)

    def handle(self, client: ClientState, plan: PlanT, round_idx: int,
               link: Link | None = None) -> Reply:
        """Answer one plan for ``client`` in round ``round_idx``.

        ``link`` reaches the server's half of split learning when the plan splits the model.
        """
        seed = client_seed(self.seed, round_idx, client.client_id)
        match plan:
            case Probe():  # the seed draws the probe's examples (and DP noise)
                return probe_client(self, client, plan, torch.Generator().manual_seed(seed))
            case Train(split=SplitPlan()) | Evaluate(split=SplitPlan()):
                if link is None:  # internal: the executor opened no link
                    raise RuntimeError(f"client {client.client_id} is split without a link")
                if isinstance(plan, Train) and plan.proximal:  # internal: a recipe refuses it
                    raise RuntimeError("a proximal term across a cut is not implemented")
                session = self.open_split(client, plan, round_idx)
                drive(session, link)
                return self.close_split(client, plan, session)
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
        """Local training of the whole model.

        ``seed`` (per run, round and client) fixes the batch order and the dropout masks.
        """
        torch.manual_seed(seed)  # dropout
        metrics = train_client(self.model, self.binder, client, self.train, epochs=plan.epochs,
                               steps=plan.steps, generator=torch.Generator().manual_seed(seed),
                               device=self.device, proximal=plan.proximal)
        return self.train_reply(client, plan, metrics)

    def train_group(self, clients: list[ClientState], plans: list[Train], round_idx: int
                    ) -> list[TrainReply]:
        """Answer the whole-model Train plans of clients that train together (in plan order).

        Each client receives its plan's model and draws its batch order from its own seed, as in
        ``train_round``; then the group trains one batched step per batch
        (``atlasfl.client.batched``; the plans must give equal batch sizes) and each client gets
        the reply ``train_round`` gives. Dropout masks come from the group's seed
        (``group_seed``), not each client's: with dropout on they differ from the one-by-one
        path's, with dropout off the results are the same up to float rounding.
        """
        orders = []
        for client, plan in zip(clients, plans, strict=True):
            assert plan.split is None and not plan.proximal, "internal: cannot be batched"
            self.receive(client, plan.model)
            seed = client_seed(self.seed, round_idx, client.client_id)
            orders.append(round_batches(client.train_set, self.train, epochs=plan.epochs,
                                        steps=plan.steps,
                                        generator=torch.Generator().manual_seed(seed)))
        torch.manual_seed(group_seed(self.seed, round_idx, [c.client_id for c in clients]))
        metrics = train_batched(self.model, self.binder, clients, orders, self.train,
                                device=self.device)
        return [self.train_reply(c, p, m) for c, p, m in zip(clients, plans, metrics, strict=True)]

    def train_reply(self, client: ClientState, plan: Train, metrics: dict[str, float]
                    ) -> TrainReply:
        """The update is what the client trained (if it uploads).

        A split client (``plan.split``) uploads only the modules of its own blocks (and its head
        in U-shape; the server holds it in vanilla). Every way of training ends here, so the
        last step's gradients are freed here: they are not state (each step starts from none),
        and a resident client would otherwise hold a copy of its adapter and head until it
        next trains.
        """
        client.optimizer.zero_grad(set_to_none=True)
        split = plan.split
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

    # -- split plans, as windows of messages (atlasfl.client.split_training) -------------------

    def open_split(self, client: ClientState, plan: Train | Evaluate, round_idx: int
                   ) -> SplitTraining | SplitScoring:
        """The client side of a split plan, its model received, ready to ``begin``."""
        self.receive(client, plan.model)
        return self._split_session(client, plan, round_idx)

    def resume_split(self, client: ClientState, plan: Train | Evaluate, round_idx: int,
                     tensors: dict[str, torch.Tensor], meta: dict[str, object]
                     ) -> SplitTraining | SplitScoring:
        """A split plan's session where its ``export`` left it (a later message, a process)."""
        session = self._split_session(client, plan, round_idx, meta)
        session.load(tensors, meta)
        return session

    def close_split(self, client: ClientState, plan: Train | Evaluate,
                    session: SplitTraining | SplitScoring) -> Reply:
        """The reply to a split plan whose session is done."""
        if isinstance(plan, Train):
            assert isinstance(session, SplitTraining)
            return self.train_reply(client, plan, session.metrics())
        assert isinstance(session, SplitScoring) and plan.split is not None
        return self._scores_reply(client, session.key,
                                  dict(zip(session.names, session.results(), strict=True)),
                                  session.seconds)

    def _split_session(self, client: ClientState, plan: Train | Evaluate, round_idx: int,
                       saved: dict[str, object] | None = None) -> SplitTraining | SplitScoring:
        split = plan.split
        assert split is not None
        if isinstance(plan, Train):
            seed = client_seed(self.seed, round_idx, client.client_id)
            order = round_batches(client.train_set, self.train, epochs=plan.epochs,
                                  steps=plan.steps, generator=torch.Generator().manual_seed(seed))

            def batch_of(i: int) -> dict[str, torch.Tensor]:
                batch = client.train_set.collate(order[i], pad_multiple=self.train.pad_multiple)
                return {k: v.to(self.device) for k, v in batch.items()}
            return SplitTraining(self.model, self.binder, client, self.train, split,
                                 num_layers=self.num_layers, device=self.device,
                                 batch_of=batch_of, count=len(order), seed=seed)
        if saved is None:
            key, names = self._to_score(client, split)
        else:  # resumed: the model and sets the session began with
            key = (str(saved["key"][0]), str(saved["key"][1]))  # type: ignore[index]
            names = [str(n) for n in saved["names"]]  # type: ignore[attr-defined]
        data = self._score_sets(client)
        return SplitScoring(self.model, self.binder, client, self.train, split,
                            {n: data[n] for n in names}, key, num_layers=self.num_layers,
                            device=self.device)

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate_round(self, client: ClientState) -> EvaluateReply:
        """The client's own model on its task's shared test rows, its local test and validation."""
        start = time.perf_counter()
        key, names = self._to_score(client, None)
        data = self._score_sets(client)
        results = {n: evaluate(self.model, self.binder, client.adapter, client.head, data[n],
                               client.task, self.train, device=self.device) for n in names}
        return self._scores_reply(client, key, results, time.perf_counter() - start)

    def _score_sets(self, client: ClientState) -> dict[str, TokenizedSet]:
        """What a client's model is scored on: shared test rows, validation, local test."""
        data = {"test": self.test_sets[client.task.name], "val": client.val_set}
        if client.local_set is not None:
            data["local"] = client.local_set
        return data

    def _to_score(self, client: ClientState, split: SplitPlan | None
                  ) -> tuple[tuple[str, str], list[str]]:
        """The model's cache key and the data sets (test, val, local) whose scores are not known.

        Split: the model is the client's part and the server model ``split`` names; the key
        names that server model's version.
        """
        key = (client.task.name, _digest(client.adapter_state(), client.head_state())
               + ("" if split is None else f"/{split}"))
        names = [] if key in self._test_cache else ["test"]
        last = self._own_cache.get(client.client_id)
        if last is None or last[0] != key[1]:
            names += [n for n in self._score_sets(client) if n != "test"]
        return key, names

    def _scores_reply(self, client: ClientState, key: tuple[str, str],
                      results: dict[str, Scored | None], seconds: float) -> EvaluateReply:
        """Scores of the model ``key`` names: those just computed (``results``) and the known.

        ``global_*``: the task's shared test rows (what the model knows of the whole task);
        ``local_*``: the client's own local test (the personalised score); ``val_*``: its
        validation rows, the only ones choices are made on.
        """
        if "test" in results:  # clients holding one model share its scores
            scored = results["test"]
            self._test_cache[key] = None if scored is None else scored.metrics()
        if "val" in results:  # val and local are scored together, once per model
            own: dict[str, dict[str, float] | None] = {}
            for name in ("val", "local"):
                scored = results.get(name)
                parts = client.local_parts if name == "local" else ()
                own[name] = None if scored is None else scored.metrics(parts)
            self._own_cache[client.client_id] = (key[1], own)
        out: dict[str, float] = {}
        scores = {"global": self._test_cache[key], **self._own_cache[client.client_id][1]}
        for prefix in ("global", "local"):
            metrics = scores[prefix]
            if metrics is not None:
                out.update({f"{prefix}_{k}": v for k, v in metrics.items()})
        val = scores["val"]
        if val is not None:
            out["val_loss"], out["val_metric"] = val["loss"], val["metric"]
        if client.scored == key[1]:  # not trained or sent anything new since its last scores
            out["unchanged"] = 1.0  # (a resumed process recomputes them, to the same values)
        client.scored = key[1]
        return EvaluateReply(client.client_id, out, seconds)
