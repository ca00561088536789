"""The C heap under many clients: glibc's mmap threshold (``train.mmap_threshold_kb``).

Activations of varying shapes (every batch pads to its own length) fragment glibc's heap: freed
blocks of one shape seldom fit the next, so the heap keeps growing with the number of clients
trained in one process although a client's own state is about 1 MB (issue 15 measured ~11 MB of
peak RSS per MiniLM client). Allocations above the mmap threshold are served by ``mmap`` and
returned to the system when freed; glibc raises that threshold dynamically up to 32 MiB, which
sends activation-sized blocks back into the fragmenting heap. Fixing it (``mallopt``
M_MMAP_THRESHOLD, as ``MALLOC_MMAP_THRESHOLD_`` does from the environment) keeps them out.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at ``kib`` KiB (> 0); False where there is no glibc."""
    if kib <= 0:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, kib * 1024))
    except (OSError, AttributeError):  # not glibc (musl, macOS): no mallopt
        return False
