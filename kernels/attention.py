"""Attention core softmax(scale(q·kᵀ) + mask)·v: the dense numpy reference.

The fused node replaces MatMul → Div/Mul → Add → Softmax (→ NaN guard) → MatMul. It
keeps the exact semantics of the ops it replaces (the Softmax axis and opset, the
optional scale, mask and NaN guard), so it is both the implementation and the oracle.
"""

from __future__ import annotations

import numpy as np


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
