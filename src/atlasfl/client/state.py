"""One client's own state: its adapter, head and optimizer over the shared backbone, its data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from atlasfl.config import TrainConfig
from atlasfl.data.batching import TokenizedSet
from atlasfl.data.tasks import TaskSpec
from atlasfl.errors import AtlasError
from atlasfl.models.head import ClassificationHead
from atlasfl.types import AdapterState


@dataclass
class ClientState:
    """Everything one client owns: adapter tensors, head, optimizer (persists across rounds)."""

    client_id: int
    task: TaskSpec
    adapter: dict[str, nn.Parameter]
    head: ClassificationHead
    optimizer: torch.optim.AdamW
    train_set: TokenizedSet
    val_set: TokenizedSet
    # its local test: held-out rows drawn like its own (``data.test_fraction``); None: none
    local_set: TokenizedSet | None = None
    # a pooled client (``centralized``) holds the local tests of the clients it pools, one after
    # another: their sizes, so each is scored on its own (empty: one client's)
    local_parts: tuple[int, ...] = ()
    scored: str = ""  # digest of the model it was last evaluated with ("": never)

    @property
    def num_examples(self) -> int:
        """Training rows (the aggregation weight)."""
        return len(self.train_set)

    def adapter_state(self) -> AdapterState:
        """The adapter's tensors (``<module>.lora_A.weight`` ...), as they would be uploaded."""
        return {k: p.detach() for k, p in self.adapter.items()}

    def head_state(self) -> AdapterState:
        """The head's tensors (``out.weight``, ``out.bias``)."""
        return {k: v.detach() for k, v in self.head.state_dict().items()}

    def load_adapter(self, tensors: AdapterState) -> None:
        """Write received adapter tensors in place (optimizer state is kept)."""
        _copy_into(self.client_id, self.adapter, tensors, "adapter")

    def load_head(self, tensors: AdapterState) -> None:
        """Write received head tensors in place (optimizer state is kept)."""
        _copy_into(self.client_id, dict(self.head.named_parameters()), tensors, "head")

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
        return tensors, {"param_groups": opt["param_groups"], "state": state_meta,
                         "scored": self.scored}

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
        self.scored = meta.get("scored", "")


def _copy_into(client_id: int, targets: Mapping[str, Tensor], tensors: AdapterState,
               what: str) -> None:
    with torch.no_grad():
        for key, value in tensors.items():
            target = targets.get(key)
            if target is None or target.shape != value.shape:
                raise AtlasError(f"client {client_id}: received {what} tensor {key!r} of shape "
                                 f"{tuple(value.shape)} that does not fit its model")
            target.copy_(value)


def make_client(client_id: int, task: TaskSpec, adapter_init: dict[str, Tensor],
                head: ClassificationHead, train_set: TokenizedSet, val_set: TokenizedSet,
                cfg: TrainConfig, device: torch.device, *, local_set: TokenizedSet | None = None,
                local_parts: tuple[int, ...] = ()) -> ClientState:
    """A client starting from the shared seeded initialisation, with a fresh AdamW."""
    adapter = {k: nn.Parameter(v.detach().clone().to(device)) for k, v in adapter_init.items()}
    head = head.to(device)
    groups = [{"params": list(adapter.values()), "lr": cfg.lr},
              {"params": list(head.parameters()), "lr": cfg.head_lr or cfg.lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    return ClientState(client_id, task, adapter, head, optimizer, train_set, val_set, local_set,
                       local_parts)
