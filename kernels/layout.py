"""Activation layout changes: token-major [tokens, features] ⇄ feature-major [features, tokens].

The Linear and attention kernels work feature-major; numpy, the reference ops and the
caller work token-major. numpy's copy of a transposed view walks one side with a large
stride; the tiled, threaded copy here keeps both sides in cache.

Feature-major buffers get a padded row length: with 1024 tokens a row is 4 KiB, and
rows 4 KiB apart all land in the same few cache sets, so a kernel reading a 128-token
tile of every row used a fraction of L2.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from .compile import compile_ir, load_source, threads
from .ir import Signature
from .launch import IMPORTS, address, launch_rows, new_calls, put_source, run

TILE = 32

TRANSPOSE_SIGNATURE = Signature("transpose_rows", (
    ("a", "ptr"), ("sr", "i64"), ("sc", "i64"), ("out", "ptr"), ("ldo", "i64"), ("r0", "i64"), ("r1", "i64"),
    ("cols", "i64")))


def _counted(name: str, start: str, end: str, step: int, entry: str, latch: str, done: str) -> str:
    """The head of `for name in range(start, end, step)` in IR text: entered from block
    `entry`, looped back to from `latch`, leaving to `done`; the body block follows, with
    %name.next; a tile loop (step > 1) also has %name.end, its tile's end clamped to end."""
    clamp = (f"  %{name}.lt = icmp slt i64 %{name}.next, {end}\n"
             f"  %{name}.end = select i1 %{name}.lt, i64 %{name}.next, i64 {end}\n") if step > 1 else ""
    return (f"{name}.head:\n  %{name} = phi i64 [ {start}, %{entry} ], [ %{name}.next, %{latch} ]\n"
            f"  %{name}.more = icmp slt i64 %{name}, {end}\n"
            f"  br i1 %{name}.more, label %{name}.body, label %{done}\n"
            f"{name}.body:\n  %{name}.next = add i64 %{name}, {step}\n{clamp}")


def transpose_ir() -> str:
    """out[c, r] = a[r, c] for a's rows [r0, r1) and every column, TILE × TILE at a time
    so that both sides stay in cache (strides in floats: a's sr and sc, out's ldo)."""
    return f"""\
; sparsejit generated kernel: tiled transpose of a's rows [r0, r1), out = a.T
define void @transpose_rows({TRANSPOSE_SIGNATURE.params()}) {{
entry:
  br label %rt.head
{_counted("rt", "%r0", "%r1", TILE, "entry", "ct.done", "exit")}\
  br label %ct.head
{_counted("ct", "0", "%cols", TILE, "rt.body", "c.done", "ct.done")}\
  br label %c.head
{_counted("c", "%ct", "%ct.end", 1, "ct.body", "r.done", "c.done")}\
  %orow = mul i64 %c, %ldo
  %acol = mul i64 %c, %sc
  br label %r.head
{_counted("r", "%rt", "%rt.end", 1, "c.body", "r.body", "r.done")}\
  %arow = mul i64 %r, %sr
  %ai = add i64 %arow, %acol
  %ap = getelementptr float, ptr %a, i64 %ai
  %v = load float, ptr %ap
  %oi = add i64 %orow, %r
  %op = getelementptr float, ptr %out, i64 %oi
  store float %v, ptr %op
  br label %r.head
r.done:
  br label %c.head
c.done:
  br label %ct.head
ct.done:
  br label %rt.head
exit:
  ret void
}}
"""


TRANSPOSE_SOURCE = f"""\
# sparsejit generated kernel: the driver of the tiled transpose, out = a.T (rows of unit
# stride); part c transposes a's row tiles [c * n / parts, (c + 1) * n / parts)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
TILE = {TILE}
""" + IMPORTS + "\n\n" + put_source(TRANSPOSE_SIGNATURE) + """

@njit(nogil=True, cache=True)
def transpose(launch, part, calls, fn, a, out):
    rows, cols = a.shape
    tiles = (rows + TILE - 1) // TILE
    parts = calls.shape[0]
    for c in range(parts):
        r0 = min(rows, c * tiles // parts * TILE)
        r1 = min(rows, (c + 1) * tiles // parts * TILE)
        if r0 < r1:
            put_transpose_rows(calls, c, fn, a.ctypes.data, a.strides[0] // 4, a.strides[1] // 4, out.ctypes.data,
                               out.strides[0] // 4, r0, r1, cols)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""


# Work over fewer elements runs on the calling thread: a parallel region costs more than
# it saves there, most of all right after a taped run's region (its outputs' copies, the
# next run's embeddings).
SERIAL_BELOW = 1 << 16


def parts_for(elements: int) -> int:
    """The parts to split work over `elements` elements into: one under SERIAL_BELOW (which
    launch.run makes on the calling thread), else one per thread."""
    return 1 if elements < SERIAL_BELOW else threads()


def _transpose_into(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out (rows of unit stride) = a.T, a float32."""
    if a.strides[0] % 4 or a.strides[1] % 4:  # (a view of unaligned floats)
        a = np.ascontiguousarray(a)
    run(load_source(TRANSPOSE_SOURCE).transpose, TRANSPOSE_SIGNATURE, parts_for(a.size), 1, _transpose_fn(), a,
        out)
    return out


@functools.cache
def _transpose_fn() -> int:
    return compile_ir(transpose_ir(), TRANSPOSE_SIGNATURE.name)


def padded_rows(n: int) -> int:
    """A row length ≥ n (floats) that is a multiple of 16 but not of 32 (64-byte lines,
    an odd count of them), so consecutive rows start in different cache sets."""
    ld = -(-n // 16) * 16
    return ld + 16 if ld % 32 == 0 and ld >= 256 else ld


ALIGN = 64  # bytes: one cache line, one AVX-512 vector


_arenas = threading.local()


def thread_arena(nbytes: int) -> np.ndarray:
    """This thread's scratch bytes (at least nbytes, from a 64-byte line): what a kernel
    works in during a call and does not hand back. The kernels called on a thread run one
    after another, so they share it, and a model's scratch is its largest call's, not the
    sum of its kernels' (bench/README.md, twenty-second session, has the sizes). It
    grows by being made anew, twice as large: a kernel that kept views into the old one
    makes them again (`arena is not thread_arena(...)`). It keeps its size for the thread's
    life, as ONNX Runtime's arena keeps its blocks: a thread that once ran a large batch
    holds that batch's scratch."""
    buf = getattr(_arenas, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _arenas.buf = aligned_empty((max(nbytes, 2 * (0 if buf is None else buf.nbytes)),), np.uint8,
                                          lasting=True)
    return buf


# What allocates this thread's buffers while a run is being taped (sparsejit.tape): a
# function (shape, dtype) -> array, or None for numpy.
_allocating = threading.local()


def taping() -> bool:
    """Whether a tape is being made on this thread (aligned_empty's buffers are its own)."""
    return getattr(_allocating, "fn", None) is not None


def call_scratch(nbytes: int) -> np.ndarray:
    """A call's scratch bytes: this thread's arena (thread_arena), or while a tape is being
    made a buffer of the tape's, which its replays then hold (no thread's arena is)."""
    return aligned_empty((nbytes,), np.uint8) if taping() else thread_arena(nbytes)


ZERO = Signature("zero_bytes", (("at", "ptr"), ("n", "i64")))
ZERO_IR = """\
; sparsejit generated kernel: n bytes from at set to 0
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
define void @zero_bytes(ptr %at, i64 %n) {
entry:
  call void @llvm.memset.p0.i64(ptr %at, i8 0, i64 %n, i1 false)
  ret void
}
"""


def zero_launch(arrays: list[np.ndarray]) -> None:
    """Each of `arrays` (contiguous) set to 0 by one launch on the calling thread, which a
    taped run makes again (numpy's fill, outside any launch, it would not)."""
    fn = compile_ir(ZERO_IR, ZERO.name)
    calls = new_calls(1, len(arrays), ZERO)
    calls[0, 0] = len(arrays)
    calls[0, 1:] = [v for a in arrays for v in (fn, address(a), a.nbytes)]
    launch_rows(ZERO, calls, tuple(arrays))


def allocate_with(fn) -> None:
    """Let `fn(shape, dtype)` make this thread's aligned_empty and feature_major_empty
    buffers (None: numpy again). A buffer kept past its call (`lasting`) is numpy's all
    the same."""
    _allocating.fn = fn


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, lasting: bool = False) -> np.ndarray:
    """np.empty whose data starts on a 64-byte line. numpy's own buffers may start past
    one, and then every vector load from them straddles two lines and costs two.
    `lasting`: a buffer a kernel keeps for later calls (never a taped run's)."""
    fn = None if lasting else getattr(_allocating, "fn", None)
    if fn is not None:
        return fn(tuple(shape), dtype)
    dtype = np.dtype(dtype)
    n = math.prod(shape)  # (not np.prod: this runs on every kernel call)
    buf = np.empty(n + ALIGN // dtype.itemsize, dtype)
    start = -buf.ctypes.data % ALIGN // dtype.itemsize  # numpy's data is itemsize-aligned
    return buf[start:start + n].reshape(shape)


EMPTY_SOURCE = """\
# sparsejit generated kernel: an uninitialised feature-major buffer, rows on 64-byte lines
import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def feature_major_empty(features, tokens, ld):
    buf = np.empty(features * ld + 16, np.float32)
    start = (64 - buf.ctypes.data % 64) % 64 // 4
    return buf[start:start + features * ld].reshape((features, ld))[:, :tokens]
"""


def feature_major_empty(features: int, tokens: int) -> np.ndarray:
    """An uninitialised [features, tokens] float32 array with padded rows (unit token stride),
    every row starting on a 64-byte line. Made in Numba, as every kernel call makes its
    output so: faster than aligned_empty's Python."""
    fn = getattr(_allocating, "fn", None)
    if fn is not None:
        return fn((features, padded_rows(tokens)), np.float32)[:, :tokens]
    return load_source(EMPTY_SOURCE).feature_major_empty(features, tokens, padded_rows(tokens))


def unit_token_stride(a: np.ndarray) -> bool:
    """Whether a 2-D [tokens, features] view is feature-major: a.T rows are contiguous."""
    return a.ndim == 2 and (a.shape[0] <= 1 or a.strides[0] == a.itemsize) and \
        (a.shape[1] <= 1 or a.strides[1] >= a.shape[0] * a.itemsize)


def on_lines(t: np.ndarray) -> bool:
    """Whether every row of a 2-D array starts on a 64-byte line (ALIGN). A row that does
    not is read by vector loads that each straddle two lines (what that costs the sparse
    kernel: bench/README.md, seventh session)."""
    return t.ctypes.data % ALIGN == 0 and (t.shape[0] <= 1 or t.strides[0] % ALIGN == 0)


def transposed(a: np.ndarray) -> np.ndarray:
    """a.T as float32 with unit inner stride and rows on 64-byte lines (maybe padded), no
    copy when a.T is one: as every kernel output is, unlike most feature-major views of
    numpy's own arrays (numpy aligns its buffers to 16 bytes)."""
    t = a.T
    if unit_token_stride(a) and t.flags.writeable and t.dtype == np.float32 and on_lines(t):
        return t
    return _transpose_into(a.astype(np.float32, copy=False), feature_major_empty(t.shape[0], t.shape[1]))


def transposed_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of a 2-D array, by the tiled transpose of a.T (fast
    when a is feature-major, that is when a.T has contiguous rows)."""
    return _transpose_into(a.T.astype(np.float32, copy=False), np.empty(a.shape, np.float32))


def contiguous(a: np.ndarray) -> np.ndarray:
    """a as a writable C-contiguous float32 array; a feature-major view is transposed fast."""
    if a.flags.c_contiguous and a.flags.writeable and a.dtype == np.float32:
        return a
    if a.ndim == 2 and unit_token_stride(a.T):
        return transposed(a.T)
    return np.array(a, dtype=np.float32, order="C")


# --- rows of i32 per token, a 16-token tile at a time ----------------------------------------

TOKENS_PER_TILE = 16  # tokens in a tile of TokenTiles, and in an AMX B tile


class TokenTiles(np.ndarray):
    """Rows of 4 bytes per token (x's 4-block rows, as an int8 layer reads its x, or its
    bfloat16 pair rows) stored a 16-token tile at a time: [tiles, rows, 16], each tile's
    rows 64 bytes apart. An AMX B tile (16 rows × 16 tokens) is then 1 KB in one piece,
    where in a feature-major array its rows are a row stride apart (amx.py: the layer's
    loads of x take less time so). `lead` is the tokens' shape; the last tile's lanes past
    their count are never set."""

    lead: tuple = ()

    def __array_finalize__(self, obj) -> None:
        self.lead = getattr(obj, "lead", ())


def token_tiles_empty(rows: int, lead: tuple) -> TokenTiles:
    """Uninitialised TokenTiles of `rows` rows for tokens of shape `lead`, on 64-byte lines."""
    n = math.prod(lead)
    tiles = aligned_empty((-(-n // TOKENS_PER_TILE), rows, TOKENS_PER_TILE), np.int32).view(TokenTiles)
    tiles.lead = tuple(lead)
    return tiles


def token_tiles_for(features: int, per: int, lead: tuple) -> TokenTiles:
    """TokenTiles for the rows of `features` inputs, `per` to a row (4 bytes, or 2 bfloat16),
    in whole AMX K-tiles of 16 rows, as an AMX layer reads them: the rows from the first
    holding an input past the last zero, the others unset."""
    tiles = token_tiles_empty(-(-features // (16 * per)) * 16, lead)
    tiles[:, features // per:] = 0
    return tiles


def as_token_tiles(rows: np.ndarray) -> np.ndarray:
    """A feature-major [rows, tokens] array (unit token stride, its rows padded to whole 16
    tokens: feature_major_empty's) seen as TokenTiles' [tiles, rows, 16], without a copy:
    tile i is tokens 16·i on, of every row."""
    n = rows.shape[1]
    return np.lib.stride_tricks.as_strided(
        rows, (-(-n // TOKENS_PER_TILE), rows.shape[0], TOKENS_PER_TILE),
        (TOKENS_PER_TILE * rows.itemsize, rows.strides[0], rows.itemsize))


def token_tiles_of(a: np.ndarray) -> np.ndarray:
    """A kernel driver's rows argument as [tiles, rows, 16]: TokenTiles (or a view of
    them), or a feature-major array seen so (as_token_tiles)."""
    return a if a.ndim == 3 else as_token_tiles(a)


def untiled(tiles: TokenTiles, rows: int) -> np.ndarray:
    """TokenTiles' first `rows` rows as the token-major view [*lead, rows] of a
    feature-major array (a copy)."""
    n = math.prod(tiles.lead)
    out = feature_major_empty(rows, n).view(np.int32)
    out[:] = np.asarray(tiles)[:, :rows].transpose(1, 0, 2).reshape(rows, -1)[:, :n]
    return out.T.reshape(tiles.lead + (rows,))
