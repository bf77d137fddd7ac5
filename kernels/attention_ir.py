"""The attention kernel as LLVM IR, working on feature-major q, k, v and output.

With the Linear outputs feature-major (yᵀ [features, tokens]), one head's qᵀ, kᵀ and vᵀ
are [head_dim, tokens] slices with unit token stride, and the output can be written
the same way, ready for the next sparse Linear: no transposing copies on either side.

For one (batch, head) pair the kernel walks the queries in tiles of `qvec` vectors
(16 queries each with AVX-512), keeping the tile's scores in registers:

1. scores: for a group of `group` keys, acc[r] = Σ_e kᵀ[e, j + r] · qᵀ[e, tile]
   (one qᵀ load serves `group` fmas), then · scale + mask, stored to a small scratch
   [keys, tile] and folded into the tile's running max;
2. softmax: p = exp(s - max) in place, summed per query;
3. output: oᵀ[e + r, tile] = Σ_j vᵀ[e + r, j] · p[j, tile] / sum, for a group of
   `group` head features at a time.

Every load and store of a query tile is masked, so any query count works and nothing
outside the tile is written. NaN propagates as in the reference: the max is
`llvm.maximum` and exp keeps NaN; a query whose keys are all masked (max = -inf) gets
NaN. Under the export's NaN guard, Where(IsNaN(p), 0, p), a query whose softmax would be
NaN (its max not finite: a NaN or +inf score, or every key masked) gets p = 0 for every
key, and its output is Σ 0·v as the guarded graph computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .epilogue import exp as _exp
from .ir import Builder, Signature

SIGNATURE = Signature("attention_head", (
    ("qt", "ptr"), ("ldq", "i64"), ("kt", "ptr"), ("ldk", "i64"), ("vt", "ptr"), ("ldv", "i64"), ("mask", "ptr"),
    ("ldm", "i64"), ("ot", "ptr"), ("ldo", "i64"), ("d", "i64"), ("tq", "i64"), ("tk", "i64"), ("scale", "float"),
    ("s", "ptr")))


@dataclass(frozen=True)
class AttentionConfig:
    mask_per_query: bool = False  # mask is [keys, queries] (row stride ldm), else one value per key
    lanes: int = 16
    qvec: int = 2                 # query vectors per tile
    group: int = 8                # keys per pass over the head features; head features per pass over the keys
    nan_guard: bool = False       # the softmax's NaN outputs are replaced by 0


ZERO = "zeroinitializer"


def _scores(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str]) -> list[str]:
    """Stage 1 for the query tile at i0: every key's scaled, masked score into the
    scratch; returns the running max per query vector."""
    vt, QV = e.vt, cfg.qvec

    def keys(rows):  # `rows` keys from j0, each score a fma chain over the head features
        def body(j0, maxes):
            def dot(ee, accs):
                qs = e.row_vectors("%qt", "%ldq", ee, i0, masks)
                koff = e.offset(ee, "%ldk", j0)
                out = []
                for r in range(rows):
                    w = e.splat(e(f"load float, ptr {e.gep('%kt', e(f'add i64 {koff}, {r}') if r else koff)}, align 4"))
                    out += [e.fma(w, qs[v], accs[r * QV + v]) for v in range(QV)]
                return out

            _, accs = e.loop("0", "%d", 1, [(vt, ZERO)] * (rows * QV), dot)
            maxes = list(maxes)
            for r in range(rows):
                j = e(f"add i64 {j0}, {r}") if r else j0
                srow = e(f"mul i64 {j}, {cfg.lanes * QV}")
                for v, mask in enumerate(_mask_vectors(e, cfg, j, i0, masks)):
                    s = e.fma(accs[r * QV + v], e.splat("%scale"), mask)
                    e.vstore(s, e.vptr("%s", srow, v), None)
                    maxes[v] = e.vcall("maximum", maxes[v], s)
            return maxes
        return body

    start, maxes = e.loop("0", "%tk", cfg.group, [(vt, e.const(float("-inf")))] * QV, keys(cfg.group))
    return e.loop(start, "%tk", 1, [(vt, m) for m in maxes], keys(1))[1]


def _mask_vectors(e: Builder, cfg: AttentionConfig, j: str, i0: str, masks: list[str]) -> list[str]:
    """Key j's mask for the tile's query vectors: one value per key, or [keys, queries]."""
    if not cfg.mask_per_query:
        return [e.splat(e(f"load float, ptr {e.gep('%mask', j)}, align 4"))] * cfg.qvec
    moff = e.offset(j, "%ldm", i0)
    return [e.vload(e.vptr("%mask", moff, v), m) for v, m in enumerate(masks)]


def _softmax(e: Builder, cfg: AttentionConfig, maxes: list[str]) -> tuple[list[str], list[str]]:
    """Stage 2: p = exp(score - max) in the scratch; returns (1/sum, dead) per query
    vector. A query whose max is not finite has a NaN softmax (NaN - NaN, inf - inf, or
    -inf - -inf in every term): it is `dead`, NaN out, or under the guard p = 0 for
    every key and the sum Σ p·v left unscaled."""
    vt, L, QV = e.vt, cfg.lanes, cfg.qvec
    if cfg.nan_guard:
        dead = [e(f"fcmp ugt {vt} {e.vcall('fabs', m)}, {e.const(3.4028234663852886e38)}") for m in maxes]
    else:
        dead = [e(f"fcmp oeq {vt} {m}, {e.const(float('-inf'))}") for m in maxes]

    def key(j, sums):
        srow = e(f"mul i64 {j}, {L * QV}")
        out = []
        for v in range(QV):
            ptr = e.vptr("%s", srow, v)
            p = _exp(e, e(f"fsub {vt} {e.vload(ptr, None)}, {maxes[v]}"))
            if cfg.nan_guard:
                p = e(f"select <{L} x i1> {dead[v]}, {vt} {ZERO}, {vt} {p}")
            e.vstore(p, ptr, None)
            out.append(e(f"fadd {vt} {sums[v]}, {p}"))
        return out

    _, sums = e.loop("0", "%tk", 1, [(vt, ZERO)] * QV, key)
    scales = [e(f"fdiv {vt} {e.const(1.0)}, {s}") for s in sums]
    if cfg.nan_guard:
        scales = [e(f"select <{L} x i1> {d}, {vt} {e.const(1.0)}, {vt} {s}") for d, s in zip(dead, scales)]
    return scales, dead


def _output(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str], scales: list[str], dead: list[str]) -> None:
    """Stage 3: oᵀ[e, tile] = Σ_j vᵀ[e, j] · p[j, tile] / sum, `group` head features at a time."""
    vt, L, QV = e.vt, cfg.lanes, cfg.qvec

    def features(rows):
        def body(e0, _):
            def key(j, accs):
                srow = e(f"mul i64 {j}, {L * QV}")
                ps = [e.vload(e.vptr("%s", srow, v), None) for v in range(QV)]
                out = []
                for r in range(rows):
                    vrow = e(f"mul i64 {e(f'add i64 {e0}, {r}') if r else e0}, %ldv")
                    w = e.splat(e(f"load float, ptr {e.gep('%vt', e(f'add i64 {vrow}, {j}'))}, align 4"))
                    out += [e.fma(w, ps[v], accs[r * QV + v]) for v in range(QV)]
                return out

            _, accs = e.loop("0", "%tk", 1, [(vt, ZERO)] * (rows * QV), key)
            for r in range(rows):
                ooff = e.offset(e(f"add i64 {e0}, {r}") if r else e0, "%ldo", i0)
                for v in range(QV):
                    o = e(f"fmul {vt} {accs[r * QV + v]}, {scales[v]}")
                    if not cfg.nan_guard:
                        o = e(f"select <{L} x i1> {dead[v]}, {vt} {e.const(float('nan'))}, {vt} {o}")
                    e.vstore(o, e.vptr("%ot", ooff, v), masks[v])
            return []
        return body

    start, _ = e.loop("0", "%d", cfg.group, [], features(cfg.group))
    e.loop(start, "%d", 1, [], features(1))


def _head(e: Builder, cfg: AttentionConfig) -> None:
    def tile(i0):  # query tiles, the last one maybe partly masked
        masks = e.lane_masks(i0, cfg.qvec, "%tq")
        maxes = _scores(e, cfg, i0, masks)
        scales, dead = _softmax(e, cfg, maxes)
        _output(e, cfg, i0, masks, scales, dead)

    e.tiles("0", "%tq", cfg.lanes * cfg.qvec, tile)


def attention_ir(cfg: AttentionConfig) -> str:
    e = Builder(cfg.lanes)
    e.function(SIGNATURE, lambda: _head(e, cfg))
    header = (f"; sparsejit generated kernel: attention for one (batch, head), feature-major, "
              f"mask_per_query={cfg.mask_per_query} lanes={cfg.lanes} qvec={cfg.qvec} group={cfg.group} "
              f"nan_guard={cfg.nan_guard}\n"
              "; ot[e, i] = sum_j vt[e, j] * softmax_j(scale * sum_e' qt[e', i] * kt[e', j] + mask[j(, i)])")
    return e.module(header)
