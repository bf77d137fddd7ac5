"""LayerNorm over the last axis: the dense numpy reference and two kernels, one per layout.

Token-major input [tokens, features] normalises each row; feature-major input (the
transposed view a sparse Linear returns) normalises each column, with the token loop
innermost and contiguous, and returns feature-major too, which is what the next sparse
layers and residual adds read without a copy.
"""

from __future__ import annotations

import numpy as np

from .compile import load_source
from .layout import feature_major_empty, unit_token_stride


def reference_layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = (d * d).mean(axis=-1, keepdims=True)
    y = d / np.sqrt(var + np.float32(epsilon)) * scale
    return (y + bias if bias is not None else y).astype(np.float32)


LAYERNORM_SOURCE = """\\
# sparsejit generated kernel: LayerNorm over features, token-major and feature-major
import numpy as np
from numba import njit, prange


# reassoc lets LLVM vectorise the row sums (a serial chain otherwise); NaN and inf
# semantics are kept.
@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def layernorm_rows(x, scale, bias, eps, y):
    n, h = x.shape
    for t in prange(n):
        mean = np.float32(0.0)
        for f in range(h):
            mean += x[t, f]
        mean /= h
        var = np.float32(0.0)
        for f in range(h):
            d = x[t, f] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / h + eps)
        for f in range(h):
            y[t, f] = (x[t, f] - mean) * inv * scale[f] + bias[f]


@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def layernorm_columns(xt, scale, bias, eps, yt, chunk):
    # Feature-major: one pass gathers each token's sum and sum of squares (in float64,
    # so E[x²] - E[x]² keeps its digits), a second writes the output; tokens innermost.
    h, n = xt.shape
    n_chunks = (n + chunk - 1) // chunk
    for c in prange(n_chunks):
        t0 = c * chunk
        w = min(n, t0 + chunk) - t0
        s1 = np.zeros(w, np.float64)
        s2 = np.zeros(w, np.float64)
        for f in range(h):
            row = xt[f, t0:t0 + w]
            for t in range(w):
                v = np.float64(row[t])
                s1[t] += v
                s2[t] += v * v
        mean = np.empty(w, np.float32)
        inv = np.empty(w, np.float32)
        for t in range(w):
            m = s1[t] / h
            mean[t] = m
            inv[t] = 1.0 / np.sqrt(max(s2[t] / h - m * m, 0.0) + eps)
        for f in range(h):
            a = scale[f]
            b = bias[f]
            row = xt[f, t0:t0 + w]
            out = yt[f, t0:t0 + w]
            for t in range(w):
                out[t] = (row[t] - mean[t]) * inv[t] * a + b
"""


def layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float) -> np.ndarray:
    """LayerNorm over the last axis, in whichever layout x comes."""
    h = x.shape[-1]
    if x.dtype != np.float32 or scale.shape != (h,) or (bias is not None and bias.shape != (h,)):
        return reference_layernorm(x, scale, bias, epsilon)
    mod = load_source(LAYERNORM_SOURCE)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, h)
    b = np.zeros(h, np.float32) if bias is None else bias
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if unit_token_stride(x2) and not x2.flags.c_contiguous:
        yt = feature_major_empty(h, x2.shape[0])
        mod.layernorm_columns(x2.T, scale, b, np.float32(epsilon), yt, 64)
        return yt.T.reshape(lead + (h,))
    y = np.empty_like(x2, dtype=np.float32)
    mod.layernorm_rows(x2, scale, b, np.float32(epsilon), y)
    return y.reshape(lead + (h,))
