"""Activation layout changes: token-major [tokens, features] ⇄ feature-major [features, tokens].

The Linear and attention kernels work feature-major; numpy, the reference ops and the
caller work token-major. numpy's copy of a transposed view walks one side with a large
stride; the tiled, threaded copy here keeps both sides in cache.

Feature-major buffers get a padded row length: with 1024 tokens a row is 4 KiB, and
rows 4 KiB apart all land in the same few cache sets, so a kernel reading a 128-token
tile of every row used a fraction of L2.
"""

from __future__ import annotations

import math

import numpy as np

from .compile import load_source

TILE = 32

TRANSPOSE_SOURCE = f"""\
# sparsejit generated kernel: tiled transpose, out = a.T (C-contiguous)
from numba import njit, prange

ANY_LAYOUT = ("out",)  # a and out compiled for any layout only, out writable (compile._any_layout)
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


def padded_rows(n: int) -> int:
    """A row length ≥ n (floats) that is a multiple of 16 but not of 32 (64-byte lines,
    an odd count of them), so consecutive rows start in different cache sets."""
    ld = -(-n // 16) * 16
    return ld + 16 if ld % 32 == 0 and ld >= 256 else ld


ALIGN = 64  # bytes: one cache line, one AVX-512 vector


def aligned_empty(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """np.empty whose data starts on a 64-byte line. numpy's own buffers may start past
    one, and then every vector load from them straddles two lines and costs two."""
    dtype = np.dtype(dtype)
    n = math.prod(shape)  # (not np.prod: this runs on every kernel call)
    buf = np.empty(n + ALIGN // dtype.itemsize, dtype)
    start = -buf.ctypes.data % ALIGN // dtype.itemsize  # numpy's data is itemsize-aligned
    return buf[start:start + n].reshape(shape)


EMPTY_SOURCE = """\
# sparsejit generated kernel: an uninitialised feature-major buffer, rows on 64-byte lines
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def feature_major_empty(features, tokens, ld):
    buf = np.empty(features * ld + 16, np.float32)
    start = (64 - buf.ctypes.data % 64) % 64 // 4
    return buf[start:start + features * ld].reshape((features, ld))[:, :tokens]
"""


def feature_major_empty(features: int, tokens: int) -> np.ndarray:
    """An uninitialised [features, tokens] float32 array with padded rows (unit token stride),
    every row starting on a 64-byte line. Made in Numba, as every kernel call makes its
    output so: faster than aligned_empty's Python."""
    return load_source(EMPTY_SOURCE).feature_major_empty(features, tokens, padded_rows(tokens))


def unit_token_stride(a: np.ndarray) -> bool:
    """Whether a 2-D [tokens, features] view is feature-major: a.T rows are contiguous."""
    return a.ndim == 2 and (a.shape[0] <= 1 or a.strides[0] == a.itemsize) and \
        (a.shape[1] <= 1 or a.strides[1] >= a.shape[0] * a.itemsize)


def on_lines(t: np.ndarray) -> bool:
    """Whether every row of a 2-D array starts on a 64-byte line (ALIGN). A row that does
    not is read by vector loads that each straddle two lines (what that costs the sparse
    kernel: bench/README.md, seventh session)."""
    return t.ctypes.data % ALIGN == 0 and (t.shape[0] <= 1 or t.strides[0] % ALIGN == 0)


def transposed(a: np.ndarray) -> np.ndarray:
    """a.T as float32 with unit inner stride and rows on 64-byte lines (maybe padded), no
    copy when a.T is one: as every kernel output is, unlike most feature-major views of
    numpy's own arrays (numpy aligns its buffers to 16 bytes)."""
    t = a.T
    if unit_token_stride(a) and t.flags.writeable and t.dtype == np.float32 and on_lines(t):
        return t
    out = feature_major_empty(t.shape[0], t.shape[1])
    load_source(TRANSPOSE_SOURCE).transpose(a.astype(np.float32, copy=False), out)
    return out


def transposed_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of a 2-D array, by the tiled transpose of a.T (fast
    when a is feature-major, that is when a.T has contiguous rows)."""
    out = np.empty(a.shape, np.float32)
    load_source(TRANSPOSE_SOURCE).transpose(a.T.astype(np.float32, copy=False), out)
    return out


def contiguous(a: np.ndarray) -> np.ndarray:
    """a as a writable C-contiguous float32 array; a feature-major view is transposed fast."""
    if a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32:
        return a
    if a.ndim == 2 and unit_token_stride(a.T):
        return transposed(a.T)
    return np.array(a, dtype=np.float32, order="C")
