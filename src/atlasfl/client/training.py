"""Local training and evaluation of one client (the whole model on the client)."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlasfl.client.state import ClientState
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.metrics import compute_metrics
from atlasfl.data.tasks import TaskSpec
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder


@functools.cache
def bf16_fast(device_type: str) -> bool:
    """Whether this machine runs bf16 matrix products faster than fp32.

    CUDA: when the card supports bf16. CPU: with AVX-512 bf16 or AMX tiles (on other CPUs bf16
    autocast is emulated and slower than fp32). Measured on an avx512_bf16 CPU: bf16 autocast
    gave 1.28x per training step (issue 15).
    """
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch.cpu
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision``: ``auto`` is bf16 where ``bf16_fast`` says so, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_fast(device.type) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast when ``train.precision`` resolves to bf16, else nothing.

    Only the forward runs under it: LoRA weights, gradients, optimizer state and aggregation
    stay fp32 (autocast casts weights per operation, never the stored tensors).
    """
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_logits(model: nn.Module, head: ClassificationHead, batch: dict[str, Tensor]) -> Tensor:
    """Logits of a batch through the shared backbone (as currently bound) and a head."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs).last_hidden_state  # (B, T, H)
    return head(hidden, batch["attention_mask"]).float()  # (B, num_labels)


def task_loss(logits: Tensor, labels: Tensor, regression: bool) -> Tensor:
    """Cross-entropy for classification, mean squared error for regression."""
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def proximal_term(params: Sequence[Tensor], anchor: Sequence[Tensor], mu: float) -> Tensor:
    """FedProx's penalty ``mu/2 sum ||w - w_anchor||^2`` over the trained tensors (fp32)."""
    total = torch.zeros((), device=anchor[0].device)
    for p, a in zip(params, anchor, strict=True):
        total = total + (p.float() - a).pow(2).sum()
    return mu / 2 * total


def train_client(model: nn.Module, binder: AdapterBinder, client: ClientState, cfg: TrainConfig,
                 *, epochs: int, steps: int = 0, generator: torch.Generator,
                 device: torch.device, proximal: float = 0.0) -> dict[str, float]:
    """Train ``epochs`` passes over the client's rows (or ``steps`` > 0 optimizer steps) in place.

    ``proximal`` > 0 adds FedProx's ``proximal_term`` toward the weights training started from
    (what the client received) to every batch's loss; the reported train loss is the task's.
    Returns the mean train loss, the optimizer steps, the examples seen and the seconds taken.
    """
    binder.bind(client.adapter)
    model.train()
    client.head.train()
    params = [*client.adapter.values(), *client.head.parameters()]
    anchor = [p.detach().float().clone() for p in params] if proximal else []

    def step(batch: dict[str, Tensor]) -> Tensor:
        with autocast(device, cfg.precision):
            logits = forward_logits(model, client.head, batch)
        loss = task_loss(logits, batch["labels"], client.task.is_regression)
        total = loss + proximal_term(params, anchor, proximal) if proximal else loss
        total.backward()
        return loss.detach()
    return run_steps(client, cfg, step, params, epochs=epochs, steps=steps, generator=generator,
                     device=device)


def round_batches(data: TokenizedSet, cfg: TrainConfig, *, epochs: int, steps: int,
                  generator: torch.Generator) -> list[np.ndarray]:
    """Row indices of every batch of a client's round, in order.

    ``epochs`` passes, or epochs drawn until ``steps`` > 0 batches (one permutation per epoch
    from ``generator``).
    """
    out: list[np.ndarray] = []
    if len(data) == 0:
        return out
    for _ in range(epochs if steps <= 0 else 10**9):
        out.extend(data.batch_indices(cfg.batch_size, generator=generator,
                                      bucket=cfg.length_bucket))
        if 0 < steps <= len(out):
            return out[:steps]
    return out


def run_steps(client: ClientState, cfg: TrainConfig, step: Callable[[dict[str, Tensor]], Tensor],
              params: list[nn.Parameter], *, epochs: int, steps: int,
              generator: torch.Generator, device: torch.device) -> dict[str, float]:
    """The local loop over the client's batches, for ``epochs`` passes or ``steps`` > 0 steps.

    Per batch: ``step`` (forward and backward, returns the loss), clipping of ``params``, an
    optimizer step. Returns what ``train_client`` returns.
    """
    start, losses, taken, seen = time.perf_counter(), [], 0, 0
    for idx in round_batches(client.train_set, cfg, epochs=epochs, steps=steps,
                             generator=generator):
        batch = {k: v.to(device) for k, v in
                 client.train_set.collate(idx, pad_multiple=cfg.pad_multiple).items()}
        client.optimizer.zero_grad(set_to_none=True)
        losses.append(step(batch))
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        client.optimizer.step()
        taken += 1
        seen += len(batch["labels"])
    train_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    return {"train_loss": train_loss, "steps": taken, "examples": seen,
            "train_seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class Scored:
    """One model's predictions on a data set, in row order, and its mean loss.

    Kept apart from the metrics so that one forward pass serves every client holding the same
    model on the shared test rows.
    """

    task: TaskSpec
    predictions: np.ndarray
    labels: np.ndarray
    loss: float

    def metrics(self, parts: Sequence[int] = ()) -> dict[str, float]:
        """The task's metrics and the mean loss over the rows.

        ``parts``: sizes of consecutive blocks of rows (the local tests of the clients a pooled
        client holds); each metric is then the mean of the blocks' metrics, as if each block's
        client were scored on its own.
        """
        bounds = np.cumsum([0, *parts]) if parts else np.array([0, len(self.labels)])
        if bounds[-1] != len(self.labels):  # internal: parts come from the same rows
            raise RuntimeError(f"parts {list(parts)} do not add up to {len(self.labels)} rows")
        blocks = [compute_metrics(self.task, self.predictions[a:b], self.labels[a:b])
                  for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        out = {k: float(np.mean([m[k] for m in blocks])) for k in blocks[0]}
        out["loss"] = self.loss
        return out


@torch.no_grad()
def evaluate(model: nn.Module, binder: AdapterBinder, adapter: dict[str, nn.Parameter],
             head: ClassificationHead, data: TokenizedSet, task: TaskSpec, cfg: TrainConfig, *,
             device: torch.device) -> Scored | None:
    """Predictions and loss of one adapter+head on ``data`` (dropout off); None if it is empty."""
    if len(data) == 0:
        return None
    binder.bind(adapter)
    model.eval()
    head.eval()

    def logits_of(batch: dict[str, Tensor]) -> Tensor:
        with autocast(device, cfg.precision):
            return forward_logits(model, head, batch)
    return score(logits_of, data, task, cfg, device=device)


def score(logits_of: Callable[[dict[str, Tensor]], Tensor], data: TokenizedSet, task: TaskSpec,
          cfg: TrainConfig, *, device: torch.device) -> Scored:
    """Predictions (row order) and mean loss of the logits ``logits_of`` gives ``data``."""
    tally = Tally(task, data)
    for batch in data.batches(cfg.eval_batch_size, pad_multiple=cfg.pad_multiple):
        batch = {k: v.to(device) for k, v in batch.items()}
        tally.add(batch["labels"], logits_of(batch))
    return tally.scored()


@dataclass
class Tally:
    """``score``'s running sums over a data set's length-sorted batches, in batch order."""

    task: TaskSpec
    data: TokenizedSet
    preds: list[Tensor] = field(default_factory=list)
    total: float = 0.0  # summed loss

    def add(self, labels: Tensor, logits: Tensor) -> None:
        """One batch's logits (its rows in the order ``batch_indices`` gives)."""
        self.total += float(task_loss(logits, labels, self.task.is_regression)) * len(logits)
        self.preds.append((logits.squeeze(-1) if self.task.is_regression
                           else logits.argmax(-1)).detach().cpu())

    def scored(self) -> Scored:
        """Predictions in row order (batches were length-sorted) and the mean loss."""
        order = self.data.length_order()
        predictions = np.empty(len(self.data),
                               dtype=np.float64 if self.task.is_regression else np.int64)
        predictions[order] = torch.cat(self.preds).float().numpy()
        return Scored(self.task, predictions, self.data.labels, self.total / len(self.data))
