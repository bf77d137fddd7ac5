"""What the Linear kernels do to an output vector once its sum is done: one table that
both generators (sparse_ir, dense_ir) emit from.

The bias is not here: both kernels start their sums from it. What follows the sum is
the activation (`ACTIVATIONS`), then the residual add. The numpy meaning of the whole
is `linear.reference_linear`.
"""

from __future__ import annotations

from collections.abc import Callable

from .ir import Emitter

# Eigen's and XLA's float32 erf: x·P(x²)/Q(x²) on x clamped to [-4, 4], only multiplies,
# adds and one divide, so it vectorises (libm's erf is a call per element).
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


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


def gelu(e: Emitter, v: str) -> str:
    """0.5·v·(1 + erf(v/√2))."""
    vt = e.vt
    one_plus = e(f"fadd {vt} {erf(e, e(f'fmul {vt} {v}, {e.const(0.7071067811865476)}'))}, {e.const(1.0)}")
    return e(f"fmul {vt} {e(f'fmul {vt} {v}, {e.const(0.5)}')}, {one_plus}")


ACTIVATIONS: dict[str, Callable[[Emitter, str], str]] = {
    "none": lambda e, v: v,
    "gelu": gelu,
}


def epilogue(e: Emitter, activation: str, v: str, residual: str | None = None, mask: str | None = None) -> str:
    """act(v), plus the residual vector at address `residual` (loaded under `mask`) if given."""
    v = ACTIVATIONS[activation](e, v)
    if residual is not None:
        v = e(f"fadd {e.vt} {v}, {e.vload(residual, mask)}")
    return v
