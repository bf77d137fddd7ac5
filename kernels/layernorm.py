"""LayerNorm over the last axis: the dense numpy reference and two kernels, one per layout.

Token-major input [tokens, features] normalises each row; feature-major input (the
transposed view a sparse Linear returns) normalises each column, with the token loop
innermost and contiguous, and returns feature-major too, which is what the next sparse
layers and residual adds read without a copy.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from ..ops import layer_normalization, op
from .bf16 import packed_pairs
from .compile import compile_ir, load_source, threads, vector_lanes
from .elementwise import RANGES, fake_quantize, reference_fake_quantize, scalar
from .ir import Builder, Signature
from .launch import IMPORTS, put_source, run
from .layout import (
    TokenTiles,
    call_scratch,
    contiguous,
    feature_major_empty,
    token_tiles_for,
    token_tiles_of,
    transposed,
    unit_token_stride,
)
from .lowp_ir import ZERO, bf16_pairs, quantized, store_block_bytes, token_tiled


@op("LayerNorm", fused=True)
def reference_layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None = None, *, epsilon: float = 1e-5,
                        feature_major: bool | None = None, quantize: tuple | None = None) -> np.ndarray:
    """The fused node (lower.mark_layouts): LayerNormalization over the last axis, its one
    output written feature-major when `feature_major` (a layout, not a value: the
    reference ignores it); with `quantize` (a scale and 8-bit zero point,
    lower.quantize_layernorms), rounded to that grid as the FakeQuantize it absorbed."""
    y = layer_normalization(x, scale, bias, axis=-1, epsilon=epsilon)[0]
    return y if quantize is None else reference_fake_quantize(y, *quantize)


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
"""


# Feature-major LayerNorm as LLVM IR: a tile of `vectors` × lanes tokens at a time, the
# token loop in the vector lanes, three passes over the features (shifted sum; sum of squared
# deviations from the mean; the output), each accumulator in a register. Loads and
# stores are masked at the tile's end, so any token range works. The quantizing variant
# rounds each output to a grid (QuantizeLinear then DequantizeLinear with scale qscale and
# zero point qzero, clamped to [qlo, qhi]) before it stores it; the plain one ignores those.
# The variant that also hands its output to an int8 layer stores each output's byte (q
# less qlo) where that layer's kernel reads its x: 4-block rows of xq, row stride ldq in
# i32, tokens 16·i on ldqt · i i32 on (a feature-major xq's ldqt is 16, TokenTiles' ldq
# is: lowp_ir.store_block_bytes); the others ignore xq.
#
# Split by features (`split`, two launches; the others ignore the last five arguments): in
# the first ("stats") each part takes its own h features of every token, the first two
# passes over them, and stores the sum of x less the first feature's (of all hall features)
# and the sum of squared deviations from its own mean as rows 2·part and 2·part + 1 of
# `stats` (row stride lds); in the second ("outputs") each part makes every token's mean
# and variance from all parts' rows (hstep features a part but the last; Chan's combination
# of the parts' sums) and writes its own features.
# The Linear before a LayerNorm splits its output features into parts as this does, and a
# thread claims the same end of each launch (launch.WALK_IR): so each part reads x from
# its own core's cache, where the other way round (tokens into parts) half of every
# token's features came from the other core's.
COLUMNS_SIGNATURE = Signature("layernorm_columns", (
    ("xt", "ptr"), ("ldx", "i64"), ("yt", "ptr"), ("ldy", "i64"), ("scale", "ptr"), ("bias", "ptr"), ("eps", "float"),
    ("h", "i64"), ("t0", "i64"), ("t1", "i64"), ("qscale", "float"), ("qzero", "float"), ("qlo", "float"),
    ("qhi", "float"), ("xq", "ptr"), ("ldq", "i64"), ("stats", "ptr"), ("lds", "i64"), ("part", "i64"),
    ("hall", "i64"), ("hstep", "i64"), ("ldqt", "i64")))


def _outputs(e: Builder, xs, means: list[str], invs: list[str], i0: str, masks: list, grid: list | None,
             to_bytes: bool, to_pairs: bool = False) -> None:
    """The third pass over the features of tokens from i0: each output, rounded to the
    grid if any, stored; with to_bytes, also its byte (q less the lowest value) in the
    4-block rows of xq, four features packed into each token's i32 and stored at once
    (the features past the last whole 4-block: a masked byte store each); with to_pairs,
    also its bfloat16 in the pair rows of xq (pair row k: features 2k and 2k + 1, in its
    low and high halves; 0 in the high half past the last feature), as bf16.packed_pairs
    rounds them."""
    vt, iv = e.vt, f"<{e.lanes} x i32>"

    def normalised(f):  # (the outputs, or with to_bytes the bytes: a vector per vector of tokens)
        _prefetch_row(e, "%yt", "%ldy", f, i0, len(means), write=True)
        a = e.splat(e(f"load float, ptr {e.gep('%scale', f)}, align 4"))
        b = e.splat(e(f"load float, ptr {e.gep('%bias', f)}, align 4"))
        off = e.offset(f, "%ldy", i0)
        ys, qs = [], []
        for v, x in enumerate(xs(f)):
            y = e.fma(e(f"fmul {vt} {e(f'fsub {vt} {x}, {means[v]}')}, {invs[v]}"), a, b)
            if grid:
                step, zero, lo = grid[0], grid[1], grid[2]
                q = quantized(e, y, *grid)
                y = e(f"fmul {vt} {e(f'fsub {vt} {q}, {zero}')}, {step}")
                if to_bytes:
                    qs.append(e(f"fptosi {vt} {e(f'fsub {vt} {q}, {lo}')} to {iv}"))
            e.vstore(y, e.vptr("%yt", off, v), masks[v])
            ys.append(y)
        return qs if to_bytes else ys

    def pair(f, last: bool = False):  # (last: feature f alone, the last of an odd count)
        los = normalised(f)
        his = [ZERO] * len(los) if last else normalised(e(f"add i64 {f}, 1"))
        row = e(f"lshr i64 {f}, 1")
        for v, (lo, hi) in enumerate(zip(los, his)):
            e.vstore(bf16_pairs(e, lo, hi), e.gep("%xq", token_tiled(e, row, "%ldq", i0, v, "%ldqt"), "i32"),
                     masks[v])
        return []

    def four(f, _acc):
        packed = normalised(f)
        for i in range(1, 4):
            more = normalised(e(f"add i64 {f}, {i}"))
            packed = [e(f"or {iv} {p}, {e(f'shl {iv} {q}, {e.splat_i32(8 * i)}')}") for p, q in zip(packed, more)]
        row = e(f"lshr i64 {f}, 2")
        for v, p in enumerate(packed):
            e.vstore(e(f"bitcast {iv} {p} to {vt}"), e.gep("%xq", token_tiled(e, row, "%ldq", i0, v, "%ldqt"), "i32"),
                     masks[v])
        return []

    if to_pairs:
        even = e("and i64 %h, -2")
        e.loop("0", even, 2, [], lambda f, _: pair(f))
        odd, done = e.fresh("odd"), e.fresh("paired")
        e.cond_br(e(f"icmp ult i64 {even}, %h"), odd, done)
        e.label(odd)
        pair(even, last=True)
        e.br(done)
        e.label(done)
    elif to_bytes:
        whole = e("and i64 %h, -4")
        e.loop("0", whole, 4, [], four)
        e.loop(whole, "%h", 1, [], lambda f, _: store_block_bytes(e, normalised(f), f, "%xq", "%ldq", i0, masks,
                                                                  "%ldqt") or [])
    else:
        e.loop("0", "%h", 1, [], lambda f, _: normalised(f) and [])


# Rows the first pass (reading xᵀ) and the last (writing yᵀ) prefetch ahead of the row they
# are on: a tile's rows are a row stride apart (over 4 KB with many tokens), which no
# hardware prefetcher follows; the first pass reads them from L3 (the second finds them
# in L2) and the last writes lines not yet in any cache. (bench/README, tenth session.)
ROWS_AHEAD = 16


def _prefetch_row(e: Builder, base: str, ld: str, f: str, i0: str, vectors: int, write: bool = False) -> None:
    """Prefetch (for writing, if `write`) the tile's lines of row f + ROWS_AHEAD of `base`
    (row stride `ld`), or of the last row past the end."""
    ahead = e(f"add i64 {f}, {ROWS_AHEAD}")
    row = e(f"select i1 {e(f'icmp slt i64 {ahead}, %h')}, i64 {ahead}, i64 {e('sub i64 %h, 1')}")
    e.prefetch_row(base, ld, row, i0, vectors, write)


def _deviations(e: Builder, xs, i0: str, vectors: int, shift: list[str], start: str):
    """The first two passes over the h features of tokens from i0: the sums of x - shift
    (from feature `start` on), the means, and the sums of the squared deviations from them.
    The sum is of x - x[a feature]: with a large mean a plain float32 sum loses the digits
    the deviations live in."""
    vt = e.vt
    inv_h = e.splat(e(f"fdiv float 1.0, {e('sitofp i64 %h to float')}"))

    def shifted_sum(f, acc):
        _prefetch_row(e, "%xt", "%ldx", f, i0, vectors)
        return [e(f"fadd {vt} {a}, {e(f'fsub {vt} {x}, {s_}')}") for a, x, s_ in zip(acc, xs(f), shift)]

    _, sums = e.loop(start, "%h", 1, [(vt, "zeroinitializer")] * vectors, shifted_sum)
    means = [e.fma(s_, inv_h, x0) for s_, x0 in zip(sums, shift)]

    def squares(f, acc):
        ds = [e(f"fsub {vt} {x}, {m}") for x, m in zip(xs(f), means)]
        return [e.fma(d, d, a) for d, a in zip(ds, acc)]

    _, sqs = e.loop("0", "%h", 1, [(vt, "zeroinitializer")] * vectors, squares)
    return sums, means, sqs


def _combined(e: Builder, i0: str, masks: list, shift: list[str], inv_h: str) -> tuple[list[str], list[str]]:
    """Every part's rows of `stats` for tokens from i0 made into the hall features' means
    and sums of squared deviations: the mean from the sum of the parts' sums (of x less
    the first feature's `shift`; inv_h 1 / hall), then each part's squared deviations plus
    its features times the squared distance of its mean from the whole's."""
    vt, vectors = e.vt, len(masks)
    ceil = e("sub i64 %hstep, 1")
    parts = e(f"sdiv i64 {e(f'add i64 %hall, {ceil}')}, %hstep")

    def rows(c, k):
        return e.row_vectors("%stats", "%lds", e(f"add i64 {e(f'mul i64 {c}, 2')}, {k}"), i0, masks)

    _, total = e.loop("0", parts, 1, [(vt, "zeroinitializer")] * vectors,
                      lambda c, acc: [e(f"fadd {vt} {a}, {s_}") for a, s_ in zip(acc, rows(c, 0))])
    means = [e.fma(t, inv_h, x0) for t, x0 in zip(total, shift)]
    shifted = [e(f"fmul {vt} {t}, {inv_h}") for t in total]

    def spread(c, acc):
        n = e(f"sub i64 %hall, {e(f'mul i64 {c}, %hstep')}")
        n = e(f"select i1 {e(f'icmp slt i64 {n}, %hstep')}, i64 {n}, i64 %hstep")
        n = e(f"sitofp i64 {n} to float")
        n, inv_n = e.splat(n), e.splat(e(f"fdiv float 1.0, {n}"))
        ds = [e(f"fsub {vt} {e(f'fmul {vt} {s_}, {inv_n}')}, {m}") for s_, m in zip(rows(c, 0), shifted)]
        return [e.fma(e(f"fmul {vt} {d}, {n}"), d, e(f"fadd {vt} {a}, {q}")) for d, a, q in zip(ds, acc, rows(c, 1))]

    _, sqs = e.loop("0", parts, 1, [(vt, "zeroinitializer")] * vectors, spread)
    return means, sqs


def _columns(e: Builder, vectors: int, quantize: bool, to_bytes: bool = False, split: str = "",
             to_pairs: bool = False) -> None:
    vt = e.vt
    eps = e.splat("%eps")
    grid = [e.splat(f"%q{v}") for v in ("scale", "zero", "lo", "hi")] if quantize else None
    count = "%hall" if split == "outputs" else "%h"
    inv_h = e.splat(e(f"fdiv float 1.0, {e(f'sitofp i64 {count} to float')}"))

    def tile(i0, vectors):
        masks = e.lane_masks(i0, vectors, "%t1")

        def xs(f):
            return e.row_vectors("%xt", "%ldx", f, i0, masks)

        if not split:
            _, means, sqs = _deviations(e, xs, i0, vectors, xs("0"), "1")
        else:  # (every part's sums from the first of all the features, hstep · part back)
            shift = xs(e(f"sub i64 0, {e('mul i64 %part, %hstep')}"))
            if split == "outputs":
                means, sqs = _combined(e, i0, masks, shift, inv_h)
            else:
                sums, _, sqs = _deviations(e, xs, i0, vectors, shift, "0")
        if split == "stats":
            row = e("mul i64 %part, 2")
            for r, values in ((row, sums), (e(f"add i64 {row}, 1"), sqs)):
                start = e.offset(r, "%lds", i0)
                for v, (value, mask) in enumerate(zip(values, masks)):
                    e.vstore(value, e.vptr("%stats", start, v), mask)
            return
        invs = [e(f"fdiv {vt} {e.const(1.0)}, {e.vcall('sqrt', e.fma(q, inv_h, eps))}") for q in sqs]
        _outputs(e, xs, means, invs, i0, masks, grid, to_bytes, to_pairs)

    e.vector_tiles("%t0", "%t1", vectors, tile)


def columns_ir(lanes: int, vectors: int = 4, quantize: bool = False, to_bytes: bool = False, split: str = "",
               to_pairs: bool = False) -> str:
    e = Builder(lanes)
    e.function(COLUMNS_SIGNATURE, lambda: _columns(e, vectors, quantize, to_bytes, split, to_pairs))
    return e.module(f"; sparsejit generated kernel: LayerNorm, feature-major, tokens [t0, t1), lanes={lanes} "
                    f"vectors={vectors}" + (", each output rounded to the grid of qscale and qzero" if quantize else "")
                    + (", and its byte stored in the 4-block rows of xq" if to_bytes else "")
                    + (", and its bfloat16 stored in the pair rows of xq" if to_pairs else "")
                    + (f", split by features: {split}" if split else ""))


COLUMNS_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the feature-major LayerNorm IR kernel
# part c normalises tokens [c * step, (c + 1) * step), whole 16-token groups; xq (the
# bytes, if stored) as [16-token tiles, rows, 16] (layout.TokenTiles, or a feature-major
# array seen so)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(COLUMNS_SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_columns(launch, part, calls, fn, xt, yt, scale, bias, eps, grid, xq):
    h, n = xt.shape
    parts = calls.shape[0]
    step = ((n + parts - 1) // parts + 15) // 16 * 16
    for c in range(parts):
        t0 = min(n, c * step)
        t1 = min(n, t0 + step)
        if t0 < t1:
            put_layernorm_columns(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, yt.ctypes.data, yt.strides[0] // 4,
                                  scale.ctypes.data, bias.ctypes.data, eps, h, t0, t1, grid[0], grid[1], grid[2],
                                  grid[3], xq.ctypes.data, xq.strides[1] // 4, 0, 0, c, h, h, xq.strides[0] // 4)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])


# part c takes features [c * hstep, (c + 1) * hstep) of every token (hstep a multiple of 4,
# so that its rows of xq, `per` features to a row, are its own), for a kernel split by
# features (either launch)
@njit(nogil=True, cache=True)
def run_features(launch, part, calls, fn, xt, yt, scale, bias, eps, grid, xq, stats, hstep, per):
    h, n = xt.shape
    parts = calls.shape[0]
    for c in range(parts):
        f0 = c * hstep
        put_layernorm_columns(calls, c, fn, xt.ctypes.data + f0 * xt.strides[0], xt.strides[0] // 4,
                              yt.ctypes.data + f0 * yt.strides[0], yt.strides[0] // 4, scale.ctypes.data + 4 * f0,
                              bias.ctypes.data + 4 * f0, eps, min(hstep, h - f0), 0, n, grid[0], grid[1], grid[2],
                              grid[3], xq.ctypes.data + f0 // per * xq.strides[1], xq.strides[1] // 4,
                              stats.ctypes.data, stats.strides[0] // 4, c, h, hstep, xq.strides[0] // 4)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""


def layernorm_columns(driver, fn: int, xt, yt, scale, bias, eps, grid, xq, parts: int) -> None:
    """run_columns over `parts` parts (both callers of the LayerNorm kernel's driver)."""
    run(driver, COLUMNS_SIGNATURE, parts, 1, fn, xt, yt, scale, bias, eps, grid, token_tiles_of(xq))

@functools.cache
def _columns_kernel(lanes: int, quantize: bool = False, to_bytes: bool = False, split: str = "",
                    to_pairs: bool = False):
    """(IR function, Numba driver) for a vector width, looked up once, as the attention's
    are: every run calls this kernel 25 times for BERT-base."""
    fn = compile_ir(columns_ir(lanes, quantize=quantize, to_bytes=to_bytes, split=split, to_pairs=to_pairs),
                     COLUMNS_SIGNATURE.name)
    driver = load_source(COLUMNS_DRIVER_SOURCE)
    return fn, driver.run_features if split else driver.run_columns


class Grid(NamedTuple):
    """What a LayerNorm rounds its output to (lower.quantize_layernorms), prepared once at
    load: the node's (scale, zero point), and the kernel's [scale, zero point, lowest,
    highest] as float32 (None where FakeQuantize's kernel would not cover it: one float32
    scale and an 8-bit zero point; then the reference runs)."""

    quantize: tuple
    floats: np.ndarray | None

    @classmethod
    def of(cls, quantize: tuple | None) -> Grid | None:
        if quantize is None:
            return None
        s, z = (scalar(v) for v in quantize)
        covered = s is not None and s.dtype == np.float32 and z is not None and z.dtype in RANGES
        return cls(quantize, np.array([s, z, *RANGES[z.dtype]], np.float32) if covered else None)


NO_GRID = np.zeros(4, np.float32)  # what the plain kernel is passed for the grid, and ignores
# Features a part takes when a LayerNorm is split by features: a multiple of the AMX
# kernel's pair of panels (32 output features), so that a part's features are those a
# Linear's part wrote, and of 4 (a part's bytes are whole 4-block rows).
SPLIT_FEATURES = 32
NO_BYTES = np.zeros((1, 1, 16), np.int32)  # what a kernel that stores no bytes is passed for xq (as TokenTiles)


def layernorm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float,
              feature_major: bool | None = None, grid: Grid | None = None) -> np.ndarray:
    """LayerNorm over the last axis. The output is feature-major when `feature_major`
    (the input transposed first if it is not), token-major when False, and in the
    input's layout when None. With a `grid`, the output rounded to it as QuantizeLinear
    then DequantizeLinear would: in the feature-major kernel's stores, or by
    FakeQuantize's kernel after."""
    h = x.shape[-1]
    if not _kernel_takes(x, scale, bias) or (grid is not None and grid.floats is None):
        return reference_layernorm(x, scale, bias, epsilon=epsilon, quantize=grid and grid.quantize)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, h)
    b = np.zeros(h, np.float32) if bias is None else bias
    scale = np.ascontiguousarray(scale, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if feature_major is None:
        feature_major = unit_token_stride(x2) and not x2.flags.c_contiguous
    if feature_major:
        return _run_columns(x2, scale, b, epsilon, grid).T.reshape(lead + (h,))
    y = np.empty(x2.shape, np.float32)
    load_source(LAYERNORM_SOURCE).layernorm_rows(contiguous(x2), scale, b, np.float32(epsilon), y)
    y = y.reshape(lead + (h,))
    return y if grid is None else fake_quantize(y, *grid.quantize)


def layernorm_to_bytes(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, epsilon: float,
                       grid: Grid, tiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`layernorm(..., feature_major=True, grid=grid)`, and the bytes an int8 layer
    quantizing its x to the same grid would make of it: 4-block rows of i32 (byte i of
    row k4 is input 4·k4 + i, less the grid's lowest value; 0 past the last input), as
    the token-major view [..., ceil(h/4)] of a feature-major array, which the int8 kernel
    reads in place (int8.Int8Chunked.from_quantized); `tiled`, as TokenTiles in whole
    64-input K-tiles, for AMX layers (the reference op's stay feature-major, which they
    read too). The kernel stores both at once. `grid` must be one the kernel covers
    (`grid.floats`)."""
    h = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, h)
    n = x2.shape[0]
    rows, kernel = -(-h // 4), _kernel_takes(x, scale, bias)
    if tiled and kernel:
        xq = token_tiles_for(h, 4, lead)
    else:
        xq = feature_major_empty(rows, n).view(np.int32)
        if h % 4:
            xq[-1] = 0
    if not kernel:
        y = layernorm(x, scale, bias, epsilon, True, grid)  # (the reference op; the bytes by numpy from its output)
        step, zero, lo, hi = grid.floats
        padded = np.zeros((n, 4 * xq.shape[0]), np.uint8)
        padded[:, :h] = np.clip(np.rint(y.reshape(n, h) / step) + zero, lo, hi) - lo
        xq[:] = padded.view(np.int32).T
        return y, xq.T.reshape(lead + (xq.shape[0],))
    b = np.zeros(h, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    yt = _run_columns(x2, np.ascontiguousarray(scale, dtype=np.float32), b, epsilon, grid, xq)
    return yt.T.reshape(lead + (h,)), xq if xq.ndim == 3 else xq.T.reshape(lead + (rows,))


def layernorm_to_pairs(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None,
                       epsilon: float) -> tuple[np.ndarray, TokenTiles]:
    """`layernorm(..., feature_major=True)`, and the pair rows a bf16 AMX layer would pack
    it into (bf16.packed_pairs, laid out as amx.BF16AmxLinear._packed lays them: TokenTiles
    in whole K-tiles, the padded rows zero), which that layer runs on (`from_quantized`)
    instead of packing x. The kernel stores both at once."""
    h = x.shape[-1]
    lead = x.shape[:-1]
    xp = token_tiles_for(h, 2, lead)
    if not _kernel_takes(x, scale, bias) or not math.prod(lead):
        y = layernorm(x, scale, bias, epsilon, True)  # (the reference op, or no tokens; the pairs by the pack kernel)
        packed_pairs(transposed(y.reshape(-1, h)), xp[:, :-(-h // 2)])
        return y, xp
    b = np.zeros(h, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
    yt = _run_columns(x.reshape(-1, h), np.ascontiguousarray(scale, dtype=np.float32), b, epsilon, None, xp, True)
    return yt.T.reshape(lead + (h,)), xp


def _kernel_takes(x: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> bool:
    """Whether the kernels take these arguments (else the reference op runs)."""
    h = x.shape[-1]
    return x.dtype == np.float32 and scale.shape == (h,) and (bias is None or bias.shape == (h,))


def _run_columns(x2: np.ndarray, scale: np.ndarray, bias: np.ndarray, epsilon: float, grid: Grid | None,
                 xq: np.ndarray | None = None, pairs: bool = False) -> np.ndarray:
    """yᵀ [h, tokens] by the feature-major kernel for x2 [tokens, h] (scale and bias float32,
    contiguous): rounded to `grid` if any, and with xq also storing its bytes there (`pairs`:
    its bfloat16 pair rows)."""
    n, h = x2.shape
    xt, yt = transposed(x2), feature_major_empty(h, n)
    floats, xq = NO_GRID if grid is None else grid.floats, NO_BYTES if xq is None else xq
    to_bytes = xq is not NO_BYTES and not pairs
    parts = threads()
    hstep = -(-h // parts // SPLIT_FEATURES) * SPLIT_FEATURES
    if parts == 1 or hstep >= h:
        fn, run_columns = _columns_kernel(vector_lanes(), grid is not None, to_bytes, to_pairs=pairs)
        layernorm_columns(run_columns, fn, xt, yt, scale, bias, np.float32(epsilon), floats, xq, parts)
        return yt
    parts = -(-h // hstep)
    lds = -(-n // 16) * 16
    stats = call_scratch(2 * parts * lds * 4).view(np.float32)[:2 * parts * lds].reshape(2 * parts, lds)
    for quantize, stores, split in ((False, (False, False), "stats"), (grid is not None, (to_bytes, pairs), "outputs")):
        fn, driver = _columns_kernel(vector_lanes(), quantize, stores[0], split, to_pairs=stores[1])
        run(driver, COLUMNS_SIGNATURE, parts, 1, fn, xt, yt, scale, bias, np.float32(epsilon), floats,
            token_tiles_of(xq), stats, hstep, 2 if pairs else 4)
    return yt
