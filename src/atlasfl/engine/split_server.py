"""The server's half of split learning: one server-side model per group, trained per batch.

Each aggregation group (``ranks.grouping``: all clients, a true task or a found cluster) has one
``ServerModel``: LoRA factors for every module (the server trains those past each client's cut,
so clients with different cuts share it), in vanilla mode a head per number of outputs, and the
AdamW moments of both. It is part of the strategy's server state (so checkpoints carry it and
resume is exact) and starts from the common seeded initialisation.

During an exchange, ``SplitServer`` holds the group models as trainable tensors and answers the
clients' per-batch messages in the order they arrive: the executor runs clients one after another
in plan order, each client's batches in its own order, and every batch of a group's clients steps
the group's server model once (sequential server training, as in SplitLoRA and SplitFed-V2).
A window of K batches (``split.window``) is answered message by message in the same way; in
U-shape the K forwards of a window come before their gradients, so each forward runs on a copy of
the weights it saw and its gradient is applied to the live weights when it arrives. The dropout
masks of a client's batch come from its seed (``open``) and the batch's number.
``snapshot`` gives the models back to the strategy, which merges them with the clients' uploads
at the end of the round (``atlasfl.strategies.split_learning``).
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from atlasfl.client.split_training import DTYPES, batch_seed
from atlasfl.client.training import autocast, task_loss
from atlasfl.config import TrainConfig
from atlasfl.errors import AtlasError
from atlasfl.messages import Activations, Gradients, Logits, SplitMessage, SplitPlan
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder
from atlasfl.models.blocks import run_blocks
from atlasfl.strategies.state import ServerModel
from atlasfl.types import AdapterState, ClientId

MOMENTS = ("exp_avg", "exp_avg_sq", "step")


@dataclass
class _Part:
    """A ServerModel as trainable tensors with its optimizers, for the length of an exchange."""

    adapter: dict[str, nn.Parameter]
    heads: dict[str, ClassificationHead]
    optimizers: dict[str, torch.optim.AdamW]  # "adapter", "head/<outputs>"
    used: bool = False


class SplitServer:
    """Answers split clients' activations and gradients with the group models of a state."""

    def __init__(self, model: nn.Module, binder: AdapterBinder, *, num_layers: int,
                 train: TrainConfig, initial_adapter: AdapterState,
                 initial_heads: dict[int, ClassificationHead], device: torch.device,
                 models: dict[str, ServerModel]):
        self.model, self.binder, self.num_layers, self.train = model, binder, num_layers, train
        self.initial_adapter, self.initial_heads = initial_adapter, initial_heads
        self.device, self.models = device, models
        self.parts: dict[str, _Part] = {}
        self.sessions: dict[ClientId, SplitPlan] = {}
        self.seeds: dict[ClientId, int] = {}
        self.batches: dict[ClientId, int] = {}  # training batches answered in the session
        # U-shape, per client, oldest first: (input, output, the weights the forward ran on)
        self.pending: dict[ClientId, deque[tuple[Tensor, Tensor, dict[str, nn.Parameter]]]] = {}

    def open(self, client_id: ClientId, plan: SplitPlan, seed: int = 0) -> None:
        """A client is about to train or evaluate with ``plan`` (the server issued it).

        ``seed``: the client's seed of the round (``atlasfl.client.runtime.client_seed``).
        """
        self.sessions[client_id], self.seeds[client_id] = plan, seed
        self.batches[client_id] = 0
        self.pending[client_id] = deque()

    # -- the group models as tensors --------------------------------------------------------

    def _part(self, name: str) -> _Part:
        if name not in self.parts:
            saved = self.models.get(name, ServerModel())
            tensors = saved.adapter or self.initial_adapter
            adapter = {k: nn.Parameter(v.detach().clone().to(self.device))
                       for k, v in tensors.items()}
            opt = torch.optim.AdamW(list(adapter.values()), lr=self.train.lr,
                                    weight_decay=self.train.weight_decay)
            part = _Part(adapter, {}, {"adapter": opt})
            _load_moments(opt, adapter, saved.moments, "adapter")
            for outputs in saved.heads:
                self._head(part, name, int(outputs))
            self.parts[name] = part
        return self.parts[name]

    def _head(self, part: _Part, name: str, outputs: int) -> ClassificationHead:
        key = str(outputs)
        if key not in part.heads:
            head = copy.deepcopy(self.initial_heads[outputs]).to(self.device)
            saved = self.models.get(name, ServerModel()).heads.get(key)
            if saved is not None:
                head.load_state_dict(saved)
            params = dict(head.named_parameters())
            opt = torch.optim.AdamW(list(params.values()), lr=self.train.head_lr or self.train.lr,
                                    weight_decay=self.train.weight_decay)
            _load_moments(opt, params, self.models.get(name, ServerModel()).moments,
                          f"head/{key}")
            part.heads[key], part.optimizers[f"head/{key}"] = head, opt
        return part.heads[key]

    def snapshot(self) -> dict[str, ServerModel]:
        """The group models now (those no client used are returned as they came)."""
        out = dict(self.models)
        for name, part in self.parts.items():
            if not part.used:
                continue
            moments = _save_moments(part.optimizers["adapter"], part.adapter, "adapter")
            heads = {}
            for key, head in part.heads.items():
                heads[key] = {k: v.detach().clone() for k, v in head.state_dict().items()}
                moments.update(_save_moments(part.optimizers[f"head/{key}"],
                                             dict(head.named_parameters()), f"head/{key}"))
            out[name] = ServerModel({k: p.detach().clone() for k, p in part.adapter.items()},
                                    heads, moments)
        return out

    # -- the protocol -----------------------------------------------------------------------

    def abandon(self, client_id: ClientId) -> None:
        """A client vanished mid-training: drop its half-done batches (U-shape's forwards)."""
        self.pending.pop(client_id, None)

    def handle(self, client_id: ClientId, message: SplitMessage) -> SplitMessage:
        """Answer one message of a client's batch."""
        plan = self.sessions[client_id]
        part = self._part(plan.server_model)
        dtype = DTYPES[plan.activation_dtype]
        if isinstance(message, Gradients):  # U-shape: the gradient at the second cut
            return self._backward(client_id, part, message, dtype)
        if not isinstance(message, Activations):  # internal: a client sent a server message
            raise TypeError(f"split server got {type(message).__name__}")
        training = not message.evaluating
        self.model.train(training)
        weights = part.adapter
        if training:
            torch.manual_seed(batch_seed(self.seeds[client_id], self.batches[client_id],
                                         "server"))
            self.batches[client_id] += 1
            if plan.u_shape:  # its gradient comes after the window's other forwards
                weights = {k: nn.Parameter(p.detach().clone()) for k, p in weights.items()}
        self.binder.bind(weights)
        mask = message.attention_mask
        if mask is None:  # a client must send the mask with the first cut
            raise AtlasError(f"client {client_id}: activations without an attention mask")
        if plan.u_shape and training and len(self.pending[client_id]) >= plan.window:
            raise AtlasError(f"client {client_id}: more than split.window = {plan.window} "
                             f"batches' activations before their gradients")
        hidden = message.hidden.to(self.device, torch.float32).requires_grad_(training)
        stop = self.num_layers - plan.tail
        with torch.set_grad_enabled(training), autocast(self.device, self.train.precision):
            out = run_blocks(self.model, self.num_layers, plan.cut, stop, hidden=hidden,
                             attention_mask=mask.to(self.device))
            if plan.u_shape:
                if training:
                    self.pending[client_id].append((hidden, out, weights))
                return Activations(client_id, out.detach().to(dtype),
                                   evaluating=message.evaluating)
            head = self._head(part, plan.server_model, plan.outputs)
            head.train(training)
            logits = head(out, mask.to(self.device)).float()
        if not training:
            return Logits(client_id, logits.detach())
        if message.labels is None:
            raise AtlasError(f"client {client_id}: vanilla split training needs the labels")
        loss = task_loss(logits, message.labels.to(self.device), plan.outputs == 1)
        self._zero(part)
        loss.backward()
        self._step(part, [f"head/{plan.outputs}"])
        assert hidden.grad is not None
        return Gradients(client_id, hidden.grad.to(dtype), loss.detach().reshape(()))

    def _backward(self, client_id: ClientId, part: _Part, message: Gradients,
                  dtype: torch.dtype) -> Gradients:
        if not self.pending.get(client_id):
            raise AtlasError(f"client {client_id}: a gradient without activations before it")
        hidden, out, weights = self.pending[client_id].popleft()
        self._zero(part)
        out.float().backward(message.grad.to(self.device, out.dtype))
        for key, param in part.adapter.items():  # the copy's gradient, onto the live weights
            param.grad = weights[key].grad
        self._step(part, [])
        assert hidden.grad is not None
        return Gradients(client_id, hidden.grad.to(dtype))

    def _zero(self, part: _Part) -> None:
        for opt in part.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def _step(self, part: _Part, heads: list[str]) -> None:
        names = ["adapter", *heads]
        if self.train.max_grad_norm > 0:
            params = [p for n in names for g in part.optimizers[n].param_groups
                      for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.train.max_grad_norm)
        for n in names:
            part.optimizers[n].step()
        part.used = True


def _save_moments(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter], prefix: str
                  ) -> dict[str, Tensor]:
    out = {}
    for name, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            out[f"{prefix}/{name}/{key}"] = value.detach().clone()
    return out


def _load_moments(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter],
                  moments: dict[str, Tensor], prefix: str) -> None:
    for name, p in params.items():
        state = {key: moments[f"{prefix}/{name}/{key}"].clone() for key in MOMENTS
                 if f"{prefix}/{name}/{key}" in moments}
        if state:
            opt.state[p] = state
