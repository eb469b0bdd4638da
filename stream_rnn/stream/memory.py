"""The worker's native heap: give freed memory back to the system when the worker is idle.

A worker's Python objects stay flat under a key explosion, but glibc keeps the heap pages that
micro-batches, evictions and checkpoints freed (and the dynamic mmap threshold moves medium
tensors into the heap), so resident memory after a burst reflects the burst, not what the
worker holds. ``malloc_trim(0)`` returns every free page to the system; the worker calls it
once per idle period (no micro-batch for a second after some were processed), where its few
milliseconds cost no latency. Elsewhere than glibc (musl, macOS) it does nothing.

Example::

    if idle_for > 1.0:
        trim_heap()
    status["rss_bytes"] = resident_bytes()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        fn = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_heap() -> bool:
    """Return the heap's free pages to the system; whether this C library can."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def resident_bytes() -> int:
    """This process's resident set now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0
