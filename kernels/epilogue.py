"""What the Linear kernels do to an output vector once its sum is done: one table that
both generators (sparse_ir, dense_ir) emit from.

The bias is not here: both kernels start their sums from it. What follows the sum is
the activation (`ACTIVATIONS`), then the residual add. The numpy meaning of the whole
is `linear.reference_linear`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

from .compile import host_cpu
from .ir import Emitter, f32

# Eigen's and XLA's float32 erf: x·P(x²)/Q(x²) on x clamped to [-4, 4], only multiplies,
# adds and one divide, so it vectorises (libm's erf is a call per element).
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


# Cephes expf: x = n·ln2 + r, exp(x) = 2ⁿ·poly(r), 2ⁿ from its exponent bits.
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)


def _avx512(e: Emitter) -> bool:
    """Whether e's vectors are AVX-512's: 16 floats, on a CPU with it."""
    return e.lanes == 16 and "+avx512f" in host_cpu()[1]


def _x86(e: Emitter, op: str, a: str, b: str) -> str:
    """AVX-512's vminps or vmaxps (`op` "min" or "max") of a and b: b where either is NaN."""
    return e.call(f"llvm.x86.avx512.{op}.ps.512", e.vt, (e.vt, a), (e.vt, b), ("i32", "4"))


def exp(e: Emitter, x: str) -> str:
    """expf of a float vector; NaN stays NaN, large arguments saturate."""
    vt, L = e.vt, e.lanes
    if _avx512(e):
        return _exp_scaled(e, x)
    lo = e(f"fcmp olt {vt} {x}, {e.const(-87.3)}")
    v = e(f"select <{L} x i1> {lo}, {vt} {e.const(-87.3)}, {vt} {x}")
    hi = e(f"fcmp ogt {vt} {v}, {e.const(88.3)}")
    v = e(f"select <{L} x i1> {hi}, {vt} {e.const(88.3)}, {vt} {v}")
    t = e.fma(v, e.const(1.4426950408889634), e.const(0.5))
    n = e.vcall("floor", t)
    r = e.fma(n, e.const(-0.693359375), v)
    r = e.fma(n, e.const(2.12194440e-4), r)
    p = e.const(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = e.fma(p, r, e.const(c))
    p = e(f"fadd {vt} {e.fma(p, e(f'fmul {vt} {r}, {r}'), r)}, {e.const(1.0)}")
    # 2ⁿ without a float→int conversion (llvm.fptosi.sat is scalarised on x86): n + 127
    # is an integer in [1, 254], so adding 1.5·2²³ leaves it in the low mantissa bits,
    # and the shift drops the rest. A NaN n gives some bits, but p is NaN then.
    biased = e(f"bitcast {vt} {e(f'fadd {vt} {n}, {e.const(12582912.0 + 127.0)}')} to <{L} x i32>")
    shift = "<" + ", ".join(["i32 23"] * L) + ">"
    two_n = e(f"bitcast <{L} x i32> {e(f'shl <{L} x i32> {biased}, {shift}')} to {vt}")
    return e(f"fmul {vt} {p}, {two_n}")


def _exp_scaled(e: Emitter, x: str) -> str:
    """`exp` with AVX-512's vscalefps (p·2ⁿ for float n): the same clamp, reduction and
    polynomial, 1 + r·(1 + r·P(r)) as two fmas, n rounded by adding 1.5·2²³: 14
    instructions, where `exp` takes 17 and vrndscaleps's two."""
    vt = e.vt
    v = _x86(e, "min", e.const(88.3), _x86(e, "max", e.const(-87.3), x))
    n = e(f"fsub {vt} {e.fma(v, e.const(1.4426950408889634), e.const(12582912.0))}, {e.const(12582912.0)}")
    r = e.fma(n, e.const(-0.693359375), v)
    r = e.fma(n, e.const(2.12194440e-4), r)
    p = e.const(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = e.fma(p, r, e.const(c))
    p = e.fma(e.fma(p, r, e.const(1.0)), r, e.const(1.0))
    return e.call("llvm.x86.avx512.mask.scalef.ps.512", vt, (vt, p), (vt, n), (vt, "zeroinitializer"),
                  ("i16", "-1"), ("i32", "4"))


def tanh(e: Emitter, x: str) -> str:
    """tanh of a float vector, as 1 - 2/(exp(2x) + 1) (±1 where exp saturates)."""
    vt = e.vt
    ex = exp(e, e(f"fmul {vt} {x}, {e.const(2.0)}"))
    ratio = e(f"fdiv {vt} {e.const(2.0)}, {e(f'fadd {vt} {ex}, {e.const(1.0)}')}")
    return e(f"fsub {vt} {e.const(1.0)}, {ratio}")


def gelu_tanh(e: Emitter, v: str) -> str:
    """0.5·v·(1 + tanh(√(2/π)·(v + 0.044715·v³))), ONNX's Gelu with approximate="tanh"."""
    vt = e.vt
    cube = e(f"fmul {vt} {e(f'fmul {vt} {v}, {v}')}, {v}")
    inner = e(f"fmul {vt} {e.fma(cube, e.const(0.044715), v)}, {e.const(0.7978845608028654)}")
    one_plus = e(f"fadd {vt} {tanh(e, inner)}, {e.const(1.0)}")
    return e(f"fmul {vt} {e(f'fmul {vt} {v}, {e.const(0.5)}')}, {one_plus}")


def erf(e: Emitter, x: str) -> str:
    """erf of a float vector."""
    vt = e.vt
    x = e.vcall("minnum", e.vcall("maxnum", x, e.const(-4.0)), e.const(4.0))
    x2 = e(f"fmul {vt} {x}, {x}")
    p = e.fma(x2, e.const(ERF_P[0]), e.const(ERF_P[1]))
    for c in ERF_P[2:]:
        p = e.fma(x2, p, e.const(c))
    p = e(f"fmul {vt} {x}, {p}")
    q = e.fma(x2, e.const(ERF_Q[0]), e.const(ERF_Q[1]))
    for c in ERF_Q[2:]:
        q = e.fma(x2, q, e.const(c))
    return e(f"fdiv {vt} {p}, {q}")


# GELU from pieces, where a vector holds 16 floats (AVX-512): v·Φ(v) = max(v, 0) − |v|·Φ(−|v|),
# with Φ(−a) a quintic in each of 16 pieces of a in [0, 6), centred on multiples of
# GELU_STEP, its six coefficients picked per lane by `vpermps` from six 16-float tables.
# Φ(−6) is 1e-9, so a is clamped there. No divide, and 18 vector instructions against the
# rational erf's 19 and a divide. (A quartic is one instruction less, but further from
# ONNX Runtime's Erf near 0, where a dynamic quantization of the output then rounds
# differently more often.)
GELU_PIECES, GELU_DEGREE = 16, 5
GELU_STEP = 6.0 / (GELU_PIECES - 0.5)


@functools.cache
def gelu_tail() -> np.ndarray:
    """[degree + 1, pieces]: row j the coefficient of u^(degree − j) in piece k's
    Φ(−(k + u)·GELU_STEP), u in [−1/2, 1/2], interpolated at Chebyshev points."""
    u = 0.5 * np.cos((2 * np.arange(GELU_DEGREE + 1) + 1) * np.pi / (2 * GELU_DEGREE + 2))
    return np.array([np.polyfit(u, [math.erfc((k + x) * GELU_STEP / math.sqrt(2)) / 2 for x in u], GELU_DEGREE)
                     for k in range(GELU_PIECES)]).T


def gelu_pieces(e: Emitter, v: str) -> str:
    """0.5·v·(1 + erf(v/√2)) as max(v, 0) − a·Φ(−a), a = min(|v|, 6), NaN staying NaN:
    16 lanes only."""
    vt, L = e.vt, e.lanes
    a = _x86(e, "min", e.vcall("fabs", v), e.const(6.0 - 2.0 ** -8))
    t = e(f"fmul {vt} {a}, {e.const(1.0 / GELU_STEP)}")
    # round(t) in the low mantissa bits of t + 1.5·2²³ (t is in [0, 15.5)): the piece,
    # as vpermps reads an index's low four bits; u = t − round(t)
    r = e(f"fadd {vt} {t}, {e.const(12582912.0)}")
    u = e(f"fsub {vt} {t}, {e(f'fsub {vt} {r}, {e.const(12582912.0)}')}")
    piece = e(f"bitcast {vt} {r} to <{L} x i32>")

    def coefficient(j: int) -> str:
        table = "<" + ", ".join(f"float {f32(c)}" for c in gelu_tail()[j]) + ">"
        return e.call("llvm.x86.avx512.permvar.sf.512", vt, (vt, table), (f"<{L} x i32>", piece))

    p = coefficient(0)
    for j in range(1, GELU_DEGREE + 1):
        p = e.fma(p, u, coefficient(j))
    return e.fma(e(f"fneg {vt} {a}"), p, _x86(e, "max", e.const(0.0), v))


def gelu(e: Emitter, v: str) -> str:
    """0.5·v·(1 + erf(v/√2)): from pieces with AVX-512, else through the rational erf."""
    vt = e.vt
    if _avx512(e):
        return gelu_pieces(e, v)
    one_plus = e(f"fadd {vt} {erf(e, e(f'fmul {vt} {v}, {e.const(0.7071067811865476)}'))}, {e.const(1.0)}")
    return e(f"fmul {vt} {e(f'fmul {vt} {v}, {e.const(0.5)}')}, {one_plus}")


ACTIVATIONS: dict[str, Callable[[Emitter, str], str]] = {
    "none": lambda e, v: v,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "tanh": tanh,  # (BERT's pooler: Gemm, then Tanh)
}


def epilogue(e: Emitter, activation: str, v: str, residual: str | None = None, mask: str | None = None) -> str:
    """act(v), plus the residual vector at address `residual` (loaded under `mask`) if given."""
    v = ACTIVATIONS[activation](e, v)
    if residual is not None:
        v = e(f"fadd {e.vt} {v}, {e.vload(residual, mask)}")
    return v
