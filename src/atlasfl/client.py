"""One client: its own adapter, head and optimizer over the shared backbone.

Local training and evaluation of one client, plain (the whole model on the client).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.metrics import compute_metrics
from atlasfl.data.tasks import TaskSpec
from atlasfl.errors import AtlasError
from atlasfl.models.head import ClassificationHead
from atlasfl.models.lora import AdapterBinder
from atlasfl.types import AdapterState

HEAD_PREFIX = "head."


@dataclass
class ClientState:
    """Everything one client owns: adapter tensors, head, optimizer (persists across rounds)."""

    client_id: int
    task: TaskSpec
    adapter: dict[str, nn.Parameter]
    head: ClassificationHead
    optimizer: torch.optim.Optimizer
    train_set: TokenizedSet
    val_set: TokenizedSet

    @property
    def num_examples(self) -> int:
        """Training rows (the aggregation weight)."""
        return len(self.train_set)

    def state(self) -> AdapterState:
        """Adapter and head tensors, as they would be uploaded (names prefixed for the head)."""
        out = {k: p.detach() for k, p in self.adapter.items()}
        out.update({HEAD_PREFIX + k: v.detach() for k, v in self.head.state_dict().items()})
        return out

    def load(self, state: AdapterState) -> None:
        """Write tensors into this client's adapter/head in place (optimizer state is kept)."""
        head = dict(self.head.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith(HEAD_PREFIX):
                    target = head.get(key[len(HEAD_PREFIX):])
                else:
                    target = self.adapter.get(key)
                if target is None or target.shape != value.shape:
                    raise AtlasError(f"client {self.client_id}: received tensor {key!r} of shape "
                                     f"{tuple(value.shape)} that does not fit its model")
                target.copy_(value)

    def replace_adapter(self, tensors: dict[str, Tensor]) -> None:
        """Give this client a new adapter of other shapes (new ranks), with fresh AdamW moments.

        The head and its optimizer state are kept; learning rates are taken from the optimizer.
        """
        if set(tensors) != set(self.adapter):
            raise AtlasError(f"client {self.client_id}: new adapter names "
                             f"{sorted(set(tensors) ^ set(self.adapter))[:3]} do not match")
        device = next(iter(self.adapter.values())).device
        self.adapter = {k: nn.Parameter(tensors[k].detach().clone().to(device))
                        for k in self.adapter}
        old = self.optimizer
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": params}
                  for g, params in zip(old.param_groups,
                                       [list(self.adapter.values()), list(self.head.parameters())],
                                       strict=True)]
        self.optimizer = type(old)(groups)
        for p in self.head.parameters():
            if p in old.state:
                self.optimizer.state[p] = old.state[p]

    def ranks(self) -> dict[str, int]:
        """Rank of every module of this client's adapter."""
        return {k.removesuffix(".lora_A.weight"): int(v.shape[0])
                for k, v in self.adapter.items() if k.endswith(".lora_A.weight")}

    def checkpoint(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything this client carries across rounds: adapter, head and optimizer state."""
        tensors = {f"adapter/{k}": p.detach() for k, p in self.adapter.items()}
        tensors.update({f"head/{k}": v.detach() for k, v in self.head.state_dict().items()})
        opt = self.optimizer.state_dict()
        state_meta: dict[str, dict[str, Any]] = {}
        for pid, entry in opt["state"].items():
            state_meta[str(pid)] = {}
            for name, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"opt/{pid}/{name}"] = value
                    state_meta[str(pid)][name] = None  # None: the value is in the tensors
                else:
                    state_meta[str(pid)][name] = value
        return tensors, {"param_groups": opt["param_groups"], "state": state_meta}

    def restore(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Inverse of ``checkpoint``: the client continues exactly where it was saved."""
        saved = {k: tensors[f"adapter/{k}"] for k in self.adapter}
        if any(v.shape != self.adapter[k].shape for k, v in saved.items()):
            self.replace_adapter(saved)  # it was saved after receiving its own ranks (Phase 2)
        with torch.no_grad():
            for key, param in self.adapter.items():
                param.copy_(tensors[f"adapter/{key}"])
        self.head.load_state_dict({k[len("head/"):]: v for k, v in tensors.items()
                                   if k.startswith("head/")})
        state = {int(pid): {name: tensors[f"opt/{pid}/{name}"] if value is None else value
                            for name, value in entry.items()}
                 for pid, entry in meta["state"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def make_client(client_id: int, task: TaskSpec, adapter_init: dict[str, Tensor],
                head: ClassificationHead, train_set: TokenizedSet, val_set: TokenizedSet,
                cfg: TrainConfig, device: torch.device) -> ClientState:
    """A client starting from the shared seeded initialisation, with a fresh AdamW."""
    adapter = {k: nn.Parameter(v.detach().clone().to(device)) for k, v in adapter_init.items()}
    head = head.to(device)
    groups = [{"params": list(adapter.values()), "lr": cfg.lr},
              {"params": list(head.parameters()), "lr": cfg.head_lr or cfg.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return ClientState(client_id, task, adapter, head, optimizer, train_set, val_set)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
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


def train_client(model: nn.Module, binder: AdapterBinder, client: ClientState, cfg: TrainConfig,
                 *, generator: torch.Generator, device: torch.device) -> dict[str, float]:
    """Run one round of local training in place; returns train loss, steps, seconds."""
    binder.bind(client.adapter)
    model.train()
    client.head.train()
    params = [*client.adapter.values(), *client.head.parameters()]
    start, losses, steps, seen = time.perf_counter(), [], 0, 0
    target_steps = cfg.local_steps or None
    epochs = cfg.local_epochs if target_steps is None else 10**9
    for _ in range(epochs):
        for batch in client.train_set.batches(cfg.batch_size, generator=generator):
            batch = {k: v.to(device) for k, v in batch.items()}
            with _autocast(device, cfg.precision):
                logits = forward_logits(model, client.head, batch)
            loss = task_loss(logits, batch["labels"], client.task.is_regression)
            client.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            client.optimizer.step()
            losses.append(loss.detach())
            steps += 1
            seen += len(batch["labels"])
            if target_steps is not None and steps >= target_steps:
                break
        if target_steps is not None and steps >= target_steps:
            break
    train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    return {"train_loss": train_loss, "steps": steps, "examples": seen,
            "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate(model: nn.Module, binder: AdapterBinder, adapter: dict[str, nn.Parameter],
             head: ClassificationHead, data: TokenizedSet, task: TaskSpec, cfg: TrainConfig, *,
             device: torch.device) -> dict[str, float]:
    """Loss and task metrics of one adapter+head on ``data`` (dropout off)."""
    if len(data) == 0:
        return {}
    binder.bind(adapter)
    model.eval()
    head.eval()
    preds, total = [], 0.0
    for batch in data.batches(cfg.eval_batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(device, cfg.precision):
            logits = forward_logits(model, head, batch)
        total += float(task_loss(logits, batch["labels"], task.is_regression)) * len(logits)
        preds.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
    # batches were length-sorted: put predictions back in row order before scoring
    order = data.length_order()
    predictions = np.empty(len(data), dtype=np.float64 if task.is_regression else np.int64)
    predictions[order] = torch.cat(preds).float().cpu().numpy()
    out = compute_metrics(task, predictions, data.labels)
    out["loss"] = total / len(data)
    return out
