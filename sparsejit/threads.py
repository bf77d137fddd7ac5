"""The one place that sets thread counts: Numba's pool and numpy's BLAS together.

Both pools sized to the same count, and never both busy at once (the executor runs one
op at a time), is what keeps them from oversubscribing the cores.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numba
import numpy as np

_blas_setters: list | None = None


def _find_blas_setters() -> list:
    """numpy's bundled OpenBLAS exports a (prefixed) set_num_threads; find it by name."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "*openblas*"))
    setters = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                    "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                setters.append(fn)
                break
    return setters


def set_threads(n: int | None) -> int:
    """Use `n` threads (default: all cores) for sparse kernels and BLAS; returns n."""
    global _blas_setters
    n = numba.config.NUMBA_NUM_THREADS if n is None else int(n)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    if _blas_setters is None:
        _blas_setters = _find_blas_setters()
    for fn in _blas_setters:
        fn(n)
    return n
