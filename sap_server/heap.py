"""Handing the C heap's free pages back to the operating system after a session leaves memory.

A training step allocates and frees hundreds of MiB of activations (SmolLM2-135M's top, batch 16 x 64:
about 230 MiB per session). glibc keeps freed memory in its heap for the next allocation, and the small
allocations a session makes between those buffers (its optimizer state, its adapter) stop the heap from
shrinking on its own: measured in one process, six sessions that each trained one step held 3,634 MiB,
still 3,580 MiB after five of them closed, and 956 MiB after malloc_trim(0) (280 ms). Trimming after every
step would make the next step fault all its pages in again (3.6 s -> 4.5 s per step there), so the server
trims only when a session is closed or unloaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to call
        _trim = None


def trim_heap() -> bool:
    """Return the heap's free pages to the OS (glibc's malloc_trim(0)). False where there is no such call."""
    if _trim is None:
        return False
    _trim(0)
    return True
