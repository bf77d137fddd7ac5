"""The dense Linear kernel as LLVM IR: a register-blocked GEMM, feature-major like the sparse one.

yᵀ[j, t] = act(bias[j] + Σ_k W[k, j] · xᵀ[k, t]) (+ rᵀ[j, t]), with xᵀ [in, tokens] and
yᵀ [out, tokens] (token stride 1, row strides ldx/ldy/ldr in floats).

The weight is packed at load into panels of `rows` output features, k-major inside a
panel: wp[p, k, r] = W[k, p·rows + r] (zero past the last feature). The micro-kernel
holds a tile of rows × (vectors · lanes tokens) in registers (6 × 64 with AVX-512: 24
accumulators) and for each k loads `vectors` token vectors of xᵀ and broadcasts `rows`
weights: 24 fmas for 10 loads, where the sparse kernel has one load per fma. A panel's
packed weights (rows × in floats) stay in L1 across the token tiles. `dense_panels`
computes panels [panel0, panel1).

Loads and stores are masked at the last, partial token tile only (the full tiles before
it load and store whole vectors), and rows past the layer's width are not stored, so
any shape works. The text is a pure function of `DenseConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .epilogue import ACTIVATIONS, epilogue
from .ir import Builder, Signature
from .lowp_ir import bf16_dot, scaled_sums, vnni_dot

SIGNATURE = Signature("dense_panels", (
    ("xt", "ptr"), ("ldx", "i64"), ("wp", "ptr"), ("bias", "ptr"), ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"),
    ("ldr", "i64"), ("k", "i64"), ("m", "i64"), ("panel0", "i64"), ("panel1", "i64"), ("ntok", "i64")))


@dataclass(frozen=True)
class DenseConfig:
    activation: str = "none"  # a key of epilogue.ACTIVATIONS
    residual: bool = False
    lanes: int = 16
    rows: int = 6             # output features per register tile
    vectors: int = 4          # token vectors per register tile
    # bfloat16 pairs (AVX512-BF16, see bf16.py): xt and wp hold i32 pairs of inputs, k counts
    # the pairs, and each step is one `vdpbf16ps` per accumulator where float32 has one fma
    bf16: bool = False
    # int8 4-blocks (AVX-512 VNNI, see int8.Int8Dense): xt and wp hold i32 of four bytes
    # (uint8 x, int8 w), k counts the blocks, sums in i32 from 0; bias holds 3m: [bias |
    # output scale | the zero point's correction (i32)], as sparse_ir's int8 epilogue
    int8: bool = False
    # a few tokens (_gemv below): the lanes along the panels' weights, not over tokens (float32 only)
    gemv: bool = False


def dense_config(activation: str, residual: bool, lanes: int) -> DenseConfig:
    # AVX2 has 16 vector registers, AVX-512 32: 12 or 24 accumulators and the operands.
    return DenseConfig(activation, residual, lanes, 6 if lanes == 16 else 4, 4 if lanes == 16 else 3)


def _panel(e: Builder, cfg: DenseConfig, p: str) -> None:
    """Panel p (`rows` output features) for every token tile."""
    vt, R, V = e.vt, cfg.rows, cfg.vectors
    wpanel = e.gep("%wp", e(f"mul i64 {p}, {e('mul i64 %k, ' + str(R))}"))
    j0 = e(f"mul i64 {p}, {R}")
    js = [e(f"add i64 {j0}, {r}") if r else j0 for r in range(R)]
    biases, rows_in = [], []
    for j in js:  # rows past m read bias[m - 1]: in bounds, and never stored
        rows_in.append(e(f"select i1 {e(f'icmp slt i64 {j}, %m')}, i64 {j}, i64 {e('add i64 %m, -1')}"))
        biases.append(e.splat(e(f"load float, ptr {e.gep('%bias', rows_in[-1])}, align 4")))

    dot = vnni_dot if cfg.int8 else bf16_dot if cfg.bf16 else lambda e, acc, x, w: e.fma(w, x, acc)

    def tile(t, masked: bool):
        masks = e.lane_masks(t, V, "%ntok") if masked else [None] * V

        def step(kk, accs):
            xs = e.row_vectors("%xt", "%ldx", kk, t, masks)
            woff = e(f"mul i64 {kk}, {R}")
            out = []
            for r in range(R):
                w = e.splat(e(f"load float, ptr {e.gep(wpanel, e(f'add i64 {woff}, {r}') if r else woff)}, align 4"))
                out += [dot(e, accs[r * V + v], xs[v], w) for v in range(V)]
            return out

        init = ["zeroinitializer" if cfg.int8 else biases[r] for r in range(R) for _ in range(V)]
        _, accs = e.loop("0", "%k", 1, [(vt, a) for a in init], step)
        if cfg.int8:
            accs = [y for r in range(R) for y in scaled_sums(e, accs[r * V:(r + 1) * V], rows_in[r], biases[r], True)]
        for r, j in enumerate(js):
            store, skip = e.fresh("store"), e.fresh("skip")
            e.cond_br(e(f"icmp slt i64 {j}, %m"), store, skip)
            e.label(store)
            yoff = e.offset(j, "%ldy", t)
            roff = e.offset(j, "%ldr", t) if cfg.residual else None
            for v in range(V):
                residual = e.vptr("%rt", roff, v) if cfg.residual else None
                y = epilogue(e, cfg.activation, accs[r * V + v], residual, masks[v])
                e.vstore(y, e.vptr("%yt", yoff, v), masks[v])
            e.br(skip)
            e.label(skip)

    # Full tiles load and store whole vectors; only the last, partial tile is masked (with
    # AVX2 a masked load is a vmaskmovps and its mask a vector rebuilt every step).
    rest, _ = e.loop("0", "%ntok", cfg.lanes * V, [], lambda t, _c: tile(t, False) or [])
    last, done = e.fresh("last"), e.fresh("done")
    e.cond_br(e(f"icmp slt i64 {rest}, %ntok"), last, done)
    e.label(last)
    tile(rest, True)
    e.br(done)
    e.label(done)


def gemv_step(lanes: int, rows: int) -> tuple[int, int]:
    """(vectors, inputs) a GEMV step takes: a panel's floats in whole vectors that end on a
    whole input, lcm(lanes, rows) of them."""
    floats = math.lcm(lanes, rows)
    return floats // lanes, floats // rows


GEMV_X_FLOATS = 1 << 14  # the most floats of x (tokens × (in + lanes)) _gemv copies to its stack


def _gemv(e: Builder, cfg: DenseConfig) -> None:
    """The same panels for a few tokens (a pooler's or a classifier's), the lanes over a
    panel's weights in their packed order instead of over tokens: each token's x is copied
    to a contiguous buffer on the stack (zeros after it), and a step of `inputs` inputs
    loads `vectors` vectors of the panel and, shuffled from one load of x, the input each
    lane multiplies. A panel's rows are then summed from every `rows`-th lane. Where the
    GEMM's tile would multiply every weight by a vector of tokens, nearly all padding,
    here each multiply is one of the layer's."""
    vt, L, R = e.vt, cfg.lanes, cfg.rows
    V, per_step = gemv_step(L, R)
    width = e("add i64 %k, " + str(L))
    xb = e(f"alloca float, i64 {e(f'mul i64 {width}, %ntok')}, align 64")
    sums = e(f"alloca float, i32 {V * L}, align 64")

    def copy_x(t, _c):
        row = e.gep(xb, e(f"mul i64 {t}, {width}"))

        def one(kk, _c):
            x = e(f"load float, ptr {e.gep('%xt', e.offset(kk, '%ldx', t))}, align 4")
            e.raw(f"  store float {x}, ptr {e.gep(row, kk)}, align 4")
            return []

        e.loop("0", "%k", 1, [], one)
        e.vstore(e.const(0.0), e.gep(row, "%k"), None)
        return []

    e.loop("0", "%ntok", 1, [], copy_x)
    picks = [f"<{', '.join(f'i32 {(v * L + i) // R}' for i in range(L))}>" for v in range(V)]
    row_mask = f"<{', '.join('i1 true' if i < R else 'i1 false' for i in range(L))}>"

    def panel(p, _c):
        wpanel = e.gep("%wp", e(f"mul i64 {p}, {e('mul i64 %k, ' + str(R))}"))
        j0 = e(f"mul i64 {p}, {R}")
        bias = e.vload(e.gep("%bias", j0), _lanes_below(e, e("sub i64 %m, " + j0), R))

        def token(t, _c):
            row = e.gep(xb, e(f"mul i64 {t}, {width}"))

            def step(kk, accs, masks=None):
                x = e.vload(e.gep(row, kk), None)
                start = e(f"mul i64 {kk}, {R}")
                return [e.fma(e.vload(e.vptr(wpanel, start, v), masks and masks[v]),
                              e(f"shufflevector {vt} {x}, {vt} poison, <{L} x i32> {picks[v]}"), accs[v])
                        for v in range(V)]

            last, accs = e.loop("0", "%k", per_step, [(vt, "zeroinitializer")] * V, step)
            left = e(f"mul i64 {e(f'sub i64 %k, {last}')}, {R}")  # the panel's floats after the whole steps
            accs = step(last, accs, [_lanes_below(e, e(f"sub i64 {left}, {v * L}"), L) for v in range(V)])
            for v in range(V):
                e.vstore(accs[v], e.vptr(sums, "0", v), None)
            y = bias
            for q in range(V * L // R):
                y = e(f"fadd {vt} {y}, {e.vload(e.gep(sums, str(q * R)), row_mask)}")
            y = epilogue(e, cfg.activation, y)
            for r in range(R):
                j = e(f"add i64 {j0}, {r}")
                e.if_before(j, "%m", lambda j=j, r=r: _store_lane(e, cfg, y, r, j, t))
            return []

        e.loop("0", "%ntok", 1, [], token)
        return []

    e.loop("%panel0", "%panel1", 1, [], panel)


def _lanes_below(e: Builder, n: str, most: int) -> str:
    """The mask of lanes i < min(n, most) (n may be negative: none)."""
    L = e.lanes
    iota = f"<{', '.join(f'i64 {i if i < most else 1 << 40}' for i in range(L))}>"
    return e(f"icmp slt <{L} x i64> {iota}, {e.splat_i64(n)}")


def _store_lane(e: Builder, cfg: DenseConfig, y: str, r: int, j: str, t: str) -> None:
    """yt[j, t] = lane r of y (+ rt[j, t])."""
    v = e(f"extractelement {e.vt} {y}, i32 {r}")
    if cfg.residual:
        res = e(f"load float, ptr {e.gep('%rt', e.offset(j, '%ldr', t))}, align 4")
        v = e(f"fadd float {v}, {res}")
    e.raw(f"  store float {v}, ptr {e.gep('%yt', e.offset(j, '%ldy', t))}, align 4")


def dense_ir(cfg: DenseConfig) -> str:
    if (cfg.activation not in ACTIVATIONS or (cfg.bf16 or cfg.int8) and cfg.lanes != 16 or cfg.bf16 and cfg.int8
            or cfg.gemv and (cfg.bf16 or cfg.int8)):
        raise ValueError(f"no dense kernel for {cfg}")
    e = Builder(cfg.lanes)
    if cfg.gemv:
        e.function(SIGNATURE, lambda: _gemv(e, cfg))
    else:
        e.function(SIGNATURE, lambda: e.loop("%panel0", "%panel1", 1, [], lambda p, _: _panel(e, cfg, p) or []))
    header = (f"; sparsejit generated kernel: dense activation={cfg.activation} residual={cfg.residual} "
              f"lanes={cfg.lanes} rows={cfg.rows} vectors={cfg.vectors}{' gemv' if cfg.gemv else ''}{' bf16' if cfg.bf16 else ''}{' int8' if cfg.int8 else ''}\n"
              "; yt[j, t] = act(bias[j] + sum_k wp[j / rows, k, j % rows] * xt[k, t])"
              + (" + rt[j, t]" if cfg.residual else ""))
    return e.module(header)
