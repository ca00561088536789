"""The client's half of split learning: its blocks forward, the cut's gradient backward.

Per batch, vanilla SplitLoRA (Lin et al., arXiv:2407.00952)::

    client: embeddings + blocks 0..s-1 (its LoRA)  --activations, mask, labels-->  server
    server: blocks s..L-1 (its LoRA), head, loss, backward, server step
    client  <--gradient at the cut, loss--                                         server
    client: backward from the cut, client step

U-shape (``tail`` = t > 0): the server returns the hidden states after block L-t-1, the client runs
the last t blocks, the head and the loss, sends the gradient at that second cut and receives the
gradient at the first: four tensors per batch, and labels and logits never leave the client.

``link`` carries a message to the server and brings its answer back (the executor's channel,
counted by kind). Raw text and token ids never cross. The server and the client bind their own
adapters on the one shared backbone, so the client binds its adapter again before each of its
forwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from atlasfl.client.state import ClientState
from atlasfl.client.training import Scored, autocast, run_steps, score, task_loss
from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.messages import Activations, Gradients, Logits, SplitMessage, SplitPlan
from atlasfl.models.lora import AdapterBinder
from atlasfl.models.split import run_blocks, split_tensors

Link = Callable[[SplitMessage], SplitMessage]  # to the server and back
R = TypeVar("R", Activations, Gradients, Logits)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _expect(reply: SplitMessage, kind: type[R]) -> R:
    if not isinstance(reply, kind):  # internal: the server answered another message
        raise TypeError(f"split server answered {type(reply).__name__}, expected {kind.__name__}")
    return reply


def split_step(model: torch.nn.Module, binder: AdapterBinder, client: ClientState,
               plan: SplitPlan, link: Link, batch: dict[str, Tensor], *, num_layers: int,
               precision: str = "fp32") -> Tensor:
    """Forward and backward of one batch across the cut(s); returns the loss.

    Leaves the client's gradients in its adapter (and head, U-shape); the server has stepped.
    """
    device = batch["input_ids"].device
    dtype = DTYPES[plan.activation_dtype]
    mask = batch["attention_mask"]
    binder.bind(client.adapter)
    with autocast(device, precision):
        front = run_blocks(model, num_layers, 0, plan.cut, batch=batch)  # (B, T, H)
    labels = None if plan.u_shape else batch["labels"]
    reply = link(Activations(client.client_id, front.detach().to(dtype), mask, labels))
    if not plan.u_shape:
        grads = _expect(reply, Gradients)
        assert grads.loss is not None  # the vanilla server computes the loss
        _backward(front, grads.grad)
        return grads.loss.detach()
    back = _expect(reply, Activations)
    middle = back.hidden.to(device, torch.float32).requires_grad_()
    binder.bind(client.adapter)  # the server bound its adapter on the shared model
    with autocast(device, precision):
        hidden = run_blocks(model, num_layers, num_layers - plan.tail, num_layers,
                            hidden=middle, attention_mask=mask)
        logits = client.head(hidden, mask).float()
    loss = task_loss(logits, batch["labels"], client.task.is_regression)
    loss.backward()
    assert middle.grad is not None
    grads = _expect(link(Gradients(client.client_id, middle.grad.to(dtype))), Gradients)
    _backward(front, grads.grad)
    return loss.detach()


def _backward(front: Tensor, grad: Tensor) -> None:
    """Backward from the first cut (nothing to do when the client holds no trainable block)."""
    if front.requires_grad:
        front.backward(grad.to(front.device, front.dtype))


def train_split_client(model: torch.nn.Module, binder: AdapterBinder, client: ClientState,
                       cfg: TrainConfig, plan: SplitPlan, link: Link, *, num_layers: int,
                       epochs: int, steps: int = 0, generator: torch.Generator,
                       device: torch.device) -> dict[str, float]:
    """``train_client`` for a split client: the same batches, loop and record, across the cut.

    The client's optimizer steps its own modules (and head, U-shape); the server steps its own.
    """
    model.train()
    client.head.train()
    own, _ = split_tensors(client.adapter, num_layers, plan.cut, plan.tail)
    params = list(own.values())
    if plan.u_shape:
        params += list(client.head.parameters())

    def step(batch: dict[str, Tensor]) -> Tensor:
        return split_step(model, binder, client, plan, link, batch, num_layers=num_layers,
                          precision=cfg.precision)
    return run_steps(client, cfg, step, params, epochs=epochs, steps=steps, generator=generator,
                     device=device)


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, binder: AdapterBinder, client: ClientState,
                   data: TokenizedSet, plan: SplitPlan, link: Link, cfg: TrainConfig, *,
                   num_layers: int, device: torch.device) -> Scored | None:
    """``evaluate`` across the cut: the client scores what comes back (labels stay here)."""
    if len(data) == 0:
        return None
    model.eval()
    client.head.eval()
    dtype = DTYPES[plan.activation_dtype]

    def logits_of(batch: dict[str, Tensor]) -> Tensor:
        mask = batch["attention_mask"]
        binder.bind(client.adapter)
        with autocast(device, cfg.precision):
            front = run_blocks(model, num_layers, 0, plan.cut, batch=batch)
        reply = link(Activations(client.client_id, front.to(dtype), mask, evaluating=True))
        if not plan.u_shape:
            return _expect(reply, Logits).logits.to(device).float()
        back = _expect(reply, Activations)
        binder.bind(client.adapter)
        with autocast(device, cfg.precision):
            hidden = run_blocks(model, num_layers, num_layers - plan.tail, num_layers,
                                hidden=back.hidden.to(device, torch.float32),
                                attention_mask=mask)
            return client.head(hidden, mask).float()
    return score(logits_of, data, client.task, cfg, device=device)
