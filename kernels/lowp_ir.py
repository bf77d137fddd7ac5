"""The low-precision pieces the IR generators share (sparse_ir, dense_ir, attention_ir,
bf16): the two dot-product instructions, packing float rows into bfloat16 pairs, and the
scaled epilogue of integer (int8) or scaled float sums.

Sums are carried as float vectors whatever they hold (i32 for VNNI), bit for bit, so
that every loop, phi, load and store of a generator stays the float kernel's; the dots
bitcast their operands.

- `bf16_dot`: `vdpbf16ps` (AVX512-BF16): per float lane, acc + x.lo·w.lo + x.hi·w.hi for
  two bfloat16 pairs held in one 32-bit lane.
- `vnni_dot`: `vpdpbusd` (AVX-512 VNNI): per i32 lane, acc + Σ of four products of
  uint8 x and int8 w bytes.
"""

from __future__ import annotations

import numpy as np

from .ir import Builder

BF16_DOT = "llvm.x86.avx512bf16.dpbf16ps.512"
VNNI_DOT = "llvm.x86.avx512.vpdpbusd.512"
ZERO = "zeroinitializer"


def bf16_dot(e: Builder, acc: str, x: str, w: str) -> str:
    """acc + the pairs of x times the pairs of w (float vectors of the pairs' bits)."""
    bv, vt = f"<{2 * e.lanes} x bfloat>", e.vt
    return e.call(BF16_DOT, vt, (vt, acc), (bv, e(f"bitcast {vt} {x} to {bv}")), (bv, e(f"bitcast {vt} {w} to {bv}")))


def vnni_dot(e: Builder, acc: str, x: str, w: str) -> str:
    """acc (i32 sums as float bits) + per lane the four products of x's uint8 and w's int8."""
    iv, vt = f"<{e.lanes} x i32>", e.vt
    out = e.call(VNNI_DOT, iv, (iv, e(f"bitcast {vt} {acc} to {iv}")), (iv, e(f"bitcast {vt} {x} to {iv}")),
                 (iv, e(f"bitcast {vt} {w} to {iv}")))
    return e(f"bitcast {iv} {out} to {vt}")


def bf16_pairs(e: Builder, lo: str, hi: str) -> str:
    """Two float vectors as one of bfloat16 pairs, lo's in the low halves (as float bits);
    `fptrunc` rounds to nearest even, NaN kept NaN."""
    L, hv = e.lanes, f"<{e.lanes} x bfloat>"
    interleave = ", ".join(f"i32 {i // 2 + (i % 2) * L}" for i in range(2 * L))
    pair = e(f"shufflevector {hv} {e(f'fptrunc {e.vt} {lo} to {hv}')}, {hv} {e(f'fptrunc {e.vt} {hi} to {hv}')}, "
             f"<{2 * L} x i32> <{interleave}>")
    return e(f"bitcast <{2 * L} x bfloat> {pair} to {e.vt}")


def pack_pair_rows(e: Builder, src: str, ld: str, rows: str, dst: str, ldd: str, p0: str, p1: str, ntok: str,
                   lddt: str | None = None) -> None:
    """dst[p, t] = the bfloat16 pair (src[2p, t], src[2p + 1, t]) for pair rows [p0, p1),
    the second 0 past the last of `rows` rows; whole vectors of tokens up to ntok rounded
    up to the lanes (the lanes past ntok hold zeros). With `lddt`, dst's tokens 16·i on
    start lddt · i i32 on (token_tiled)."""
    def tile(p, t):
        (mask,) = e.lane_masks(t, 1, ntok)
        r0 = e(f"mul i64 {p}, 2")
        r1 = e(f"add i64 {r0}, 1")
        inside = e(f"icmp slt i64 {r1}, {rows}")
        lo = e.vload(e.gep(src, e.offset(r0, ld, t)), mask)
        hi = e.vload(e.gep(src, e.offset(e(f"select i1 {inside}, i64 {r1}, i64 {r0}"), ld, t)), mask)
        hi = e(f"select i1 {inside}, {e.vt} {hi}, {e.vt} {ZERO}")
        at = e.offset(p, ldd, t) if lddt is None else token_tiled(e, p, ldd, t, 0, lddt)
        e.vstore(bf16_pairs(e, lo, hi), e.gep(dst, at), None)

    e.loop(p0, p1, 1, [], lambda p, _: e.tiles("0", ntok, e.lanes, lambda t: tile(p, t)) or [])


def scaled_sums(e: Builder, sums: list[str], j: str, bias: str, int8: bool, requantize: bool = False) -> list[str]:
    """Row j's sums times its scale %bias[m + j], plus `bias` (its bias, splat); int8: the
    sums are i32 (as float bits), less the zero point's correction %bias[2m + j] (an i32)
    and converted first (int8.Int8Linear's epilogue); `requantize` (int8): the scaled sums
    clamped to [%bias[4m + j], %bias[5m + j]], rounded half to even and times
    %bias[3m + j] before the bias, as int8_ir's epilogue does (a QLinearMatMul's output)."""
    iv, vt = f"<{e.lanes} x i32>", e.vt

    def term(k: int, ty: str = "float") -> str:  # %bias[k·m + j]
        at = e(f"add i64 {j}, {e(f'mul i64 %m, {k}') if k > 1 else '%m'}")
        return e(f"load {ty}, ptr {e.gep('%bias', at, ty)}, align 4")

    scale = e.splat(term(1))
    if int8:
        corr = e.splat_i32(term(2, "i32"))
        ints = [e(f"sub {iv} {e(f'bitcast {vt} {v} to {iv}')}, {corr}") for v in sums]
        sums = [e(f"sitofp {iv} {v} to {vt}") for v in ints]
    ys = [e(f"fmul {vt} {v}, {scale}") for v in sums]
    if requantize:
        sy, lo, hi = (e.splat(term(k)) for k in (3, 4, 5))
        ys = [e(f"fmul {vt} {e.vcall('roundeven', e.vcall('minnum', e.vcall('maxnum', y, lo), hi))}, {sy}")
              for y in ys]
    return [e(f"fadd {vt} {y}, {bias}") for y in ys]


def inverse(scale: float) -> np.float32 | None:
    """1/scale in float32 where `quantized_ir` may divide by it (a multiply and two fmas,
    `quotient_ir`) and keep every quantized value that of x / scale: scale within
    [2^-64, 2^64], so 1/scale and the remainder stay normal wherever the quotient is not
    far below 1/2 (rounded to 0 either way); None where it must divide."""
    s = np.float32(scale)
    return np.float32(1) / s if np.isfinite(s) and INVERTIBLE[0] <= s <= INVERTIBLE[1] else None


def quotient_ir(out: str, x: str, scale: str, inv: str) -> str:
    """IR lines making float `out` x / scale rounded to the nearest float, by its inverse
    `inv` (`inverse`, correctly rounded) without the divider: q = x·inv, then q corrected
    by the exact remainder x − q·scale (an fma) times inv (Markstein's theorem: the result
    is the correctly rounded quotient where the remainder is normal). Where x / scale
    overflows, q's ±inf is kept (its correction is NaN). A float quotient whose remainder
    is subnormal, |x / scale| below 2^-38 under `inverse`'s bound, may differ in its last
    bits: it rounds to 0 either way."""
    return (f"  {out}.q = fmul float {x}, {inv}\n  {out}.nq = fneg float {out}.q\n"
            f"  {out}.re = call float @llvm.fma.f32(float {out}.nq, float {scale}, float {x})\n"
            f"  {out}.q1 = call float @llvm.fma.f32(float {out}.re, float {inv}, float {out}.q)\n"
            f"  {out}.ok = fcmp ord float {out}.q1, {out}.q1\n"
            f"  {out} = select i1 {out}.ok, float {out}.q1, float {out}.q\n")


def quantized_ir(out: str, x: str, scale: str, zero: str, lo: str, hi: str, inv: str | None = None) -> str:
    """IR lines making float `out` QuantizeLinear's value of float `x`, still a float:
    clamp(roundeven(x / scale) + zero, lo, hi), NaN giving 0 before the clamp, as the
    Numba kernels' `quantized` (lowp_ir.quantized is its vector twin). With `inv`, scale's
    `inverse`, the quotient is `quotient_ir`'s (the same values; the divider's throughput
    is what bounds the row kernels)."""
    d = quotient_ir(f"{out}.d", x, scale, inv) if inv else f"  {out}.d = fdiv float {x}, {scale}\n"
    return (f"{d}  {out}.r = call float @llvm.roundeven.f32(float {out}.d)\n"
            f"  {out}.z = fadd float {out}.r, {zero}\n  {out}.nan = fcmp uno float {out}.z, {out}.z\n"
            f"  {out}.n = select i1 {out}.nan, float 0.0, float {out}.z\n"
            f"  {out}.lo = call float @llvm.maxnum.f32(float {out}.n, float {lo})\n"
            f"  {out} = call float @llvm.minnum.f32(float {out}.lo, float {hi})\n")


# The scales whose inverse `quotient` divides by (`inverse`'s bound)
INVERTIBLE = (2.0 ** -64, 2.0 ** 64)


def quotient(e: Builder, x: str, scale: str) -> str:
    """x / scale (float vectors, scale's lanes all one value) rounded to the nearest float,
    as `fdiv` gives it. Where the scale is within `inverse`'s bound, by its inverse instead
    of the divider, whose throughput bounds the quantizing epilogues: quotient_ir's
    multiply and two fmas (the same values, but for quotients under 2^-38, which round to
    0 either way), 1/scale made once (LLVM hoists it out of the loops, as it does the test
    of the scale: a branch every vector takes the same way)."""
    vt = e.vt
    s = e(f"extractelement {vt} {scale}, i32 0")
    ok = e(f"and i1 {e(f'fcmp oge float {s}, {INVERTIBLE[0]!r}')}, {e(f'fcmp ole float {s}, {INVERTIBLE[1]!r}')}")
    fast, slow, done = e.fresh("byinverse"), e.fresh("bydivision"), e.fresh("quotient")
    e.cond_br(ok, fast, slow)
    e.label(fast)
    inv = e(f"fdiv {vt} {e.const(1.0)}, {scale}")
    q = e(f"fmul {vt} {x}, {inv}")
    q1 = e.fma(e.fma(e(f"fneg {vt} {q}"), scale, x), inv, q)  # (q + the remainder x - q·scale times inv)
    by_inverse = e(f"select <{e.lanes} x i1> {e(f'fcmp ord {vt} {q1}, {q1}')}, {vt} {q1}, {vt} {q}")
    e.br(done)
    e.label(slow)
    by_division = e(f"fdiv {vt} {x}, {scale}")
    e.br(done)
    e.label(done)
    return e.phi(vt, (by_inverse, fast), (by_division, slow))


def quantized(e: Builder, x: str, scale: str, zero: str, lo: str, hi: str) -> str:
    """QuantizeLinear's value, still a float: clamp(roundeven(x / scale) + zero, lo, hi),
    NaN giving 0 before the clamp (as numpy's cast of NaN to a byte does on x86)."""
    q = e(f"fadd {e.vt} {e.vcall('roundeven', quotient(e, x, scale))}, {zero}")
    q = e(f"select <{e.lanes} x i1> {e(f'fcmp uno {e.vt} {q}, {q}')}, {e.vt} zeroinitializer, {e.vt} {q}")
    # (no NaN left, which `nnan` tells LLVM: one vmaxps and one vminps, where minnum and
    # maxnum's NaN rule costs a compare and a blend each on x86)
    return e.vcall("minnum", e.vcall("maxnum", q, lo, flags="nnan"), hi, flags="nnan")


def unsigned_bytes(e: Builder, x: str, scale: str, zero: str) -> str:
    """QuantizeLinear's bytes of float vector x on a grid of lowest value 0 (uint8), as an
    i32 vector: clamp(roundeven(x / scale) + zero, 0, 255), NaN giving 0, as `quantized`
    then the byte. In fewer instructions: x / scale capped at 2^30 by `vminps` with the
    quotient second (a NaN quotient passes), converted by `vcvtps2dq` rounding to nearest
    even (a NaN, or a quotient under -2^31, gives -2^31), then the integer add of the zero
    point (`zero`: an i32 vector) and the clamp, which take -2^31 + zero to 0."""
    iv = f"<{e.lanes} x i32>"
    q = quotient(e, x, scale)
    q = e.call("llvm.x86.avx512.min.ps.512", e.vt, (e.vt, e.const(2.0 ** 30)), (e.vt, q), ("i32", "4"))
    i = e.call("llvm.x86.avx512.mask.cvtps2dq.512", iv, (e.vt, q), (iv, "zeroinitializer"), ("i16", "-1"),
               ("i32", "8"))
    b = e(f"add {iv} {i}, {zero}")
    return e.call(f"llvm.smin.v{e.lanes}i32", iv, (iv, e.call(f"llvm.smax.v{e.lanes}i32", iv, (iv, b),
                                                              (iv, "zeroinitializer"))), (iv, e.splat_i32(255)))


def token_tiled(e: Builder, row: str, ld: str, t: str, u: int, ldt: str) -> str:
    """The index of vector u of tokens from t (a multiple of the lanes) in row `row`,
    where tokens 16·i on start ldt · i elements on and rows are `ld` apart (layout.TokenTiles':
    ld = 16; a feature-major array's: ldt = 16)."""
    tok = e(f"add i64 {t}, {u * e.lanes}") if u else t
    tile = e(f"mul i64 {e(f'lshr i64 {tok}, 4')}, {ldt}")
    return e(f"add i64 {e.offset(row, ld, tile)}, {e(f'and i64 {tok}, 15')}")


def store_block_bytes(e: Builder, qs: list[str], j: str, base: str, ld: str, t: str, masks: list,
                      ldt: str | None = None) -> None:
    """Bytes (i32 vectors holding 0..255) of input j for consecutive vectors of tokens from
    t, stored where an int8 kernel reads its x: byte j % 4 of each token's i32 in 4-block
    row j / 4 of `base` (row stride `ld` in i32; with `ldt`, tokens 16·i on ldt · i i32 on,
    as in layout.TokenTiles, t a multiple of the lanes). One masked byte store per
    vector; a lane mask (None: every lane) covers its token's one byte."""
    L = e.lanes
    iv, bv, bm = f"<{L} x i32>", f"<{4 * L} x i8>", f"<{4 * L} x i1>"
    byte = e(f"and i64 {j}, 3")
    shift = e.splat_i32(e(f"trunc i64 {e(f'shl i64 {byte}, 3')} to i32"))  # 8 · (j mod 4)
    ones = e(f"bitcast {iv} {e(f'shl {iv} {e.splat_i32(255)}, {shift}')} to {bv}")
    bytes_mask = e(f"icmp ne {bv} {ones}, zeroinitializer")
    row = e(f"lshr i64 {j}, 2")
    start = e.offset(row, ld, t) if ldt is None else None
    spread = ", ".join(f"i32 {i // 4}" for i in range(4 * L))
    for u, (q, mask) in enumerate(zip(qs, masks)):
        at = e.vptr(base, start, u, "i32") if ldt is None else e.gep(base, token_tiled(e, row, ld, t, u, ldt), "i32")
        on = bytes_mask
        if mask is not None:  # each token's lane mask over its four bytes
            per_byte = e(f"shufflevector <{L} x i1> {mask}, <{L} x i1> poison, <{4 * L} x i32> <{spread}>")
            on = e(f"and {bm} {bytes_mask}, {per_byte}")
        packed = e(f"bitcast {iv} {e(f'shl {iv} {q}, {shift}')} to {bv}")
        e.call(f"llvm.masked.store.v{4 * L}i8.p0", "void", (bv, packed), ("ptr", at),
               ("i32", "1"), (bm, on))


def store_pair_halves(e: Builder, values: list[str], j: str, base: str, ld: str, t: str,
                      masks: list | None = None, ldt: str | None = None) -> None:
    """Row j's outputs (vectors of tokens from t) rounded to bfloat16 and stored where a
    bf16 layer on pairs of consecutive inputs reads its x (bf16.packed_pairs' layout): the
    low halves (j even) or high halves (j odd) of pair row j / 2 of `base`, its row stride
    `ld` in i32. Each vector's 16 values go out spread over 32 halves, by a store masked to
    the row's halves (and, with `masks`, to each vector's tokens), so rows j and j + 1 never
    write each other's bytes. Without masks a masked tile's lanes past the last token land
    in the rows' padding. With `ldt`, tokens 16·i on start ldt · i i32 on (token_tiled)."""
    L, hv, gv, gm = e.lanes, f"<{e.lanes} x i16>", f"<{2 * e.lanes} x i16>", f"<{2 * e.lanes} x i1>"
    odd = e(f"trunc i64 {e(f'and i64 {j}, 1')} to i1")
    spread = [f"<{', '.join(f'i32 {p // 2 if p % 2 == parity else L}' for p in range(2 * L))}>" for parity in (0, 1)]
    halves = [f"<{', '.join(f'i1 {int(p % 2 == parity)}' for p in range(2 * L))}>" for parity in (0, 1)]
    row = e.offset(e(f"lshr i64 {j}, 1"), e(f"shl i64 {ld}, 1"), e(f"shl i64 {t}, 1"))
    which = e(f"select i1 {odd}, {gm} {halves[1]}, {gm} {halves[0]}")
    pairs = ", ".join(f"i32 {p // 2}" for p in range(2 * L))
    for u, v in enumerate(values):
        h = e(f"bitcast <{L} x bfloat> {e(f'fptrunc {e.vt} {v} to <{L} x bfloat>')} to {hv}")
        x = e(f"select i1 {odd}, {gv} {e(f'shufflevector {hv} {h}, {hv} zeroinitializer, <{2 * L} x i32> {spread[1]}')}, "
              f"{gv} {e(f'shufflevector {hv} {h}, {hv} zeroinitializer, <{2 * L} x i32> {spread[0]}')}")
        on = which
        if masks is not None and masks[u] is not None:  # (each token's lane over its two halves)
            on = e(f"and {gm} {which}, {e(f'shufflevector <{L} x i1> {masks[u]}, <{L} x i1> poison, <{2 * L} x i32> <{pairs}>')}")
        at = e.gep(base, e(f"add i64 {row}, {2 * u * L}") if u else row, "i16") if ldt is None else \
            e.gep(base, token_tiled(e, e(f"lshr i64 {j}, 1"), ld, t, u, ldt), "i32")
        e.call(f"llvm.masked.store.v{2 * L}i16.p0", "void", (gv, x), ("ptr", at), ("i32", "2"), (gm, on))


def group_order(lanes: int) -> str:
    """The shuffle of two vectors of `lanes` 16-bit values (a group's first 16 tokens and
    its last 16) into the group's stored order: by 4-token pieces, first and last in turn
    (tokens 0-3, 16-19, 4-7, 20-23, ...), what sparse_ir._add_scattered's unpacks read."""
    idx = [4 * (p // 8) + p % 4 + (lanes if p % 8 >= 4 else 0) for p in range(2 * lanes)]
    return f"<{', '.join(f'i32 {i}' for i in idx)}>"


def store_rows(e: Builder, values: list[str], masks: list, base: str, row: str, ld: str, t: str) -> None:
    """Float vectors (tokens from t, vector v masked by masks[v] or whole) rounded to
    bfloat16 and stored as row `row` of `base` (16-bit row stride `ld`) in the bfloat16
    rows a scattered bf16 layer reads as x (bf16.rows_ir's layout: groups of 32 tokens,
    group_order). Masked-off tokens are stored as zeros. t is on a group for two vectors or
    more, which make whole groups; one vector fills the half of its group its tokens are
    in and, for the first half, zeros in the second, which a later tile overwrites where
    it has tokens."""
    L, hv, gv = e.lanes, f"<{e.lanes} x i16>", f"<{2 * e.lanes} x i16>"
    order = group_order(L)
    halves = [e(f"bitcast <{L} x bfloat> {e(f'fptrunc {e.vt} {v} to <{L} x bfloat>')} to {hv}") for v in values]
    halves = [h if m is None else e(f"select <{L} x i1> {m}, {hv} {h}, {hv} zeroinitializer")
              for h, m in zip(halves, masks)]
    start = e.offset(row, ld, e(f"and i64 {t}, {-2 * L}"))
    if len(halves) > 1:
        for u in range(0, len(halves), 2):
            x = e(f"shufflevector {hv} {halves[u]}, {hv} {halves[u + 1]}, <{2 * L} x i32> {order}")
            e.raw(f"  store {gv} {x}, ptr {e.gep(base, e(f'add i64 {start}, {u * L}') if u else start, 'i16')}, "
                  "align 64")
        return
    v = halves[0]
    upper = e(f"icmp ne i64 {e(f'and i64 {t}, {L}')}, 0")
    placed = [e(f"shufflevector {hv} {a}, {hv} {b}, <{2 * L} x i32> {order}")
              for a, b in ((v, "zeroinitializer"), ("zeroinitializer", v))]
    x = e(f"select i1 {upper}, {gv} {placed[1]}, {gv} {placed[0]}")
    second = f"<{', '.join('i1 ' + str(int(p % 8 >= 4)) for p in range(2 * L))}>"
    stored = e(f"select i1 {upper}, <{2 * L} x i1> {second}, <{2 * L} x i1> <{', '.join(['i1 1'] * 2 * L)}>")
    e.call(f"llvm.masked.store.v{2 * L}i16.p0", "void", (gv, x), ("ptr", e.gep(base, start, "i16")), ("i32", "2"),
           (f"<{2 * L} x i1>", stored))
