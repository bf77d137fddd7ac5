"""Activation layout changes: token-major [tokens, features] ⇄ feature-major [features, tokens].

Sparse kernels work feature-major and dense ones token-major. numpy's copy of a
transposed view walks one side with a large stride (0.95 ms for 128×3072 here); this
tiled, threaded copy keeps both sides in cache (`bench/` and `tests/test_kernels.py`).
"""

from __future__ import annotations

import numpy as np

from .compile import load_source

TILE = 32

TRANSPOSE_SOURCE = f"""\
# sparsejit generated kernel: tiled transpose, out = a.T (C-contiguous)
from numba import njit, prange

TILE = {TILE}


@njit(parallel=True, cache=True, nogil=True)
def transpose(a, out):
    rows, cols = a.shape
    n_row_tiles = (rows + TILE - 1) // TILE
    for rt in prange(n_row_tiles):
        r0 = rt * TILE
        r1 = min(rows, r0 + TILE)
        for c0 in range(0, cols, TILE):
            c1 = min(cols, c0 + TILE)
            for c in range(c0, c1):
                for r in range(r0, r1):
                    out[c, r] = a[r, c]
"""


def reference_transpose(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T)


def transposed(a: np.ndarray) -> np.ndarray:
    """a.T as a C-contiguous float32 array, without a copy when a.T already is one."""
    t = a.T
    if t.flags.c_contiguous and t.flags.writeable and t.dtype == np.float32:
        return t
    out = np.empty(t.shape, np.float32)
    load_source(TRANSPOSE_SOURCE).transpose(a.astype(np.float32, copy=False), out)
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """a as a writable C-contiguous float32 array; a feature-major view is transposed fast."""
    if a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32:
        return a
    if a.ndim == 2 and a.T.flags.c_contiguous:
        return transposed(a.T)
    return np.array(a, dtype=np.float32, order="C")
