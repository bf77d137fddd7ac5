"""Quantized Linear layers: float x, quantized to uint8 per tensor (with a static scale and
zero point from the model, or a dynamic one from x's range, as DynamicQuantizeLinear
computes it), times symmetric int8 weights, accumulated in int32, scaled back to float,
then the Linear epilogues. The numpy reference and the kernel (int8_ir.py).

The weights are kept as 4-blocks along the input dimension (all four int8 of a block
in one i32), only the blocks holding a nonzero: 4-block pruning stores no zeros, and
unstructured pruning stores the zeros that share a block with a nonzero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np

from ..ops import dynamic_quantize_linear, matmul_integer, op, quantize_linear
from .compile import compile_ir, host_cpu, load_source, threads, vector_lanes
from .compress import analyse, balanced_bounds
from .dense_ir import SIGNATURE as DENSE_SIGNATURE
from .dense_ir import DenseConfig, dense_ir
from .int8_ir import (
    GRID_SIGNATURE,
    LANES,
    PAIR_LIMIT,
    QUANTIZE_FLOAT_SIGNATURE,
    QUANTIZE_SIGNATURE,
    RANGE_SIGNATURE,
    SIGNATURE,
    Int8Config,
    grid_ir,
    int8_ir,
    quantize_float_ir,
    quantize_ir,
    range_ir,
)
from .ir import with_driver
from .lanes_ir import GROUP, TOKENS, WINDOW, LanesConfig, lanes_ir
from .lanes_ir import SIGNATURE as LANES_SIGNATURE
from .launch import IMPORTS, checked, put_source, run
from .layout import aligned_empty, feature_major_empty, taping, transposed
from .linear import (
    _NO_RESIDUAL,
    DENSE_DRIVER_SOURCE,
    DENSE_TOKEN_TILE,
    SPARSE_DRIVER_SOURCE,
    SPARSE_VECTORS,
    DenseLinear,
    SparseLinear,
    TakesOwnX,
    _residual_rows,
    dense_panels,
    linear_epilogue,
)
from .sparse_ir import SIGNATURE as SPARSE_SIGNATURE
from .sparse_ir import IRConfig, ir_source


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


def requantized(y: np.ndarray, requantize: np.ndarray | None) -> np.ndarray:
    """y requantized and dequantized, per output column: requantize's rows are the output
    scale, and its type's lowest and highest values less its zero point (QLinearMatMul's
    output as ONNX Runtime rounds it, ops.qlinear_matmul, then DequantizeLinear)."""
    if requantize is None:
        return y
    return np.rint(np.clip(y, requantize[1], requantize[2])) * requantize[0]


@op("QLinear", fused=True)
def reference_qlinear(x, skip=None, *, weight, scale, mode, x_scale=None, x_zero_point=None, bias=None,
                      activation="none", residual=False, source_op=None, requantize=None):
    """The fused node (fuse.fuse_quantized_linear): x quantized, MatMulInteger with the int8
    weight, Cast to float, times the output scale (see output_scale), requantized and
    dequantized if the node says so (QLinearMatMul), then the Linear epilogue."""
    q, xs, zero = quantize_x(x, mode, x_scale, x_zero_point)
    acc = matmul_integer(q, weight, np.array(zero, q.dtype))
    y = requantized(acc.astype(np.float32) * output_scale(mode, xs, scale), requantize)
    return linear_epilogue(y, bias, activation, skip if residual else None)


@op("QLinearGroup", fused=True)
def reference_qlinear_group(x, *, activation, members):
    """The node lower.group_linears makes: its member QLinear nodes on one input."""
    return tuple(reference_qlinear(x, **m.attrs) for m in members)


DRIVER_SOURCE = """\
# sparsejit generated kernel: the drivers of the int8 IR kernels (the K-chunked and the
# on-float ones run on the sparse kernel's driver, linear.SPARSE_DRIVER_SOURCE)
# run_range: part c finds the range of x's rows [c * k / parts, (c + 1) * k / parts)
# run_grid: one part makes a dynamic x's grid and the epilogue's terms from the ranges
# run_quantize: part c quantizes x's 4-blocks of inputs [c * k4 / parts, (c + 1) * k4 / parts)
# into the 4-block rows of xq on the grid (run_quantize_float: x's rows into floats q - zero point)
# run_int8: part c computes output rows [bounds[c], bounds[c + 1]) for all tokens
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls", "ranges")  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(RANGE_SIGNATURE) + "\n\n" + put_source(GRID_SIGNATURE) + "\n\n" + \
    put_source(QUANTIZE_SIGNATURE) + "\n\n" + put_source(QUANTIZE_FLOAT_SIGNATURE) + "\n\n" + put_source(SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_range(launch, part, calls, fn, xt, ranges):
    k = xt.shape[0]
    parts = calls.shape[0]
    for c in range(parts):
        put_range_rows(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, c * k // parts, (c + 1) * k // parts,
                       xt.shape[1], ranges.ctypes.data + c * ranges.strides[0])
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])


@njit(nogil=True, cache=True)
def run_grid(launch, part, calls, fn, ranges, kbias, m, wscale, colsum, corr, terms, grid, bad):
    put_dynamic_grid(calls, 0, fn, ranges.ctypes.data, ranges.shape[0], kbias.ctypes.data, kbias.shape[0], m,
                     wscale.ctypes.data, colsum.ctypes.data, corr, terms.ctypes.data, grid.ctypes.data, bad.ctypes.data)
    launch_calls(launch, part, calls.ctypes.data, 1, calls.shape[1])


@njit(nogil=True, cache=True)
def run_quantize(launch, part, calls, fn, xt, xq, grid):
    k = xt.shape[0]
    k4 = (k + 3) // 4
    parts = calls.shape[0]
    for c in range(parts):
        a = c * k4 // parts
        b = (c + 1) * k4 // parts
        if a < b:
            put_quantize_rows(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, xq.ctypes.data, xq.strides[0] // 4, k,
                              grid.ctypes.data, a, b, xt.shape[1])
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])


@njit(nogil=True, cache=True)
def run_quantize_float(launch, part, calls, fn, xt, xf, grid):
    k = xt.shape[0]
    parts = calls.shape[0]
    for c in range(parts):
        put_quantize_float_rows(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, xf.ctypes.data, xf.strides[0] // 4,
                                grid.ctypes.data, c * k // parts, (c + 1) * k // parts, xt.shape[1])
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])


@njit(nogil=True, cache=True)
def run_int8(launch, part, calls, fn, xq, indptr, split, blocks, weights, corr, mult, bias, requant, yt, rt, bounds):
    for c in range(calls.shape[0]):
        put_int8_rows(calls, c, fn, xq.ctypes.data, xq.strides[0] // 4, indptr.ctypes.data, split.ctypes.data,
                      blocks.ctypes.data, weights.ctypes.data, corr.ctypes.data, mult.ctypes.data, bias.ctypes.data,
                      requant.ctypes.data, yt.ctypes.data, yt.strides[0] // 4, rt.ctypes.data, rt.strides[0] // 4,
                      bounds[c], bounds[c + 1], yt.shape[1])
    launch_calls(launch, part, calls.ctypes.data, calls.shape[0], calls.shape[1])
"""


def has_vnni() -> bool:
    return "+avx512vnni" in host_cpu()[1] and "+avx512f" in host_cpu()[1]


def host_dots() -> list[str]:
    """The int8_ir.DOTS this CPU runs, fastest first (generic runs everywhere)."""
    features = host_cpu()[1]
    return ["vnni"] * has_vnni() + ["pmaddwd"] * ("+avx2" in features) + ["generic"]


DOT_NAMES = {"vnni": "AVX-512 VNNI", "pmaddwd": "AVX2 vpmaddwd", "generic": "no VNNI or AVX2: dot products written out"}


def compress_blocks(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, block indices k/4 as uint16, the blocks' four int8 packed in an int32) per
    output row: the 4-blocks along the input dimension holding a nonzero."""
    k, m = weight.shape
    k4 = -(-k // 4)
    wt = np.zeros((m, 4 * k4), np.int8)
    wt[:, :k] = weight.T
    blocks = wt.view(np.int32)  # [out, in/4]: a block's four bytes as one i32, nonzero if any is
    # (the positions, then a take: faster than a boolean select or a 2-D nonzero; bench/README.md, sixteenth session)
    where = np.flatnonzero(blocks != 0)
    rows, cols = np.divmod(where, k4)
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    return indptr, cols.astype(np.uint16), blocks.reshape(-1)[where]


def pairs_first_order(indptr: np.ndarray, blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reorders each row's stored blocks (in place) so that those whose byte pairs cannot
    saturate vpmaddubsw's int16 sums (int8_ir.PAIR_LIMIT) come first, each group in its
    input order; returns split: row j's other blocks start at split[j]."""
    b = weights.view(np.int8).reshape(-1, 4).astype(np.int32)
    fits = (np.abs(b[:, 0]) + np.abs(b[:, 1]) <= PAIR_LIMIT) & (np.abs(b[:, 2]) + np.abs(b[:, 3]) <= PAIR_LIMIT)
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.lexsort((~fits, rows))  # by row, then the fitting blocks first, stable
    blocks[:], weights[:] = blocks[order], weights[order]
    return (indptr[:-1] + np.bincount(rows, weights=fits, minlength=len(indptr) - 1)).astype(np.int64)


# Accumulators per token tile: 8 of AVX-512's 32 registers; on AVX2's 16, each vector's
# activations take two temporaries and the weights two registers.
INT8_VECTORS = {"vnni": 8, "pmaddwd": 8, "generic": 8}


class _Quantized:
    """What both int8 layer kernels share: the node's attributes, the numpy reference, and
    a call that hands the driver xᵀ, rᵀ and yᵀ (feature-major, as the Linear kernels)."""

    kind = "int8"

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale, x_zero_point, bias, activation: str,
                 residual: bool, requantize: np.ndarray | None = None):
        self.in_features, self.out_features = weight.shape
        self.mode, self.activation, self.residual, self.requantize = mode, activation, residual, requantize
        self.x_scale, self.x_zero_point = x_scale, x_zero_point
        self.scale = np.broadcast_to(np.asarray(scale, np.float32), (self.out_features,)).copy()
        self.bias = np.zeros(self.out_features, np.float32) if bias is None else np.asarray(bias, np.float32).copy()
        zp = np.asarray(0 if x_zero_point is None else x_zero_point)
        # x's zero point, and the lowest quantized value (int8 or uint8 activations)
        self._zero, self._lo = int(zp), -128 if zp.dtype == np.int8 else 0
        # the grid the quantizing kernels read x's on, [scale, zero point, lowest, highest]:
        # the model's (static); a dynamic x's is made per call (_grid_terms)
        self._xgrid = None if mode == "dynamic" else np.array([*self._x_quantization(), self._lo + 255], np.float32)

    def dense_weight(self) -> np.ndarray:
        raise NotImplementedError

    def _x_quantization(self) -> tuple:
        """x's static scale, zero point and lowest byte, as float32."""
        return np.float32(self.x_scale), np.float32(self._zero), np.float32(self._lo)

    def _set_vnni_terms(self, weight: np.ndarray) -> None:
        """What the VNNI kernels' epilogue reads (sparse_ir's and dense_ir's `int8`): the
        weight's column sums, and [bias | output scale | the zero point's correction
        (i32)], the last two fixed at load when x's quantization is static; then, for a
        requantized output, [its scale | lowest | highest] (lanes_ir's and amx_ir's)."""
        m = self.out_features
        self.colsum = weight.sum(axis=0, dtype=np.int32)
        self._kbias = np.zeros((3 if self.requantize is None else 6) * m, np.float32)
        self._kbias[:m] = self.bias
        if self.mode != "dynamic":
            self._kbias[m:2 * m] = output_scale(self.mode, np.float32(self.x_scale), self.scale)
            self._kbias[2 * m:3 * m].view(np.int32)[:] = (self._zero - self._lo) * self.colsum
        if self.requantize is not None:
            self._kbias[3 * m:] = np.broadcast_to(np.asarray(self.requantize, np.float32), (3, m)).reshape(-1)

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return reference_qlinear(x, residual, weight=self.dense_weight(), scale=self.scale, mode=self.mode,
                                 x_scale=self.x_scale, x_zero_point=self.x_zero_point, bias=self.bias,
                                 activation=self.activation, residual=self.residual, requantize=self.requantize)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """y for x [..., in]: one call of the driver quantizes x (its range first, when
        dynamic) and runs the kernel, so the threads stay awake between the steps."""
        lead, k, m = x.shape[:-1], self.in_features, self.out_features
        x2 = x.reshape(-1, k)
        yt = feature_major_empty(m, x2.shape[0])
        if x2.shape[0]:
            rt = transposed(_residual_rows(residual, lead, m)) if self.residual else _NO_RESIDUAL
            self._run(transposed(x2), yt, rt)
        return yt.T.reshape(lead + (m,))

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        """The driver's call (a dynamic input whose range is not finite raises)."""
        raise NotImplementedError

    def reads_bytes(self, grid: np.ndarray) -> bool:
        """Whether x quantized to `grid` ([scale, zero point, lowest, highest] as float32,
        layernorm.Grid's) is what this layer quantizes x to: a static layer on that grid,
        whose `from_quantized` (Int8Chunked's, Int8Amx's) can then take x's bytes."""
        return self.mode == "static" and (np.float32(self.x_scale), self._zero, self._lo) == tuple(grid[:3])

    def _grid_terms(self, xt: np.ndarray, kbias: np.ndarray, corr: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(the grid x is quantized on, the epilogue's terms for it): the model's grid and
        `kbias` (static); for a dynamic x, made by two launches, xᵀ's range and then
        (int8_ir's `grid_ir`) its grid and a copy of `kbias` with this call's output scale,
        and (`corr`) the zero point's correction. No Python between them, so a taped run
        makes them again (a range that is not finite raises, by launch.checked)."""
        if self.mode != "dynamic":
            return self._xgrid, kbias
        parts, drivers = threads(), load_source(DRIVER_SOURCE)
        ranges = aligned_empty((parts, 2, vector_lanes()), np.float32)  # per part and lane: lowest, highest
        run(drivers.run_range, RANGE_SIGNATURE, parts, 1, self._fns[0], xt, ranges)
        grid, terms = aligned_empty((4,), np.float32), aligned_empty(kbias.shape, np.float32)
        bad = np.zeros(1, np.int64)  # (the call's own, outside any arena: launch.checked)
        run(drivers.run_grid, GRID_SIGNATURE, 1, 1, _grid_fn(), ranges, kbias, self.out_features, self.scale,
            self.colsum if corr else _NO_COLSUM, int(corr), terms, grid, bad)
        checked(bad, _finite_range)
        return grid, terms

    def _quantize_into(self, xt: np.ndarray, xq: np.ndarray, kbias: np.ndarray | None = None) -> np.ndarray:
        """xᵀ quantized into xq's 4-block rows (its range first, when dynamic); the
        epilogue's terms for it (`kbias`, by default the layer's [bias | scale | correction],
        a dynamic x's own made for the call). For the kernels that take x so quantized."""
        grid, terms = self._grid_terms(xt, self._kbias if kbias is None else kbias)
        run(load_source(DRIVER_SOURCE).run_quantize, QUANTIZE_SIGNATURE, threads(), 1, self._fns[1], xt, xq, grid)
        return terms


_NO_COLSUM = np.zeros(1, np.int32)


def _finite_range(bad: np.ndarray) -> None:
    if bad[0]:
        raise ValueError("the input holds NaN or infinity, so its dynamic quantization scale is undefined")


def _quantize_fns() -> tuple:
    """The range (dynamic scales) and quantize-into-4-blocks IR kernels' addresses."""
    lanes = vector_lanes()
    return compile_ir(range_ir(lanes), RANGE_SIGNATURE.name), compile_ir(quantize_ir(lanes), QUANTIZE_SIGNATURE.name)


@functools.cache
def _grid_fn() -> int:
    """The address of the dynamic grid's kernel (int8_ir.grid_ir)."""
    return compile_ir(grid_ir(vector_lanes()), GRID_SIGNATURE.name)


class _ReadsBytes(TakesOwnX):
    """An int8 layer that can run on x's bytes in 4-block rows ([in/4, tokens] of i32, token
    stride 1: a LayerNorm's, byte_rows, or what the layer before left, quantized_for)."""


class Int8Linear(_ReadsBytes, _Quantized):
    """The int8 kernel for one quantized Linear node (attributes as reference_qlinear takes).
    It reads x's bytes in 4-block rows, so a static layer can also run on bytes handed
    over (from_quantized)."""

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False, requantize: np.ndarray | None = None,
                 dot: str | None = None):
        super().__init__(weight, scale, mode, x_scale, x_zero_point, bias, activation, residual, requantize)
        self.indptr, self.blocks, self.weights = compress_blocks(weight)
        self._set_vnni_terms(weight)
        dot = dot or host_dots()[0]
        pairs_first = dot == "pmaddwd"
        self.config = Int8Config(activation, residual, dot, INT8_VECTORS[dot], requantize is not None, pairs_first)
        self.split = pairs_first_order(self.indptr, self.blocks, self.weights) if pairs_first else self.indptr[1:]
        # per output: the output scale, its lowest and highest value less its zero point, (padding)
        self._requant = np.zeros((self.out_features if requantize is not None else 1, 4), np.float32)
        if requantize is not None:
            self._requant[:, :3] = np.broadcast_to(np.asarray(requantize, np.float32), (3, self.out_features)).T
        self._fns = (*_quantize_fns(), compile_ir(int8_ir(self.config), SIGNATURE.name))
        self._bytes_fn: int | None = None  # (bytes_for's kernel, made on first use)
        self._driver = load_source(DRIVER_SOURCE).run_int8
        self._bounds: tuple[int, np.ndarray] = (0, np.zeros(1, np.int64))
        self._terms = self._corr_mult(self._kbias)  # (static: the zero point's correction and the multipliers)

    @property
    def source(self) -> str:
        return with_driver(int8_ir(self.config), DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """The int8 weight [in, out] rebuilt from the stored blocks."""
        blocks = self.weights.view(np.int8).reshape(-1, 4)
        w = np.zeros((-(-self.in_features // 4), 4, self.out_features), np.int8)
        rows = np.repeat(np.arange(self.out_features), np.diff(self.indptr))
        w[self.blocks.astype(np.int64), :, rows] = blocks
        return w.reshape(-1, self.out_features)[:self.in_features]

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._kernel(*self._x_rows(xt), yt, rt)

    def _corr_mult(self, terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kernel's zero point corrections (i32) and multipliers, in [bias | scale | correction]."""
        m = self.out_features
        return terms[2 * m:3 * m].view(np.int32), terms[m:2 * m]

    def _x_rows(self, xt: np.ndarray) -> tuple:
        """(xᵀ quantized into 4-block rows padded to whole 64-byte lines (int8_ir.LANES
        tokens), the zero point's correction and the multipliers for it)."""
        xq = aligned_empty((-(-self.in_features // 4), -(-xt.shape[1] // LANES) * LANES), np.float32)
        return xq, *self._corr_mult(self._quantize_into(xt, xq))

    def _on_x(self, xq: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        # (xq's rows padded to whole 64-byte lines, as every maker of x's bytes pads them)
        self._kernel(xq.view(np.float32), *self._terms, yt, rt)

    def bytes_terms(self, grids: np.ndarray) -> np.ndarray:
        """What `bytes_for` takes for outputs quantized per output as QuantizeLinear does,
        output j on grids[:, j] ([scale, zero point, lowest, highest] rows, float32; one
        8-bit type for all): the grids by output, [out, 4]."""
        if self.residual:
            raise ValueError("an int8 layer with a residual gives no bytes per output")
        return np.ascontiguousarray(np.asarray(grids, np.float32).reshape(4, self.out_features).T)

    def bytes_for(self, x: np.ndarray | None, terms: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        """As Int8Lanes.bytes_for, by int8_ir's `bytes_out`."""
        lead = given.shape[:-1] if x is None else x.shape[:-1]
        n, m = math.prod(lead), self.out_features
        rows, out = _bytes_buffer(m, n, terms[0, 2] != 0)
        if n:
            got = (byte_rows(given).view(np.float32), *self._terms) if given is not None else \
                self._x_rows(transposed(x.reshape(-1, self.in_features)))
            if self._bytes_fn is None:
                self._bytes_fn = compile_ir(int8_ir(dataclasses.replace(self.config, bytes_out=True)), SIGNATURE.name)
            # (the driver reads y's token count from yt's shape: n, on rows holding n bytes)
            yt = np.lib.stride_tricks.as_strided(rows, (m, n), rows.strides)
            self._kernel(*got, yt, terms, self._bytes_fn)
        return out.T.reshape(lead + (m,))

    def _kernel(self, xq: np.ndarray, corr: np.ndarray, mult: np.ndarray, yt: np.ndarray, rt: np.ndarray,
                fn: int | None = None) -> None:
        bounds = self._split()
        run(self._driver, SIGNATURE, len(bounds) - 1, 1, self._fns[2] if fn is None else fn, xq, self.indptr,
            self.split, self.blocks, self.weights, corr, mult, self.bias, self._requant, yt, rt, bounds)

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        """The fraction of outputs [start, stop)'s dense multiply-adds not done: the
        4-blocks not stored."""
        stop = self.out_features if stop is None else stop
        return 1 - int(self.indptr[stop] - self.indptr[start]) / max(-(-self.in_features // 4) * (stop - start), 1)

    def _split(self) -> np.ndarray:
        n = threads()
        if self._bounds[0] != n:
            self._bounds = (n, balanced_bounds(self.indptr, n))
        return self._bounds[1]


ON_FLOAT_CHUNK = 128  # inputs per K-chunk of Int8OnFloat's sparse kernel
EXACT_FLOAT = 1 << 24  # integers up to this magnitude are exact in float32, and so are their sums


class Int8OnFloat(_Quantized):
    """An int8 layer on the FP32 sparse kernel, exactly: x quantized into floats (q - zero
    point, integers in [-255, 255]), the int8 weights as floats, so every product and every
    partial sum is an integer below 2^24 (`exact_on_float` checks this at load) and the
    kernel's float sums equal MatMulInteger's int32 ones; then the scaled epilogue
    (sparse_ir `scaled`): times the output scale, plus the bias, as reference_qlinear.

    For unstructured sparsity without VNNI: the int8 kernel stores whole 4-blocks, several
    times the multiply-adds, where this kernel skips each zero."""

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False):
        super().__init__(weight, scale, mode, x_scale, x_zero_point, bias, activation, residual)
        # in K-chunks of 128 inputs, the FP32 planner's default: with all inputs at once, a
        # 3072-input layer's activations are read from L2 for every stored weight
        self.inner = SparseLinear(weight.astype(np.float32), None, activation, residual, k_chunk=ON_FLOAT_CHUNK,
                                  scaled=True)
        mult = self.scale if mode == "dynamic" else output_scale(mode, np.float32(x_scale), self.scale)
        self._scaled_bias = np.concatenate([self.bias, mult]).astype(np.float32)  # [bias | output scale]
        lanes = vector_lanes()
        self._fns = (compile_ir(range_ir(lanes), RANGE_SIGNATURE.name),
                     compile_ir(quantize_float_ir(lanes), QUANTIZE_FLOAT_SIGNATURE.name))

    @property
    def source(self) -> str:
        return with_driver(self.inner.source, DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        return self.inner.dense_weight().astype(np.int8)

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        """The fraction of outputs [start, stop)'s dense multiply-adds not done."""
        w = self.dense_weight()[:, start:stop]
        return 1 - np.count_nonzero(w) / max(w.size, 1)

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        grid, bias = self._grid_terms(xt, self._scaled_bias, corr=False)  # (a dynamic x's: this call's output scale)
        xf = feature_major_empty(*xt.shape)
        run(load_source(DRIVER_SOURCE).run_quantize_float, QUANTIZE_FLOAT_SIGNATURE, threads(), 1,
            self._fns[1], xt, xf, grid)
        self.inner._run(xf, yt, rt, bias)


def exact_on_float(weight: np.ndarray) -> bool:
    """Whether Int8OnFloat computes this int8 weight exactly: with activations q - zero in
    [-255, 255], every partial sum of a column is at most 255 · Σ|w| in magnitude."""
    return bool(255 * np.abs(weight.astype(np.int64)).sum(axis=0).max(initial=0) < EXACT_FLOAT)


def weight_step(layer: _Quantized) -> np.ndarray:
    """Per output column, the float value of one step of the int8 weight: the node's scale,
    less x's scale where the model folded the two into one constant (static), times the
    output's scale where the sums are requantized (QLinearMatMul divided by it)."""
    step = layer.scale / np.float32(layer.x_scale) if layer.mode == "static" else layer.scale
    return step if layer.requantize is None else step * layer.requantize[0]


def byte_rows(given: np.ndarray) -> np.ndarray:
    """A token-major view [..., in/4] of x's bytes (layernorm.layernorm_to_bytes) as the
    4-block rows [in/4, tokens] the kernel reads, token stride 1 (copied only if not, into
    rows on 64-byte lines as the kernels' own outputs are)."""
    rows = given.reshape(-1, given.shape[-1]).T
    if rows.shape[1] <= 1 or rows.strides[1] == rows.itemsize:
        return rows
    copy = feature_major_empty(*rows.shape).view(rows.dtype)  # (4-byte rows: a float32 array's)
    copy[...] = rows
    return copy


def _bytes_buffer(m: int, n: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(float rows [m, n / 4] of a buffer the kernels store bytes in, as their yᵀ; those
    bytes [m, n], int8 where the grids' lowest value is not 0, else uint8)."""
    rows = feature_major_empty(m, -(-n // 4))
    return rows, rows.view(np.uint8)[:, :n].view(np.int8 if signed else np.uint8)


class _HandsOver(_ReadsBytes):
    """An int8 layer whose kernel can also store its output as the next layer's bytes
    (`quantized_for`, its kernel's `quant_out`), so that the next skips quantizing it."""

    def hands_to(self, nxt) -> bool:
        """Whether this layer's output can go to `nxt` (reading it as x) as the bytes nxt's
        kernel reads: both static and both such layers, no residual or requantized output here."""
        return (isinstance(nxt, _HandsOver) and self.mode == "static" and nxt.mode == "static"
                and not self.residual and self.requantize is None and nxt.in_features == self.out_features)


class Int8Chunked(_HandsOver, _Quantized, SparseLinear):
    """The int8 layer on the float32 sparse kernel's frame with AVX-512 VNNI products
    (sparse_ir's `int8`): its K-chunks, per-thread row order and balanced split, one
    `vpdpbusd` per stored 4-block and vector of 16 tokens, the i32 partial sums passed
    through yᵀ between chunks, then Int8Linear's epilogue. The chunk of xq it reads (128
    inputs × 128 tokens: 16 KB) stays in L1 across a thread's rows, where Int8Linear,
    which reads all of a row's inputs at once, reads xq from L2.

    Not for QLinearMatMul's requantized outputs (Int8Linear keeps those)."""

    kind = "int8"
    granule = 4  # K-chunks hold whole 4-blocks

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False, k_chunk: int | None = ON_FLOAT_CHUNK):
        _Quantized.__init__(self, weight, scale, mode, x_scale, x_zero_point, bias, activation, residual)
        k = weight.shape[0]
        self.pattern = analyse(weight)
        self.config = IRConfig(1, activation, residual, 16, SPARSE_VECTORS[16], 16 if k <= 1 << 16 else 32,
                               int8=True)
        indptr, k4, packed = compress_blocks(weight)
        self._csr = indptr, (4 * k4.astype(np.int64)).astype(np.uint16 if k <= 1 << 16 else np.int32), packed
        self._set_vnni_terms(weight)
        self._fns = (*_quantize_fns(), compile_ir(ir_source(self.config), SPARSE_SIGNATURE.name))
        self._driver = load_source(SPARSE_DRIVER_SOURCE).run_rows
        self._handoffs: dict[tuple, tuple] = {}  # by the next layer's grid: see _handoff
        self._set_chunk(k_chunk)

    @property
    def source(self) -> str:
        return with_driver(ir_source(self.config), DRIVER_SOURCE + "\n" + SPARSE_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """The int8 weight [in, out] rebuilt from the stored, chunked and reordered blocks."""
        _, _, indptr, indices, values, order = self._layout
        w = np.zeros((-(-self.in_features // 4) * 4, self.out_features), np.int8)
        rows = np.repeat(order, np.diff(indptr))
        blocks = values.view(np.int8).reshape(-1, 4)
        for b in range(4):
            w[indices.astype(np.int64) + b, rows] = blocks[:, b]
        return w[:self.in_features]

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        """The fraction of outputs [start, stop)'s dense multiply-adds not done: the
        4-blocks not stored."""
        _, _, indptr, _, _, order = self._layout
        per_row = np.bincount(order, weights=np.diff(indptr), minlength=self.out_features)
        stop = self.out_features if stop is None else stop
        return 1 - float(per_row[start:stop].sum()) / max(-(-self.in_features // 4) * (stop - start), 1)

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        xq = feature_major_empty(-(-self.in_features // 4), xt.shape[1])
        self._call(self._fns[2], self._kbias, xt, xq, yt, rt, False)

    def _call(self, fn: int, kbias, xt, xq, yt, rt, given: bool) -> None:
        """The kernel at `fn` on x: quantized into xq first, or `given` there as bytes."""
        if not given:
            kbias = self._quantize_into(xt, xq, kbias)
        SparseLinear._run(self, xq, yt, rt, kbias, fn)

    # --- handing the output to the next int8 layer already quantized --------------------

    def quantized_for(self, x: np.ndarray, nxt: Int8Chunked, given: np.ndarray | None = None) -> np.ndarray:
        """This layer's output for x [..., in], quantized as `nxt` quantizes its x, in the
        4-block rows nxt's kernel reads ([out/4, tokens] of i32): the kernel stores those
        bytes in its epilogue (sparse_ir's `quant_out`) instead of y, and nxt skips its
        own pass over y (`from_quantized`). `given`: x's own bytes already, as a token-major
        view (layernorm.layernorm_to_bytes), which this layer reads instead of quantizing x."""
        x2 = x.reshape(-1, self.in_features)
        n, m = x2.shape[0], self.out_features
        xq = feature_major_empty(-(-m // 4), n)
        if n:
            if m % 4:
                xq[-1] = 0  # (the bytes past the last output: nxt's padded weights are 0 there)
            fn, kbias = self._handoff(nxt)
            yt = feature_major_empty(m, n)  # (the partial sums between K-chunks)
            if given is None:
                self._call(fn, kbias, transposed(x2), feature_major_empty(-(-self.in_features // 4), n), yt, xq, False)
            else:
                gt = byte_rows(given)
                self._call(fn, kbias, gt, gt, yt, xq, True)
        return xq

    def _on_x(self, xq: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._call(self._fns[2], self._kbias, xq, xq, yt, rt, True)

    def _handoff(self, nxt: Int8Chunked) -> tuple:
        """(the quant_out kernel, [bias | scale | correction | nxt's grid]), made on first use."""
        key = (float(nxt.x_scale), nxt._zero, nxt._lo)
        made = self._handoffs
        if key not in made:
            scale, zero, lo = nxt._x_quantization()
            cfg = dataclasses.replace(self.config, quant_out=True)
            fn = compile_ir(ir_source(cfg), SPARSE_SIGNATURE.name)
            made[key] = fn, np.concatenate([self._kbias, np.array([scale, zero, lo, lo + 255], np.float32)])
        return made[key]


class Int8Dense(_Quantized, DenseLinear):
    """A dense (or nearly dense) int8 layer on the register-blocked GEMM (dense_ir's
    `int8`) with AVX-512 VNNI: the weight in panels of 4-blocks, x quantized into 4-block
    rows as for the sparse kernels, one `vpdpbusd` per accumulator and 4-block, then
    Int8Linear's epilogue. Not for requantized outputs."""

    kind = "int8"

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False):
        _Quantized.__init__(self, weight, scale, mode, x_scale, x_zero_point, bias, activation, residual)
        k, m = weight.shape
        self.config = DenseConfig(activation, residual, 16, 6, 4, int8=True)
        rows, k4 = self.config.rows, -(-k // 4)
        panels = -(-m // rows)
        padded = np.zeros((4 * k4, panels * rows), np.int8)
        padded[:k, :m] = weight
        blocks = padded.reshape(k4, 4, panels * rows).transpose(0, 2, 1).copy().view(np.int32)[..., 0]
        # wp[p, k4, r]: the 4-block (W[4·k4 .. 4·k4 + 3, j]) of output j = p·rows + r, as float32 bits
        self.weight = np.ascontiguousarray(blocks.reshape(k4, panels, rows).transpose(1, 0, 2)).view(np.float32)
        self._set_vnni_terms(weight)
        self._fns = _quantize_fns()
        self._fn = compile_ir(dense_ir(self.config), DENSE_SIGNATURE.name)
        self._driver = load_source(DENSE_DRIVER_SOURCE).run_panels
        width = self.config.lanes * self.config.vectors
        self.token_tile = -(-DENSE_TOKEN_TILE // width) * width

    @property
    def source(self) -> str:
        return with_driver(dense_ir(self.config), DRIVER_SOURCE + "\n" + DENSE_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """The int8 weight [in, out] rebuilt from the panels."""
        blocks = self.weight.view(np.int8).reshape(self.weight.shape[0], self.weight.shape[1], -1, 4)
        w = blocks.transpose(1, 3, 0, 2).reshape(4 * blocks.shape[1], -1)  # [in (padded), out (padded)]
        return np.ascontiguousarray(w[:self.in_features, :self.out_features])

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        return 0.0  # every multiply-add done

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        xq = feature_major_empty(-(-self.in_features // 4), xt.shape[1])
        kbias = self._quantize_into(xt, xq)
        parts = max(1, min(threads(), self.weight.shape[0]))
        ntok = xq.shape[1]
        dense_panels(self._driver, self._fn, xq, self.weight, kbias, yt, rt, parts,
                     ntok if ntok <= 128 else self.token_tile)


# --- outputs in the lanes (lanes_ir) -------------------------------------------------------

def has_lanes() -> bool:
    """Whether this CPU runs lanes_ir's kernel: AVX-512 VNNI, and VBMI's `vpermi2b`."""
    return has_vnni() and "+avx512vbmi" in host_cpu()[1]


SHIFT = {WINDOW: WINDOW.bit_length() - 1, GROUP: GROUP.bit_length() - 1}  # (both powers of two: shifts, not divisions)


def lane_slot_count(weight: np.ndarray) -> int:
    """How many slots lane_slots stores for this weight (its 2 instructions per slot and
    token are what the planner weighs), without storing them."""
    k, m = weight.shape
    nw = -(-k // WINDOW)
    nz = np.zeros((nw * WINDOW, m), np.bool_)
    nz[:k] = weight != 0
    counts = nz.reshape(nw, WINDOW, m).sum(axis=1)
    return int((-(-counts // 4)).reshape(nw, m // GROUP, GROUP).max(axis=2).sum())


def lane_slots(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """lanes_ir's weights for an int8 weight [in, out] (out a multiple of 16): (starts,
    idx, w). For group g of 16 outputs and window v of 128 inputs, slots starts[g · nw + v]
    on; slot s holds, for lane i (output 16g + i), the input offsets in the window (idx[s,
    4i .. 4i + 3]) and the weights (w[s, 4i ..]) of the row's nonzeros 4s', 4s' + 1, ...
    of that window, in input order; rows with fewer nonzeros than the group's most are
    padded with offset 0 and weight 0."""
    k, m = weight.shape
    nw, groups = -(-k // WINDOW), m // GROUP
    padded = weight if k == nw * WINDOW else np.concatenate([weight, np.zeros((nw * WINDOW - k, m), np.int8)])
    by_window = np.ascontiguousarray(padded.reshape(nw, WINDOW, m).transpose(0, 2, 1)).reshape(-1)  # [nw, m, 128]
    where = np.flatnonzero(by_window != 0)  # (a bool array's: faster than the int8 array's own)
    column, offset = where >> SHIFT[WINDOW], (where & (WINDOW - 1)).astype(np.uint8)  # column: window · m + output
    per_window = np.diff(np.searchsorted(where, np.arange(nw + 1) * (m * WINDOW)))
    window = np.repeat(np.arange(nw), per_window)
    out = column - window * m
    counts = np.bincount(column, minlength=nw * m)
    rank = np.arange(len(where)) - (np.cumsum(counts) - counts)[column]  # the nonzero's place in its row's window
    slots = (-(-counts // 4)).reshape(nw, groups, GROUP).max(axis=2).T  # [groups, nw]
    starts = np.zeros(groups * nw + 1, np.int32)
    np.cumsum(slots.reshape(-1), out=starts[1:])
    at = (starts[(out >> SHIFT[GROUP]) * nw + window] + (rank >> 2)) * 64 + (out & (GROUP - 1)) * 4 + (rank & 3)
    idx = aligned_empty((int(starts[-1]), 64), np.uint8)
    w = aligned_empty((int(starts[-1]), 64), np.int8)
    idx[:], w[:] = 0, 0
    idx.reshape(-1)[at], w.reshape(-1)[at] = offset, by_window[where]
    return starts, idx, w


class Int8Lanes(_HandsOver, _Quantized):
    """The int8 layer with 16 outputs in the lanes (lanes_ir): for scattered weights, where
    the 4-block kernel (Int8Chunked) stores mostly zeros. x quantized into the same 4-block
    rows as for the other VNNI kernels (so a LayerNorm's bytes serve it too), the same
    epilogue, bit for bit. Needs AVX-512 VBMI (has_lanes) and out_features a multiple of 16."""

    kind = "int8"

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False, requantize: np.ndarray | None = None):
        _Quantized.__init__(self, weight, scale, mode, x_scale, x_zero_point, bias, activation, residual, requantize)
        if self.out_features % GROUP:
            raise ValueError(f"Int8Lanes needs outputs in groups of {GROUP}, not {self.out_features}")
        self.config = LanesConfig(activation, residual, requantize=requantize is not None)
        self.starts, self.idx, self.w = lane_slots(weight)
        self.windows = -(-self.in_features // WINDOW)
        self._set_vnni_terms(weight)
        self._fns = (*_quantize_fns(), compile_ir(lanes_ir(self.config), LANES_SIGNATURE.name))
        self._per_thread = threading.local()
        self._bounds: dict[int, np.ndarray] = {}  # each part's groups, by the thread count
        self._driver = load_source(LANES_DRIVER_SOURCE).run_lanes
        self._handoffs: dict[tuple, tuple] = {}  # by the next layer's grid: see _handoff
        self._bytes_fn: int | None = None  # (bytes_for's kernel, made on first use)

    @property
    def source(self) -> str:
        return with_driver(lanes_ir(self.config), LANES_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """The int8 weight [in, out] rebuilt from the slots."""
        nw = self.windows
        cell = np.repeat(np.arange(len(self.starts) - 1), np.diff(self.starts))  # slot → group · nw + window
        group, window = np.divmod(cell, nw)
        w = np.zeros((nw * WINDOW, self.out_features), np.int8)
        s, b = np.nonzero(self.w)
        w[window[s] * WINDOW + self.idx[s, b], group[s] * GROUP + b // 4] = self.w[s, b]
        return w[:self.in_features]

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        """The fraction of outputs [start, stop)'s dense multiply-adds not done: each slot
        does 4 per output of its group."""
        stop = self.out_features if stop is None else stop
        per_group = 4 * np.diff(self.starts[::self.windows]).astype(np.int64)
        per_output = np.repeat(per_group, GROUP)
        return 1 - float(per_output[start:stop].sum()) / max(self.in_features * (stop - start), 1)

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        xq = feature_major_empty(-(-self.in_features // 4), xt.shape[1])
        self._kernel(xq, yt, rt, self._quantize_into(xt, xq))

    def _on_x(self, xq: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._kernel(xq, yt, rt, self._kbias)

    # --- handing the output to the next int8 layer already quantized (as Int8Chunked does) ---

    def quantized_for(self, x: np.ndarray, nxt, given: np.ndarray | None = None) -> np.ndarray:
        """This layer's output for x [..., in], quantized as `nxt` quantizes its x, in its 4-block
        rows ([out/4, tokens] of i32), stored by the kernel's epilogue (lanes_ir's `quant_out`)
        instead of y. `given`: x's own bytes already (Int8Chunked.quantized_for)."""
        x2 = x.reshape(-1, self.in_features)
        n = x2.shape[0]
        out = feature_major_empty(self.out_features // 4, n)
        if n:
            fn, terms = self._handoff(nxt)
            xq, terms = self._x_bytes(x2, given, terms)
            self._kernel(xq, out, out, terms, fn)
        return out

    def bytes_terms(self, grids: np.ndarray) -> np.ndarray:
        """What `bytes_for` takes for outputs quantized per output as QuantizeLinear does,
        output j on grids[:, j] ([scale, zero point, lowest, highest] rows, float32; one
        8-bit type for all): the epilogue's terms, then the grids."""
        if self.residual or self.config.quant_out:
            raise ValueError("an int8 layer with a residual or storing the next layer's bytes gives no bytes per output")
        return np.concatenate([self._kbias, np.asarray(grids, np.float32).reshape(-1)])

    def bytes_for(self, x: np.ndarray | None, terms: np.ndarray, given: np.ndarray | None = None) -> np.ndarray:
        """y for x [..., in] (or for x's bytes `given`, as from_quantized takes them)
        quantized per output on the grids of `terms` (bytes_terms), as those grids' type's
        bytes (uint8 where the lowest is 0, else int8): feature-major [..., out], each
        output's tokens contiguous. The kernel stores the bytes instead of y (lanes_ir's
        `bytes_out`)."""
        lead = given.shape[:-1] if x is None else x.shape[:-1]
        n, m = math.prod(lead), self.out_features
        rows, out = _bytes_buffer(m, n, terms[-2 * m] != 0)
        if n:
            xq, terms = self._x_bytes(x, given, terms)
            self._kernel(xq, rows, rows, terms, self._bytes_kernel())
        return out.T.reshape(lead + (m,))

    def _x_bytes(self, x: np.ndarray | None, given: np.ndarray | None, terms: np.ndarray) -> tuple:
        """(x's bytes as the kernel reads them, the epilogue's terms for them): the bytes
        `given`, or x [..., in] quantized into new 4-block rows, with a dynamic x's own
        correction and scale in the terms."""
        if given is not None:
            return byte_rows(given), terms
        x2 = x.reshape(-1, self.in_features)
        xq = feature_major_empty(-(-self.in_features // 4), x2.shape[0])
        return xq, self._quantize_into(transposed(x2), xq, terms)

    def _bytes_kernel(self) -> int:
        if self._bytes_fn is None:
            self._bytes_fn = compile_ir(lanes_ir(dataclasses.replace(self.config, bytes_out=True)), LANES_SIGNATURE.name)
        return self._bytes_fn

    def _handoff(self, nxt) -> tuple:
        """(the quant_out kernel, [bias | scale | correction | nxt's grid]), made on first use."""
        key = (float(nxt.x_scale), nxt._zero, nxt._lo)
        if key not in self._handoffs:
            scale, zero, lo = nxt._x_quantization()
            fn = compile_ir(lanes_ir(dataclasses.replace(self.config, quant_out=True)), LANES_SIGNATURE.name)
            self._handoffs[key] = fn, np.concatenate([self._kbias, np.array([scale, zero, lo, lo + 255], np.float32)])
        return self._handoffs[key]

    def _kernel(self, xq: np.ndarray, yt: np.ndarray, rt: np.ndarray, terms: np.ndarray, fn: int | None = None) -> None:
        """The kernel (`fn`, by default the layer's) over all tokens, the groups split between
        the threads by their slots. The scratch is the calling thread's own (a model may run
        in several threads at once), made once per thread; while a tape is made, the tape's."""
        parts = threads()
        shape = (parts, TOKENS * self.windows * WINDOW // 4)
        scratch = getattr(self._per_thread, "scratch", None)
        if taping():  # (a tape's own, which its replays hold: no thread's is)
            scratch = aligned_empty(shape, np.int32)
        elif scratch is None or scratch.shape[0] != parts:
            scratch = self._per_thread.scratch = aligned_empty(shape, np.int32, lasting=True)
        bounds = self._bounds.get(parts)
        if bounds is None:
            bounds = self._bounds[parts] = balanced_bounds(self.starts[::self.windows].astype(np.int64), parts, 0.0)
        run(self._driver, LANES_SIGNATURE, parts, 1, self._fns[2] if fn is None else fn, xq.view(np.float32),
            -(-self.in_features // 4), self.starts, self.idx, self.w, terms, self.out_features, yt, rt, scratch,
            self.windows, bounds)


LANES_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the int8 kernel with the outputs in the lanes (lanes_ir)
# part c computes the groups [bounds[c], bounds[c + 1]) for all tokens, in row c of the scratch
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(LANES_SIGNATURE) + f"""

@njit(nogil=True, cache=True)
def run_lanes(launch, part, calls, fn, xq, k4, starts, idx, w, terms, m, yt, rt, scratch, windows, bounds):
    for c in range(calls.shape[0]):
        put_int8_lanes(calls, c, fn, xq.ctypes.data, xq.strides[0] // 4, k4, starts.ctypes.data, idx.ctypes.data,
                       w.ctypes.data, terms.ctypes.data, m, yt.ctypes.data, yt.strides[0] // 4, rt.ctypes.data,
                       rt.strides[0] // 4, scratch.ctypes.data + c * scratch.strides[0], windows * {WINDOW // 4},
                       windows, bounds[c], bounds[c + 1], 0, xq.shape[1])
    launch_calls(launch, part, calls.ctypes.data, calls.shape[0], calls.shape[1])
"""
