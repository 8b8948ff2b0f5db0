"""The C heap: give memory that is free again back to the system.

CPython returns its own object arenas once they are empty, but what OpenSSL and CPython's larger buffers
took from glibc's malloc stays in the process after a burst (1,000 sensors connecting, a flood of readings)
until malloc_trim(3) hands the free pages back. Measured in docs/performance.md.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger("gatewayd.heap")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim  # glibc only; musl has none
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system; False where the C library cannot (not glibc)."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
