"""Keep large activation buffers mapped between runs (glibc's malloc only).

Every kernel returns a fresh output array. glibc serves large requests with a fresh
mmap and unmaps them on free, so every run faulted its activation buffers in anew.
Raising the mmap threshold to its maximum (32 MB) and the trim threshold to 128 MB lets
freed buffers be reused from the heap instead, as ONNX Runtime's and PyTorch's arenas do. Peak memory is unchanged; memory freed after a run stays with
the process (up to 128 MB) rather than going back to the system.

The setting is process-wide and made once, at the first load. Set SPARSEJIT_KEEP_MALLOC=1
in the environment to leave malloc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 128 << 20

_done = False


def keep_buffers_mapped() -> bool:
    """Set glibc's mmap and trim thresholds once per process; False where there is no
    glibc, or the environment asks to leave malloc alone."""
    global _done
    if _done:
        return True
    if os.environ.get("SPARSEJIT_KEEP_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    logging.getLogger("sparsejit").debug("malloc thresholds set: %s", _done)
    return _done
