"""Embeddings: the sum of rows gathered from 2–3 tables (word, position, token type), then
LayerNorm, written feature-major for the first Linear layers: the numpy reference and
the kernel.

The kernel reads each token's rows as vectors, sums the tables and transposes blocks of
lanes × lanes in registers into a feature-major buffer; LayerNorm's feature-major kernel
then normalises it: two passes where the ops it replaces made five (the gathers, two
adds, the transpose to feature-major, LayerNorm).
"""

from __future__ import annotations

import functools

import numpy as np

from ..ops import gather, layer_normalization, op
from .compile import compile_ir, load_source, vector_lanes
from .elementwise import reference_fake_quantize
from .ir import Builder, Signature, with_driver
from .launch import IMPORTS, checked, put_source, run
from .layernorm import NO_BYTES, NO_GRID, Grid, _columns_kernel, layernorm_columns
from .layout import feature_major_empty, parts_for


@op("EmbedLayerNorm", fused=True)
def reference_embed_layernorm(*ids_scale_bias, tables, gathers, epsilon, quantize=None, wrap=()):
    """The fused node (fuse.fuse_embeddings): LayerNorm(Σ_i tables[i][ids_i]), the ids
    broadcast against each other, then scale and bias. `gathers` names the Gather nodes
    it replaces, for errors. With `quantize` (a scale and 8-bit zero point,
    lower.quantize_layernorms), rounded to that grid as the FakeQuantize it absorbed.
    `wrap`: per table, whether its ids are int64 that the graph Cast to int32 first
    (lower.fold_id_casts), which this Cast does again."""
    *ids, scale, bias = ids_scale_bias
    ids = [i.astype(np.int32) if w else i for i, w in zip(ids, list(wrap) + [False] * len(ids))]
    x = gather(tables[0], ids[0])
    for table, i in zip(tables[1:], ids[1:]):
        x = x + gather(table, i)
    y = layer_normalization(x, scale, bias, axis=-1, epsilon=epsilon)[0]
    return y if quantize is None else reference_fake_quantize(y, *quantize)


# Up to three tables' ids, each [b or 1, s or 1] with its strides (0 where broadcast), in
# int64; `bad` is the part's slot for the lowest table index with an id out of range
# (`tables` where none is).
SIGNATURE = Signature("embed_sum", (
    ("ids0", "ptr"), ("sb0", "i64"), ("ss0", "i64"), ("ids1", "ptr"), ("sb1", "i64"), ("ss1", "i64"),
    ("ids2", "ptr"), ("sb2", "i64"), ("ss2", "i64"), ("sizes", "ptr"), ("offsets", "ptr"), ("seq", "i64"),
    ("table", "ptr"), ("h", "i64"), ("yt", "ptr"), ("ldy", "i64"), ("t0", "i64"), ("t1", "i64"), ("bad", "ptr")))
TABLES = 3  # the most tables a kernel takes (word, position, token type)


def transpose(e: Builder, vectors: list[str]) -> list[str]:
    """The L × L block in `vectors` (one row each) transposed: log2(L) stages, each swapping
    one bit of the row index with the same bit of the lane index by two-source shuffles."""
    L, vt = e.lanes, e.vt
    v = list(vectors)
    bit = 1
    while bit < L:
        lo = [c if not c & bit else L + (c ^ bit) for c in range(L)]
        hi = [L + c if c & bit else c ^ bit for c in range(L)]
        for r in range(L):
            if not r & bit:
                a, b = v[r], v[r | bit]
                v[r] = e(f"shufflevector {vt} {a}, {vt} {b}, <{L} x i32> <{', '.join(f'i32 {i}' for i in lo)}>")
                v[r | bit] = e(f"shufflevector {vt} {a}, {vt} {b}, <{L} x i32> <{', '.join(f'i32 {i}' for i in hi)}>")
        bit *= 2
    return v


def _rows(e: Builder, tables: int, tok: str, inside: str, sizes: list, offsets: list, worst: str,
          wrap: tuple = ()) -> tuple:
    """Token `tok`'s row of the concatenated table for each table (0 past t1, or where its
    id is out of range), and `worst` lowered to the lowest table whose id is (a negative
    id counts from its table's end, as Gather's). A table in `wrap` takes its int64 id as
    a Cast to int32 makes it (its low 32 bits, signed)."""
    b = e(f"udiv i64 {tok}, %seq")
    s_ = e(f"sub i64 {tok}, {e(f'mul i64 {b}, %seq')}")
    rows = []
    for i in range(tables):
        at = e.gep(f"%ids{i}", e(f"select i1 {inside}, i64 {e.offset(b, f'%sb{i}', e(f'mul i64 {s_}, %ss{i}'))}, "
                                 "i64 0"), "i64")
        id_ = e(f"load i64, ptr {at}, align 8")
        if i < len(wrap) and wrap[i]:
            id_ = e(f"sext i32 {e(f'trunc i64 {id_} to i32')} to i64")
        wrapped = e(f"select i1 {e(f'icmp slt i64 {id_}, 0')}, i64 {e(f'add i64 {id_}, {sizes[i]}')}, i64 {id_}")
        out = e(f"or i1 {e(f'icmp slt i64 {wrapped}, 0')}, {e(f'icmp sge i64 {wrapped}, {sizes[i]}')}")
        bad = e(f"and i1 {inside}, {out}")
        worst = e(f"select i1 {bad}, i64 {e(f'call i64 @llvm.smin.i64(i64 {worst}, i64 {i})')}, i64 {worst}")
        ok = e(f"and i1 {inside}, {e(f'xor i1 {out}, true')}")
        rows.append(e(f"select i1 {ok}, i64 {e(f'add i64 {wrapped}, {offsets[i]}')}, i64 0"))
    return rows, worst


def _embed_sum(e: Builder, tables: int, wrap: tuple = ()) -> None:
    """yt[f, t] = Σ_i table[row_i(t), f] for tokens [t0, t1), a block of L tokens × L
    features at a time: each token's rows read as vectors (contiguous), summed, and the
    block transposed in registers into feature rows. row_i(t) is table i's id for token t
    (ids_i[t / seq, t % seq] by its strides) offset to its rows in the one concatenated
    table; a token past t1, or whose id is out of range, reads row 0 (and the part's `bad`
    slot says which table's id was, for the caller to raise), and is not stored."""
    L = e.lanes
    e.declared.setdefault("llvm.smin.i64", "declare i64 @llvm.smin.i64(i64, i64)")
    sizes = [e(f"load i64, ptr {e.gep('%sizes', str(i), 'i64')}, align 8") for i in range(tables)]
    offsets = [e(f"load i64, ptr {e.gep('%offsets', str(i), 'i64')}, align 8") for i in range(tables)]
    e.raw(f"  store i64 {tables}, ptr %bad, align 8")

    def tile(t):
        (tmask,) = e.lane_masks(t, 1, "%t1")
        rows, worst = [], str(tables)  # rows[u][i]: token t + u's row of table i
        for u in range(L):
            tok = e(f"add i64 {t}, {u}") if u else t
            found, worst = _rows(e, tables, tok, e(f"icmp slt i64 {tok}, %t1"), sizes, offsets, worst, wrap)
            rows += [e.gep("%table", e(f"mul i64 {row}, %h")) for row in found]
        seen = e("load i64, ptr %bad, align 8")
        e.raw(f"  store i64 {e(f'call i64 @llvm.smin.i64(i64 {seen}, i64 {worst})')}, ptr %bad, align 8")

        def block(f):
            (fmask,) = e.lane_masks(f, 1, "%h")
            sums = []
            for u in range(L):
                parts = [e.vload(e.gep(rows[u * tables + i], f), fmask) for i in range(tables)]
                acc = parts[0]
                for p in parts[1:]:
                    acc = e(f"fadd {e.vt} {acc}, {p}")
                sums.append(acc)
            for c, feature_row in enumerate(transpose(e, sums)):
                fc = e(f"add i64 {f}, {c}") if c else f
                store, skip = e.fresh("store"), e.fresh("skip")
                e.cond_br(e(f"icmp slt i64 {fc}, %h"), store, skip)
                e.label(store)
                e.vstore(feature_row, e.vptr("%yt", e.offset(fc, "%ldy", t), 0), tmask)
                e.br(skip)
                e.label(skip)

        e.tiles("0", "%h", L, block)

    e.tiles("%t0", "%t1", L, tile)


def embed_ir(lanes: int, tables: int, wrap: tuple = ()) -> str:
    e = Builder(lanes)
    e.function(SIGNATURE, lambda: _embed_sum(e, tables, wrap))
    cast = f", ids of tables {[i for i, w in enumerate(wrap) if w]} Cast to int32 first" if any(wrap) else ""
    return e.module(f"; sparsejit generated kernel: embedding rows of {tables} tables gathered and summed, "
                    f"feature-major, lanes={lanes}{cast}\n"
                    "; yt[f, t] = sum_i table[ids_i[t / seq, t % seq] + offsets[i], f]"
                    "; bad = the first table with an id out of range")


EMBED_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the embedding IR kernel
# ids[k] is table k's ids as [b or 1, s or 1], broadcast to [batch, seq] by strides of 0;
# part c sums tokens [c * step, (c + 1) * step), whole 16-token groups, and checks their ids
# (its slot of bad: the lowest table index with an id out of range, as many as there are
# tables where none is; a part with no tokens keeps what its slot holds)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_embed(launch, part, calls, fn, ids, sizes, offsets, batch, seq, table, yt, bad):
    n = batch * seq
    spec = np.zeros((3, 3), np.int64)  # per table: the ids' address, batch stride, position stride
    for k in range(len(ids)):
        a = ids[k]
        spec[k, 0] = a.ctypes.data
        spec[k, 1] = a.strides[0] // 8 if a.shape[0] > 1 else 0
        spec[k, 2] = a.strides[1] // 8 if a.shape[1] > 1 else 0
    for k in range(len(ids), 3):
        spec[k, 0] = spec[0, 0]  # (a table the kernel does not have: never read)
    parts = calls.shape[0]
    step = ((n + parts - 1) // parts + 15) // 16 * 16
    for c in range(parts):
        t0 = min(n, c * step)
        t1 = min(n, t0 + step)
        if t0 < t1:
            put_embed_sum(calls, c, fn, spec[0, 0], spec[0, 1], spec[0, 2], spec[1, 0], spec[1, 1], spec[1, 2],
                          spec[2, 0], spec[2, 1], spec[2, 2], sizes.ctypes.data, offsets.ctypes.data, seq,
                          table.ctypes.data, table.shape[1], yt.ctypes.data, yt.strides[0] // 4, t0, t1,
                          bad.ctypes.data + c * 8)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def kernel_source(tables: int = 3) -> str:
    return with_driver(embed_ir(vector_lanes(), tables), EMBED_DRIVER_SOURCE)


class EmbedLayerNorm:
    """The kernel for one EmbedLayerNorm node: its tables concatenated into one private
    array at load (row offsets per table), the ids checked and offset per call."""

    def __init__(self, tables: list[np.ndarray], gathers: list[str], epsilon: float, quantize: tuple | None = None,
                 wrap: tuple = ()):
        self.wrap = tuple(bool(w) for w in wrap)
        self.sizes = np.array([t.shape[0] for t in tables], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.table = np.ascontiguousarray(np.concatenate(tables).astype(np.float32, copy=False))
        self.gathers, self.epsilon = gathers, np.float32(epsilon)
        self.grid = Grid.of(quantize)
        self._zeros = np.zeros(self.table.shape[1], np.float32)  # (the bias where there is none)
        self._driver = load_source(EMBED_DRIVER_SOURCE).run_embed

    @functools.cached_property
    def _fn(self) -> int:
        # (compiled at the first call, not at load: on an empty cache the load's helper,
        # kernels/prebuild.py, builds it meanwhile)
        return compile_ir(embed_ir(vector_lanes(), len(self.sizes), self.wrap), SIGNATURE.name)

    def dense_tables(self) -> list[np.ndarray]:
        return [self.table[o:o + r] for o, r in zip(self.offsets, self.sizes)]

    def __call__(self, *ids_scale_bias) -> np.ndarray:
        *ids, scale, bias = ids_scale_bias
        shape = np.broadcast_shapes(*(np.shape(i) for i in ids))
        h = self.table.shape[1]
        if len(shape) != 2 or len(ids) > TABLES or scale.shape != (h,) or (bias is not None and bias.shape != (h,)) or \
                (self.grid is not None and self.grid.floats is None):
            return reference_embed_layernorm(*ids, scale, bias, tables=self.dense_tables(), gathers=self.gathers,
                                             epsilon=float(self.epsilon), quantize=self.grid and self.grid.quantize,
                                             wrap=self.wrap)
        # (few tokens on the calling thread: a run's first step, whose parallel region would
        # wake the threads the run's last region left)
        parts = parts_for(shape[0] * shape[1] * h)
        xt, yt = feature_major_empty(h, shape[0] * shape[1]), feature_major_empty(h, shape[0] * shape[1])
        # one type for all (C-contiguous int64, 2-D, read-only views: a shape-only value, the
        # positions, is read-only and is not copied): Numba indexes the tuple at run time
        as_2d = tuple(_read_only(np.require(i, np.int64, "C").reshape((1,) * (2 - np.ndim(i)) + np.shape(i)))
                      for i in ids)
        bad = np.full(parts, len(ids), np.int64)  # (the call's own, outside any arena: launch.checked)
        run(self._driver, SIGNATURE, parts, 1, self._fn, as_2d, self.sizes, self.offsets, shape[0], shape[1],
            self.table, xt, bad)
        checked(bad, self._check_ids)
        if xt.size:
            fn, run_columns = _columns_kernel(vector_lanes(), self.grid is not None)
            b = self._zeros if bias is None else np.ascontiguousarray(bias, np.float32)
            grid = NO_GRID if self.grid is None else self.grid.floats
            layernorm_columns(run_columns, fn, xt, yt, np.ascontiguousarray(scale, np.float32), b, self.epsilon, grid,
                              NO_BYTES, parts)
        return yt.T.reshape(shape + (h,))

    def _check_ids(self, bad: np.ndarray) -> None:
        """The IndexError for the first table with an id out of range (the kernel's `bad`)."""
        k = int(bad.min(initial=len(self.sizes)))
        if k < len(self.sizes):
            rows = self.sizes[k]
            raise IndexError(f"{self.gathers[k]!r}: Gather index out of range [{-rows}, {rows}) on axis 0")
