"""The C heap under many clients: glibc's mmap threshold and ``malloc_trim``.

Activations of varying shapes (every batch pads to its own length) fragment glibc's heap: freed
blocks of one shape seldom fit the next, so the heap keeps growing with the number of clients
trained in one process although a client's own state is about 1 MB (issue 15 measured ~11 MB of
peak RSS per MiniLM client). Allocations above the mmap threshold are served by ``mmap`` and
returned to the system when freed; glibc raises that threshold dynamically up to 32 MiB, which
sends activation-sized blocks back into the fragmenting heap. Fixing it (``mallopt``
M_MMAP_THRESHOLD, as ``MALLOC_MMAP_THRESHOLD_`` does from the environment) keeps them out.

A client spilled to disk (``federation.resident_clients``) frees its state, about 1 MB of small
tensors for MiniLM, in the middle of a heap that long-lived objects (rows, caches) keep growing
above it; glibc keeps such freed pages. ``trim`` (``malloc_trim(0)``, which also releases free
pages inside the heap) after each spill gives them back, so peak memory follows the resident
clients, not every client the process has touched (``bench/scale.py``).

bf16 on a CPU runs its matrix products through oneDNN, which builds a primitive per shape and
keeps up to 1024 of them (oneDNN's cache and PyTorch's own, ``LRU_CACHE_CAPACITY``). Over the
shapes of a whole run (lengths, batch sizes, per-module LoRA ranks) that held about 1 GB on the
main job; ``set_onednn_cache`` caps both. The libraries read the capacity once, when they build
their first primitive, so it is set before the model runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


_LIBC = _libc()


def set_mmap_threshold(kib: int) -> bool:
    """Fix glibc's mmap threshold at ``kib`` KiB (> 0); False where there is no glibc."""
    fn = getattr(_LIBC, "mallopt", None)
    if kib <= 0 or fn is None:  # not glibc (musl, macOS): no mallopt
        return False
    return bool(fn(M_MMAP_THRESHOLD, kib * 1024))


def trim() -> bool:
    """Give the C heap's free pages back to the system; False where there is no glibc."""
    fn = getattr(_LIBC, "malloc_trim", None)
    if fn is None:  # not glibc (musl, macOS)
        return False
    fn(0)  # 1 if it released memory, 0 if there was none to release
    return True


ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def set_onednn_cache(entries: int) -> list[str]:
    """Cap oneDNN's primitive caches at ``entries`` (> 0); the variables it set.

    A variable already in the environment is the user's choice and is left as it is. Takes
    effect only before the process builds its first oneDNN primitive (the libraries read it once).
    """
    if entries <= 0:
        return []
    unset = [name for name in ONEDNN_CACHE_VARIABLES if name not in os.environ]
    for name in unset:
        os.environ[name] = str(entries)
    return unset


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
