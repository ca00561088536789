"""The client's half of split learning: its blocks forward, the cut's gradient backward.

Per batch, vanilla SplitLoRA (Lin et al., arXiv:2407.00952)::

    client: embeddings + blocks 0..s-1 (its LoRA)  --activations, mask, labels-->  server
    server: blocks s..L-1 (its LoRA), head, loss, backward, server step
    client  <--gradient at the cut, loss--                                         server
    client: backward from the cut, client step

U-shape (``tail`` = t > 0): the server returns the hidden states after block L-t-1, the client runs
the last t blocks, the head and the loss, sends the gradient at that second cut and receives the
gradient at the first: four tensors per batch, and labels and logits never leave the client.

**Windows** (``split.window`` = K). The client sends the messages of K batches together and the
server answers them together: one message pair per window instead of per batch (two in U-shape).
Every forward of a window runs on the weights the client held when the window opened (a snapshot
of its own modules); the server steps once per batch as it answers, and the client, when the
gradients arrive, recomputes each batch's forward from the snapshot, backpropagates and steps once
per batch, in order. K = 1 is sequential split learning exactly; K > 1 computes each batch's
gradient at weights up to K - 1 steps old (bounded staleness) for K-fold fewer round trips. A
client that keeps its process keeps its graphs and skips the recomputation (same values); a fresh
process per message (Flower deployment) recomputes. Dropout masks come from a per-batch seed on
each side (``batch_seed``), so a recomputed forward draws the masks of the first, and the server's
masks do not depend on the process it runs in.

The client side of a split plan is a state machine over windows: ``begin`` gives the first
window's messages, ``answer`` takes the server's answers and gives the next messages (none when
the plan is done), ``export`` and ``load`` carry it between processes at a message boundary.
``drive`` runs one through a ``link`` (the in-process executor); the Flower ClientApp runs one
step per message. Raw text and token ids never cross. The server and the client bind their own
adapters on the one shared backbone, so the client binds its weights again before each forward.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn

from atlasfl.client.state import ClientState
from atlasfl.client.training import Scored, Tally, autocast, task_loss
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.errors import AtlasError
from atlasfl.messages import Activations, Gradients, Logits, SplitMessage, SplitPlan
from atlasfl.models.lora import AdapterBinder
from atlasfl.models.blocks import run_blocks, split_tensors

Link = Callable[[SplitMessage], SplitMessage]  # to the server and back
Batch = dict[str, Tensor]
R = TypeVar("R", Activations, Gradients, Logits)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def batch_seed(seed: int, index: int, side: str) -> int:
    """Seed of the dropout masks of batch ``index`` on one ``side`` (front, server, tail)."""
    return zlib.crc32(f"{seed}/{index}/{side}".encode())


def _expect(replies: Sequence[SplitMessage], kind: type[R], count: int) -> list[R]:
    if len(replies) != count:
        raise AtlasError(f"split: the server answered {len(replies)} messages of a window of "
                         f"{count}")
    for reply in replies:
        if not isinstance(reply, kind):
            raise AtlasError(f"split: the server answered {type(reply).__name__}, expected "
                             f"{kind.__name__}")
    return list(replies)  # type: ignore[arg-type]


class SplitSession(Protocol):
    """The client side of one split plan, as windows of messages."""

    def begin(self) -> list[SplitMessage]:
        """The first window's messages to the server (none: nothing to do)."""
        ...

    def answer(self, replies: Sequence[SplitMessage]) -> list[SplitMessage]:
        """Take the server's answers to the last messages; the next ones (none: done)."""
        ...

    def export(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Where the session stands, to ``load`` in another process."""
        ...

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Continue from ``export``."""
        ...


def drive(session: SplitSession, link: Link) -> None:
    """Run a session to its end, each message through ``link`` in order."""
    requests = session.begin()
    while requests:
        requests = session.answer([link(message) for message in requests])


class _Windows:
    """What both sessions share: the shared backbone, the plan and the window position."""

    def __init__(self, model: nn.Module, binder: AdapterBinder, client: ClientState,
                 cfg: TrainConfig, plan: SplitPlan, *, num_layers: int, device: torch.device,
                 count: int):
        self.model, self.binder, self.client, self.cfg, self.plan = (model, binder, client,
                                                                     cfg, plan)
        self.num_layers, self.device, self.count = num_layers, device, count
        self.dtype = DTYPES[plan.activation_dtype]
        self.window = max(int(plan.window), 1)
        self.start = 0  # first batch of the open window
        self.stage = "idle"
        self.seconds = 0.0  # the client's own compute, over all its messages

    def indices(self) -> range:
        return range(self.start, min(self.start + self.window, self.count))

    def _tail(self, middle: Tensor, mask: Tensor, weights: dict[str, nn.Parameter]) -> Tensor:
        """U-shape: the last ``tail`` blocks and the head, from the server's hidden states."""
        L = self.num_layers
        self.binder.bind(weights)  # the server bound its adapter on the shared model
        with autocast(self.device, self.cfg.precision):
            hidden = run_blocks(self.model, L, L - self.plan.tail, L, hidden=middle,
                                attention_mask=mask)
            return self.client.head(hidden, mask).float()


class SplitTraining(_Windows):
    """A split client's local training: ``train_client`` across the cut, as windows.

    ``batch_of(i)`` gives batch ``i`` of the round (``count`` batches, on the device). The
    client's optimizer steps its own modules (and head, U-shape); the server steps its own.
    """

    def __init__(self, model: nn.Module, binder: AdapterBinder, client: ClientState,
                 cfg: TrainConfig, plan: SplitPlan, *, num_layers: int, device: torch.device,
                 batch_of: Callable[[int], Batch], count: int, seed: int):
        super().__init__(model, binder, client, cfg, plan, num_layers=num_layers,
                         device=device, count=count)
        self.batch_of, self.seed = batch_of, seed
        own, _ = split_tensors(client.adapter, num_layers, plan.cut, plan.tail)
        self.own: dict[str, nn.Parameter] = dict(own)
        self.head_params = dict(client.head.named_parameters()) if plan.u_shape else {}
        self.params = [*self.own.values(), *self.head_params.values()]
        self.losses: list[float] = []
        self.steps = self.examples = 0
        self.snapshot: dict[str, nn.Parameter] = {}  # own modules as the window opened
        self.fronts: dict[int, Tensor] = {}  # graphs of this process (absent after ``load``)
        self.tail_grads: dict[int, dict[str, Tensor]] = {}  # U-shape: per batch, until stepped

    # -- the protocol ----------------------------------------------------------------------

    def begin(self) -> list[SplitMessage]:  # noqa: D102
        return self._timed(self._open)

    def answer(self, replies: Sequence[SplitMessage]) -> list[SplitMessage]:  # noqa: D102
        def act() -> list[SplitMessage]:
            n = len(self.indices())
            if self.stage == "front" and self.plan.u_shape:
                return self._tails(_expect(replies, Activations, n))
            if self.stage in ("front", "tail"):
                self._steps(_expect(replies, Gradients, n))
                self.start += n
                return self._open()
            raise AtlasError(f"split: the client got answers while {self.stage}")
        return self._timed(act)

    def metrics(self) -> dict[str, float]:
        """What ``train_client`` returns (seconds: the client's own compute)."""
        loss = (float(torch.tensor(self.losses, dtype=torch.float32).mean()) if self.losses
                else float("nan"))
        return {"train_loss": loss, "steps": self.steps, "examples": self.examples,
                "train_seconds": self.seconds}

    def export(self) -> tuple[dict[str, Tensor], dict[str, Any]]:  # noqa: D102
        tensors = {f"snapshot/{k}": p.detach() for k, p in self.snapshot.items()}
        for i, grads in self.tail_grads.items():
            tensors.update({f"tail/{i}/{k}": g for k, g in grads.items()})
        return tensors, {"start": self.start, "stage": self.stage, "losses": self.losses,
                         "steps": self.steps, "examples": self.examples,
                         "seconds": self.seconds}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:  # noqa: D102
        self.start, self.stage = int(meta["start"]), str(meta["stage"])
        self.losses = [float(v) for v in meta["losses"]]
        self.steps, self.examples = int(meta["steps"]), int(meta["examples"])
        self.seconds = float(meta["seconds"])
        self.snapshot = {k.removeprefix("snapshot/"): nn.Parameter(v.clone().to(self.device))
                         for k, v in tensors.items() if k.startswith("snapshot/")}
        self.fronts, self.tail_grads = {}, {}
        for key, value in tensors.items():
            if key.startswith("tail/"):
                _, i, name = key.split("/", 2)
                self.tail_grads.setdefault(int(i), {})[name] = value.to(self.device)

    # -- the steps -------------------------------------------------------------------------

    def _timed(self, act: Callable[[], list[SplitMessage]]) -> list[SplitMessage]:
        t0 = time.perf_counter()
        self.model.train()
        self.client.head.train()
        try:
            return act()
        finally:
            self.seconds += time.perf_counter() - t0

    def _weights(self) -> dict[str, nn.Parameter]:
        return {**self.client.adapter, **self.snapshot}

    def _front(self, i: int, batch: Batch) -> Tensor:
        self.binder.bind(self._weights())
        torch.manual_seed(batch_seed(self.seed, i, "front"))
        with autocast(self.device, self.cfg.precision):
            return run_blocks(self.model, self.num_layers, 0, self.plan.cut, batch=batch)

    def _open(self) -> list[SplitMessage]:
        """Open the next window: the snapshot, and its batches' hidden states at the cut."""
        if self.start >= self.count:
            self.stage, self.snapshot = "done", {}
            return []
        self.snapshot = {k: nn.Parameter(p.detach().clone()) for k, p in self.own.items()}
        out: list[SplitMessage] = []
        for i in self.indices():
            batch = self.batch_of(i)
            front = self.fronts[i] = self._front(i, batch)
            labels = None if self.plan.u_shape else batch["labels"]
            out.append(Activations(self.client.client_id, front.detach().to(self.dtype),
                                   batch["attention_mask"], labels))
        self.stage = "front"
        return out

    def _tails(self, middles: list[Activations]) -> list[SplitMessage]:
        """U-shape: tail, head and loss of each batch; the gradients at the second cut."""
        out: list[SplitMessage] = []
        weights = self._weights()
        for i, reply in zip(self.indices(), middles, strict=True):
            batch = self.batch_of(i)
            middle = reply.hidden.to(self.device, torch.float32).requires_grad_()
            for p in [*self.snapshot.values(), *self.head_params.values()]:
                p.grad = None
            torch.manual_seed(batch_seed(self.seed, i, "tail"))
            logits = self._tail(middle, batch["attention_mask"], weights)
            loss = task_loss(logits, batch["labels"], self.client.task.is_regression)
            loss.backward()
            grads = {k: p.grad for k, p in self.snapshot.items() if p.grad is not None}
            grads.update({f"head.{k}": p.grad for k, p in self.head_params.items()
                          if p.grad is not None})
            self.tail_grads[i] = grads
            self.losses.append(float(loss.detach()))
            assert middle.grad is not None
            out.append(Gradients(self.client.client_id, middle.grad.to(self.dtype)))
        for p in self.head_params.values():
            p.grad = None
        self.stage = "tail"
        return out

    def _steps(self, grads: list[Gradients]) -> None:
        """Backward from the first cut and one optimizer step per batch of the window."""
        for i, reply in zip(self.indices(), grads, strict=True):
            front = self.fronts.pop(i, None)
            for p in self.snapshot.values():
                p.grad = None
            if front is None:  # a fresh process: the same forward again, from the snapshot
                front = self._front(i, self.batch_of(i))
            if front.requires_grad:  # nothing to do when the client holds no trainable block
                front.backward(reply.grad.to(front.device, front.dtype))
            found = {k: p.grad for k, p in self.snapshot.items() if p.grad is not None}
            found.update(self.tail_grads.pop(i, {}))
            self.client.optimizer.zero_grad(set_to_none=True)
            for key, grad in found.items():
                target = (self.head_params[key.removeprefix("head.")] if key.startswith("head.")
                          else self.own[key])
                target.grad = grad.clone()
            if not self.plan.u_shape:
                assert reply.loss is not None  # the vanilla server computes the loss
                self.losses.append(float(reply.loss))
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
            self.client.optimizer.step()
            self.steps += 1
            self.examples += int(reply.grad.shape[0])
        for p in self.snapshot.values():
            p.grad = None


class SplitScoring(_Windows):
    """``evaluate`` across the cut, for several data sets: the client scores what comes back.

    Labels stay on the client; ``results`` gives one ``Scored`` (or None: empty) per data set,
    in the order of ``data`` (by name); ``key`` names the model scored (the runtime's caches).
    """

    def __init__(self, model: nn.Module, binder: AdapterBinder, client: ClientState,
                 cfg: TrainConfig, plan: SplitPlan, data: dict[str, TokenizedSet],
                 key: tuple[str, str], *, num_layers: int, device: torch.device):
        self.names, self.key = list(data), key
        self.data = list(data.values())
        self.items = [(s, idx) for s, d in enumerate(self.data)
                      for idx in d.batch_indices(cfg.eval_batch_size)]
        super().__init__(model, binder, client, cfg, plan, num_layers=num_layers, device=device,
                         count=len(self.items))
        self.tallies = [Tally(client.task, d) for d in self.data]

    def _batch(self, i: int) -> Batch:
        s, idx = self.items[i]
        return {k: v.to(self.device) for k, v in
                self.data[s].collate(idx, pad_multiple=self.cfg.pad_multiple).items()}

    @torch.no_grad()
    def begin(self) -> list[SplitMessage]:  # noqa: D102
        return self._open()

    @torch.no_grad()
    def answer(self, replies: Sequence[SplitMessage]) -> list[SplitMessage]:  # noqa: D102
        if self.stage != "front":
            raise AtlasError(f"split: the client got answers while {self.stage}")
        t0 = time.perf_counter()
        self.model.eval()
        self.client.head.eval()
        n = len(self.indices())
        checked: list[Activations] | list[Logits] = (
            _expect(replies, Activations, n) if self.plan.u_shape else _expect(replies, Logits, n))
        for i, reply in zip(self.indices(), checked, strict=True):
            batch = self._batch(i)
            mask = batch["attention_mask"]
            if isinstance(reply, Logits):
                logits = reply.logits.to(self.device).float()
            else:
                assert isinstance(reply, Activations)
                logits = self._tail(reply.hidden.to(self.device, torch.float32), mask,
                                    self.client.adapter)
            self.tallies[self.items[i][0]].add(batch["labels"], logits)
        self.start += n
        self.seconds += time.perf_counter() - t0
        return self._open()

    def _open(self) -> list[SplitMessage]:
        if self.start >= self.count:
            self.stage = "done"
            return []
        t0 = time.perf_counter()
        self.model.eval()
        self.client.head.eval()
        out: list[SplitMessage] = []
        for i in self.indices():
            batch = self._batch(i)
            self.binder.bind(self.client.adapter)
            with autocast(self.device, self.cfg.precision):
                front = run_blocks(self.model, self.num_layers, 0, self.plan.cut, batch=batch)
            out.append(Activations(self.client.client_id, front.to(self.dtype),
                                   batch["attention_mask"], evaluating=True))
        self.stage = "front"
        self.seconds += time.perf_counter() - t0
        return out

    def results(self) -> list[Scored | None]:
        """One result per data set, in the order given (None: the set is empty)."""
        if self.stage != "done":  # internal: a caller asked before the last answer
            raise RuntimeError("split scoring is not done")
        return [t.scored() if len(t.data) else None for t in self.tallies]

    def export(self) -> tuple[dict[str, Tensor], dict[str, Any]]:  # noqa: D102
        tensors = {f"preds/{s}/{j}": p for s, t in enumerate(self.tallies)
                   for j, p in enumerate(t.preds)}
        return tensors, {"start": self.start, "stage": self.stage, "seconds": self.seconds,
                         "names": self.names, "key": list(self.key),
                         "totals": [t.total for t in self.tallies],
                         "batches": [len(t.preds) for t in self.tallies]}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:  # noqa: D102
        self.start, self.stage = int(meta["start"]), str(meta["stage"])
        self.seconds = float(meta["seconds"])
        for s, tally in enumerate(self.tallies):
            tally.total = float(meta["totals"][s])
            tally.preds = [tensors[f"preds/{s}/{j}"] for j in range(int(meta["batches"][s]))]
