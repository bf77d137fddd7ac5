"""The attention kernel as LLVM IR, working on feature-major q, k, v and output.

With the Linear outputs feature-major (yᵀ [features, tokens]), one head's qᵀ, kᵀ and vᵀ
are [head_dim, tokens] slices with unit token stride, and the output can be written
the same way, ready for the next sparse Linear: no transposing copies on either side.

For one (batch, head) pair the kernel walks the queries in tiles of `qvec` vectors
(16 queries each with AVX-512), keeping the tile's scores in registers:

1. scores: for a block of `block` keys, acc[r] = Σ_e kᵀ[e, j + r] · qᵀ[e, tile]
   (one qᵀ load serves `block` fmas), then · scale + mask, stored to a small scratch
   [keys, tile] and folded into the tile's running max;
2. softmax: p = exp(s - max) in place, summed per query;
3. output: oᵀ[e + r, tile] = Σ_j vᵀ[e + r, j] · p[j, tile] / sum, for a block of
   `block` head features at a time.

Every load and store of a query tile is masked, so any query count works and nothing
outside the tile is written. NaN propagates as in the reference: the max is
`llvm.maximum` and exp keeps NaN; a query whose keys are all masked (max = -inf) gets
NaN. Under the export's NaN guard, Where(IsNaN(p), 0, p), a query whose softmax would be
NaN (its max not finite: a NaN or +inf score, or every key masked) gets p = 0 for every
key, and its output is Σ 0·v as the guarded graph computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Builder

# Cephes expf: x = n·ln2 + r, exp(x) = 2ⁿ·poly(r), 2ⁿ from its exponent bits.
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)

ARGS = ("ptr noalias %qt, i64 %ldq, ptr noalias %kt, i64 %ldk, ptr noalias %vt, i64 %ldv, "
        "ptr noalias %mask, i64 %ldm, ptr noalias %ot, i64 %ldo, i64 %d, i64 %tq, i64 %tk, "
        "float %scale, ptr noalias %s")


@dataclass(frozen=True)
class AttentionConfig:
    mask_per_query: bool = False  # mask is [keys, queries] (row stride ldm), else one value per key
    lanes: int = 16
    qvec: int = 2                 # query vectors per tile
    block: int = 8                # keys per score block, head features per output block
    nan_guard: bool = False       # the softmax's NaN outputs are replaced by 0


def _exp(e: Builder, x: str) -> str:
    """expf on a vector; NaN stays NaN, large arguments saturate like the Numba kernel."""
    vt, L = e.vt, e.lanes
    lo = e(f"fcmp olt {vt} {x}, {e.const(-87.3)}")
    v = e(f"select <{L} x i1> {lo}, {vt} {e.const(-87.3)}, {vt} {x}")
    hi = e(f"fcmp ogt {vt} {v}, {e.const(88.3)}")
    v = e(f"select <{L} x i1> {hi}, {vt} {e.const(88.3)}, {vt} {v}")
    t = e.fma(v, e.const(1.4426950408889634), e.const(0.5))
    n = e(f"call {vt} @llvm.floor.v{L}f32({vt} {t})")
    r = e.fma(n, e.const(-0.693359375), v)
    r = e.fma(n, e.const(2.12194440e-4), r)
    p = e.const(EXP_POLY[0])
    for c in EXP_POLY[1:]:
        p = e.fma(p, r, e.const(c))
    r2 = e(f"fmul {vt} {r}, {r}")
    p = e.fma(p, r2, r)
    p = e(f"fadd {vt} {p}, {e.const(1.0)}")
    # 2ⁿ without a float→int conversion (llvm.fptosi.sat is scalarised on x86: 32
    # cvttss2si per loop step cost a third of the kernel's time): n + 127 is an integer
    # in [1, 254], so adding 1.5·2²³ leaves it in the low mantissa bits, and the shift
    # drops the rest. A NaN n gives some bits, but p is NaN then and NaN·2ⁿ is NaN.
    biased = e(f"fadd {vt} {n}, {e.const(12582912.0 + 127.0)}")
    ni = e(f"bitcast {vt} {biased} to <{L} x i32>")
    ni = e(f"shl <{L} x i32> {ni}, <{', '.join(['i32 23'] * L)}>")
    two_n = e(f"bitcast <{L} x i32> {ni} to {vt}")
    return e(f"fmul {vt} {p}, {two_n}")


def _head(cfg: AttentionConfig) -> str:
    e = Builder(cfg.lanes)
    vt, L, QV, R = e.vt, cfg.lanes, cfg.qvec, cfg.block
    width = L * QV  # queries per tile = floats per scratch row
    e.raw(f"define void @attention_head({ARGS}) {{")
    e.label("entry")
    ninf = e.const(float("-inf"))
    nan = e.const(float("nan"))
    zero = "zeroinitializer"

    def tile(i0):
        masks = e.lane_masks(i0, QV, "%tq")

        def score_block(rows):
            def body(j0, maxes):
                def dot(ee, accs):
                    qs = e.row_vectors("%qt", "%ldq", ee, i0, masks)
                    koff = e.offset(ee, "%ldk", j0)
                    out = []
                    for r in range(rows):
                        kp = e.gep("%kt", e(f"add i64 {koff}, {r}") if r else koff)
                        w = e.splat(e(f"load float, ptr {kp}, align 4"))
                        out += [e.fma(w, qs[v], accs[r * QV + v]) for v in range(QV)]
                    return out

                _, accs = e.loop("0", "%d", 1, [(vt, zero)] * (rows * QV), dot)
                maxes = list(maxes)
                scale = e.splat("%scale")
                for r in range(rows):
                    j = e(f"add i64 {j0}, {r}") if r else j0
                    if not cfg.mask_per_query:
                        mv = e.splat(e(f"load float, ptr {e.gep('%mask', j)}, align 4"))
                    else:
                        moff = e.offset(j, "%ldm", i0)
                    srow = e(f"mul i64 {j}, {width}")
                    for v in range(QV):
                        if cfg.mask_per_query:
                            mv = e.vload(e.vptr("%mask", moff, v), masks[v])
                        s = e.fma(accs[r * QV + v], scale, mv)
                        e.vstore(s, e.vptr("%s", srow, v), None)
                        maxes[v] = e(f"call {vt} @llvm.maximum.v{L}f32({vt} {maxes[v]}, {vt} {s})")
                return maxes
            return body

        start, maxes = e.loop("0", "%tk", R, [(vt, ninf)] * QV, score_block(R))
        _, maxes = e.loop(start, "%tk", 1, [(vt, m) for m in maxes], score_block(1))

        # A query whose max is not finite has a NaN softmax (NaN - NaN, inf - inf, or
        # -inf - -inf in every term): NaN out, or under the guard p = 0 for every key.
        if cfg.nan_guard:
            finite = e.const(3.4028234663852886e38)
            dead = [e(f"fcmp ugt {vt} {e(f'call {vt} @llvm.fabs.v{L}f32({vt} {m})')}, {finite}") for m in maxes]
        else:
            dead = [e(f"fcmp oeq {vt} {m}, {ninf}") for m in maxes]

        def softmax(j, sums):
            srow = e(f"mul i64 {j}, {width}")
            out = []
            for v in range(QV):
                ptr = e.vptr("%s", srow, v)
                x = e(f"fsub {vt} {e.vload(ptr, None)}, {maxes[v]}")
                p = _exp(e, x)
                if cfg.nan_guard:
                    p = e(f"select <{L} x i1> {dead[v]}, {vt} {zero}, {vt} {p}")
                e.vstore(p, ptr, None)
                out.append(e(f"fadd {vt} {sums[v]}, {p}"))
            return out

        _, sums = e.loop("0", "%tk", 1, [(vt, zero)] * QV, softmax)
        scales = []
        for v in range(QV):
            inv = e(f"fdiv {vt} {e.const(1.0)}, {sums[v]}")
            if cfg.nan_guard:  # Σ p·v with every p = 0, unscaled
                inv = e(f"select <{L} x i1> {dead[v]}, {vt} {e.const(1.0)}, {vt} {inv}")
            scales.append(inv)

        def out_block(rows):
            def body(e0, _c):
                def pv(j, accs):
                    srow = e(f"mul i64 {j}, {width}")
                    ps = [e.vload(e.vptr("%s", srow, v), None) for v in range(QV)]
                    out = []
                    for r in range(rows):
                        er = e(f"add i64 {e0}, {r}") if r else e0
                        vrow = e(f"mul i64 {er}, %ldv")
                        w = e.splat(e(f"load float, ptr {e.gep('%vt', e(f'add i64 {vrow}, {j}'))}, align 4"))
                        out += [e.fma(w, ps[v], accs[r * QV + v]) for v in range(QV)]
                    return out

                _, accs = e.loop("0", "%tk", 1, [(vt, zero)] * (rows * QV), pv)
                for r in range(rows):
                    er = e(f"add i64 {e0}, {r}") if r else e0
                    ooff = e.offset(er, "%ldo", i0)
                    for v in range(QV):
                        o = e(f"fmul {vt} {accs[r * QV + v]}, {scales[v]}")
                        if not cfg.nan_guard:
                            o = e(f"select <{L} x i1> {dead[v]}, {vt} {nan}, {vt} {o}")
                        e.vstore(o, e.vptr("%ot", ooff, v), masks[v])
                return []
            return body

        start, _ = e.loop("0", "%d", R, [], out_block(R))
        e.loop(start, "%d", 1, [], out_block(1))

    e.tiles("0", "%tq", width, tile)  # query tiles, the last one maybe partly masked
    e.raw("  ret void")
    e.raw("}")
    return "\n".join(e.lines)


_DECLARES = """\
declare <{L} x float> @llvm.fma.v{L}f32(<{L} x float>, <{L} x float>, <{L} x float>)
declare <{L} x float> @llvm.maximum.v{L}f32(<{L} x float>, <{L} x float>)
declare <{L} x float> @llvm.floor.v{L}f32(<{L} x float>)
declare <{L} x float> @llvm.fabs.v{L}f32(<{L} x float>)
declare <{L} x float> @llvm.masked.load.v{L}f32.p0(ptr, i32, <{L} x i1>, <{L} x float>)
declare void @llvm.masked.store.v{L}f32.p0(<{L} x float>, ptr, i32, <{L} x i1>)
"""


def attention_ir(cfg: AttentionConfig) -> str:
    header = (f"; sparsejit generated kernel: attention for one (batch, head), feature-major, "
              f"mask_per_query={cfg.mask_per_query} lanes={cfg.lanes} qvec={cfg.qvec} block={cfg.block} "
              f"nan_guard={cfg.nan_guard}\n"
              "; ot[e, i] = sum_j vt[e, j] * softmax_j(scale * sum_e' qt[e', i] * kt[e', j] + mask[j(, i)])\n")
    return header + _DECLARES.format(L=cfg.lanes) + "\n" + _head(cfg)
