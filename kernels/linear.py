"""Linear layers y = act(x·W + b) (+ residual): the dense reference and the sparse generator.

Sparse kernels work feature-major, as SparseDNN's and XNNPACK's do: with xᵀ [in, tokens]
each nonzero W[k, j] adds w·xᵀ[k, :] to yᵀ[j, :], a contiguous, vectorisable token loop.
The weight is stored compressed per output feature (CSR of Wᵀ); with 4-block structure
(four consecutive input weights kept or pruned together, as oBERT prunes) one index
serves four weights.

What is baked into the generated kernel is the pattern's *granularity* (block size),
the fused epilogue, the vector width and the tile; the nonzeros themselves are data.
Code with every nonzero unrolled does not scale (a 768×256 layer at 90% would not
compile in 10 minutes), while this kernel compiles once per configuration (0.15 s) and
is shared by every layer that has it. The kernel is LLVM IR (sparse_ir.py), because
only there do the accumulators stay in registers. Dense layers are LLVM IR too
(dense_ir.py), a register-blocked GEMM in the same feature-major layout: 440-470 GFLOP/s
on the two cores here, where OpenBLAS (which this machine's environment pins to its
Haswell kernels, OPENBLAS_CORETYPE=Haswell) did about 120 per core.
"""

from __future__ import annotations

import copy
import ctypes
from dataclasses import dataclass

import numba
import numpy as np

from .compile import compile_ir, load_source, vector_lanes
from .dense_ir import dense_config, dense_ir
from .gelu import reference_gelu
from .layout import feature_major_empty, transposed
from .sparse_ir import IRConfig, ir_source


def reference_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                     activation: str = "none", residual: np.ndarray | None = None) -> np.ndarray:
    """Dense numpy oracle: act(x @ weight + bias) + residual."""
    return linear_epilogue(x @ weight, bias, activation, residual)


def linear_epilogue(y: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
                    residual: np.ndarray | None = None) -> np.ndarray:
    """act(y + bias) + residual: what a Linear kernel does after the product."""
    if bias is not None:
        y = y + bias
    if activation == "gelu":
        y = reference_gelu(y)
    if residual is not None:
        y = y + residual
    return y


# ---------------------------------------------------------------------------------------
# The sparse kernel: LLVM IR per configuration (sparse_ir.py), driven by one Numba
# function that splits output rows across threads with equal nonzeros per thread.

SPARSE_DRIVER_SOURCE = """\
# sparsejit generated kernel: the parallel driver of every sparse IR kernel
# thread c computes output rows [bounds[c], bounds[c + 1]) for all tokens; in each K-chunk
# it takes them in the order `order` lists them (see order_rows)
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def run_rows(fn, xt, indptr, indices, values, bias, yt, rt, nchunks, order, bounds):
    ldx = xt.strides[0] // 4
    ldy = yt.strides[0] // 4
    ldr = rt.strides[0] // 4
    m = yt.shape[0]
    for c in prange(bounds.shape[0] - 1):
        fn(xt.ctypes.data, ldx, indptr.ctypes.data, indices.ctypes.data, values.ctypes.data, bias.ctypes.data,
           yt.ctypes.data, ldy, rt.ctypes.data, ldr, m, nchunks, order.ctypes.data, bounds[c], bounds[c + 1],
           xt.shape[1])
"""

_IR_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, *[ctypes.c_void_p] * 5,
                             ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


def kernel_config(block: int, activation: str, residual: bool, in_features: int = 1 << 16) -> IRConfig:
    """Input indices are stored in 16 bits when they fit: the weights stream from memory
    on every call, and two bytes fewer per nonzero is a quarter less to stream."""
    lanes = vector_lanes()
    return IRConfig(block, activation, residual, lanes, 128 // lanes, 16 if in_features <= 1 << 16 else 32)


def kernel_source(cfg: IRConfig) -> str:
    """What runs for one configuration: its LLVM IR, then the Numba driver that calls it."""
    return ir_source(cfg) + "\n; driver (Numba):\n" + "".join("; " + line + "\n" for line in
                                                              SPARSE_DRIVER_SOURCE.splitlines())


def compiled_kernel(cfg: IRConfig):
    """(IR function as a ctypes pointer, Numba driver)."""
    fn = _IR_PROTO(compile_ir(ir_source(cfg), "sparse_rows"))
    return fn, load_source(SPARSE_DRIVER_SOURCE).run_rows


def balanced_bounds(indptr: np.ndarray, parts: int, row_cost: float = 4.0) -> np.ndarray:
    """Split rows into `parts` contiguous ranges of about equal work (nonzeros + a per-row cost)."""
    m = len(indptr) - 1
    if m == 0:
        return np.zeros(parts + 1, np.int64)
    # work_before[i]: work of rows [0, i). Cut at the row boundary nearest each target.
    work_before = np.concatenate([[0.0], np.cumsum(np.diff(indptr) + row_cost)])
    targets = work_before[-1] * np.arange(1, parts) / parts
    hi = np.clip(np.searchsorted(work_before, targets), 1, m)
    nearer_lo = (targets - work_before[hi - 1]) < (work_before[hi] - targets)
    cuts = np.where(nearer_lo, hi - 1, hi)
    return np.concatenate([[0], cuts, [m]]).astype(np.int64)


# ---------------------------------------------------------------------------------------
# Pattern analysis and compression


@dataclass(frozen=True)
class Pattern:
    """What the loader learns about one weight matrix W [in, out]."""

    in_features: int
    out_features: int
    nnz: int
    block: int           # 4 when the zeros come in 4-blocks along the input dimension
    stored: int          # weights the sparse kernel stores (nnz plus zeros inside kept blocks)

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)


def analyse(weight: np.ndarray) -> Pattern:
    k, m = weight.shape
    nz = weight != 0
    nnz = int(nz.sum())
    block, stored = 1, nnz
    if k % 4 == 0 and 0 < nnz < weight.size:
        kept_blocks = int(nz.reshape(k // 4, 4, m).any(axis=1).sum())
        # Use 4-blocks when they add almost no stored zeros (true 4-block pruning).
        if 4 * kept_blocks <= 1.05 * nnz:
            block, stored = 4, 4 * kept_blocks
    return Pattern(k, m, nnz, block, stored)


def compress(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of Wᵀ by output feature: (indptr, input indices, values); 4-blocks when block=4."""
    k, m = weight.shape
    wt = np.ascontiguousarray(weight.T)  # [out, in]
    if block == 1:
        rows, cols = np.nonzero(wt)
        values = wt[rows, cols].astype(np.float32)
        starts = cols
    else:
        groups = wt.reshape(m, k // block, block)
        rows, gcols = np.nonzero(np.any(groups != 0, axis=2))
        values = np.ascontiguousarray(groups[rows, gcols], dtype=np.float32)
        starts = gcols * block
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    return indptr, starts.astype(np.int32), values


def chunk_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, in_features: int,
               k_chunk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Reorder a CSR of Wᵀ into K-chunks: chunk-major, then row, then input index.

    Returns (indptr, indices, values, nchunks), where row j of chunk c holds the stored
    weights at [indptr[c·m + j], indptr[c·m + j + 1]) and the inputs of chunk c are
    [c·k_chunk, (c + 1)·k_chunk). With one chunk this is the CSR unchanged."""
    m = len(indptr) - 1
    nchunks = max(1, -(-in_features // k_chunk))
    if nchunks == 1:
        return indptr, indices, values, 1
    rows = np.repeat(np.arange(m), np.diff(indptr))
    key = indices.astype(np.int64) // k_chunk * m + rows
    order = np.argsort(key, kind="stable")  # within a (chunk, row), the CSR's index order stays
    counts = np.bincount(key, minlength=nchunks * m)
    ptr = np.zeros(nchunks * m + 1, np.int64)
    np.cumsum(counts, out=ptr[1:])
    return ptr, np.ascontiguousarray(indices[order]), np.ascontiguousarray(values[order]), nchunks


def order_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, order: np.ndarray, nchunks: int,
               bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Reorder the rows of every K-chunk so that each thread takes its rows in order of
    their stored-weight count in that chunk.

    The kernel's loop over a row's nonzeros ends at a count that varies from row to row,
    which the branch predictor cannot foresee in the CSR's row order. With equal counts
    in every row the kernel ran 11% faster than with a pruned weight's varying ones (one
    core, 768→3072, 13 nonzeros per row and chunk); in count order, runs of rows share a
    count, and the real 90% weight went from 529 to 506 µs.

    Takes and returns (indptr, indices, values, order) where slot s of chunk c holds
    the stored weights of row order[c·m + s]; the input may be
    in any slot order (a chunked CSR has order = arange per chunk). Each thread's rows
    [bounds[i], bounds[i + 1]) keep their slots, so a thread finds them where it looks."""
    m = (len(indptr) - 1) // nchunks
    counts = np.diff(indptr).reshape(nchunks, m)
    rows = order.reshape(nchunks, m)
    owner = np.searchsorted(bounds, rows, side="right")
    perm = np.lexsort((rows, counts, owner), axis=-1)
    new_counts = np.take_along_axis(counts, perm, 1).ravel()
    starts = np.take_along_axis(indptr[:-1].reshape(nchunks, m), perm, 1).ravel()
    ptr = np.zeros(nchunks * m + 1, np.int64)
    np.cumsum(new_counts, out=ptr[1:])
    gather = np.repeat(starts - ptr[:-1], new_counts) + np.arange(ptr[-1])
    new_order = np.ascontiguousarray(np.take_along_axis(rows, perm, 1).ravel(), np.int32)
    return ptr, np.ascontiguousarray(indices[gather]), np.ascontiguousarray(values[gather]), new_order


def _writable(a: np.ndarray) -> np.ndarray:
    # The kernels' signatures take writable arrays; a read-only view (a broadcast, a
    # caller's frozen buffer) is copied rather than compiled for twice.
    return a if a.flags.writeable else a.copy()


def _bias(bias: np.ndarray | None, m: int) -> np.ndarray:
    return np.zeros(m, np.float32) if bias is None else _writable(np.ascontiguousarray(bias, np.float32))


def _residual_rows(residual: np.ndarray, lead: tuple, m: int) -> np.ndarray:
    """The residual as [tokens, m], broadcast to the output's shape when it is smaller."""
    if residual.shape != lead + (m,):
        residual = np.broadcast_to(residual, lead + (m,))
    return residual.reshape(-1, m)


DENSE_DRIVER_SOURCE = """\
# sparsejit generated kernel: the parallel driver of the dense IR kernel
# thread c computes row blocks [c * n / parts, (c + 1) * n / parts), for `block` tokens at a
# time so that the tokens' slice of xt stays in cache across the thread's row blocks
from numba import njit, prange


@njit(parallel=True, nogil=True, cache=True)
def run_blocks(fn, xt, wp, bias, yt, rt, parts, block):
    n_blocks = wp.shape[0]
    ntok = xt.shape[1]
    r_step = 4 if rt.shape[1] == ntok else 0  # (no residual: a 1 x 1 placeholder, never read)
    for c in prange(parts):
        b0 = c * n_blocks // parts
        b1 = (c + 1) * n_blocks // parts
        if b0 < b1:
            for t0 in range(0, ntok, block):
                fn(xt.ctypes.data + t0 * 4, xt.strides[0] // 4, wp.ctypes.data, bias.ctypes.data,
                   yt.ctypes.data + t0 * 4, yt.strides[0] // 4, rt.ctypes.data + t0 * r_step, rt.strides[0] // 4,
                   xt.shape[0], yt.shape[0], b0, b1, min(block, ntok - t0))
"""

_DENSE_PROTO = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)


class _FeatureMajorLinear:
    """What both Linear kernels do around their generated code: take x in any layout,
    hand the kernel xᵀ and rᵀ (no copy when they are feature-major views already) and
    return yᵀ.T, a view the next layer reads as xᵀ without a copy."""

    in_features: int
    out_features: int
    residual: bool

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xt = transposed(x2)
        yt = feature_major_empty(self.out_features, x2.shape[0])
        rt = transposed(_residual_rows(residual, lead, self.out_features)) if self.residual else _NO_RESIDUAL
        if x2.shape[0]:
            self._run(xt, yt, rt)
        return yt.T.reshape(lead + (self.out_features,))

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        raise NotImplementedError


_NO_RESIDUAL = np.zeros((1, 1), np.float32)  # what the kernels get for rt when there is none


class DenseLinear(_FeatureMajorLinear):
    """Every weight multiplied: the register-blocked IR GEMM (dense_ir.py), feature-major
    in and out like SparseLinear, with the same epilogues."""

    kind = "dense"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool):
        k, m = weight.shape
        self.in_features, self.out_features = k, m
        self.config = dense_config(activation, residual, vector_lanes())
        rows = self.config.rows
        n_blocks = -(-m // rows)
        padded = np.zeros((k, n_blocks * rows), np.float32)
        padded[:, :m] = weight
        # wp[b, k, r] = W[k, b·rows + r]: each block's weights contiguous, k-major
        self.weight = np.ascontiguousarray(padded.reshape(k, n_blocks, rows).transpose(1, 0, 2))
        self.bias = _bias(bias, m)
        self.activation, self.residual = activation, residual
        self._fn = _DENSE_PROTO(compile_ir(dense_ir(self.config), "dense_blocks"))
        self._driver = load_source(DENSE_DRIVER_SOURCE).run_blocks

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it, unpacked."""
        k, m = self.in_features, self.out_features
        return np.ascontiguousarray(self.weight.transpose(1, 0, 2).reshape(k, -1)[:, :m])

    @property
    def source(self) -> str:
        return dense_ir(self.config) + "\n; driver (Numba):\n" + "".join(
            "; " + line + "\n" for line in DENSE_DRIVER_SOURCE.splitlines())

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        parts = max(1, min(numba.get_num_threads(), self.weight.shape[0]))
        # Over 128 tokens, 64 at a time: every row block re-reads xᵀ, and 64 tokens of it
        # stay in L2 where 1024 did not (BERT-base FFN over 1024 tokens: 14.2 → 12.1 ms).
        ntok = xt.shape[1]
        self._driver(self._fn, xt, self.weight, self.bias, yt, rt, parts, ntok if ntok <= 128 else 64)


class SparseLinear(_FeatureMajorLinear):
    """The generated sparse kernel for one weight, with its pattern compressed at load.

    `k_chunk` splits the input features into chunks the kernel takes one at a time for
    all of a thread's rows, so the chunk of xᵀ it reads stays in L1 cache (partial sums
    go through yᵀ between chunks). None takes all inputs at once."""

    kind = "sparse"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str,
                 residual: bool, pattern: Pattern | None = None, k_chunk: int | None = None):
        self.pattern = pattern or analyse(weight)
        k, m = weight.shape
        self.config = kernel_config(self.pattern.block, activation, residual, k)
        self.in_features, self.out_features = k, m
        self.activation, self.residual = activation, residual
        indptr, indices, values = compress(weight, self.pattern.block)
        self._csr = indptr, indices.astype(np.uint16 if self.config.index_bits == 16 else np.int32), values
        self.bias = _bias(bias, m)
        self._fn, self._driver = compiled_kernel(self.config)
        self._set_chunk(k_chunk)

    def _set_chunk(self, k_chunk: int | None) -> None:
        indptr, indices, values = self._csr
        self.k_chunk = self.in_features if k_chunk is None else min(k_chunk, self.in_features)
        if self.k_chunk % self.pattern.block:
            raise ValueError(f"k_chunk {k_chunk} is not a multiple of the block size {self.pattern.block}")
        indptr, indices, values, self.nchunks = chunk_rows(indptr, indices, values, self.in_features, self.k_chunk)
        m = self.out_features
        self._layout = (0, None, indptr, indices, values, np.tile(np.arange(m, dtype=np.int32), self.nchunks))
        self._arrays()

    def _arrays(self) -> tuple:
        """(threads, bounds, indptr, indices, values, order) for the current thread count:
        the rows split across threads with equal work, then ordered per thread by count
        (`order_rows`). Built again, from the last layout, when the thread count changes."""
        n = numba.get_num_threads()
        layout = self._layout
        if layout[0] != n:
            _, _, indptr, indices, values, order = layout
            m = self.out_features
            per_row = np.bincount(order, weights=np.diff(indptr), minlength=m)
            bounds = balanced_bounds(np.concatenate([[0], np.cumsum(per_row)]), n)
            layout = (n, bounds) + order_rows(indptr, indices, values, order, self.nchunks, bounds)
            self._layout = layout
        return layout

    # The current layout's arrays (slot order: see order_rows).
    indptr = property(lambda self: self._layout[2])
    indices = property(lambda self: self._layout[3])
    values = property(lambda self: self._layout[4])
    order = property(lambda self: self._layout[5])

    def with_chunk(self, k_chunk: int | None) -> SparseLinear:
        """The same layer with its weights regrouped into K-chunks of `k_chunk` inputs."""
        other = copy.copy(self)
        other._set_chunk(k_chunk)
        return other

    def drop_csr(self) -> None:
        """Forget the unchunked copy once the chunking is settled (it doubles the memory)."""
        self._csr = None

    @property
    def source(self) -> str:
        return kernel_source(self.config)

    def dense_weight(self) -> np.ndarray:
        """W [in, out] rebuilt from the compressed, chunked and reordered weights the kernel
        walks (what `check` compares the kernel's results with)."""
        _, _, indptr, indices, values, order = self._layout
        w = np.zeros((self.in_features, self.out_features), np.float32)
        rows = np.repeat(order, np.diff(indptr))
        values = values.reshape(len(rows), self.pattern.block)
        for b in range(values.shape[1]):
            w[indices.astype(np.int64) + b, rows] = values[:, b]
        return w

    def bounds(self) -> np.ndarray:
        return self._arrays()[1]

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        _, bounds, indptr, indices, values, order = self._arrays()
        self._driver(self._fn, xt, indptr, indices, values, self.bias, yt, rt, self.nchunks, order, bounds)


class OutputSlice:
    """One Linear layer computed inside a grouped kernel: layers that read the same input
    (BERT's Q, K and V projections) run as one kernel over their concatenated weights, one
    call and one pass over xᵀ instead of three. This is the part of the group's output that
    is this layer's, for `check` and `kernel_source`; the model runs the group itself."""

    def __init__(self, group: SparseLinear | DenseLinear, start: int, stop: int):
        self.group, self.start, self.stop = group, start, stop
        self.kind = group.kind
        self.in_features, self.out_features = group.in_features, stop - start
        self.residual = False

    @property
    def source(self) -> str:
        return self.group.source

    def dense_weight(self) -> np.ndarray:
        return np.ascontiguousarray(self.group.dense_weight()[:, self.start:self.stop])

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if residual is not None:
            raise ValueError("a grouped Linear layer has no residual input")
        return self.group(x)[..., self.start:self.stop]
