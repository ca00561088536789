"""Device profiles (Phase 2) and their seeded assignment to clients.

A profile is what a client reports about itself: the memory a training process may use, its
relative compute and its link. Clients get profiles independently of their task: drawn uniformly
at random from ``devices.profiles`` with a generator seeded by the run seed, or listed one per
client in ``devices.assignment`` — never cyclically by client index, which would tie device to
task when clients are numbered task by task.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from atlasfl.config import DevicesConfig
from atlasfl.errors import AtlasError, unknown_name

GIB = 2**30


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device."""

    name: str
    memory_bytes: int
    compute: float  # training throughput relative to laptop-8gb
    uplink_mbps: float
    downlink_mbps: float


BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    p.name: p for p in (
        DeviceProfile("cpu-2gb", 2 * GIB, 0.1, 5.0, 20.0),  # phone-class CPU
        DeviceProfile("tablet-4gb", 4 * GIB, 0.3, 10.0, 50.0),
        DeviceProfile("laptop-8gb", 8 * GIB, 1.0, 20.0, 100.0),
        DeviceProfile("gpu-16gb", 16 * GIB, 20.0, 100.0, 500.0),
    )
}


def known_profiles(cfg: DevicesConfig) -> dict[str, DeviceProfile]:
    """Built-in profiles plus the user-defined ones of ``devices.custom`` (which may override)."""
    out = dict(BUILTIN_PROFILES)
    for c in cfg.custom:
        out[c.name] = DeviceProfile(c.name, int(c.memory_gb * GIB), c.compute, c.uplink_mbps,
                                    c.downlink_mbps)
    return out


def assign_devices(client_ids: Sequence[int], cfg: DevicesConfig, *, seed: int
                   ) -> dict[int, DeviceProfile]:
    """Each client's device profile: the explicit list, or a seeded uniform draw."""
    profiles = known_profiles(cfg)
    if cfg.assignment:
        if len(cfg.assignment) != len(client_ids):
            raise AtlasError(f"devices.assignment lists {len(cfg.assignment)} profiles for "
                             f"{len(client_ids)} clients; allowed: exactly one per client")
        names = list(cfg.assignment)
    else:
        if not cfg.profiles:
            raise AtlasError("devices.profiles is empty; allowed: one or more profile names")
        rng = np.random.default_rng([seed, zlib.crc32(b"devices")])
        names = [cfg.profiles[i] for i in rng.integers(len(cfg.profiles), size=len(client_ids))]
    for name in names:
        if name not in profiles:
            raise unknown_name("device profile", name, profiles)
    return {cid: profiles[name] for cid, name in zip(sorted(client_ids), names, strict=True)}
