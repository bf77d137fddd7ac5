"""Linear layers y = act(x·W + b) (+ residual): the numpy reference and the two kernels.

Both kernels work feature-major (xᵀ [in, tokens] → yᵀ [out, tokens]), so that the
layers hand each other transposed views without copies, and both end in the same
epilogues (epilogue.py).

- `SparseLinear`: the weight compressed per output feature (compress.py; 4-blocks when
  the pruning was 4-block); each stored W[k, j] adds w·xᵀ[k, :] to yᵀ[j, :], a
  contiguous token loop. The generated code (sparse_ir.py) is specialised on the
  pattern's granularity (block size), the epilogue, the vector width and the tile; the
  stored weights are data, so one compiled kernel serves every layer of a config (code
  with every nonzero unrolled does not scale to BERT-size layers). A Numba driver
  splits the output rows across threads with equal work each.
- `DenseLinear`: every weight multiplied, a register-blocked GEMM (dense_ir.py).
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np

from ..ops import gelu, op
from .compile import compile_ir, load_source, threads, vector_lanes
from .compress import Pattern, analyse, balanced_bounds, chunk_rows, compress, order_rows
from .dense_ir import GEMV_X_FLOATS, dense_config, dense_ir
from .dense_ir import SIGNATURE as DENSE_SIGNATURE
from .ir import with_driver
from .launch import IMPORTS, put_source, run
from .layout import feature_major_empty, transposed
from .sparse_ir import SIGNATURE as SPARSE_SIGNATURE
from .sparse_ir import IRConfig, ir_source

__all__ = ["DenseLinear", "OutputSlice", "Pattern", "SparseLinear", "analyse", "reference_linear"]

# The numpy meaning of each epilogue.ACTIVATIONS entry.
REFERENCE_ACTIVATIONS = {"none": lambda y: y, "gelu": gelu, "gelu_tanh": lambda y: gelu(y, approximate="tanh"),
                         "tanh": np.tanh}


def reference_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                     activation: str = "none", residual: np.ndarray | None = None) -> np.ndarray:
    """Dense numpy oracle: act(x @ weight + bias) + residual."""
    return linear_epilogue(x @ weight, bias, activation, residual)


def linear_epilogue(y: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
                    residual: np.ndarray | None = None) -> np.ndarray:
    """act(y + bias) + residual: what a Linear kernel does after the product."""
    y = REFERENCE_ACTIVATIONS[activation](y if bias is None else y + bias)
    return y if residual is None else y + residual


@op("Linear", fused=True)
def linear(x, skip=None, *, weight, bias, activation, residual, source_op=None):
    """The fused node (fuse.fuse_linear): MatMul or Gemm with a constant weight, + bias,
    then the activation, + the residual input `skip` when `residual`."""
    return reference_linear(x, weight, bias, activation, skip if residual else None)


@op("LinearGroup", fused=True)
def linear_group(x, *, activation, members):
    """The node lower.group_linears makes: its member Linear nodes on one input."""
    return tuple(linear(x, **m.attrs) for m in members)


# ---------------------------------------------------------------------------------------
# The sparse kernel: LLVM IR per configuration (sparse_ir.py), driven by one Numba
# function that splits output rows across threads with equal work per thread.

SPARSE_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of every sparse IR kernel
# part c computes output rows [bounds[c], bounds[c + 1]) for all tokens; in each K-chunk
# it takes them in the order `order` lists them (see compress.order_rows)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(SPARSE_SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_rows(launch, part, calls, fn, xt, indptr, indices, values, bias, yt, rt, nchunks, order, bounds):
    for c in range(calls.shape[0]):
        put_sparse_rows(calls, c, fn, xt.ctypes.data, xt.strides[0] // 4, indptr.ctypes.data, indices.ctypes.data,
                        values.ctypes.data, bias.ctypes.data, yt.ctypes.data, yt.strides[0] // 4, rt.ctypes.data,
                        rt.strides[0] // 4, yt.shape[0], nchunks, order.ctypes.data, bounds[c], bounds[c + 1],
                        xt.shape[1], xt.shape[0])
    launch_calls(launch, part, calls.ctypes.data, calls.shape[0], calls.shape[1])
"""


def kernel_config(block: int, activation: str, residual: bool, in_features: int = 1 << 16,
                  scaled: bool = False) -> IRConfig:
    """An output row's tile of tokens stays in `vectors` registers: 8 of AVX-512's 32 (128
    tokens), 14 of AVX2's 16, leaving one for the broadcast weight and one spare (with
    16, the 128 tokens of the AVX-512 tile, LLVM spilled every accumulator to the stack
    and back for each stored weight). Input indices are stored in 16 bits when they fit:
    the weights stream from memory on every call, and two bytes fewer per stored weight
    is a quarter less to stream."""
    lanes = vector_lanes()
    return IRConfig(block, activation, residual, lanes, SPARSE_VECTORS[lanes], 16 if in_features <= 1 << 16 else 32,
                    scaled)


SPARSE_VECTORS = {16: 8, 8: 14}  # accumulator registers of the sparse tile, by lanes (AVX-512, AVX2)


def compiled_kernel(cfg: IRConfig):
    """(the IR function's address, Numba driver)."""
    return compile_ir(ir_source(cfg), SPARSE_SIGNATURE.name), load_source(SPARSE_DRIVER_SOURCE).run_rows


def _writable(a: np.ndarray) -> np.ndarray:
    # A read-only view (a broadcast, a caller's frozen buffer) is copied: the layer keeps
    # a bias of its own. (The drivers take read-only arrays too: compile._any_layout.)
    return a if a.flags.writeable else a.copy()


def _bias(bias: np.ndarray | None, m: int) -> np.ndarray:
    return np.zeros(m, np.float32) if bias is None else _writable(np.ascontiguousarray(bias, np.float32))


def _residual_rows(residual: np.ndarray, lead: tuple, m: int) -> np.ndarray:
    """The residual as [tokens, m], broadcast to the output's shape when it is smaller."""
    if residual.shape != lead + (m,):
        residual = np.broadcast_to(residual, lead + (m,))
    return residual.reshape(-1, m)


DENSE_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the dense IR kernel
# part c computes panels [c * n / parts, (c + 1) * n / parts), `token_tile` tokens at a
# time so that the tokens' slice of xt stays in cache across the part's panels
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(DENSE_SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_panels(launch, part, calls, fn, xt, wp, bias, yt, rt, token_tile):
    parts = calls.shape[0]
    panels = wp.shape[0]
    ntok = xt.shape[1]
    r_step = 4 if rt.shape[1] == ntok else 0  # (no residual: a 1 x 1 placeholder, never read)
    for c in range(parts):
        p0 = c * panels // parts
        p1 = (c + 1) * panels // parts
        if p0 < p1:
            for t0 in range(0, ntok, token_tile):
                put_dense_panels(calls, c, fn, xt.ctypes.data + t0 * 4, xt.strides[0] // 4, wp.ctypes.data,
                                 bias.ctypes.data, yt.ctypes.data + t0 * 4, yt.strides[0] // 4,
                                 rt.ctypes.data + t0 * r_step, rt.strides[0] // 4, xt.shape[0], yt.shape[0], p0, p1,
                                 min(token_tile, ntok - t0))
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""


def dense_panels(driver, fn: int, xt, wp, bias, yt, rt, parts: int, token_tile: int) -> None:
    """run_panels over `parts` parts (every caller of the dense kernel's driver)."""
    run(driver, DENSE_SIGNATURE, parts, -(-xt.shape[1] // token_tile), fn, xt, wp, bias, yt, rt, token_tile)


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


class TakesOwnX:
    """A feature-major layer that can also run on x already in its kernel's own form (an
    int8 layer's bytes, a bf16 layer's rows or pair rows), handed over by what made x:
    `_on_x(xk, yt, rt)` runs the kernel on it."""

    def from_quantized(self, xk: np.ndarray, lead: tuple, residual: np.ndarray | None = None) -> np.ndarray:
        """y for the x whose kernel's own form is xk ([..., tokens], token stride 1): what
        __call__ gives for that x."""
        m, n = self.out_features, math.prod(lead)
        yt = feature_major_empty(m, n)
        if n:
            rt = transposed(_residual_rows(residual, lead, m)) if self.residual else _NO_RESIDUAL
            self._on_x(xk, yt, rt)
        return yt.T.reshape(lead + (m,))


GEMV_TOKENS = 16  # the most tokens DenseLinear runs on its GEMV (dense_ir's `gemv`)
DENSE_TOKEN_TILE = 48  # tokens per driver step over 128 tokens, rounded up to the register tile (AVX-512: 64)


class DenseLinear(_FeatureMajorLinear):
    """Every weight multiplied: the register-blocked IR GEMM (dense_ir.py), feature-major
    in and out like SparseLinear, with the same epilogues."""

    kind = "dense"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool):
        k, m = weight.shape
        self.in_features, self.out_features = k, m
        self.config = dense_config(activation, residual, vector_lanes())
        rows = self.config.rows
        panels = -(-m // rows)
        padded = np.zeros((k, panels * rows), np.float32)
        padded[:, :m] = weight
        # wp[p, k, r] = W[k, p·rows + r]: each panel's weights contiguous, k-major
        self.weight = np.ascontiguousarray(padded.reshape(k, panels, rows).transpose(1, 0, 2))
        self.bias = _bias(bias, m)
        self.activation, self.residual = activation, residual
        self._compile()
        self._driver = load_source(DENSE_DRIVER_SOURCE).run_panels
        width = self.config.lanes * self.config.vectors
        self.token_tile = -(-DENSE_TOKEN_TILE // width) * width

    def _compile(self) -> None:
        """The kernel for self.config, and for a few tokens (a pooler or a classifier head on
        a batch's first tokens) the same panels as a GEMV (float32, dense_ir's `gemv`, up to
        GEMV_TOKENS tokens), or (bf16 pairs) with one token vector per register tile (up to
        one vector of tokens): the GEMM's tile would multiply every weight by a vector of
        tokens, nearly all of them padding."""
        self._gemv = not (self.config.bf16 or self.config.int8)
        self._fn, self._few = (compile_ir(dense_ir(cfg), DENSE_SIGNATURE.name)
                               for cfg in (self.config, replace(self.config, vectors=1, gemv=self._gemv)))

    def _takes_few(self, ntok: int) -> bool:
        """Whether a call on ntok tokens runs the few tokens' kernel (_compile)."""
        if not self._gemv:
            return ntok <= self.config.lanes
        return ntok <= GEMV_TOKENS and (self.in_features + self.config.lanes) * ntok <= GEMV_X_FLOATS

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it, unpacked."""
        k, m = self.in_features, self.out_features
        return np.ascontiguousarray(self.weight.transpose(1, 0, 2).reshape(k, -1)[:, :m])

    @property
    def source(self) -> str:
        return with_driver(dense_ir(self.config), DENSE_DRIVER_SOURCE)

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        parts = max(1, min(threads(), self.weight.shape[0]))
        # Over 128 tokens, a few register tiles at a time (64 tokens with AVX-512, 2 × 24 with
        # AVX2): every panel re-reads xᵀ, and that many tokens of it stay in L2 where 1024 do
        # not; whole tiles, so that only the last one is masked.
        ntok = xt.shape[1]
        fn = self._few if self._takes_few(ntok) else self._fn
        dense_panels(self._driver, fn, xt, self.weight, self.bias, yt, rt, parts,
                     ntok if ntok <= 128 else self.token_tile)


class SparseLinear(_FeatureMajorLinear):
    """The generated sparse kernel for one weight, with its pattern compressed at load.

    `k_chunk` splits the input features into chunks the kernel takes one at a time for
    all of a thread's rows, so the chunk of xᵀ it reads stays in L1 cache (partial sums
    go through yᵀ between chunks). None takes all inputs at once."""

    kind = "sparse"
    granule = 0  # the inputs a K-chunk must hold whole, when not the pattern's block

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str,
                 residual: bool, pattern: Pattern | None = None, k_chunk: int | None = None, scaled: bool = False):
        pattern = pattern or analyse(weight)
        config = kernel_config(pattern.block, activation, residual, weight.shape[0], scaled)
        indptr, indices, values = compress(weight, pattern.block)
        self._setup(weight, bias, pattern, config,
                    (indptr, indices.astype(np.uint16 if config.index_bits == 16 else np.int32), values), k_chunk)

    def _setup(self, weight: np.ndarray, bias: np.ndarray | None, pattern: Pattern, config: IRConfig, csr: tuple,
               k_chunk: int | None) -> None:
        """What a sparse layer (this, or a bf16 one) sets up once it has its kernel's
        configuration and its compressed weight `csr` (indptr, indices, values): shapes,
        epilogue, bias, kernel and driver, then the K-chunks."""
        self.pattern, self.config, self._csr = pattern, config, csr
        self.in_features, self.out_features = weight.shape
        self.activation, self.residual = config.activation, config.residual
        self.bias = _bias(bias, weight.shape[1])
        self._fn, self._driver = compiled_kernel(config)
        self._set_chunk(k_chunk)

    def _set_chunk(self, k_chunk: int | None) -> None:
        indptr, indices, values = self._csr
        self.k_chunk = self.in_features if k_chunk is None else min(k_chunk, self.in_features)
        granule = self.granule or self.pattern.block
        if self.k_chunk % granule and self.k_chunk != self.in_features:
            raise ValueError(f"k_chunk {k_chunk} is not a multiple of the block size {granule}")
        indptr, indices, values, self.nchunks = chunk_rows(indptr, indices, values, self.in_features, self.k_chunk)
        m = self.out_features
        self._layout = (0, None, indptr, indices, values, np.tile(np.arange(m, dtype=np.int32), self.nchunks))
        self._arrays()

    def _arrays(self) -> tuple:
        """(threads, bounds, indptr, indices, values, order) for the current thread count:
        the rows split across threads with equal work, then ordered per thread by count
        (`order_rows`). Built again, from the last layout, when the thread count changes."""
        n = threads()
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
        return with_driver(ir_source(self.config), SPARSE_DRIVER_SOURCE)

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

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray, bias: np.ndarray | None = None,
             fn: int | None = None) -> None:
        """The sparse driver's call, for this layer and the layers on it (int8, bf16): `bias`
        what the epilogue reads instead of the layer's bias ([bias | output scale ...]),
        `fn` a kernel of this layout instead of the layer's own. x and the stored values
        go as float32 bits (an int8 layer's bytes, a bf16 one's pairs): the driver's types."""
        _, bounds, indptr, indices, values, order = self._arrays()
        run(self._driver, SPARSE_SIGNATURE, len(bounds) - 1, 1, self._fn if fn is None else fn, xt.view(np.float32),
            indptr, indices, values.view(np.float32), self.bias if bias is None else bias, yt, rt, self.nchunks,
            order, bounds)


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


class ByTokens:
    """One layer on two kernels that compute the same y: `few` for calls under `at` tokens,
    `many` for calls of `at` tokens or more, each the faster there as measured at load
    (plan._int8_choice: the sparse VNNI kernel at one sequence, AMX's dense one at a batch
    of them, which reuses each weight tile across its tokens). Everything else about the
    layer (its weights, reference, epilogue) is `few`'s, which `many` equals."""

    def __init__(self, few, many, at: int):
        self.few, self.many, self.at = few, many, at
        self.label = f"{getattr(few, 'label', few.kind)} under {at} tokens, {getattr(many, 'label', many.kind)} from {at}"

    def pick(self, x: np.ndarray):
        """The kernel for x [..., in]."""
        return self.many if x.size >= self.at * x.shape[-1] else self.few

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        return self.pick(x)(x, residual)

    @property
    def source(self) -> str:
        return (f"; under {self.at} tokens:\n{self.few.source}\n; from {self.at} tokens:\n{self.many.source}")

    def __getattr__(self, name: str):
        if name in ("few", "many"):  # (not set yet: copying, unpickling)
            raise AttributeError(name)
        return getattr(self.few, name)
