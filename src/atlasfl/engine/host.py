"""What machine a run ran on, recorded in its summary.

Timings compare only on one machine: bf16's gain on the main job differed by host (README,
"Speed and memory"). So every summary names its CPU (and card), its cores and its torch threads.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: str) -> str | None:
    """The first ``model name`` in a Linux ``/proc/cpuinfo`` text; None if it has none."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_facts(device: torch.device) -> dict[str, Any]:
    """The CPU's name, the cores this process may use, torch's threads and, on CUDA, the card."""
    try:
        cpu = cpu_model(CPUINFO.read_text(errors="replace"))
    except OSError:  # not Linux
        cpu = None
    out: dict[str, Any] = {"cpu": cpu or platform.processor() or platform.machine(),
                           "cores": usable_cores(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out
