"""Quantized Linear layers: float x, quantized to uint8 per tensor (with a static scale and
zero point from the model, or a dynamic one from x's range, as DynamicQuantizeLinear
computes it), times symmetric int8 weights, accumulated in int32, scaled back to float,
then the Linear epilogues. The numpy reference and the kernel (int8_ir.py).

The weights are kept as 4-blocks along the input dimension (all four int8 of a block
in one i32), only the blocks holding a nonzero: 4-block pruning stores no zeros, and
unstructured pruning stores the zeros that share a block with a nonzero.
"""

from __future__ import annotations

import numba
import numpy as np

from ..ops import dynamic_quantize_linear, dynamic_scale, matmul_integer, op, quantize_linear
from .compile import compile_ir, host_cpu, load_source
from .compress import balanced_bounds
from .int8_ir import LANES, QUANTIZE_SIGNATURE, SIGNATURE, Int8Config, int8_ir, quantize_ir
from .ir import with_driver
from .layout import feature_major_empty, transposed
from .linear import linear_epilogue


def quantize_x(x: np.ndarray, mode: str, x_scale=None, x_zero_point=None) -> tuple[np.ndarray, np.float32, int]:
    """(x quantized, its scale, its zero point) as the graph quantizes it."""
    if mode == "dynamic":
        q, scale, zero = dynamic_quantize_linear(x)
        return q, np.float32(scale), int(zero)
    return quantize_linear(x, x_scale, x_zero_point), np.float32(x_scale), int(np.asarray(x_zero_point))


def output_scale(mode: str, x_scale: np.float32, scale: np.ndarray) -> np.ndarray:
    """The per-output multiplier of the int32 sums: the model's constant (static), or the
    input's scale times the weights' (dynamic, in float32 as the graph's Mul does)."""
    return np.asarray(scale, np.float32) if mode == "static" else np.float32(x_scale) * np.asarray(scale, np.float32)


@op("QLinear", fused=True)
def reference_qlinear(x, skip=None, *, weight, scale, mode, x_scale=None, x_zero_point=None, bias=None,
                      activation="none", residual=False, source_op=None):
    """The fused node (fuse.fuse_quantized_linear): x quantized, MatMulInteger with the int8
    weight, Cast to float, times the output scale (see output_scale), then the Linear
    epilogue."""
    q, xs, zero = quantize_x(x, mode, x_scale, x_zero_point)
    acc = matmul_integer(q, weight, np.array(zero, q.dtype))
    y = acc.astype(np.float32) * output_scale(mode, xs, scale)
    return linear_epilogue(y, bias, activation, skip if residual else None)


QUANTIZE_DRIVER_SOURCE = """\
# sparsejit generated kernel: the parallel driver of the quantizing IR kernel
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def run_quantize(fn, xt, xq, scale, zero, lo, hi, parts):
    k4 = xq.shape[0]
    for c in prange(parts):
        a = c * k4 // parts
        b = (c + 1) * k4 // parts
        if a < b:
            fn(xt.ctypes.data, xt.strides[0] // 4, xq.ctypes.data, xq.shape[1], xt.shape[0], scale, zero, lo, hi,
               a, b, xt.shape[1])
"""

INT8_DRIVER_SOURCE = """\
# sparsejit generated kernel: the parallel driver of the int8 IR kernel
# thread c computes output rows [bounds[c], bounds[c + 1]) for all tokens
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def run_int8(fn, xq, indptr, blocks, weights, corr, scale, bias, yt, rt, bounds, ntok):
    for c in prange(bounds.shape[0] - 1):
        fn(xq.ctypes.data, xq.shape[1], indptr.ctypes.data, blocks.ctypes.data, weights.ctypes.data,
           corr.ctypes.data, scale.ctypes.data, bias.ctypes.data, yt.ctypes.data, yt.strides[0] // 4,
           rt.ctypes.data, rt.strides[0] // 4, bounds[c], bounds[c + 1], ntok)
"""


def has_vnni() -> bool:
    return "+avx512vnni" in host_cpu()[1] and "+avx512f" in host_cpu()[1]


def compress_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, block indices k/4 as uint16, the blocks' four int8 packed in an int32) per
    output row: the 4-blocks along the input dimension holding a nonzero."""
    k, m = weight.shape
    padded = np.zeros((-(-k // 4) * 4, m), np.int8)
    padded[:k] = weight
    blocks = padded.reshape(-1, 4, m).transpose(2, 0, 1)  # [out, in/4, 4]
    rows, cols = np.nonzero(blocks.any(axis=2))
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    packed = np.ascontiguousarray(blocks[rows, cols]).view(np.int32).ravel()
    return indptr, cols.astype(np.uint16), packed


class Int8Linear:
    """The int8 kernel for one quantized Linear node (attributes as reference_qlinear takes)."""

    kind = "int8"

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False, vnni: bool | None = None):
        self.in_features, self.out_features = weight.shape
        self.mode, self.activation, self.residual = mode, activation, residual
        self.x_scale, self.x_zero_point = x_scale, x_zero_point
        self.scale = np.broadcast_to(np.asarray(scale, np.float32), (self.out_features,)).copy()
        self.bias = np.zeros(self.out_features, np.float32) if bias is None else np.asarray(bias, np.float32).copy()
        self.indptr, self.blocks, self.weights = compress_blocks(weight)
        self.colsum = weight.astype(np.int32).sum(axis=0).astype(np.int32)
        self.config = Int8Config(activation, residual, has_vnni() if vnni is None else vnni)
        self._fn = SIGNATURE.ctypes()(compile_ir(int8_ir(self.config), SIGNATURE.name))
        self._driver = load_source(INT8_DRIVER_SOURCE).run_int8
        self._quantize_fn = QUANTIZE_SIGNATURE.ctypes()(compile_ir(quantize_ir(), QUANTIZE_SIGNATURE.name))
        self._quantize = load_source(QUANTIZE_DRIVER_SOURCE).run_quantize
        self._bounds: tuple[int, np.ndarray] = (0, np.zeros(1, np.int64))
        self._static = self._quantization(None) if mode == "static" else None

    @property
    def source(self) -> str:
        return with_driver(int8_ir(self.config), INT8_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """The int8 weight [in, out] rebuilt from the stored blocks."""
        blocks = self.weights.view(np.int8).reshape(-1, 4)
        w = np.zeros((-(-self.in_features // 4), 4, self.out_features), np.int8)
        rows = np.repeat(np.arange(self.out_features), np.diff(self.indptr))
        w[self.blocks.astype(np.int64), :, rows] = blocks
        return w.reshape(-1, self.out_features)[:self.in_features]

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return reference_qlinear(x, residual, weight=self.dense_weight(), scale=self.scale, mode=self.mode,
                                 x_scale=self.x_scale, x_zero_point=self.x_zero_point, bias=self.bias,
                                 activation=self.activation, residual=self.residual)

    def _quantization(self, xt: np.ndarray | None) -> tuple[np.float32, int, int, np.ndarray, np.ndarray]:
        """(scale, zero point, lowest value) of x's quantization, then what the kernel takes
        from them: the zero point's correction per output (zero point in uint8 terms times
        the column sums) and the output multipliers. Static: constants, computed at load."""
        if self.mode == "dynamic":
            scale, zp = dynamic_scale(xt)
            zero, lo = int(zp), 0
        else:
            zp = np.asarray(self.x_zero_point)
            scale, zero, lo = np.float32(self.x_scale), int(zp), -128 if zp.dtype == np.int8 else 0
        return (scale, zero, lo, ((zero - lo) * self.colsum).astype(np.int32),
                output_scale(self.mode, scale, self.scale))

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        lead, k, m = x.shape[:-1], self.in_features, self.out_features
        x2 = x.reshape(-1, k)
        ntok = x2.shape[0]
        xt = transposed(x2)
        scale, zero, lo, corr, mult = self._static or self._quantization(xt)
        xq = np.empty((-(-k // 4), -(-ntok // LANES) * LANES, 4), np.uint8)
        self._quantize(self._quantize_fn, xt, xq, scale, np.float32(zero), np.float32(lo), np.float32(lo + 255),
                       numba.get_num_threads())
        yt = feature_major_empty(m, ntok)
        rt = transposed(np.broadcast_to(residual, lead + (m,)).reshape(-1, m)) if self.residual else \
            np.zeros((1, 1), np.float32)
        if ntok:
            self._driver(self._fn, xq, self.indptr, self.blocks, self.weights, corr, mult, self.bias, yt, rt,
                         self._split(), ntok)
        return yt.T.reshape(lead + (m,))

    def _split(self) -> np.ndarray:
        n = numba.get_num_threads()
        if self._bounds[0] != n:
            self._bounds = (n, balanced_bounds(self.indptr, n))
        return self._bounds[1]
