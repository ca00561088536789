"""Byte counts as people read them (MiB = 2^20 bytes; MB = 10^6 bytes, said where used)."""

from __future__ import annotations


def mib(num_bytes: float) -> str:
    """``1.5 GiB``-free memory sizes: whole MiB from 10 MiB, one decimal below, KiB under 1 MiB.

    A budget of 0.4 MiB must not print as "0 MiB" next to a need of 3 MiB.
    """
    value = num_bytes / 2**20
    if value >= 10:
        return f"{value:.0f} MiB"
    if value >= 1:
        return f"{value:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"
