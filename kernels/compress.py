"""A weight's sparsity pattern, learned at load, and the compressed layout the sparse
kernel walks: CSR of Wᵀ by output feature (4-blocks along the input dimension when the
pruning was 4-block), regrouped into K-chunks, each thread's rows ordered by count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    The kernel's loop over a row's weights ends at a count that varies from row to row,
    which the branch predictor cannot foresee in the CSR's row order; in count order,
    runs of rows share a count.

    Takes and returns (indptr, indices, values, order) where slot s of chunk c holds
    the stored weights of row order[c·m + s]; the input may be in any slot order (a
    chunked CSR has order = arange per chunk). Each thread's rows [bounds[i],
    bounds[i + 1]) keep their slots, so a thread finds them where it looks."""
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
