"""Per-element ops that a quantized graph runs between its Linear layers, as Numba kernels:
QuantizeLinear and DequantizeLinear per tensor, Erf, QLinearMatMul's requantization, and
the fused nodes of fuse.py's quantized passes (QSoftmax, QAttentionCore; FakeQuantize,
which every quantized BERT runs, and Lookup as LLVM IR kernels). QuantizeLinear,
DequantizeLinear and QAttentionCore are plain Numba functions compiled as C functions and
FakeQuantize and Lookup IR, all run on the launcher (launch.py); the others parallel
Numba functions. QOperator and QDQ
graphs keep activations quantized, so a block runs a dozen of these; their numpy
references make several passes over the tensor each, these one, on every thread.

Each computes what its reference does, in the same float32 steps: x / scale rounded half
to even, plus the zero point, clamped to the type (QuantizeLinear); (q - zero point) ·
scale (DequantizeLinear); erf in float64, rounded to float32 (scipy's float32 erf). Each
wrapper returns None for what its kernel does not cover (a scale per axis or block,
another type), and plan.elementwise_step runs the reference instead.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, field

import numpy as np

from ..ops import _integer_product, dequantize_linear, exact_floats, op, quantize_linear, softmax
from ..ops import qlinear_matmul as reference_qlinear_matmul
from .compile import compile_ir, compiled_cfunc, load_source, threads
from .ir import Signature
from .launch import IMPORTS, address, launch_rows, new_calls, put_source, run
from .layout import _transpose_into, aligned_empty, call_scratch, parts_for, taping
from .lowp_ir import quantized_ir
from .qattention_ir import SCRATCH, SLOTS, Scratch, qattention_ir

# The steps the kernels below and the attention kernel (QATTENTION_SOURCE) share
STEPS = """\
@njit(inline="always")
def quantized(x, scale, zero, lo, hi):
    # QuantizeLinear's value as a float: clamp(rint(x / scale) + zero, lo, hi); NaN gives
    # the byte 0, as numpy's cast of NaN does on x86
    v = np.rint(x / scale) + zero
    v = np.float32(0) if v != v else v
    v = lo if v < lo else v
    return hi if v > hi else v


@njit(inline="always")
def requantized(acc, multiplier, zero, lo, hi):
    # QLinearMatMul's output of the sum acc: clamp(rint(acc * multiplier), lo, hi) + zero
    v = np.float32(acc) * multiplier
    v = lo if v < lo else v
    return np.int32(np.rint(hi if v > hi else v) + zero)


# (a float64 sum of float32 values: exact but where their exponents span more than 29
# bits, and then its rounding to float32 does not depend on the order)
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def total64(xs):
    total = 0.0
    for i in range(xs.size):
        total += np.float64(xs[i])
    return total


@njit(inline="always")
def top_byte(qr, value, flip):
    # the byte of the row's largest value (value[b]: byte b dequantized). Where the values
    # rise with the bytes xor `flip` (0 to 255; see qsoftmax's wrapper), the largest of
    # those, which vectorises; else (flip -1) compared value by value
    if flip < 0:
        top = qr[0]
        for i in range(1, qr.size):
            if value[qr[i]] > value[top]:
                top = qr[i]
        return np.int64(top)
    f = np.uint8(flip)
    best = np.uint8(0)
    for i in range(qr.size):
        key = qr[i] ^ f
        best = key if key > best else best
    return np.int64(best ^ f)


@njit(inline="always")
def softmax_row(qr, value, table, flip, es, scale, zero, lo, hi, less, out):
    # out[i] = the softmax of the row of bytes qr, quantized, less `less`: its top byte
    # (top_byte), e = table[top, b] = exp(value[b] - value[top]) (es: room for them), their
    # float64 sum rounded to float32, e / sum
    e = table[top_byte(qr, value, flip)]
    for i in range(qr.size):
        es[i] = e[qr[i]]
    t = np.float32(total64(es))
    for i in range(qr.size):
        out[i] = np.int32(quantized(np.float32(es[i] / t), scale, zero, lo, hi)) - less
"""

ELEMENTWISE_SOURCE = """\
# sparsejit generated kernel: QLinearMatMul's requantization, QSoftmax and Erf
import math

import numpy as np
from numba import njit, prange

CHUNK = 8192  # elements per parallel task
""" + STEPS + """

@njit(parallel=True, nogil=True, cache=True)
def requantize(acc, multiplier, zero, lo, hi, out):
    # out[r, j] = requantized(acc[r, j]), multiplier[j] per column
    rows = acc.shape[0]
    per_task = max(1, CHUNK // max(1, acc.shape[1]))
    for c in prange((rows + per_task - 1) // per_task):
        for r in range(c * per_task, min(rows, (c + 1) * per_task)):
            xs = acc[r]
            ys = out[r]
            for j in range(xs.size):
                ys[j] = requantized(xs[j], multiplier[j], zero, lo, hi)


@njit(parallel=True, nogil=True, cache=True)
def qsoftmax(q, value, table, flip, out_scale, out_zero, lo, hi, out):
    # each row of bytes q [rows, n] (softmax_row)
    rows, n = q.shape
    per_task = max(1, CHUNK // max(1, n))
    for c in prange((rows + per_task - 1) // per_task):
        es = np.empty(n, np.float32)
        for r in range(c * per_task, min(rows, (c + 1) * per_task)):
            softmax_row(q[r], value, table, flip, es, out_scale, out_zero, lo, hi, 0, out[r])


# Each task works on slices of its chunk: loops over a slice from 0 vectorise, where
# loops over the chunk's range of the whole array did not.
@njit(parallel=True, nogil=True, cache=True)
def erf(x, out):
    n = x.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        xs = x[c * CHUNK:min(n, (c + 1) * CHUNK)]
        ys = out[c * CHUNK:min(n, (c + 1) * CHUNK)]
        for i in range(xs.size):
            ys[i] = np.float32(math.erf(np.float64(xs[i])))
"""

# QOperator attention (QAttentionCore): QLinearMatMul(q, kᵀ) → Lookup → + mask →
# QuantizeLinear → QSoftmax → QLinearMatMul(·, v), in the float32 steps of the kernels
# above; the (batch, head) tasks [t0, t1) of one part (task i: batch i % b, head i // b),
# compiled as a C function that the launcher runs (launch.py; a parallel Numba function
# compiles more slowly: bench/README.md, nineteenth session). Its products on BLAS, for
# CPUs without AVX-512 VNNI: with it, the kernel is qattention_ir's, step for step this one
# with its products in int32.
# Its types are set per model where it says TYPES (q's, kᵀ's, v's, the probabilities' and
# the output's bytes, the floats of each product).
QATTENTION_SOURCE = """\
# sparsejit generated kernel: QOperator attention, (batch, head) tasks [t0, t1)
import numpy as np
from numba import carray, njit
from numpy.lib.stride_tricks import as_strided

from sparsejit.kernels.launch import pointer

Q, K, V, P, Y, FIRST, SECOND = TYPES
""" + STEPS + """

@njit(inline="always")
def centred(x, zero):
    # x (2-D bytes, any layout) less its zero point, in zero's type, C order
    y = np.empty(x.shape, np.asarray(zero).dtype)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            y[i, j] = x[i, j] - zero
    return y


# the sums of (x - xz)(y - yz) over k for x [m, k] and y [k, n] bytes in any layout, in xz's
# float type, which holds every such sum exactly (ops.exact_floats), so that the order of the
# sums does not matter. Not inlined, and both calls give it arrays of layout 'A': one compile
# serves both where the types agree (inlined twice, it was most of the kernel's compile:
# bench/README.md, twenty-first session)
@njit
def product(x, xz, y, yz):
    c = np.empty((x.shape[0], y.shape[1]), np.asarray(xz).dtype)
    np.dot(centred(x, xz), centred(y, yz), c)
    return c


@njit(inline="always")
def strided(n, at, dtype):
    # the 4-D array of dtype from slots n[at:at + 9]: its first element's address, its
    # extent in elements, its shape and its strides in bytes
    flat = carray(pointer(n[at]), n[at + 1], dtype)
    return as_strided(flat, (n[at + 2], n[at + 3], n[at + 4], n[at + 5]), (n[at + 6], n[at + 7], n[at + 8], n[at + 9]))


def qattention(slots, floats, t0, t1):
    # slots: int64 [50] (qattention's wrapper), floats: float32 [20]. q [b, h, rows, d],
    # kt [b, h, d, t], v [b, h, t, dv], each in any layout (`strided`); the mask [mb, mh, mr,
    # t] in C order, the output [b, h, rows, dv] of strides n[46:50]; `plain`: the bytes the
    # scaled scores quantize to where the mask adds 0
    n = carray(pointer(slots), 50, np.int64)
    f = carray(pointer(floats), 20, np.float32)
    q, kt, v = strided(n, 0, Q), strided(n, 10, K), strided(n, 20, V)
    mask = carray(pointer(n[30]), (n[31], n[32], n[33], n[34]), np.float32)
    extent = 1 + (n[36] - 1) * n[46] + (n[37] - 1) * n[47] + (n[38] - 1) * n[48] + (n[39] - 1) * n[49]
    out = as_strided(carray(pointer(n[35]), extent, Y), (n[36], n[37], n[38], n[39]), (n[46], n[47], n[48], n[49]))
    scores = carray(pointer(n[40]), 256, np.float32)
    value = carray(pointer(n[41]), 256, np.float32)
    table = carray(pointer(n[42]), (256, 256), np.float32)
    flip = n[43]
    plain = carray(pointer(n[44]), 256, np.uint8)
    qz, kz, vz, pz = FIRST(f[0]), FIRST(f[1]), SECOND(f[2]), SECOND(f[3])
    m1, z1, lo1, hi1, s_scale, s_zero, s_lo, s_hi = f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11]
    p_scale, p_zero, p_lo, p_hi, m2, z2, lo2, hi2 = f[12], f[13], f[14], f[15], f[16], f[17], f[18], f[19]
    batch, rows = q.shape[0], q.shape[2]
    t = kt.shape[3]
    dv = v.shape[3]
    byte = np.empty(t, np.uint8)
    qr = np.empty(t, np.uint8)
    es = np.empty(t, np.float32)
    for task in range(t0, t1):
        h = task // batch  # (head-major, as qattention_ir)
        b = task - h * batch
        acc = product(q[b, h], qz, kt[b, h], kz)
        pq = np.empty((rows, t), P)  # the probabilities' bytes
        for i in range(rows):
            ai = acc[i]
            mr = mask[min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1), min(i, mask.shape[2] - 1)]
            for j in range(t):
                byte[j] = requantized(ai[j], m1, z1, lo1, hi1) & 255
            for j in range(t):  # (e + 0 is e: one lookup where the mask adds nothing)
                qr[j] = plain[byte[j]]
            masked = False
            for j in range(t):
                masked |= mr[j] != 0
            if masked:  # (the keys the mask moves)
                for j in range(t):
                    if mr[j] != 0:
                        qr[j] = np.int32(quantized(scores[byte[j]] + mr[j], s_scale, s_zero, s_lo, s_hi)) & 255
            softmax_row(qr, value, table, flip, es, p_scale, p_zero, p_lo, p_hi, 0, pq[i])
        o = product(pq[:, :t], pz, v[b, h], vz)  # (layout 'A', as q[b, h])
        for i in range(rows):
            oi = o[i]
            ys = out[b, h, i]
            for k in range(dv):
                ys[k] = requantized(oi[k], m2, z2, lo2, hi2)
"""


RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127)}


def _kernels():
    return load_source(ELEMENTWISE_SOURCE)


def _flat(x: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x's elements in memory order, the output's, the output shaped as x, laid out as x):
    a transposed view (a Linear kernel's feature-major output) is read as it lies, not
    copied; another view (its output at a batch's tokens, each feature's row padded) is
    copied in its own axes' order, row by row, not transposed to C order."""
    if x.flags.c_contiguous:
        out = aligned_empty(x.shape, dtype)  # (a tape's buffer, while one is made)
        return x.reshape(-1), out.reshape(-1), out
    order = np.argsort(x.strides, kind="stable")[::-1]  # axes from the one whose steps are longest
    out = aligned_empty(tuple(x.shape[a] for a in order), dtype)
    return np.ascontiguousarray(x.transpose(order)).reshape(-1), out.reshape(-1), out.transpose(np.argsort(order))


def scalar(value) -> np.ndarray | None:
    v = None if value is None else np.asarray(value)
    return v.reshape(()) if v is not None and v.size == 1 else None


def quantize(x: np.ndarray, scale, zero_point=None, **attrs):
    """QuantizeLinear of float32 x to uint8 or int8 with one scale and zero point; None otherwise."""
    s, z = scalar(scale), scalar(zero_point)
    if x.dtype != np.float32 or s is None or s.dtype != np.float32 or z is None or z.dtype not in RANGES \
            or any(attrs.get(a) for a in ("block_size", "precision", "output_dtype")):
        return None
    lo, hi = RANGES[z.dtype]
    flat, out, shaped = _flat(x, z.dtype)
    _each("quantize", flat, out, s, z, lo, hi)
    return shaped


def dequantize(q: np.ndarray, scale, zero_point=None, **attrs):
    """DequantizeLinear of uint8 or int8 q with one float32 scale and zero point; None otherwise."""
    s, z = scalar(scale), scalar(0 if zero_point is None else zero_point)
    if q.dtype not in RANGES or s is None or s.dtype != np.float32 \
            or any(attrs.get(a) for a in ("block_size", "output_dtype")):
        return None
    flat, out, shaped = _flat(q, np.float32)
    _each("dequantize", flat, out, s, z, RANGES[q.dtype][0])
    return shaped


def erf(x: np.ndarray, **attrs):
    """Erf of float32 x; None otherwise."""
    if x.dtype != np.float32:
        return None
    flat, out, shaped = _flat(x, np.float32)
    _kernels().erf(flat, out)
    return shaped


def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point, **attrs):
    """QLinearMatMul with a per-tensor a and y and an 8-bit output: the exact integer sums
    on BLAS (ops.qlinear_matmul's), requantized in one pass; None otherwise."""
    ys, yz, a_s = scalar(y_scale), scalar(y_zero_point), scalar(a_scale)
    bs = np.asarray(b_scale, np.float32).reshape(-1)
    if ys is None or yz is None or yz.dtype not in RANGES or a_s is None or b.ndim < 2 or \
            bs.size not in (1, b.shape[-1]) or np.asarray(a_zero_point).size != 1:
        return None
    acc = np.ascontiguousarray(_integer_product(a, b, a_zero_point, b_zero_point), np.float32)
    multiplier, z, lo, hi = _requantizing(a_s, bs, ys, yz)
    out = np.empty(acc.shape, yz.dtype)
    n = acc.shape[-1]
    _kernels().requantize(acc.reshape(-1, n), np.broadcast_to(multiplier, (n,)).copy(), z, lo, hi, out.reshape(-1, n))
    return out


@op("Lookup", fused=True)
def reference_lookup(x: np.ndarray, *, table: np.ndarray, ops=(), min_rank: int = 1) -> np.ndarray:
    """The fused node (fuse.fuse_lookups): the table's entry for each byte of x, an 8-bit
    tensor; `ops`, the chain it replaced, for the reader."""
    if x.dtype not in RANGES:
        raise TypeError(f"a Lookup over {' -> '.join(ops)} got a {x.dtype} input; its table is for 8-bit values")
    y = table[x.view(np.uint8)]
    return y.reshape((1,) * (min_rank - y.ndim) + y.shape) if y.ndim < min_rank else y


def lookup(x: np.ndarray, *, table: np.ndarray, ops=(), min_rank: int = 1):
    """reference_lookup on every thread; None for what it does not cover."""
    if x.dtype not in RANGES or x.ndim < min_rank or table.shape != (256,) or table.dtype.hasobject \
            or table.dtype.itemsize not in (1, 2, 4, 8):
        return None
    flat, out, shaped = _flat(x.view(np.uint8), table.dtype)
    _each(f"lookup {8 * table.dtype.itemsize}", flat, out, table=np.ascontiguousarray(table))
    return shaped


@op("FakeQuantize", fused=True)
def reference_fake_quantize(x: np.ndarray, scale, zero_point) -> np.ndarray:
    """The fused node (fuse.fuse_fake_quantize): DequantizeLinear(QuantizeLinear(x))."""
    return dequantize_linear(quantize_linear(x, scale, zero_point), scale, zero_point)


def fake_quantize(x: np.ndarray, scale, zero_point):
    """reference_fake_quantize in one pass on every thread; None for what it does not cover."""
    s, z = scalar(scale), scalar(zero_point)
    if x.dtype != np.float32 or s is None or s.dtype != np.float32 or z is None or z.dtype not in RANGES:
        return None
    lo, hi = RANGES[z.dtype]
    flat, out, shaped = _flat_by_kernels(x) or _flat(x, np.float32)
    _each("fake_quantize", flat, out, s, z, lo, hi)
    return shaped


def _flat_by_kernels(x: np.ndarray) -> tuple | None:
    """_flat's arrays for float32 x C-contiguous, or a 2-D view whose rows' elements are
    evenly spaced (one token of a feature-major output: a pooler's input), copied by the
    transpose kernel; each buffer made by layout.aligned_empty. So a taped run
    (sparsejit.tape) replays the copy with the kernel that follows, and holds both
    buffers. None for other x."""
    if x.flags.c_contiguous:
        out = aligned_empty(x.shape, np.float32)
        return x.reshape(-1), out.reshape(-1), out
    if x.ndim != 2 or min(x.strides) < 0 or x.strides[0] % 4 or x.strides[1] % 4:
        return None
    rows = _transpose_into(x.T, aligned_empty(x.shape, np.float32))
    out = aligned_empty(x.shape, np.float32)
    return rows.reshape(-1), out.reshape(-1), out


EACH = Signature("each", (
    ("x", "ptr"), ("out", "ptr"), ("i0", "i64"), ("i1", "i64"), ("scale", "float"), ("zero", "float"), ("lo", "float"),
    ("hi", "float"), ("table", "ptr")))

_QUANTIZED = "  %xp = getelementptr float, ptr %x, i64 %i\n  %v = load float, ptr %xp\n" + \
    quantized_ir("%q2", "%v", "%scale", "%zero", "%lo", "%hi")
_STORE_FLOAT = "  %yp = getelementptr float, ptr %out, i64 %i\n  store float %y, ptr %yp\n"


def each_ir(op: str) -> str:
    """out[i] for x[i], i in [i0, i1): `op` "fake_quantize" (float to float, in the float32
    steps of the Numba kernels' `quantized`) or "lookup <bits>" (byte to table[byte],
    entries of 8 to 64 bits). (QuantizeLinear and DequantizeLinear alone stay Numba
    kernels, which ran them faster than such loops: bench/README, thirteenth session.)"""
    if op == "fake_quantize":
        body = _QUANTIZED + "  %s = fsub float %q2, %zero\n  %y = fmul float %s, %scale\n" + _STORE_FLOAT
    else:
        t = f"i{op.split()[1]}"
        body = ("  %kp = getelementptr i8, ptr %x, i64 %i\n  %k = load i8, ptr %kp\n  %ki = zext i8 %k to i64\n"
                f"  %tp = getelementptr {t}, ptr %table, i64 %ki\n  %e = load {t}, ptr %tp\n"
                f"  %yp = getelementptr {t}, ptr %out, i64 %i\n  store {t} %e, ptr %yp\n")
    return f"""\
; sparsejit generated kernel: {op}, element by element over [i0, i1)
define void @each({EACH.params()}) {{
entry:
  br label %head
head:
  %i = phi i64 [ %i0, %entry ], [ %next, %body ]
  %more = icmp slt i64 %i, %i1
  br i1 %more, label %body, label %exit
body:
  %next = add i64 %i, 1
{body}  br label %head
exit:
  ret void
}}

declare float @llvm.roundeven.f32(float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
"""


EACH_DRIVER = """\
# sparsejit generated kernel: the driver of the element-by-element IR kernels (each_ir)
# part c computes elements [c * n / parts, (c + 1) * n / parts); x, out and table are
# their bytes (one compiled driver for every element type)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(EACH) + """

@njit(nogil=True, cache=True)
def run_each(launch, part, calls, fn, x, out, n, scale, zero, lo, hi, table):
    parts = calls.shape[0]
    for c in range(parts):
        if c * n // parts < (c + 1) * n // parts:
            put_each(calls, c, fn, x.ctypes.data, out.ctypes.data, c * n // parts, (c + 1) * n // parts, scale, zero,
                     lo, hi, table.ctypes.data)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""

_NO_TABLE = np.zeros(1, np.uint8)


# QuantizeLinear and DequantizeLinear per tensor over [i0, i1), Numba functions compiled as
# C functions of EACH's signature (`each_kernel`), which run_each launches as it does the
# IR kernels (IR loops ran them more slowly: bench/README.md, thirteenth session; a
# parallel Numba function compiles more slowly: nineteenth session)
EACH_SOURCE = """\
# sparsejit generated kernel: QuantizeLinear and DequantizeLinear per tensor, [i0, i1)
import numpy as np
from numba import carray, njit

from sparsejit.kernels.launch import pointer
""" + STEPS + """

def quantize(x, out, i0, i1, scale, zero, lo, hi, table):
    # float32 x to bytes (int8's too: the int32 value's low byte)
    xs = carray(pointer(x), i1, np.float32)[i0:]
    ys = carray(pointer(out), i1, np.uint8)[i0:]
    for i in range(xs.size):
        ys[i] = np.int32(quantized(xs[i], scale, zero, lo, hi))


def dequantize(x, out, i0, i1, scale, zero, lo, hi, table):
    # bytes x to float32: (x - zero) · scale, x int8 where lo < 0
    qs = carray(pointer(x), i1, np.uint8)[i0:]
    ys = carray(pointer(out), i1, np.float32)[i0:]
    wrap = np.float32(256) if lo < 0 else np.float32(0)
    for i in range(qs.size):
        v = np.float32(qs[i])
        ys[i] = ((v - wrap if v >= 128 else v) - zero) * scale
"""


@functools.cache
def each_kernel(op: str) -> int:
    """The address of EACH_SOURCE's `op` ("quantize" or "dequantize"), a C function of
    EACH's signature."""
    return compiled_cfunc(getattr(load_source(EACH_SOURCE), op),
                          "void(int64, int64, int64, int64, float32, float32, float32, float32, int64)",
                          nogil=True).address


@functools.cache
def _each_fn(op: str) -> int:
    return each_kernel(op) if op in ("quantize", "dequantize") else compile_ir(each_ir(op), EACH.name)


def _each(op: str, x: np.ndarray, out: np.ndarray, scale=0, zero=0, lo=0, hi=0, table: np.ndarray = _NO_TABLE) -> None:
    """each_ir(op), or EACH_SOURCE's, over the flat (contiguous) x into out, on every thread
    (under layout.SERIAL_BELOW elements on the calling thread alone, with no parallel region)."""
    f32 = np.float32
    run(load_source(EACH_DRIVER).run_each, EACH, parts_for(x.size), 1, _each_fn(op), x.view(np.uint8),
        out.view(np.uint8), x.size, f32(scale), f32(zero), f32(lo), f32(hi), table.view(np.uint8))


@op("QSoftmax", fused=True)
def reference_qsoftmax(q: np.ndarray, *, in_scale, in_zero, out_scale, out_zero, value=None, table=None, axis=-1,
                       opset=13) -> np.ndarray:
    """The fused node (fuse.fuse_quantized_softmax): QuantizeLinear(Softmax(DequantizeLinear(q)))
    over the Softmax's `axis` as its `opset` reads it (`value` and `table`, softmax_table's,
    are the kernel's, which takes the last axis)."""
    return quantize_linear(softmax(dequantize_linear(q, in_scale, in_zero), axis=axis, opset=opset), out_scale, out_zero)


def last_axis(axis: int, ndim: int) -> bool:
    """Whether a Softmax over `axis` of an ndim-D input is over its last axis alone (in
    every opset: before 13 the axes from `axis` on, flattened)."""
    return -ndim <= axis < ndim and axis % ndim == ndim - 1


def softmax_table(in_scale, in_zero) -> tuple[np.ndarray, np.ndarray]:
    """(each byte's dequantized value [256], exp(value[b] - value[top]) [top, b]), in byte
    order, by the ops the Softmax runs (numpy's exp on this CPU)."""
    value = dequantize_linear(np.arange(256, dtype=np.uint8).view(np.asarray(in_zero).dtype), in_scale, in_zero)
    with np.errstate(all="ignore"):
        return value, np.exp(value[None, :] - value[:, None])


def _rising(scale, zero) -> int:
    """The byte mask under whose xor the dequantized values (b - zero) · scale never fall
    as the bytes rise: the type's order (uint8: 0; int8: its sign bit, 128), reversed
    (xor 255) by a negative scale; -1 where the scale is 0, NaN or infinite."""
    s = float(np.asarray(scale).reshape(()))
    if not np.isfinite(s) or s == 0:
        return -1
    return (128 if np.asarray(zero).dtype == np.int8 else 0) ^ (255 if s < 0 else 0)


def qsoftmax(q: np.ndarray, *, in_scale, in_zero, out_scale, out_zero, value, table, axis=-1, opset=13):
    """reference_qsoftmax on every thread, a row per task; None for what it does not cover
    (a softmax over more than the last axis among them)."""
    if q.dtype not in RANGES or q.ndim == 0 or q.shape[-1] == 0 or not last_axis(axis, q.ndim):
        return None
    z = np.asarray(out_zero)
    lo, hi = RANGES[z.dtype]
    rows = np.ascontiguousarray(q).view(np.uint8).reshape(-1, q.shape[-1])
    out = np.empty(rows.shape, z.dtype)
    _kernels().qsoftmax(rows, value, table, _rising(in_scale, in_zero), np.float32(out_scale), np.float32(z),
                        np.float32(lo), np.float32(hi), out)
    return out.reshape(q.shape)


@op("QAttentionCore", fused=True)
def reference_qattention(q, kt, mask, v, *, qk, lookup, grid, softmax, pv, ops=()) -> np.ndarray:
    """The fused node (fuse.fuse_quantized_attention), each step by its reference:
    QLinearMatMul(q, kt) with `qk` (a's scale and zero point, b's, y's), the Lookup
    `lookup` of its bytes (over `ops`), + mask, QuantizeLinear to `grid` (scale, zero
    point), QSoftmax with `softmax` (its attributes), QLinearMatMul(·, v) with `pv`."""
    scores = reference_lookup(reference_qlinear_matmul(q, qk[0], qk[1], kt, *qk[2:]), table=lookup)
    p = reference_qsoftmax(quantize_linear(np.add(scores, mask), *grid), **softmax)
    return reference_qlinear_matmul(p, pv[0], pv[1], v, *pv[2:])


def _requantizing(a_scale, b_scale, y_scale, y_zero) -> tuple:
    """(multiplier, zero, lo, hi) of qlinear_matmul's requantization, as its kernel takes them."""
    z = np.float32(y_zero)
    lo, hi = RANGES[np.asarray(y_zero).dtype]
    return np.float32(a_scale) * np.float32(b_scale) / np.float32(y_scale), z, np.float32(lo) - z, np.float32(hi) - z


def qattention(q, kt, mask, v, **attrs):
    """reference_qattention on every thread, a (batch, head) per task, its scores never
    leaving the task; None for what it does not cover (a scale or zero point per axis, a
    mask that does not broadcast to the scores, inputs not 4-D 8-bit, no keys: a softmax
    over none, which the reference refuses). A node's steps
    make its `QAttention` once (plan.elementwise_step)."""
    return QAttention(**attrs)(q, kt, mask, v)


class QAttention:
    """qattention for one node's constants, checked and laid out for the kernel once."""

    def __init__(self, *, qk, lookup, grid, softmax, pv, ops=()):
        self._calls: dict[tuple, _Prepared | None] = {}  # (by the inputs' shapes, layouts and types: _prepare)
        self._taped: dict[tuple, tuple] = {}  # (the rows of the tape made last, by the same key)
        scales, zeros = [*qk[0::2], grid[0], *pv[0::2]], [*qk[1::2], grid[1], *pv[1::2]]
        self.covered = not (any(np.size(c) != 1 or np.asarray(c).dtype != np.float32 for c in scales) or
                            any(np.size(c) != 1 or np.asarray(c).dtype not in RANGES for c in zeros) or
                            np.asarray(softmax["out_zero"]).dtype != np.asarray(pv[1]).dtype or
                            not last_axis(softmax.get("axis", -1), 4) or
                            lookup.shape != (256,) or lookup.dtype != np.float32)
        if not self.covered:
            return
        scalars = [np.asarray(c).reshape(()) for c in (*qk, *grid, *pv)]
        (qs, self.qz, ks, self.kz, ss, sz), (gs, gz), (ps, self.pz, vs, self.vz, ys, yz) = \
            scalars[:6], scalars[6:8], scalars[8:]
        self.types = [z.dtype for z in (self.qz, self.kz, self.vz, self.pz, yz)]  # q's, kt's, v's, p's, y's
        lo, hi = RANGES[gz.dtype]
        p_lo, p_hi = RANGES[self.pz.dtype]
        self.floats = np.array([self.qz, self.kz, self.vz, self.pz, *_requantizing(qs, ks, ss, sz), gs, gz, lo, hi,
                                softmax["out_scale"], softmax["out_zero"], p_lo, p_hi, *_requantizing(ps, vs, ys, yz)],
                               np.float32)
        # the bytes each scaled score quantizes to where the mask adds 0 (the kernel's
        # `quantized`, in its float32 steps)
        v = np.rint(lookup / np.float32(gs)) + np.float32(gz)
        plain = (np.clip(np.where(np.isnan(v), np.float32(0), v), lo, hi).astype(np.int32) & 255).astype(np.uint8)
        self.tables = lookup, softmax["value"], softmax["table"], plain  # (held: the kernel reads them by address)
        self.products = qattention_products()
        self.tail = [*map(address, self.tables[:3]), _rising(softmax["in_scale"], softmax["in_zero"])]

    def __call__(self, q, kt, mask, v):
        if not self.covered:
            return None
        key = (threads(), q.shape, q.strides, q.dtype.num, kt.shape, kt.strides, kt.dtype.num, v.shape, v.strides,
               v.dtype.num, mask.shape, mask.dtype.num)
        call = self._calls.get(key, False)
        if call is False:
            if len(self._calls) >= 64:  # (a server seeing many shapes)
                self._calls.clear()
            call = self._calls[key] = self._prepare(q, kt, mask, v)
        if call is None:
            return None
        t = kt.shape[3]
        mask = mask.reshape(call.mask)
        if mask.shape[3] != t or not mask.flags.c_contiguous:
            mask = np.ascontiguousarray(np.broadcast_to(mask, (*mask.shape[:3], t)))
        b, h, rows, dv = call.out  # (written with the heads merged, [b, rows, h, dv], by _prepare's strides in
        out = aligned_empty((b, rows, h, dv), self.types[4]).transpose(0, 2, 1, 3)  # the slots: the Transpose and
        # Reshape after it are views)
        if out.size == 0:
            return out
        made = taping()
        mine = not made and call.lock.acquire(blocking=False)  # (else another thread is in its arrays: copies)
        try:
            slots, calls = (call.slots, call.calls) if mine else (call.slots.copy(), call.calls.copy())
            if made:  # (the tape's rows, held here, which no later run rewrites)
                self._taped[key] = slots, calls
            scratch = _NO_TABLE
            for k, x in zip((0, 10, 20, 30, 35), (q, kt, v, mask, out)):
                slots[:, k] = address(x)
            if call.scratch is not None:  # (in this thread's arena, or a tape's: layout.call_scratch)
                at, size = call.scratch
                scratch = call_scratch(size)
                slots[:, SLOTS:] = at + address(scratch)
            calls[:, 2] = address(slots) + call.rows
            launch_rows(QATTENTION, calls, (q, kt, v, mask, out, slots, scratch, self.floats, *self.tables))
        finally:
            if mine:
                call.lock.release()
        return out

    def _prepare(self, q, kt, mask, v) -> _Prepared | None:
        """How the kernel runs on inputs of these shapes, layouts and types: None where it
        does not cover them (see `qattention`)."""
        if any(x.ndim != 4 for x in (q, kt, v)) or [q.dtype, kt.dtype, v.dtype] != self.types[:3] \
                or mask.dtype != np.float32:
            return None
        batch, heads, rows, d = q.shape
        t, dv = kt.shape[3], v.shape[3]
        if t == 0 or kt.shape != (batch, heads, d, t) or v.shape[:3] != (batch, heads, t) or \
                np.broadcast_shapes(mask.shape, (batch, heads, rows, t)) != (batch, heads, rows, t) or \
                any(s < 0 for x in (q, kt, v) for s in x.strides):
            return None
        shape = (1,) * (4 - mask.ndim) + mask.shape
        tasks = batch * heads
        parts = max(1, min(threads(), tasks))
        vnni = self.products == "vnni" and max(d, t) < EXACT_INT32
        if vnni:  # (the IR kernel, its sums in int32; each part its own scratch)
            fn, lookup = qattention_ir_kernel(_offsets(self.types)), row_bytes_kernel()
        else:
            fn, lookup = _qattention_fn(*self.types, exact_floats(d, q, self.qz, kt, self.kz),
                                        exact_floats(t, np.empty(0, self.pz.dtype), self.pz, v, self.vz)), 0
        slots = np.zeros((parts, SLOTS + len(SCRATCH) * vnni), np.int64)
        slots[:, :SLOTS] = [*_strided(q), *_strided(kt), *_strided(v), 0, *shape[:3], t, 0, batch, heads, rows, dv,
                            *self.tail, address(self.tables[3]), lookup,
                            rows * heads * dv, dv, heads * dv, 1]  # (the output's byte strides, its heads merged)
        calls = new_calls(parts, 1, QATTENTION)
        calls[:, :6] = [[1, fn, 0, address(self.floats), c * tasks // parts, (c + 1) * tasks // parts]
                        for c in range(parts)]
        scratch = None
        if vnni:  # (each array from a 64-byte line)
            sizes = [-(-s // 64) * 64 for s in Scratch.of(rows, d, t, dv)]
            per_part = sum(sizes)
            scratch = (np.cumsum([0, *sizes[:-1]]) + per_part * np.arange(parts)[:, None], per_part * parts)
        return _Prepared(shape, (batch, heads, rows, dv), slots, calls, np.arange(parts) * slots.strides[0], scratch)


@dataclass(frozen=True)
class _Prepared:
    """QAttention._prepare's: the mask's 4-D shape, the output's shape, the rows of slots
    and calls (all but the inputs' and output's addresses, and the scratch's), each slot
    row's offset, and the scratch arrays' offsets by part in the thread's arena and the
    bytes they take (None: the Numba kernel's, which makes its own). Whoever holds `lock`
    uses its arrays; another thread copies them."""

    mask: tuple
    out: tuple
    slots: np.ndarray
    calls: np.ndarray
    rows: np.ndarray
    scratch: tuple | None
    lock: threading.Lock = field(default_factory=threading.Lock)


QATTENTION = Signature("qattention", (("slots", "ptr"), ("floats", "ptr"), ("t0", "i64"), ("t1", "i64")))


def _strided(x: np.ndarray) -> tuple[int, ...]:
    """x's first element's address, its extent in elements, shape and strides (not negative)."""
    return address(x), 1 + sum((n - 1) * s for n, s in zip(x.shape, x.strides)) // x.itemsize, *x.shape, *x.strides


@functools.cache
def qattention_kernel(types: tuple[str, ...]) -> int:
    """The address of QATTENTION_SOURCE's kernel for these types (q's, kt's, v's, the
    probabilities' and the output's bytes, the two products' floats)."""
    source = QATTENTION_SOURCE.replace("TYPES", ", ".join(f"np.{t}" for t in types))
    return compiled_cfunc(load_source(source).qattention, "void(int64, int64, int64, int64)", nogil=True).address


def _offsets(types) -> tuple[int, ...]:
    """What the products add to make q, kᵀ, p and v vpdpbusd's types (uint8 x + cx, int8 y
    - cy): 128 for an int8 q or p and a uint8 kᵀ or v, else 0 (from q's, kt's, v's and p's
    types)."""
    return (128 * (np.dtype(types[0]) == np.int8), 128 * (np.dtype(types[1]) == np.uint8),
            128 * (np.dtype(types[3]) == np.int8), 128 * (np.dtype(types[2]) == np.uint8))


@functools.cache
def qattention_ir_kernel(offsets: tuple[int, ...]) -> int:
    """The address of qattention_ir's kernel for these offsets (`_offsets`)."""
    return compile_ir(qattention_ir(offsets), QATTENTION.name)


@functools.cache
def _qattention_fn(*types) -> int:
    """qattention_kernel for these dtypes (or types) (looked up by them: their names take
    longer)."""
    return qattention_kernel(tuple(np.dtype(t).name for t in types))


def qattention_products() -> str:
    """How QAttentionCore's kernel takes its products on this CPU: "vnni" (qattention_ir's
    kernel) or "blas" (QATTENTION_SOURCE's)."""
    from .int8 import has_vnni

    return "vnni" if has_vnni() else "blas"


EXACT_INT32 = 33025  # sums of fewer products of a byte less 255 and one less 128 fit int32 (k · 255 · 255 < 2^31)


ROW_BYTES = Signature("row_bytes", (("acc", "ptr"), ("t", "i64"), ("grid", "ptr"), ("plain", "ptr"), ("byte", "ptr"),
                                    ("qr", "ptr")))


def has_permutes() -> bool:
    """Whether this CPU has AVX-512 VBMI's byte permutes (rows.permutes)."""
    from .rows import permutes

    return permutes()


@functools.cache
def row_bytes_kernel() -> int:
    """The address of row_bytes_ir's kernel where the CPU has AVX-512 VBMI, else 0 (the
    attention kernel's own loops)."""
    return compile_ir(row_bytes_ir(), ROW_BYTES.name) if has_permutes() else 0


def row_bytes_ir() -> str:
    """`row_bytes`: for a row of scores' sums acc (i32, t of them), byte[j] (uint8) =
    requantized(acc[j]) & 255 on grid (float32 [multiplier, zero point, lowest, highest],
    QAttentionCore's first requantizing: clamp, round half to even, add the zero point, in
    the attention kernel's float32 steps) and qr[j] = plain[byte[j]], 64 at a time by two
    vpermi2b over plain's 256 bytes and a select on the byte's top bit, the rest one by one."""
    v, b, f = "<64 x i32>", "<64 x i8>", "<64 x float>"
    permute = "call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512"

    def splat(x: str) -> list[str]:
        return [f"  %{x}.i = insertelement {f} poison, float %{x}, i64 0",
                f"  %{x}.v = shufflevector {f} %{x}.i, {f} poison, <64 x i32> zeroinitializer"]

    def byte_of(acc: str, out: str, lanes: int) -> list[str]:  # (requantized, & 255: its low byte)
        fty, ity, bty = (f"<{lanes} x {t}>" if lanes > 1 else t for t in ("float", "i32", "i8"))
        sfx, fn = (".v", f"v{lanes}f32") if lanes > 1 else ("", "f32")
        o = f"%{out}"
        return [f"  {o}.f = sitofp {ity} {acc} to {fty}", f"  {o}.m = fmul {fty} {o}.f, %m{sfx}",
                f"  {o}.lo = call {fty} @llvm.maxnum.{fn}({fty} {o}.m, {fty} %lo{sfx})",
                f"  {o}.hi = call {fty} @llvm.minnum.{fn}({fty} {o}.lo, {fty} %hi{sfx})",
                f"  {o}.r = call {fty} @llvm.roundeven.{fn}({fty} {o}.hi)", f"  {o}.z = fadd {fty} {o}.r, %z{sfx}",
                f"  {o}.q = fptosi {fty} {o}.z to {ity}", f"  {o} = trunc {ity} {o}.q to {bty}"]

    lines = ["; sparsejit generated kernel: a row of QAttentionCore's scores to bytes, looked up by vpermi2b",
             f"define void @row_bytes({ROW_BYTES.params()}) {{", "entry:"]
    for i, x in enumerate(("m", "z", "lo", "hi")):
        lines += [f"  %{x}.at = getelementptr float, ptr %grid, i64 {i}", f"  %{x} = load float, ptr %{x}.at"]
        lines += splat(x)
    lines += [f"  %tab{h}.at = getelementptr i8, ptr %plain, i64 {64 * h}" for h in range(4)]
    lines += [f"  %tab{h} = load {b}, ptr %tab{h}.at, align 1" for h in range(4)]
    lines += ["  br label %v.head", "v.head:", "  %j = phi i64 [ 0, %entry ], [ %jn, %v.body ]",
              "  %jn = add i64 %j, 64", "  %vmore = icmp sle i64 %jn, %t", "  br i1 %vmore, label %v.body, label %s.head",
              "v.body:", "  %a.at = getelementptr i32, ptr %acc, i64 %j", f"  %a = load {v}, ptr %a.at, align 4"]
    lines += byte_of("%a", "y", 64)
    lines += [f"  %lk = {permute}({b} %tab0, {b} %y, {b} %tab1)", f"  %hk = {permute}({b} %tab2, {b} %y, {b} %tab3)",
              f"  %top = icmp slt {b} %y, zeroinitializer", f"  %q = select <64 x i1> %top, {b} %hk, {b} %lk",
              "  %b.at = getelementptr i8, ptr %byte, i64 %j", f"  store {b} %y, ptr %b.at, align 1",
              "  %q.at = getelementptr i8, ptr %qr, i64 %j", f"  store {b} %q, ptr %q.at, align 1",
              "  br label %v.head",
              "s.head:", "  %k = phi i64 [ %j, %v.head ], [ %kn, %s.body ]", "  %smore = icmp slt i64 %k, %t",
              "  br i1 %smore, label %s.body, label %done", "s.body:", "  %kn = add i64 %k, 1",
              "  %c.at = getelementptr i32, ptr %acc, i64 %k", "  %c = load i32, ptr %c.at"]
    lines += byte_of("%c", "x", 1)
    lines += ["  %xk = zext i8 %x to i64", "  %p.at = getelementptr i8, ptr %plain, i64 %xk", "  %p = load i8, ptr %p.at",
              "  %xb.at = getelementptr i8, ptr %byte, i64 %k", "  store i8 %x, ptr %xb.at",
              "  %p2.at = getelementptr i8, ptr %qr, i64 %k", "  store i8 %p, ptr %p2.at", "  br label %s.head",
              "done:", "  ret void", "}", "", f"declare {b} @llvm.x86.avx512.vpermi2var.qi.512({b}, {b}, {b})"]
    for ty, fn in ((f, "v64f32"), ("float", "f32")):
        lines += [f"declare {ty} @llvm.{name}.{fn}({ty}{f', {ty}' if name != 'roundeven' else ''})"
                  for name in ("maxnum", "minnum", "roundeven")]
    return "\n".join(lines) + "\n"
