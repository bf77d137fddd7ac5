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
outside the tile is written. NaN propagates as in the reference: exp keeps NaN, so a
NaN score makes its query's sum NaN, and its outputs (the running max, x86's vmaxps,
may drop it: _running_max); a query whose keys are all masked (max = -inf) gets NaN.
Under the export's NaN guard, Where(IsNaN(p), 0, p), a query whose softmax would be
NaN (its max not finite: a NaN or +inf score, or every key masked) gets p = 0 for every
key, and its output is Σ 0·v as the guarded graph computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .amx_ir import ROWS, tile_config
from .epilogue import exp as _exp
from .ir import Builder, Signature
from .lowp_ir import bf16_dot, bf16_pairs, pack_pair_rows, quantized, store_block_bytes, unsigned_bytes

SIGNATURE = Signature("attention_head", (
    ("qt", "ptr"), ("ldq", "i64"), ("kt", "ptr"), ("ldk", "i64"), ("vt", "ptr"), ("ldv", "i64"), ("mask", "ptr"),
    ("ldm", "i64"), ("ot", "ptr"), ("ldo", "i64"), ("d", "i64"), ("tq", "i64"), ("tk", "i64"), ("scale", "float"),
    ("s", "ptr"), ("pk", "ptr"), ("xq", "ptr"), ("ldxq", "i64"), ("grid", "ptr")))


@dataclass(frozen=True)
class AttentionConfig:
    mask_per_query: bool = False  # mask is [keys, queries] (row stride ldm), else one value per key
    lanes: int = 16
    qvec: int = 2                 # query vectors per tile
    group: int = 8                # keys per pass over the head features; head features per pass over the keys
    nan_guard: bool = False       # the softmax's NaN outputs are replaced by 0
    # bfloat16 products (AVX512-BF16 `vdpbf16ps`, precision="bf16"): q, k packed into pairs of
    # head features and v into bfloat16 rows in the scratch pk, the probabilities into pairs of
    # keys in s; scores, sums and outputs stay float32 (see _packed)
    bf16: bool = False
    # with bf16, both products on AMX's tiles (`tdpbf16ps`; _tile_scores, _tile_output), for
    # head sizes of whole tile rows (32 bfloat16)
    amx: bool = False
    # float32 products: each output also quantized on the grid at %grid (scale, zero point,
    # lowest, highest) and its byte stored in the 4-block rows of xq (the head's first row,
    # row stride ldxq in i32), where the int8 layer reading the heads' merged output reads
    # x; `unsigned_grid`: the grid's lowest value is 0 (lowp_ir.unsigned_bytes)
    quant_out: bool = False
    unsigned_grid: bool = False


ZERO = "zeroinitializer"


def _dot(e: Builder, cfg: AttentionConfig, w: str, x: str, acc: str) -> str:
    """acc + w·x: a fma, or with bf16 one `vdpbf16ps` of a pair (w broadcast, x a vector of pairs)."""
    return bf16_dot(e, acc, x, w) if cfg.bf16 else e.fma(w, x, acc)


def _scores(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str]) -> list[str]:
    """Stage 1 for the query tile at i0: every key's scaled, masked score into the
    scratch; returns the running max per query vector."""
    vt, QV = e.vt, cfg.qvec
    # bf16: pairs of head features, from the packed q and k (see _packed)
    q, ldq, k, ldk, steps = ("%qp", "%ldqp", "%kp", "%ldkp", "%d2") if cfg.bf16 else ("%qt", "%ldq", "%kt", "%ldk", "%d")

    def keys(rows):  # `rows` keys from j0, each score a fma chain over the head features
        def body(j0, state):
            def dot(ee, accs):
                qs = e.row_vectors(q, ldq, ee, i0, masks)
                koff = e.offset(ee, ldk, j0)
                out = []
                for r in range(rows):
                    w = e.splat(e(f"load float, ptr {e.gep(k, e(f'add i64 {koff}, {r}') if r else koff)}, align 4"))
                    out += [_dot(e, cfg, w, qs[v], accs[r * QV + v]) for v in range(QV)]
                return out

            _, accs = e.loop("0", steps, 1, [(vt, ZERO)] * (rows * QV), dot)
            for r in range(rows):
                j = e(f"add i64 {j0}, {r}") if r else j0
                srow = e(f"mul i64 {j}, {cfg.lanes * QV}")
                for v, mask in enumerate(_mask_vectors(e, cfg, j, i0, masks)):
                    s = e.fma(accs[r * QV + v], e.splat("%scale"), mask)
                    e.vstore(s, e.vptr("%s", srow, v), None)
                    state = _running_max(e, cfg, state, v, s)
            return state
        return body

    start, state = e.loop("0", "%tk", cfg.group, _max_start(e, cfg), keys(cfg.group))
    types = [t for t, _ in _max_start(e, cfg)]
    return _maxes(e, cfg, e.loop(start, "%tk", 1, list(zip(types, state)), keys(1))[1])


def _max_start(e: Builder, cfg: AttentionConfig) -> list[tuple[str, str]]:
    """A query tile's running max as loop values (_running_max): a max per query vector,
    from -inf, and under the NaN guard whether a score of its was NaN."""
    return [(e.vt, e.const(float("-inf")))] * cfg.qvec + [(f"<{cfg.lanes} x i1>", ZERO)] * (cfg.qvec * cfg.nan_guard)


def _running_max(e: Builder, cfg: AttentionConfig, state: list[str], v: int, s: str) -> list[str]:
    """The running max (_max_start) after query vector v's scores s: m > s ? m : s, which
    is x86's vmaxps (one instruction, where llvm.maximum's NaN rule takes six). It may drop
    a NaN score, which still makes its query's sum NaN, and so its outputs; under the guard,
    where a NaN score must make its query dead, the NaN is noted beside it (_maxes)."""
    vt, state = e.vt, list(state)
    state[v] = e(f"select <{cfg.lanes} x i1> {e(f'fcmp ogt {vt} {state[v]}, {s}')}, {vt} {state[v]}, {vt} {s}")
    if cfg.nan_guard:
        nan = cfg.qvec + v
        state[nan] = e(f"or <{cfg.lanes} x i1> {state[nan]}, {e(f'fcmp uno {vt} {s}, {s}')}")
    return state


def _maxes(e: Builder, cfg: AttentionConfig, state: list[str]) -> list[str]:
    """The maxes of a running max (_running_max): under the guard NaN where a score was."""
    maxes = state[:cfg.qvec]
    if not cfg.nan_guard:
        return maxes
    return [e(f"select <{cfg.lanes} x i1> {nan}, {e.vt} {e.const(float('nan'))}, {e.vt} {m}")
            for m, nan in zip(maxes, state[cfg.qvec:])]


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

    def probability(j, v):
        p = _exp(e, e(f"fsub {vt} {e.vload(e.vptr('%s', e(f'mul i64 {j}, {L * QV}'), v), None)}, {maxes[v]}"))
        return e(f"select <{L} x i1> {dead[v]}, {vt} {ZERO}, {vt} {p}") if cfg.nan_guard else p

    def key(j, sums):
        out = []
        for v in range(QV):
            p = probability(j, v)
            e.vstore(p, e.vptr("%s", e(f"mul i64 {j}, {L * QV}"), v), None)
            out.append(e(f"fadd {vt} {sums[v]}, {p}"))
        return out

    def key_pair(jp, sums):  # bf16: keys 2jp and 2jp + 1 (p = 0 past the last), stored as pair row jp
        j0 = e(f"mul i64 {jp}, 2")
        j1 = e(f"add i64 {j0}, 1")
        inside = e(f"icmp slt i64 {j1}, %tk")
        out = []
        for v in range(QV):
            p0 = probability(j0, v)
            p1 = e(f"select i1 {inside}, {vt} {probability(e(f'select i1 {inside}, i64 {j1}, i64 {j0}'), v)}, "
                   f"{vt} {ZERO}")
            e.vstore(bf16_pairs(e, p0, p1), e.vptr("%s", e(f"mul i64 {jp}, {L * QV}"), v), None)
            out.append(e(f"fadd {vt} {e(f'fadd {vt} {sums[v]}, {p0}')}, {p1}"))
        return out

    if cfg.bf16:  # (pair row jp overwrites row jp, read before: jp <= 2jp)
        _, sums = e.loop("0", "%tk2", 1, [(vt, ZERO)] * QV, key_pair)
    else:
        _, sums = e.loop("0", "%tk", 1, [(vt, ZERO)] * QV, key)
    scales = [e(f"fdiv {vt} {e.const(1.0)}, {s}") for s in sums]
    if cfg.nan_guard:
        scales = [e(f"select <{L} x i1> {d}, {vt} {e.const(1.0)}, {vt} {s}") for d, s in zip(dead, scales)]
    return scales, dead


def _grid(e: Builder, cfg: AttentionConfig) -> tuple | None:
    """quant_out's grid from %grid: scale, zero point, lowest, highest (splat), and the zero
    point as i32 lanes."""
    if not cfg.quant_out:
        return None
    scalars = [e(f"load float, ptr {e.gep('%grid', str(i))}, align 4") for i in range(4)]
    return (*(e.splat(v) for v in scalars), e.splat_i32(e(f"fptosi float {scalars[1]} to i32")))


def _byte(e: Builder, cfg: AttentionConfig, o: str, grid: tuple) -> str:
    """The byte (an i32 vector) the next int8 layer makes of output vector o."""
    step, zero, lo, hi, izero = grid
    if cfg.unsigned_grid:
        return unsigned_bytes(e, o, step, izero)
    return e(f"fptosi {e.vt} {e(f'fsub {e.vt} {quantized(e, o, step, zero, lo, hi)}, {lo}')} to <{e.lanes} x i32>")


def _output(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str], scales: list[str], dead: list[str]) -> None:
    """Stage 3: oᵀ[e, tile] = Σ_j vᵀ[e, j] · p[j, tile] / sum, `group` head features at a
    time; with quant_out, each output's byte too."""
    vt, L, QV = e.vt, cfg.lanes, cfg.qvec
    grid = _grid(e, cfg)

    def features(rows):
        def body(e0, _):
            def key(j, accs):  # (bf16: a pair of keys, from the packed v)
                srow = e(f"mul i64 {j}, {L * QV}")
                ps = [e.vload(e.vptr("%s", srow, v), None) for v in range(QV)]
                out = []
                for r in range(rows):
                    vrow = e(f"mul i64 {e(f'add i64 {e0}, {r}') if r else e0}, {'%ldvp' if cfg.bf16 else '%ldv'}")
                    at = e.gep("%vp" if cfg.bf16 else "%vt", e(f"add i64 {vrow}, {j}"))
                    w = e.splat(e(f"load float, ptr {at}, align 4"))
                    out += [_dot(e, cfg, w, ps[v], accs[r * QV + v]) for v in range(QV)]
                return out

            _, accs = e.loop("0", "%tk2" if cfg.bf16 else "%tk", 1, [(vt, ZERO)] * (rows * QV), key)
            for r in range(rows):
                feature = e(f"add i64 {e0}, {r}") if r else e0
                ooff = e.offset(feature, "%ldo", i0)
                os_ = []
                for v in range(QV):
                    o = e(f"fmul {vt} {accs[r * QV + v]}, {scales[v]}")
                    if not cfg.nan_guard:
                        o = e(f"select <{L} x i1> {dead[v]}, {vt} {e.const(float('nan'))}, {vt} {o}")
                    e.vstore(o, e.vptr("%ot", ooff, v), masks[v])
                    os_.append(o)
                if grid is not None:
                    store_block_bytes(e, [_byte(e, cfg, o, grid) for o in os_], feature, "%xq", "%ldxq", i0, masks)
            return []
        return body

    start, _ = e.loop("0", "%d", cfg.group, [], features(cfg.group))
    e.loop(start, "%d", 1, [], features(1))


def _packed(e: Builder) -> None:
    """bf16: the head's operands packed into pk, rows of whole vectors (16 tokens each):
    qp [d2, ldqp] and kp [d2, ldkp], token t's pair of head features (2e, 2e + 1) in one
    32-bit lane (0 past the last feature and token); vp [d, ldvp], row e the bfloat16
    pairs of keys (2j, 2j + 1) of vᵀ[e] (0 past the last key). Names %d2, %tk2 (pairs of
    features, of keys) and the packed rows' strides, for the stages."""
    L = e.lanes
    e("add i64 %d, 1", "%d1")
    e("sdiv i64 %d1, 2", "%d2")
    e("add i64 %tk, 1", "%tk1")
    e("sdiv i64 %tk1, 2", "%tk2")
    for n, t in (("q", "%tq"), ("k", "%tk")):
        e(f"add i64 {t}, {L - 1}", f"%{n}r")
        e(f"and i64 %{n}r, {-L}", f"%ld{n}p")
    e("add i64 %tk2, " + str(L - 1), "%vr")
    e(f"and i64 %vr, {-L}", "%ldvp")
    e("getelementptr inbounds float, ptr %pk, i64 0", "%qp")
    e(f"getelementptr inbounds float, ptr %pk, i64 {e('mul i64 %d2, %ldqp')}", "%kp")
    e(f"getelementptr inbounds float, ptr %kp, i64 {e('mul i64 %d2, %ldkp')}", "%vp")

    pack_pair_rows(e, "%qt", "%ldq", "%d", "%qp", "%ldqp", "0", "%d2", "%tq")
    pack_pair_rows(e, "%kt", "%ldk", "%d", "%kp", "%ldkp", "0", "%d2", "%tk")
    wide, iv = f"<{2 * L} x i64>", f"<{L} x i64>"
    iota = f"<{', '.join(f'i64 {i}' for i in range(2 * L))}>"
    tk_wide = e(f"shufflevector {iv} {e.splat_i64('%tk')}, {iv} poison, <{2 * L} x i32> zeroinitializer")

    def v_pairs(row, t2):  # keys 2·t2 .. 2·t2 + 2·lanes - 1 of vᵀ[row] (0 past the last) → vp[row, t2:]
        t = e(f"mul i64 {t2}, 2")
        keys = e(f"add {wide} {e(f'shufflevector {iv} {e.splat_i64(t)}, {iv} poison, <{2 * L} x i32> zeroinitializer')}"
                 f", {iota}")
        x = e.call(f"llvm.masked.load.v{2 * L}f32.p0", f"<{2 * L} x float>", ("ptr", e.gep("%vt", e.offset(row, "%ldv", t))),
                   ("i32", "4"), (f"<{2 * L} x i1>", e(f"icmp slt {wide} {keys}, {tk_wide}")),
                   (f"<{2 * L} x float>", ZERO))
        b = e(f"fptrunc <{2 * L} x float> {x} to <{2 * L} x bfloat>")
        e.raw(f"  store <{2 * L} x bfloat> {b}, ptr {e.gep('%vp', e.offset(row, '%ldvp', t2))}, align 4")

    e.loop("0", "%d", 1, [], lambda row, _: e.tiles("0", "%tk2", L, lambda t2: v_pairs(row, t2)) or [])


# AMX's tiles (cfg.amx): tmm0, tmm1 the sums of the query tile's two halves, tmm4 the
# keys' (or v's) tile, tmm6, tmm7 the queries' (or the probabilities') tiles of each half
TILE_C, TILE_A, TILE_B = 0, 4, 6


def _keys_by_row(e: Builder) -> None:
    """AMX: the keys' pairs as rows, ka [tk16, d2] (tk16 = tk rounded up to 16: key j's
    pairs of head features, in order; 0 past the last key), the A operand of the scores'
    tiles: kp transposed by gathers of 16 pairs. After vp in pk."""
    L = e.lanes
    e(f"and i64 {e(f'add i64 %tk, {ROWS - 1}')}, {-ROWS}", "%tk16")
    e(f"getelementptr inbounds float, ptr %vp, i64 {e('mul i64 %d, %ldvp')}", "%ka")
    iv = f"<{L} x i64>"
    iota = f"<{', '.join(f'i64 {i}' for i in range(L))}>"
    ones = f"<{', '.join(['i1 true'] * L)}>"

    def key(j, _):
        def pairs(h, _c):
            rows = e(f"mul {iv} {e(f'add {iv} {e.splat_i64(h)}, {iota}')}, {e.splat_i64('%ldkp')}")
            at = e(f"getelementptr inbounds i32, ptr %kp, {iv} {e(f'add {iv} {rows}, {e.splat_i64(j)}')}")
            got = e.call(f"llvm.masked.gather.v{L}i32.v{L}p0", f"<{L} x i32>", (f"<{L} x ptr>", at), ("i32", "4"),
                         (f"<{L} x i1>", ones), (f"<{L} x i32>", "poison"))
            e.raw(f"  store <{L} x i32> {got}, ptr {e.gep('%ka', e.offset(j, '%d2', h), 'i32')}, align 4")
            return []
        e.loop("0", "%d2", L, [], pairs)
        return []

    e.loop("0", "%tk16", 1, [], key)


def _tile_products(e: Builder, a: str, lda: str, b: str, ldb: str, steps: str) -> None:
    """tmm0, tmm1 = Σ over `steps` K-tiles: A (16 rows of 64 bytes from a, row stride lda
    bytes, on by 64 bytes a step) · B (16 rows from b and from b + 64 bytes, stride ldb
    bytes, on by 16 rows a step)."""
    for c in range(2):
        e.call("llvm.x86.tilezero", "void", ("i8", str(TILE_C + c)))

    def step(k, _):
        at = e(f"getelementptr inbounds i8, ptr {a}, i64 {e(f'mul i64 {k}, 64')}")
        e.call("llvm.x86.tileloadd64", "void", ("i8", str(TILE_A)), ("ptr", at), ("i64", lda))
        krow = e(f"mul i64 {k}, {ROWS}")
        row = e(f"getelementptr inbounds i8, ptr {b}, i64 {e(f'mul i64 {krow}, {ldb}')}")
        for c in range(2):
            at = e(f"getelementptr inbounds i8, ptr {row}, i64 {64 * c}")
            e.call("llvm.x86.tileloadd64", "void", ("i8", str(TILE_B + c)), ("ptr", at), ("i64", ldb))
        for c in range(2):
            e.call("llvm.x86.tdpbf16ps", "void", ("i8", str(TILE_C + c)), ("i8", str(TILE_A)), ("i8", str(TILE_B + c)))
        return []

    e.loop("0", steps, 1, [], step)


def _tile_scores(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str]) -> list[str]:
    """Stage 1 on AMX: the scores of 16 keys × the tile's 32 queries from ka's rows and
    qp's pair rows into tmm0, tmm1, stored to the scratch rows [key, query]; then each
    key's row · scale + mask, and the running max."""
    W = cfg.lanes * cfg.qvec
    qp = e.gep("%qp", i0)
    ldq, lda = e("mul i64 %ldqp, 4"), e("mul i64 %d2, 4")
    steps = e(f"sdiv i64 %d2, {ROWS}")

    def block(j0, _):
        _tile_products(e, e.gep("%ka", e.offset(j0, "%d2", "0"), "i32"), lda, qp, ldq, steps)
        for c in range(2):
            e.call("llvm.x86.tilestored64", "void", ("i8", str(TILE_C + c)),
                   ("ptr", e.gep("%s", e(f"add i64 {e(f'mul i64 {j0}, {W}')}, {cfg.lanes * c}"))), ("i64", str(4 * W)))
        return []

    e.loop("0", "%tk16", ROWS, [], block)

    def key(j, state):
        srow = e(f"mul i64 {j}, {W}")
        for v, mask in enumerate(_mask_vectors(e, cfg, j, i0, masks)):
            s = e.fma(e.vload(e.vptr("%s", srow, v), None), e.splat("%scale"), mask)
            e.vstore(s, e.vptr("%s", srow, v), None)
            state = _running_max(e, cfg, state, v, s)
        return state

    return _maxes(e, cfg, e.loop("0", "%tk", 1, _max_start(e, cfg), key)[1])


def _tile_output(e: Builder, cfg: AttentionConfig, i0: str, masks: list[str], scales: list[str],
                 dead: list[str]) -> None:
    """Stage 3 on AMX: oᵀ for 16 head features × the tile's 32 queries, Σ over 32 keys a
    step of vp's rows (bfloat16 keys) · the scratch's pair rows of probabilities, stored
    through a 2 KB buffer (%obuf), · 1/sum into oᵀ. The scratch's pair rows past the last pair,
    up to a whole tile, are zeroed first (garbage bits × 0 could be NaN)."""
    vt, L, W = e.vt, cfg.lanes, cfg.lanes * cfg.qvec
    pad = e(f"and i64 {e(f'add i64 %tk2, {ROWS - 1}')}, {-ROWS}")

    def zero(jp, _):
        for v in range(cfg.qvec):
            e.vstore(ZERO, e.vptr("%s", e(f"mul i64 {jp}, {W}"), v), None)
        return []

    e.loop("%tk2", pad, 1, [], zero)
    out = "%obuf"
    ldv, ldp = e("mul i64 %ldvp, 4"), str(4 * W)
    steps = e(f"sdiv i64 {pad}, {ROWS}")

    def block(f0, _):
        _tile_products(e, e.gep("%vp", e.offset(f0, "%ldvp", "0")), ldv, "%s", ldp, steps)
        for c in range(2):
            e.call("llvm.x86.tilestored64", "void", ("i8", str(TILE_C + c)), ("ptr", e.gep(out, str(c * ROWS * L))),
                   ("i64", "64"))

        def row(r, _):
            ooff = e.offset(e(f"add i64 {f0}, {r}"), "%ldo", i0)
            for v in range(cfg.qvec):
                at = e(f"add i64 {e(f'mul i64 {r}, {L}')}, {v * ROWS * L}")
                o = e(f"fmul {vt} {e.vload(e.gep(out, at), None)}, {scales[v]}")
                if not cfg.nan_guard:
                    o = e(f"select <{L} x i1> {dead[v]}, {vt} {e.const(float('nan'))}, {vt} {o}")
                e.vstore(o, e.vptr("%ot", ooff, v), masks[v])
            return []

        e.loop("0", str(ROWS), 1, [], row)
        return []

    e.loop("0", "%d", ROWS, [], block)


def _head(e: Builder, cfg: AttentionConfig) -> None:
    if cfg.bf16:
        _packed(e)
    if cfg.amx:
        _keys_by_row(e)
        e(f"alloca [{2 * ROWS * cfg.lanes} x float], align 64", "%obuf")  # _tile_output's C tiles
        e.call("llvm.x86.ldtilecfg", "void", ("ptr", "@amx_config"))

    def tile(i0):  # query tiles, the last one maybe partly masked
        masks = e.lane_masks(i0, cfg.qvec, "%tq")
        maxes = (_tile_scores if cfg.amx else _scores)(e, cfg, i0, masks)
        scales, dead = _softmax(e, cfg, maxes)
        (_tile_output if cfg.amx else _output)(e, cfg, i0, masks, scales, dead)

    e.tiles("0", "%tq", cfg.lanes * cfg.qvec, tile)
    if cfg.amx:
        e.call("llvm.x86.tilerelease", "void")


def attention_ir(cfg: AttentionConfig) -> str:
    if cfg.amx and not (cfg.bf16 and cfg.lanes == 16 and cfg.qvec == 2) or cfg.quant_out and cfg.bf16 \
            or cfg.unsigned_grid and (not cfg.quant_out or cfg.lanes != 16):
        raise ValueError(f"no attention kernel for {cfg}")
    e = Builder(cfg.lanes)
    e.function(SIGNATURE, lambda: _head(e, cfg))
    if cfg.amx:
        e.raw(f'@amx_config = private unnamed_addr constant [64 x i8] c"{tile_config()}", align 64')
    header = (f"; sparsejit generated kernel: attention for one (batch, head), feature-major, "
              f"mask_per_query={cfg.mask_per_query} lanes={cfg.lanes} qvec={cfg.qvec} group={cfg.group} "
              f"nan_guard={cfg.nan_guard}{' bf16' if cfg.bf16 else ''}{' amx' if cfg.amx else ''}"
              f"{' quant_out' if cfg.quant_out else ''}{' unsigned_grid' if cfg.unsigned_grid else ''}\n"
              "; ot[e, i] = sum_j vt[e, j] * softmax_j(scale * sum_e' qt[e', i] * kt[e', j] + mask[j(, i)])")
    return e.module(header)
