"""The one place that sets thread counts: Numba's pool and the BLAS libraries together.

All parallelism is Numba's: every kernel is split across Numba's threads, and BLAS
(which only the numpy reference ops still call) runs single-threaded. Letting OpenBLAS
keep threads of its own does not work beside Numba: after each call they spin for a
while, and on a 2-core machine that starves the next parallel kernel (measured here: a
0.15 ms sparse kernel took 8 ms right after a BLAS call).
"""

from __future__ import annotations

import ctypes
import glob
import os

import numba
import numpy as np

_blas_setters: list | None = None


def _find_blas_setters() -> list:
    """numpy's and scipy's bundled OpenBLAS builds (scipy's is the one Numba's np.dot
    calls) each export a prefixed set_num_threads; find them by name."""
    import scipy

    libs = []
    for pkg, libdir in ((np, "numpy.libs"), (scipy, "scipy.libs")):
        libs += glob.glob(os.path.join(os.path.dirname(pkg.__file__), os.pardir, libdir, "*openblas*"))
    setters = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                    "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                setters.append(fn)
                break
    return setters


def set_threads(n: int | None) -> int:
    """Use `n` threads (default: all cores) for all kernels, BLAS single-threaded inside
    them; returns n."""
    global _blas_setters
    n = numba.config.NUMBA_NUM_THREADS if n is None else int(n)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    if _blas_setters is None:
        _blas_setters = _find_blas_setters()
    for fn in _blas_setters:
        fn(1)
    return n
