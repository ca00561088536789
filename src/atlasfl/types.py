"""Shared type aliases."""

from __future__ import annotations

from typing import TypeAlias

from torch import Tensor

ClientId: TypeAlias = int
TaskId: TypeAlias = str
AdapterState: TypeAlias = dict[str, Tensor]  # tensor name -> tensor (adapter or head)
Metrics: TypeAlias = dict[str, float]
