"""Per-element ops that a quantized graph runs between its Linear layers, as Numba kernels:
QuantizeLinear and DequantizeLinear per tensor, and Erf. The QOperator form keeps every
activation quantized, so a block runs a dozen of each; their numpy references (ops.py)
make several passes over the tensor each, these one, on every thread.

Each computes what its reference does, in the same float32 steps: x / scale rounded half
to even, plus the zero point, clamped to the type (QuantizeLinear); (q - zero point) ·
scale (DequantizeLinear); erf in float64, rounded to float32 (scipy's float32 erf).
`quantize`, `dequantize` and `erf` return None for what they do not cover (a scale per
axis or block, another type), and the caller runs the reference.
"""

from __future__ import annotations

import numpy as np

from .compile import load_source

ELEMENTWISE_SOURCE = """\
# sparsejit generated kernel: per-element QuantizeLinear, DequantizeLinear (per tensor) and Erf
import math

import numpy as np
from numba import njit, prange

CHUNK = 8192  # elements per parallel task


# Each task works on slices of its chunk: loops over a slice from 0 vectorise, where
# loops over the chunk's range of the whole array did not.
@njit(parallel=True, nogil=True, cache=True)
def quantize(x, scale, zero, lo, hi, out):
    n = x.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        xs = x[c * CHUNK:min(n, (c + 1) * CHUNK)]
        ys = out[c * CHUNK:min(n, (c + 1) * CHUNK)]
        for i in range(xs.size):
            v = np.rint(xs[i] / scale) + zero
            v = lo if v < lo else v
            ys[i] = np.int32(hi if v > hi else v)


@njit(parallel=True, nogil=True, cache=True)
def dequantize(q, scale, zero, out):
    n = q.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        qs = q[c * CHUNK:min(n, (c + 1) * CHUNK)]
        ys = out[c * CHUNK:min(n, (c + 1) * CHUNK)]
        for i in range(qs.size):
            ys[i] = (np.float32(qs[i]) - zero) * scale


@njit(parallel=True, nogil=True, cache=True)
def erf(x, out):
    n = x.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        xs = x[c * CHUNK:min(n, (c + 1) * CHUNK)]
        ys = out[c * CHUNK:min(n, (c + 1) * CHUNK)]
        for i in range(xs.size):
            ys[i] = np.float32(math.erf(np.float64(xs[i])))
"""

_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _kernels():
    return load_source(ELEMENTWISE_SOURCE)


def _flat(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x's elements in memory order, the output's, the output shaped as x): a transposed
    view (a Linear kernel's feature-major output) is read as it lies, not copied."""
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        out = np.empty(x.T.shape, dtype)
        return x.T.reshape(-1), out.reshape(-1), out.T
    out = np.empty(x.shape, dtype)
    return np.ascontiguousarray(x).reshape(-1), out.reshape(-1), out


def _scalar(value) -> np.ndarray | None:
    v = None if value is None else np.asarray(value)
    return v.reshape(()) if v is not None and v.size == 1 else None


def quantize(x: np.ndarray, scale, zero_point=None, **attrs):
    """QuantizeLinear of float32 x to uint8 or int8 with one scale and zero point; None otherwise."""
    s, z = _scalar(scale), _scalar(zero_point)
    if x.dtype != np.float32 or s is None or s.dtype != np.float32 or z is None or z.dtype not in _RANGES \
            or any(attrs.get(a) for a in ("block_size", "precision", "output_dtype")):
        return None
    lo, hi = _RANGES[z.dtype]
    flat, out, shaped = _flat(x, z.dtype)
    _kernels().quantize(flat, np.float32(s), np.float32(z), np.float32(lo), np.float32(hi), out)
    return shaped


def dequantize(q: np.ndarray, scale, zero_point=None, **attrs):
    """DequantizeLinear of uint8 or int8 q with one float32 scale and zero point; None otherwise."""
    s, z = _scalar(scale), _scalar(0 if zero_point is None else zero_point)
    if q.dtype not in _RANGES or s is None or s.dtype != np.float32 \
            or any(attrs.get(a) for a in ("block_size", "output_dtype")):
        return None
    flat, out, shaped = _flat(q, np.float32)
    _kernels().dequantize(flat, np.float32(s), np.float32(z), out)
    return shaped


def erf(x: np.ndarray, **attrs):
    """Erf of float32 x; None otherwise."""
    if x.dtype != np.float32:
        return None
    flat, out, shaped = _flat(x, np.float32)
    _kernels().erf(flat, out)
    return shaped
