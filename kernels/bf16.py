"""bfloat16 Linear layers (`load(..., precision="bf16")`), sparse and dense: the weights
rounded to bfloat16 at load, the activations rounded to bfloat16 as the layer reads
them, products summed in float32 by AVX512-BF16's `vdpbf16ps`, the epilogues in float32
as in every other Linear kernel.

`vdpbf16ps` takes pairs: per float lane it adds a·b + c·d for two bfloat16 pairs held in
one 32-bit lane. So the weights are stored as pairs of consecutive inputs (2k, 2k + 1)
holding a nonzero, the two bfloat16 in one i32, and the activations are packed feature-
major into pair rows xp [in/2, tokens] of i32 (input 2k in the low half) by the
conversion kernel here, once per call. The sparse kernel is sparse_ir's with `bf16`:
the same tiles, K-chunks, row order and epilogues, one `vdpbf16ps` per stored pair and
vector of tokens where the float32 kernel has one fma per stored weight. Half the bytes
of activations per input, and at 4-block pruning half the instructions.

At scattered pruning most such pairs would hold one nonzero (as many instructions as the
float32 kernel), so those weights pair any two of a row's inputs instead
(BF16ScatteredLinear): two slots' worth of weights per pair, x rounded once per call into
bfloat16 rows laid out so that one in-lane interleave of two rows' vectors makes the
pairs (rows_ir, sparse_ir._add_scattered); per pair and 16 tokens, two half-width loads,
one shuffle and one `vdpbf16ps` where the float32 kernel has two loads and two fmas.
The dense GEMM (dense_ir's with `bf16`) holds its weights as panels of pairs: one
`vdpbf16ps` per accumulator and pair of inputs where float32 has one fma per input.

bfloat16 keeps float32's exponent and 8 significant bits (relative rounding error at most
2⁻⁸). Rounding is to nearest, ties to even, on both sides (numpy's `to_bf16` below, and LLVM's
`fptrunc` to bfloat, which is `vcvtneps2bf16`), NaN kept NaN.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import numpy as np

from .compile import compile_ir, host_cpu, load_source, threads
from .compress import analyse, chunk_rows, compress
from .dense_ir import DenseConfig, dense_ir
from .ir import Builder, Signature, with_driver
from .launch import IMPORTS, put_source, run
from .layout import feature_major_empty, token_tiles_of, transposed
from .linear import (
    DENSE_DRIVER_SOURCE,
    DENSE_TOKEN_TILE,
    SPARSE_DRIVER_SOURCE,
    SPARSE_VECTORS,
    DenseLinear,
    SparseLinear,
    TakesOwnX,
    _bias,
    linear_epilogue,
)
from .lowp_ir import pack_pair_rows, store_rows
from .sparse_ir import SIGNATURE as SPARSE_SIGNATURE
from .sparse_ir import IRConfig, ir_source


def has_bf16() -> bool:
    """Whether this CPU has AVX512-BF16's `vdpbf16ps` on 512-bit vectors."""
    features = host_cpu()[1]
    return "+avx512bf16" in features and "+avx512f" in features


def to_bf16(x: np.ndarray) -> np.ndarray:
    """The bfloat16 bits (uint16) of float32 x, rounded to nearest, ties to even; NaN
    stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return np.where(np.isnan(x), (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def from_bf16(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bits."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def rounded(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 and back: what the kernel computes with."""
    return from_bf16(to_bf16(x))


def reference_bf16_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                          activation: str = "none", residual: np.ndarray | None = None) -> np.ndarray:
    """The numpy meaning of a bf16 layer: x and W rounded to bfloat16, the products and
    sums in float64 (the kernel sums in float32, in another order), then the float32
    epilogue."""
    y = (rounded(x).astype(np.float64) @ rounded(weight).astype(np.float64)).astype(np.float32)
    return linear_epilogue(y, bias, activation, residual)


PACK_SIGNATURE = Signature("pack_pairs", (("xt", "ptr"), ("ldx", "i64"), ("xp", "ptr"), ("ldp", "i64"), ("k", "i64"),
                                          ("p0", "i64"), ("p1", "i64"), ("ntok", "i64"), ("ldpt", "i64")))


def pack_ir() -> str:
    e = Builder(16)
    e.function(PACK_SIGNATURE, lambda: pack_pair_rows(e, "%xt", "%ldx", "%k", "%xp", "%ldp", "%p0", "%p1", "%ntok",
                                                      "%ldpt"))
    return e.module("; sparsejit generated kernel: float xt packed into bfloat16 pairs of inputs\n"
                    "; xp[p, t] = bf16(xt[2p, t]) | bf16(xt[2p + 1, t]) << 16 (0 past the last input; tokens 16 i on"
                    " at ldpt i)")


DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the bf16 kernels' packing (the sparse ones then
# run on the sparse kernel's driver, linear.SPARSE_DRIVER_SOURCE)
# part c packs xt's pairs of rows [c * pairs / parts, (c + 1) * pairs / parts) into xp
# (or, for the scattered kernel, rounds xt's rows to bfloat16 rows of xp: rows_ir); xp as
# [16-token tiles, rows, 16] (layout.TokenTiles, or a feature-major array seen so)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(PACK_SIGNATURE) + """

@njit(nogil=True, cache=True)
def pack_pairs(launch, part, calls, fn, xt, xp):
    pairs = xp.shape[1]
    parts = calls.shape[0]
    for c in range(parts):
        put_pack_pairs(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, xp.ctypes.data, xp.strides[1] // 4,
                       xt.shape[0], c * pairs // parts, (c + 1) * pairs // parts, xt.shape[1], xp.strides[0] // 4)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""


@functools.cache
def _pack_fn() -> int:
    return compile_ir(pack_ir(), PACK_SIGNATURE.name)


def packed_pairs(xt: np.ndarray, xp: np.ndarray | None = None) -> np.ndarray:
    """xp ([in/2, tokens], or TokenTiles' [tiles, in/2, 16]; a new feature-major array when
    None) with xt's pairs of rows packed into it by pack_ir's kernel."""
    if xp is None:
        xp = feature_major_empty(-(-xt.shape[0] // 2), xt.shape[1])
    run(load_source(DRIVER_SOURCE).pack_pairs, PACK_SIGNATURE, threads(), 1, _pack_fn(), xt,
        token_tiles_of(xp).view(np.float32))  # (i32 rows as float32 bits: one type, one compiled driver)
    return xp


def rows_ir() -> str:
    """xp's rows [p0, p1) = xt's rounded to bfloat16: 16-bit rows (row stride 2·ldp in
    16-bit units), in groups of 32 tokens, each group's two halves interleaved by 4-token
    pieces (tokens 0-3, 16-19, 4-7, 20-23, ...) as sparse_ir._add_scattered reads them, the
    last group padded with zeros. PACK_SIGNATURE's (k unused), so that the packing's
    driver runs it."""
    e = Builder(16)

    def body():
        ld = e("shl i64 %ldp, 1")
        e.loop("%p0", "%p1", 1, [], lambda r, _: e.tiles("0", "%ntok", 32, lambda t: store_rows(
            e, e.row_vectors("%xt", "%ldx", r, t, e.lane_masks(t, 2, "%ntok")), [None] * 2, "%xp", r, ld, t)) or [])

    e.function(PACK_SIGNATURE, body)
    return e.module("; sparsejit generated kernel: float xt rounded to bfloat16 rows, in groups of 32 tokens\n"
                    "; xp[r, 32g + 8l + i] = bf16(xt[r, 32g + 4l + i]), xp[r, 32g + 8l + 4 + i] = "
                    "bf16(xt[r, 32g + 16 + 4l + i]) (l < 4, i < 4)")


@functools.cache
def _rows_fn() -> int:
    return compile_ir(rows_ir(), PACK_SIGNATURE.name)


def bf16_rows(xt: np.ndarray) -> np.ndarray:
    """xt [in, tokens] rounded to bfloat16, as a new feature-major float32 array of xt's
    shape whose row r holds, in its first half, row r's 16-bit values: the kernel's
    layout (row stride 2·ldx in 16-bit units, each row on a 64-byte line)."""
    k, n = xt.shape
    xb = feature_major_empty(k, n)
    run(load_source(DRIVER_SOURCE).pack_pairs, PACK_SIGNATURE, threads(), 1, _rows_fn(), xt, token_tiles_of(xb))
    return xb


def scattered_pairs(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray) -> tuple:
    """Each row's stored weights (a CSR, maybe K-chunked: segments [indptr[i], indptr[i + 1]))
    paired in their order, two to a slot: (indptr, indices ka | kb << 16 as int32, the two
    bfloat16 packed in an int32, ka's in the low half). A segment's odd last weight pairs
    with a zero weight at its own input."""
    counts = np.diff(indptr)
    pairs = (counts + 1) // 2
    ptr = np.zeros(len(pairs) + 1, np.int64)
    np.cumsum(pairs, out=ptr[1:])
    seg = np.repeat(np.arange(len(pairs)), pairs)
    first = indptr[:-1][seg] + 2 * (np.arange(ptr[-1]) - ptr[:-1][seg])
    has_second = first + 1 < indptr[1:][seg]
    second = np.where(has_second, first + 1, first)
    ka, kb = indices[first].astype(np.int64), indices[second].astype(np.int64)
    wb = np.where(has_second, values[second], 0).astype(np.float32)
    packed = (to_bf16(values[first]).astype(np.uint32) | to_bf16(wb).astype(np.uint32) << np.uint32(16)).view(np.int32)
    return ptr, (ka | kb << 16).astype(np.uint32).view(np.int32), packed


def compress_pairs(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, pair indices k/2 as uint16, the pairs' two bfloat16 packed in an int32) per
    output row: the pairs of consecutive inputs holding a nonzero."""
    k, m = weight.shape
    padded = np.zeros((k + k % 2, m), np.float32)
    padded[:k] = weight
    pairs = padded.reshape(-1, 2, m).transpose(2, 0, 1)  # [out, in/2, 2]
    rows, cols = np.nonzero(pairs.any(axis=2))
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    packed = np.ascontiguousarray(to_bf16(pairs[rows, cols])).view(np.int32).ravel()
    return indptr, cols.astype(np.uint16), packed


class _HandsOver(TakesOwnX):
    """The handover in a chain (executor.TokenChain), as int8.Int8Chunked's: a layer whose
    output the next layer of its own kind reads as x stores it as the x that layer's
    kernel reads (bfloat16 rows, or pair rows: `quantized_for`), in its epilogue (the
    IRConfig flag `handoff`), and the next skips making x (`from_quantized`). That x is
    what the next would have made of the float output, so the results are the same."""

    handoff: str

    def hands_to(self, nxt) -> bool:
        """Whether this layer's output can go to `nxt` (reading it as x) as nxt's own x."""
        return type(nxt) is type(self) and not self.residual and nxt.in_features == self.out_features

    @functools.cached_property
    def _handoff_fn(self) -> int:
        return compile_ir(ir_source(replace(self.config, **{self.handoff: True})), SPARSE_SIGNATURE.name)


class BF16SparseLinear(_HandsOver, SparseLinear):
    """The bf16 sparse kernel for one weight: SparseLinear's K-chunks, row order and thread
    split over stored pairs (indices hold each pair's first input, 2k), with x packed
    into bfloat16 pairs by the driver before the rows run."""

    kind = "sparse-bf16"
    granule = 2  # K-chunks hold whole pairs
    handoff = "pairs_out"  # (_HandsOver: FFN1 stores FFN2's pair rows)

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool,
                 pattern=None, k_chunk: int | None = None):
        k = weight.shape[0]
        config = IRConfig(1, activation, residual, 16, SPARSE_VECTORS[16], 16 if k <= 1 << 16 else 32, bf16=True)
        indptr, pairs, values = compress_pairs(weight)
        csr = indptr, (2 * pairs.astype(np.int64)).astype(np.uint16 if k <= 1 << 16 else np.int32), values
        self._setup(weight, bias, pattern or analyse(weight), config, csr, k_chunk)

    @property
    def source(self) -> str:
        return with_driver(ir_source(self.config) + "\n" + pack_ir(), DRIVER_SOURCE + "\n" + SPARSE_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it: the stored pairs' bfloat16 values as float32."""
        _, _, indptr, indices, values, order = self._layout
        w = np.zeros((self.in_features + 1, self.out_features), np.float32)
        rows = np.repeat(order, np.diff(indptr))
        pairs = from_bf16(values.view(np.uint16).reshape(-1, 2))
        for b in range(2):
            w[indices.astype(np.int64) + b, rows] = pairs[:, b]
        return w[:self.in_features]

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        super()._run(packed_pairs(xt), yt, rt)

    def quantized_for(self, x: np.ndarray, nxt: BF16SparseLinear, given=None) -> np.ndarray:
        """This layer's output for x [..., in] as the pair rows nxt's kernel reads
        ([out/2, tokens] of i32 as float32: packed_pairs' layout). `given` is the int8
        layers' (x's bytes) and is not taken."""
        x2 = x.reshape(-1, self.in_features)
        n, m = x2.shape[0], self.out_features
        xp = feature_major_empty(-(-m // 2), n)
        if n:
            if m % 2:
                xp[-1] = 0  # (the high halves past the last output: nxt's weights there are 0)
            SparseLinear._run(self, packed_pairs(transposed(x2)), feature_major_empty(m, n), xp, fn=self._handoff_fn)
        return xp

    def _on_x(self, xp: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        SparseLinear._run(self, xp, yt, rt)


def scattered_config(activation: str, residual: bool) -> IRConfig:
    """The scattered bf16 kernel's configuration (indices: two 16-bit inputs in an i32)."""
    return IRConfig(1, activation, residual, 16, SPARSE_VECTORS[16], 32, bf16=True, scattered=True)


class BF16ScatteredLinear(_HandsOver, SparseLinear):
    """The bf16 sparse kernel for scattered pruning: each row's stored weights in each
    K-chunk paired two by two whatever their inputs (scattered_pairs), x rounded to
    bfloat16 rows once per call, and per pair and vector of tokens the two rows'
    vectors interleaved into one `vdpbf16ps` (sparse_ir._add_scattered). Needs at most
    65536 inputs."""

    kind = "sparse-bf16"
    handoff = "rows_out"  # (_HandsOver: FFN1 stores FFN2's bfloat16 rows)

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool,
                 pattern=None, k_chunk: int | None = None):
        if weight.shape[0] > 1 << 16:
            raise ValueError(f"the scattered bf16 kernel holds 16-bit input indices: {weight.shape[0]} inputs are "
                             "too many")
        self._setup(weight, bias, pattern or analyse(weight), scattered_config(activation, residual),
                    compress(weight, 1), k_chunk)

    def _set_chunk(self, k_chunk: int | None) -> None:
        indptr, indices, values = self._csr
        self.k_chunk = self.in_features if k_chunk is None else min(k_chunk, self.in_features)
        indptr, indices, values, self.nchunks = chunk_rows(indptr, indices, values, self.in_features, self.k_chunk)
        indptr, indices, values = scattered_pairs(indptr, indices, values)
        m = self.out_features
        self._layout = (0, None, indptr, indices, values, np.tile(np.arange(m, dtype=np.int32), self.nchunks))
        self._arrays()

    @property
    def source(self) -> str:
        return with_driver(ir_source(self.config) + "\n" + rows_ir(), DRIVER_SOURCE + "\n" + SPARSE_DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it: the stored pairs' bfloat16 values as float32."""
        _, _, indptr, indices, values, order = self._layout
        w = np.zeros((self.in_features, self.out_features), np.float32)
        rows = np.repeat(order, np.diff(indptr))
        pairs = from_bf16(values.view(np.uint16).reshape(-1, 2))
        ks = indices.view(np.uint32)
        np.add.at(w, ((ks & 0xFFFF).astype(np.int64), rows), pairs[:, 0])
        np.add.at(w, ((ks >> 16).astype(np.int64), rows), pairs[:, 1])
        return w

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._on_x(bf16_rows(xt), yt, rt)

    def _on_rows(self, fn: int, xb: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        """The kernel `fn` (this layer's, or its handover's) on x's bfloat16 rows xb."""
        # (each slot's two indices go as two uint16: the type the float kernels' driver is built for)
        _, bounds, indptr, indices, values, order = self._arrays()
        run(self._driver, SPARSE_SIGNATURE, len(bounds) - 1, 1, fn, xb, indptr, indices.view(np.uint16),
            values.view(np.float32), self.bias, yt, rt, self.nchunks, order, bounds)

    def quantized_for(self, x: np.ndarray, nxt: BF16ScatteredLinear, given=None) -> np.ndarray:
        """This layer's output for x [..., in] as the bfloat16 rows nxt's kernel reads (a
        [out, tokens] float32 array holding them: bf16_rows's layout). `given` is the
        int8 layers' (x's bytes) and is not taken."""
        x2 = x.reshape(-1, self.in_features)
        n, m = x2.shape[0], self.out_features
        rows = feature_major_empty(m, n)
        if n:  # (yᵀ holds the partial sums between K-chunks: with one chunk, no yᵀ)
            yt = feature_major_empty(m, n) if self.nchunks > 1 else rows
            self._on_rows(self._handoff_fn, bf16_rows(transposed(x2)), yt, rows)
        return rows

    def _on_x(self, xb: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._on_rows(self._fn, xb, yt, rt)


class BF16DenseLinear(DenseLinear):
    """The dense GEMM (dense_ir.py) on bfloat16 pairs: the weight packed into panels of
    pairs at load, x packed into pairs, one `vdpbf16ps` per accumulator and pair of inputs."""

    kind = "dense-bf16"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool):
        k, m = weight.shape
        self.in_features, self.out_features = k, m
        self.config = DenseConfig(activation, residual, 16, 6, 4, bf16=True)
        rows = self.config.rows
        panels, pairs = -(-m // rows), -(-k // 2)
        padded = np.zeros((2 * pairs, panels * rows), np.float32)
        padded[:k, :m] = weight
        packed = to_bf16(padded).reshape(pairs, 2, panels * rows).transpose(0, 2, 1).copy().view(np.int32)[..., 0]
        # wp[p, k2, r]: the pair (W[2·k2, j], W[2·k2 + 1, j]) of output j = p·rows + r, as float32 bits
        self.weight = np.ascontiguousarray(packed.reshape(pairs, panels, rows).transpose(1, 0, 2)).view(np.float32)
        self.bias = _bias(bias, m)
        self.activation, self.residual = activation, residual
        self._compile()
        self._driver = load_source(DENSE_DRIVER_SOURCE).run_panels
        width = self.config.lanes * self.config.vectors
        self.token_tile = -(-DENSE_TOKEN_TILE // width) * width

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it: bfloat16 values as float32."""
        pairs = self.weight.view(np.uint16).reshape(self.weight.shape[0], self.weight.shape[1], -1, 2)
        w = from_bf16(pairs.transpose(1, 3, 0, 2).reshape(2 * pairs.shape[1], -1))  # [in (padded), out (padded)]
        return np.ascontiguousarray(w[:self.in_features, :self.out_features])

    @property
    def source(self) -> str:
        return with_driver(dense_ir(self.config) + "\n" + pack_ir(), DENSE_DRIVER_SOURCE)

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        super()._run(packed_pairs(xt), yt, rt)
