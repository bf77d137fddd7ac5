"""Linear layers y = act(x·W + b) (+ residual): the dense reference and the sparse generator.

Sparse kernels work feature-major, as SparseDNN's and XNNPACK's do: with xᵀ [in, tokens]
each nonzero W[k, j] adds w·xᵀ[k, :] to yᵀ[j, :], a contiguous, vectorisable token loop.
The weight is stored compressed per output feature (CSR of Wᵀ); with 4-block structure
(four consecutive input weights kept or pruned together, as oBERT prunes) one index
serves four weights.

What is baked into the generated source is the pattern's *granularity* (block size),
the fused epilogue and the argument layouts; the nonzeros themselves are data. Source
with every nonzero unrolled does not scale (a 768×256 layer at 90% would not compile
in 10 minutes), while this source compiles once per configuration and is shared by
every layer that has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from .compile import load_source
from .gelu import ERF_SOURCE, reference_gelu
from .layout import contiguous, transposed

ACTIVATIONS = ("none", "gelu")
BLOCK_SIZES = (1, 4)


def reference_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
                     activation: str = "none", residual: np.ndarray | None = None) -> np.ndarray:
    """Dense numpy oracle: act(x @ weight + bias) + residual."""
    y = x @ weight
    if bias is not None:
        y = y + bias
    if activation == "gelu":
        y = reference_gelu(y)
    if residual is not None:
        y = y + residual
    return y


# ---------------------------------------------------------------------------------------
# Source generation: a table of fragments and one emitter. Pure functions of the config.

_ACCUMULATE = {
    1: """\
            w = values[p]
            xk = xt[indices[p]]
            for t in range(n_tok):
                y[t] += w * xk[t]""",
    4: """\
            k = indices[p]
            w0 = values[p, 0]
            w1 = values[p, 1]
            w2 = values[p, 2]
            w3 = values[p, 3]
            x0 = xt[k]
            x1 = xt[k + 1]
            x2 = xt[k + 2]
            x3 = xt[k + 3]
            for t in range(n_tok):
                y[t] += w0 * x0[t] + w1 * x1[t] + w2 * x2[t] + w3 * x3[t]""",
}

_ACTIVATION = {
    "none": "",
    "gelu": "                v = gelu32(v)\n",
}

_RESIDUAL = {False: "", True: "                v += rt[j, t]\n"}

_VALUES_TYPE = {1: "float32[::1]", 4: "float32[:, ::1]"}

_TEMPLATE = """\
# sparsejit generated kernel: block={block} activation={activation} residual={residual}
# yt[j, :] = act(bias[j] + sum over stored (k, w) of row j: w * xt[k, :]){res_doc}
from numba import njit, prange

{helpers}


@njit("void(float32[:, ::1], int64[::1], int32[::1], {values_type}, float32[::1], "
      "float32[:, ::1], float32[:, :])", parallel=True, cache=True, nogil=True)
def sparse_linear(xt, indptr, indices, values, bias, yt, rt):
    n_tok = xt.shape[1]
    for j in prange(yt.shape[0]):
        y = yt[j]
        b = bias[j]
        for t in range(n_tok):
            y[t] = b
        for p in range(indptr[j], indptr[j + 1]):
{accumulate}
        if {has_epilogue}:
            for t in range(n_tok):
                v = y[t]
{activation_code}{residual_code}                y[t] = v
"""


@dataclass(frozen=True)
class KernelConfig:
    block: int = 1
    activation: str = "none"
    residual: bool = False


def kernel_source(cfg: KernelConfig) -> str:
    """The Numba source for one kernel configuration (same config, same text)."""
    if cfg.block not in _ACCUMULATE or cfg.activation not in _ACTIVATION:
        raise ValueError(f"no sparse kernel for {cfg}")
    return _TEMPLATE.format(
        block=cfg.block, activation=cfg.activation, residual=cfg.residual,
        helpers=ERF_SOURCE if cfg.activation == "gelu" else "",
        res_doc=" + rt[j, :]" if cfg.residual else "",
        values_type=_VALUES_TYPE[cfg.block],
        accumulate=_ACCUMULATE[cfg.block],
        has_epilogue=bool(cfg.activation != "none" or cfg.residual),
        activation_code=_ACTIVATION[cfg.activation],
        residual_code=_RESIDUAL[cfg.residual],
    )


def compiled_kernel(cfg: KernelConfig):
    return load_source(kernel_source(cfg)).sparse_linear


_DENSE_TEMPLATE = """\
# sparsejit generated kernel: dense activation={activation} residual={residual}
# y = act(x @ w + bias){res_doc}: token rows split across threads, BLAS on each share
import numpy as np
from numba import njit, prange

{helpers}

@njit("void(float32[:, ::1], float32[:, ::1], float32[::1], float32[:, ::1], float32[:, :], int64)",
      parallel=True, cache=True, nogil=True)
def dense_linear(x, w, bias, y, r, n_chunks):
    n = x.shape[0]
    step = (n + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r0 = c * step
        r1 = min(n, r0 + step)
        if r0 < r1:
            np.dot(x[r0:r1], w, y[r0:r1])
            for i in range(r0, r1):
                for j in range(y.shape[1]):
                    v = y[i, j] + bias[j]
{activation_code}{residual_code}                    y[i, j] = v
"""


def dense_kernel_source(activation: str, residual: bool) -> str:
    if activation not in _ACTIVATION:
        raise ValueError(f"no dense kernel for activation {activation!r}")
    indent = "    "  # the dense epilogue sits one level deeper than the sparse one
    return _DENSE_TEMPLATE.format(
        activation=activation, residual=residual,
        res_doc=" + r" if residual else "",
        helpers=ERF_SOURCE if activation == "gelu" else "",
        activation_code="".join(indent + line + "\n" for line in _ACTIVATION[activation].splitlines()),
        residual_code=indent + "                v += r[i, j]\n" if residual else "",
    )


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
    if k % 4 == 0 and nnz:
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


def _writable(a: np.ndarray) -> np.ndarray:
    # The kernels' signatures take writable arrays; a read-only view (a broadcast, a
    # caller's frozen buffer) is copied rather than compiled for twice.
    return a if a.flags.writeable else a.copy()


class DenseLinear:
    """x·W + b through BLAS, split over the kernel threads, with the sparse kernel's epilogue."""

    kind = "dense"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool):
        self.weight = _writable(np.ascontiguousarray(weight, dtype=np.float32))
        self.in_features, self.out_features = self.weight.shape
        self.bias = np.zeros(self.out_features, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self.activation, self.residual = activation, residual
        self._kernel = load_source(self.source).dense_linear
        self._no_residual = np.zeros((1, 1), np.float32)

    @property
    def source(self) -> str:
        return dense_kernel_source(self.activation, self.residual)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = contiguous(x.reshape(-1, self.in_features))
        y = np.empty((x2.shape[0], self.out_features), np.float32)
        if self.residual:
            if residual.shape != lead + (self.out_features,):
                residual = np.broadcast_to(residual, lead + (self.out_features,))
            r = contiguous(residual.reshape(-1, self.out_features))
        else:
            r = self._no_residual
        n_chunks = max(1, min(numba.get_num_threads(), x2.shape[0]))
        self._kernel(x2, self.weight, self.bias, y, r, n_chunks)
        return y.reshape(lead + (self.out_features,))


class SparseLinear:
    """The generated sparse kernel for one weight, with its pattern compressed at load."""

    kind = "sparse"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str,
                 residual: bool, pattern: Pattern | None = None):
        self.pattern = pattern or analyse(weight)
        self.config = KernelConfig(self.pattern.block, activation, residual)
        self.indptr, self.indices, self.values = compress(weight, self.pattern.block)
        k, m = weight.shape
        self.in_features, self.out_features = k, m
        self.bias = np.zeros(m, np.float32) if bias is None else np.ascontiguousarray(bias, np.float32)
        self._kernel = compiled_kernel(self.config)
        self._no_residual = np.zeros((1, 1), np.float32)

    @property
    def source(self) -> str:
        return kernel_source(self.config)

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xt = transposed(x2)
        yt = np.empty((self.out_features, x2.shape[0]), np.float32)
        if self.config.residual:
            if residual.shape != lead + (self.out_features,):
                residual = np.broadcast_to(residual, lead + (self.out_features,))
            rt = transposed(residual.reshape(-1, self.out_features))
        else:
            rt = self._no_residual
        self._kernel(xt, self.indptr, self.indices, self.values, self.bias, yt, rt)
        # yt.T is a view: the next sparse layer's x.T is then contiguous again, no copy.
        return yt.T.reshape(lead + (self.out_features,))
