"""The dense Linear kernel as LLVM IR: a register-blocked GEMM, feature-major like the sparse one.

yᵀ[j, t] = act(bias[j] + Σ_k W[k, j] · xᵀ[k, t]) (+ rᵀ[j, t]), with xᵀ [in, tokens] and
yᵀ [out, tokens] (token stride 1, row strides ldx/ldy/ldr in floats).

The weight is packed at load into blocks of `rows` output features, k-major inside a
block: wp[b, k, r] = W[k, b·rows + r] (zero past the last feature). The micro-kernel
holds a tile of rows × (vectors · lanes tokens) in registers (6 × 64 with AVX-512: 24
accumulators) and for each k loads `vectors` token vectors of xᵀ and broadcasts `rows`
weights: 24 fmas for 10 loads, where the sparse kernel has one load per fma. A block's
packed weights (rows × in floats) stay in L1 across the token tiles.

Loads and stores are masked at the last token tile, and rows past the layer's width
are not stored, so any shape works. The text is a pure function of `DenseConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Builder
from .sparse_ir import _gelu

ARGS = ("ptr noalias %xt, i64 %ldx, ptr noalias %wp, ptr noalias %bias, ptr noalias %yt, i64 %ldy, "
        "ptr noalias %rt, i64 %ldr, i64 %k, i64 %m, i64 %b0, i64 %b1, i64 %ntok")


@dataclass(frozen=True)
class DenseConfig:
    activation: str = "none"  # "none" or "gelu"
    residual: bool = False
    lanes: int = 16
    rows: int = 6             # output features per register tile
    vectors: int = 4          # token vectors per register tile


def dense_config(activation: str, residual: bool, lanes: int) -> DenseConfig:
    # AVX2 has 16 vector registers, AVX-512 32: 12 or 24 accumulators and the operands.
    return DenseConfig(activation, residual, lanes, 6 if lanes == 16 else 4, 4 if lanes == 16 else 3)


def dense_ir(cfg: DenseConfig) -> str:
    if cfg.activation not in ("none", "gelu"):
        raise ValueError(f"no dense kernel for {cfg}")
    e = Builder(cfg.lanes)
    vt, L, R, V = e.vt, cfg.lanes, cfg.rows, cfg.vectors
    width = L * V
    e.raw(f"; sparsejit generated kernel: dense activation={cfg.activation} residual={cfg.residual} "
          f"lanes={L} rows={R} vectors={V}")
    e.raw("; yt[j, t] = act(bias[j] + sum_k wp[j / rows, k, j % rows] * xt[k, t])"
          + (" + rt[j, t]" if cfg.residual else ""))
    for decl in (f"declare {vt} @llvm.fma.v{L}f32({vt}, {vt}, {vt})",
                 f"declare {vt} @llvm.maxnum.v{L}f32({vt}, {vt})",
                 f"declare {vt} @llvm.minnum.v{L}f32({vt}, {vt})",
                 f"declare {vt} @llvm.masked.load.v{L}f32.p0(ptr, i32, <{L} x i1>, {vt})",
                 f"declare void @llvm.masked.store.v{L}f32.p0({vt}, ptr, i32, <{L} x i1>)"):
        e.raw(decl)
    e.raw(f"define void @dense_blocks({ARGS}) {{")
    e.label("entry")
    panel = e(f"mul i64 %k, {R}")  # floats per packed block

    def block(b, _c):
        wblock = e.gep("%wp", e(f"mul i64 {b}, {panel}"))
        j0 = e(f"mul i64 {b}, {R}")
        biases = []
        for r in range(R):
            j = e(f"add i64 {j0}, {r}") if r else j0
            # rows past m read bias[m - 1]: in bounds, and never stored
            jc = e(f"select i1 {e(f'icmp slt i64 {j}, %m')}, i64 {j}, i64 {e('add i64 %m, -1')}")
            biases.append(e.splat(e(f"load float, ptr {e.gep('%bias', jc)}, align 4")))

        def tile(t):
            masks = e.lane_masks(t, V, "%ntok")

            def step(kk, accs):
                xs = e.row_vectors("%xt", "%ldx", kk, t, masks)
                woff = e(f"mul i64 {kk}, {R}")
                out = []
                for r in range(R):
                    wi = e(f"add i64 {woff}, {r}") if r else woff
                    w = e.splat(e(f"load float, ptr {e.gep(wblock, wi)}, align 4"))
                    out += [e.fma(w, xs[v], accs[r * V + v]) for v in range(V)]
                return out

            _, accs = e.loop("0", "%k", 1, [(vt, biases[r]) for r in range(R) for _ in range(V)], step)
            for r in range(R):
                j = e(f"add i64 {j0}, {r}") if r else j0
                inside = e(f"icmp slt i64 {j}, %m")
                e.raw(f"  br i1 {inside}, label %store{e.loops}.{r}, label %skip{e.loops}.{r}")
                e.label(f"store{e.loops}.{r}")
                yoff = e.offset(j, "%ldy", t)
                if cfg.residual:
                    roff = e.offset(j, "%ldr", t)
                for v in range(V):
                    y = accs[r * V + v]
                    if cfg.activation == "gelu":
                        y = _gelu(e, y)
                    if cfg.residual:
                        rp = e.vptr("%rt", roff, v)
                        y = e(f"fadd {vt} {y}, {e.vload(rp, masks[v])}")
                    e.vstore(y, e.vptr("%yt", yoff, v), masks[v])
                e.raw(f"  br label %skip{e.loops}.{r}")
                e.label(f"skip{e.loops}.{r}")
            e.loops += 1  # a fresh label number for the next tile's store blocks

        e.tiles("0", "%ntok", width, tile)
        return []

    b1 = e("add i64 %b1, 0")
    e.loop("%b0", b1, 1, [], block)
    e.raw("  ret void")
    e.raw("}")
    return "\n".join(e.lines)
