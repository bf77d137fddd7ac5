"""Attention core softmax(scale(q·kᵀ) + mask)·v: the dense numpy reference and the kernel.

The fused node replaces MatMul → Div/Mul → Add → Softmax (→ NaN guard) → MatMul. The
reference keeps the exact semantics of the ops it replaces (the Softmax axis and opset,
the optional scale, mask and NaN guard). The kernel handles the case every BERT-family
export has, 4-D [batch, heads, seq, head_dim] with the softmax over the last axis, one
(batch, head) pair per thread; `fused_attention` falls back to the reference otherwise.
"""

from __future__ import annotations

import numpy as np

from .compile import load_source


def reference_attention(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                        scale: np.ndarray | None = None, scale_op: str = "none", axis: int | None = None,
                        opset: int = 13, nan_guard: bool = False) -> np.ndarray:
    from sparsejit.ops import softmax

    s = np.matmul(q, kt)
    if scale_op == "div":
        s = s / scale
    elif scale_op == "mul":
        s = s * scale
    if mask is not None:
        s = s + mask
    p = softmax(s, axis=axis, opset=opset)
    if nan_guard:
        p = np.where(np.isnan(p), np.float32(0), p)
    return np.matmul(p, v)


ATTENTION_SOURCE = """\
# sparsejit generated kernel: attention, one (batch, head) pair per thread
# out[b, h] = softmax(q[b, h] @ kt[b, h] * scale + mask[b, h]) @ v[b, h]
import numpy as np
from numba import njit, prange

LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)


@njit(inline="always")
def exp_row(x, ibits, out):
    # Cephes expf, written as straight-line loops LLVM vectorises (math.exp does not):
    # x = n ln2 + r, exp(x) = 2^n * poly(r), 2^n built from its exponent bits.
    for j in range(x.shape[0]):
        v = min(max(x[j], np.float32(-87.3)), np.float32(88.3))
        n = np.floor(v * LOG2E + np.float32(0.5))
        r = v - n * LN2_HI - n * LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        out[j] = p * r * r + r + np.float32(1.0)
        ibits[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
    scale = ibits.view(np.float32)
    for j in range(x.shape[0]):
        out[j] *= scale[j]


# reassoc lets LLVM vectorise the row max and sum; NaN and inf semantics are kept.
@njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
def attention(q, kt, v, mask, scale, nan_guard, out):
    n_batch, n_head, n_q, _ = q.shape
    n_k = kt.shape[3]
    mb, mh, mq = mask.shape[0] > 1, mask.shape[1] > 1, mask.shape[2] > 1
    for bh in prange(n_batch * n_head):
        b = bh // n_head
        h = bh % n_head
        s = np.empty((n_q, n_k), np.float32)
        x = np.empty(n_k, np.float32)
        ibits = np.empty(n_k, np.int32)
        np.dot(q[b, h], kt[b, h], s)
        for i in range(n_q):
            row = s[i]
            m_row = mask[b if mb else 0, h if mh else 0, i if mq else 0]
            top = -np.inf
            for j in range(n_k):
                x[j] = row[j] * scale + m_row[j]
                top = max(top, x[j])
            if top == -np.inf:  # every key masked out: softmax is NaN, or 0 under the guard
                fill = np.float32(0.0) if nan_guard else np.float32(np.nan)
                for j in range(n_k):
                    row[j] = fill
                continue
            for j in range(n_k):
                x[j] -= top
            exp_row(x, ibits, row)
            total = np.float32(0.0)
            for j in range(n_k):
                total += row[j]
            inv = np.float32(1.0) / total
            for j in range(n_k):
                row[j] *= inv
        np.dot(s, v[b, h], out[b, h])
"""


def _scalar(scale, scale_op: str) -> float | None:
    if scale_op == "none":
        return 1.0
    s = np.asarray(scale)
    if s.size != 1:
        return None
    return float(1.0 / s.ravel()[0]) if scale_op == "div" else float(s.ravel()[0])


def fused_attention(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                    scale: np.ndarray | None = None, scale_op: str = "none", axis: int | None = None,
                    opset: int = 13, nan_guard: bool = False) -> np.ndarray:
    """The kernel where it applies, else the reference (same arguments, same result)."""
    mul = _scalar(scale, scale_op)
    ok = (q.ndim == kt.ndim == v.ndim == 4 and mul is not None and q.dtype == kt.dtype == v.dtype == np.float32
          and (axis is None or axis in (-1, 3)) and q.shape[:2] == kt.shape[:2] == v.shape[:2]
          and q.shape[3] == kt.shape[2] and kt.shape[3] == v.shape[2])
    if ok and mask is not None:
        ok = mask.dtype == np.float32 and mask.ndim <= 4 and \
            np.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], kt.shape[3])) == \
            (q.shape[0], q.shape[1], q.shape[2], kt.shape[3])
    if not ok:
        return reference_attention(q, kt, v, mask, scale, scale_op, axis, opset, nan_guard)
    if mask is None:
        mask = np.zeros((1, 1, 1, kt.shape[3]), np.float32)
    mask = np.ascontiguousarray(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
    if mask.shape[3] != kt.shape[3]:
        mask = np.ascontiguousarray(np.broadcast_to(mask, mask.shape[:3] + (kt.shape[3],)))
    out = np.empty(q.shape[:3] + (v.shape[3],), np.float32)
    kernel = load_source(ATTENTION_SOURCE).attention
    kernel(np.ascontiguousarray(q), np.ascontiguousarray(kt), np.ascontiguousarray(v), mask,
           np.float32(mul), nan_guard, out)
    return out
