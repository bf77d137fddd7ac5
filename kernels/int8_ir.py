"""The sparse INT8 Linear kernel as LLVM IR: uint8 activations × int8 weights in 4-blocks.

Layout: the activations are quantized into xq [in/4, tokens_padded, 4] (uint8), so that
one 64-byte load is 16 tokens × one 4-block of inputs; the weights are stored per output
row as the 4-blocks (k/4) that hold a nonzero, each block's four int8 weights packed in
one i32. For every stored block the kernel broadcasts its i32 and adds, per token, the
4-input dot product into an i32 accumulator, by one of the `DOTS`:

- `vnni`: one `vpdpbusd` (AVX-512 VNNI), 16 tokens per vector.
- `pmaddwd`: AVX2, 8 tokens per vector. The activations' bytes 0 and 2 (a mask) and 1
  and 3 (a 16-bit shift) as 16-bit pairs, times the weights' bytes sign-extended to the
  same pairs, each pair of products added into 32 bits by `vpmaddwd`: exact, where
  AVX2's `vpmaddubsw` (ONNX Runtime's choice) adds two products in 16 bits and saturates.
  A block whose weight pairs cannot saturate it (|w0| + |w1| ≤ 128: 255 · 128 < 2^15)
  takes `vpmaddubsw` then `vpmaddwd` by ones, half the instructions: each row's such
  blocks are stored first (`pairs_first`).
- `generic`: the same sum written out with shifts and 32-bit multiplies, for any CPU.

`int8_rows` computes rows [j0, j1) for all tokens: tiles of `vectors` vectors, then tiles
of halving widths, then one masked vector; loads never pass the padded token count,
stores stop at `ntok`. The
epilogue: y = float(acc - corr[j]) · scale[j], then the Linear epilogues (bias,
activation, residual), where corr[j] = zero point · Σ_k W[k, j] undoes the activations'
zero point exactly. With `requantize` (a QLinearMatMul's output, dequantized), y is first
clamped to the output type's range, rounded half to even and scaled by the output's
scale, all in float32 as ONNX Runtime and ops.qlinear_matmul do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .epilogue import ACTIVATIONS, epilogue
from .ir import Builder, Signature, f32
from .lowp_ir import quantized
from .sparse_ir import tail_vectors

SIGNATURE = Signature("int8_rows", (
    ("xq", "ptr"), ("tp", "i64"), ("indptr", "ptr"), ("split", "ptr"), ("blocks", "ptr"), ("weights", "ptr"),
    ("corr", "ptr"),
    ("scale", "ptr"), ("bias", "ptr"), ("requant", "ptr"), ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"),
    ("ldr", "i64"), ("j0", "i64"), ("j1", "i64"), ("ntok", "i64")))
LANES = 16  # tokens per 64 bytes of xq (one i32 of 4 uint8 each); the token count is padded to it

DOTS = {"vnni": 16, "pmaddwd": 8, "generic": 16}  # how a 4-block's dot products are made → i32 lanes


@dataclass(frozen=True)
class Int8Config:
    activation: str = "none"  # a key of epilogue.ACTIVATIONS
    residual: bool = False
    dot: str = "vnni"         # a key of DOTS
    vectors: int = 8          # accumulators per token tile
    requantize: bool = False  # the scaled sums requantized and dequantized before the bias
    # pmaddwd: each row's blocks [indptr[j], split[j]) cannot saturate int16 pairs, so
    # `vpmaddubsw` does their products in half the instructions (see _dot4_pairs)
    pairs_first: bool = False
    # without residual: y quantized per output as QuantizeLinear does, on rt[4j: 4j + 4]
    # ([scale, zero point, lowest, highest]), stored as bytes: yt's row j of floats holds
    # row j's bytes (yt is a buffer of bytes with rows `ldy` floats apart)
    bytes_out: bool = False

    @property
    def lanes(self) -> int:
        return DOTS[self.dot]


def _dot4(e: Builder, cfg: Int8Config, acc: str, a: str, ws: list[str]) -> str:
    """acc + per lane Σ_i a.byte[i] (unsigned) · w.byte[i] (signed), ws from _block_weights."""
    iv = f"<{e.lanes} x i32>"
    if cfg.dot == "vnni":
        return e.call("llvm.x86.avx512.vpdpbusd.512", iv, (iv, acc), (iv, a), (iv, ws[0]))
    if cfg.dot == "pmaddwd":
        hv = f"<{2 * e.lanes} x i16>"
        a16 = e(f"bitcast {iv} {a} to {hv}")
        even = e(f"and {hv} {a16}, <{', '.join(['i16 255'] * 2 * e.lanes)}>")  # bytes 0, 2 as 16-bit pairs
        odd = e(f"lshr {hv} {a16}, <{', '.join(['i16 8'] * 2 * e.lanes)}>")   # bytes 1, 3
        for half, w in zip((even, odd), ws):
            acc = e(f"add {iv} {acc}, {e.call('llvm.x86.avx2.pmadd.wd', iv, (hv, half), (hv, w))}")
        return acc
    for i, wi in enumerate(ws):
        shifted = e(f"lshr {iv} {a}, {e.splat_i32(8 * i)}") if i else a
        byte = e(f"and {iv} {shifted}, {e.splat_i32(255)}")
        acc = e(f"add {iv} {acc}, {e(f'mul {iv} {byte}, {wi}')}")
    return acc


PAIR_LIMIT = 128  # |w0| + |w1| ≤ this: 255 · 128 = 32640 fits int16, so vpmaddubsw cannot saturate


def _dot4_pairs(e: Builder, acc: str, a: str, packed: str) -> str:
    """acc + per lane Σ_i a.byte[i] · w.byte[i] for a block whose byte pairs (0, 1) and
    (2, 3) have |w0| + |w1| ≤ PAIR_LIMIT: `vpmaddubsw` adds each pair's products in int16,
    exactly (no pair can pass 32640), and `vpmaddwd` by ones adds the two pairs in int32."""
    iv, bv, hv = f"<{e.lanes} x i32>", f"<{4 * e.lanes} x i8>", f"<{2 * e.lanes} x i16>"
    a8, w8 = e(f"bitcast {iv} {a} to {bv}"), e(f"bitcast {iv} {e.splat_i32(packed)} to {bv}")
    pairs = e.call("llvm.x86.avx2.pmadd.ub.sw", hv, (bv, a8), (bv, w8))
    ones = f"<{', '.join(['i16 1'] * 2 * e.lanes)}>"
    return e(f"add {iv} {acc}, {e.call('llvm.x86.avx2.pmadd.wd', iv, (hv, pairs), (hv, ones))}")


def _block_weights(e: Builder, cfg: Int8Config, packed: str) -> list[str]:
    """The block's weights as _dot4 takes them: its i32 broadcast (vnni); its bytes 0, 2
    and 1, 3 sign-extended to 16-bit pairs, broadcast (pmaddwd); its four bytes, each
    sign-extended and broadcast (generic)."""
    if cfg.dot == "vnni":
        return [e.splat_i32(packed)]
    if cfg.dot == "pmaddwd":
        iv, hv = f"<{e.lanes} x i32>", f"<{2 * e.lanes} x i16>"
        w16 = e(f"bitcast {iv} {e.splat_i32(packed)} to {hv}")
        eight = f"<{', '.join(['i16 8'] * 2 * e.lanes)}>"
        return [e(f"ashr {hv} {e(f'shl {hv} {w16}, {eight}')}, {eight}"), e(f"ashr {hv} {w16}, {eight}")]
    ws = []
    for i in range(4):
        byte = e(f"trunc i32 {e(f'lshr i32 {packed}, {8 * i}') if i else packed} to i8")
        ws.append(e.splat_i32(e(f"sext i8 {byte} to i32")))
    return ws


def _tile(e: Builder, cfg: Int8Config, j: str, t: str, vectors: int) -> None:
    """Row j, tokens [t, t + lanes·vectors): the stored blocks' dot products, the epilogue."""
    iv = f"<{e.lanes} x i32>"
    p0 = e(f"load i64, ptr {e.gep('%indptr', j, 'i64')}, align 8")
    p1 = e(f"load i64, ptr {e.gep('%indptr', e(f'add i64 {j}, 1'), 'i64')}, align 8")

    def block(p, accs, pairs=False):
        at = e.gep("%blocks", p, "i16")
        k4 = e(f"zext i16 {e(f'load i16, ptr {at}, align 2')} to i64")
        packed = e(f"load i32, ptr {e.gep('%weights', p, 'i32')}, align 4")
        ws = None if pairs else _block_weights(e, cfg, packed)
        start = e(f"add i64 {e(f'mul i64 {k4}, %tp')}, {t}")  # in 4-byte units: one i32 per token
        out = []
        for u, acc in enumerate(accs):
            ptr = e.gep("%xq", e(f"add i64 {start}, {e.lanes * u}") if u else start, "i32")
            a = e(f"load {iv}, ptr {ptr}, align 4")
            out.append(_dot4_pairs(e, acc, a, packed) if pairs else _dot4(e, cfg, acc, a, ws))
        return out

    accs = ["zeroinitializer"] * vectors
    if cfg.pairs_first:  # the blocks vpmaddubsw takes exactly, then the rest
        ps = e(f"load i64, ptr {e.gep('%split', j, 'i64')}, align 8")
        _, accs = e.loop(p0, ps, 1, [(iv, a) for a in accs], lambda p, c: block(p, c, pairs=True))
        p0 = ps
    _, accs = e.loop(p0, p1, 1, [(iv, a) for a in accs], block)
    corr = e.splat_i32(e(f"load i32, ptr {e.gep('%corr', j, 'i32')}, align 4"))
    scale = e.splat(e(f"load float, ptr {e.gep('%scale', j)}, align 4"))
    bias = e.splat(e(f"load float, ptr {e.gep('%bias', j)}, align 4"))
    if cfg.requantize:  # requant[4j: 4j + 3]: the output scale, its lowest and highest value less its zero point
        at = e(f"mul i64 {j}, 4")
        sy, lo, hi = (e.splat(e(f"load float, ptr {e.gep('%requant', e(f'add i64 {at}, {i}'))}, align 4"))
                      for i in range(3))
    masks = e.lane_masks(t, vectors, "%ntok")
    ystart, rstart = e.offset(j, "%ldy", t), e.offset(j, "%ldr", t) if cfg.residual else None
    if cfg.bytes_out:
        at = e(f"mul i64 {j}, 4")
        grid = [e.splat(e(f"load float, ptr {e.gep('%rt', e(f'add i64 {at}, {i}') if i else at)}, align 4"))
                for i in range(4)]
        ystart = e.offset(j, e("shl i64 %ldy, 2"), t)  # (in bytes)
    for u, (acc, mask) in enumerate(zip(accs, masks)):
        y = e(f"sitofp {iv} {e(f'sub {iv} {acc}, {corr}')} to {e.vt}")
        y = e(f"fmul {e.vt} {y}, {scale}")
        if cfg.requantize:  # (a multiply, then an add: the graph's DequantizeLinear, then its Add)
            y = e(f"fmul {e.vt} {e.vcall('roundeven', e.vcall('minnum', e.vcall('maxnum', y, lo), hi))}, {sy}")
        y = e(f"fadd {e.vt} {y}, {bias}")
        if cfg.bytes_out:
            _store_bytes(e, quantized(e, epilogue(e, cfg.activation, y), *grid), e.vptr("%yt", ystart, u, "i8"), mask)
            continue
        residual = e.vptr("%rt", rstart, u) if cfg.residual else None
        e.vstore(epilogue(e, cfg.activation, y, residual, mask), e.vptr("%yt", ystart, u), mask)


def _store_bytes(e: Builder, q: str, ptr: str, mask: str | None) -> None:
    """The float vector q of quantized values (lowp_ir.quantized's) stored as bytes at ptr."""
    L = e.lanes
    b = e(f"trunc <{L} x i32> {e(f'fptosi {e.vt} {q} to <{L} x i32>')} to <{L} x i8>")
    if mask is None:
        e.raw(f"  store <{L} x i8> {b}, ptr {ptr}, align 1")
    else:
        e.call(f"llvm.masked.store.v{L}i8.p0", "void", (f"<{L} x i8>", b), ("ptr", ptr), ("i32", "1"),
               (f"<{L} x i1>", mask))


def _rows(e: Builder, cfg: Int8Config) -> None:
    """Whole tiles of `vectors` vectors, then of halving widths, with plain stores (a
    masked store is microcoded on AMD: with one per vector, the epilogue cost more than the
    dot products); then the last tokens, under one vector, masked. Each pass over the rows
    streams all their weights."""
    def rows(start, vectors, end):
        def tile(t, _):
            e.loop("%j0", "%j1", 1, [], lambda j, _c: _tile(e, cfg, j, t, vectors) or [])
            return []
        return e.loop(start, end, e.lanes * vectors, [], tile)[0]

    e.full_to.append("%ntok")
    t = rows("0", cfg.vectors, "%ntok")
    for v in tail_vectors(cfg.vectors):
        t = rows(t, v, "%ntok")
    e.full_to.pop()
    e.cond_br(e(f"icmp slt i64 {t}, %ntok"), "last", "done")
    e.label("last")
    rows(t, 1, e(f"add i64 {t}, {e.lanes}"))  # reads padding up to tp, stores stop at ntok
    e.br("done")
    e.label("done")


# (grid: [scale, zero point, lowest, highest] as float32 in memory, the model's or a dynamic
# x's, which `grid_ir` writes for each call: so a taped call reads the new one)
QUANTIZE_SIGNATURE = Signature("quantize_rows", (
    ("xt", "ptr"), ("ldx", "i64"), ("xq", "ptr"), ("tp", "i64"), ("k", "i64"), ("grid", "ptr"),
    ("k4_0", "i64"), ("k4_1", "i64"), ("ntok", "i64")))


def _load_grid(e: Builder) -> None:
    """%scale, %zero, %lo and %hi loaded from %grid."""
    for i, name in enumerate(("scale", "zero", "lo", "hi")):
        e.raw(f"  %{name} = load float, ptr {e.gep('%grid', str(i))}, align 4")


def _quantize(e: Builder) -> None:
    """xq[k4, t] = the four uint8 q(k, t) of inputs k = 4·k4 .. 4·k4 + 3, packed in an i32:
    q = clamp(roundeven(x / scale) + zero, lo, hi) - lo. Past the last input (a 4-block
    the weights pad with zeros) and past the last token (lanes the int8 kernel never
    stores) it writes 0 and whatever its masked loads give. Whole vectors of tokens and
    whole 4-blocks are read with plain loads."""
    iv, vt = f"<{e.lanes} x i32>", e.vt
    _load_grid(e)
    scale, zero, lo, hi = (e.splat(v) for v in ("%scale", "%zero", "%lo", "%hi"))
    lo_i = e(f"fptosi {vt} {lo} to {iv}")

    def tile(k4, t, checked):
        (mask,) = e.lane_masks(t, 1, "%ntok")
        packed = None
        for i in range(4):
            k = e(f"add i64 {e(f'mul i64 {k4}, 4')}, {i}")
            inside = e(f"icmp slt i64 {k}, %k") if checked else None
            at = e.offset(e(f"select i1 {inside}, i64 {k}, i64 0") if checked else k, "%ldx", t)
            q = quantized(e, e.vload(e.gep("%xt", at), mask), scale, zero, lo, hi)
            q = e(f"sub {iv} {e(f'fptosi {vt} {q} to {iv}')}, {lo_i}")
            if checked:
                q = e(f"select i1 {inside}, {iv} {q}, {iv} zeroinitializer")
            q = e(f"shl {iv} {q}, {e.splat_i32(8 * i)}") if i else q
            packed = e(f"or {iv} {packed}, {q}") if packed else q
        e.raw(f"  store {iv} {packed}, ptr {e.gep('%xq', e.offset(k4, '%tp', t), 'i32')}, align 4")

    def blocks(k4_0, k4_1, checked):
        return e.loop(k4_0, k4_1, 1, [], lambda k4, _: e.tiles("0", "%ntok", e.lanes,
                                                                 lambda t: tile(k4, t, checked)) or [])[0]

    whole = e("sdiv i64 %k, 4")
    k4 = blocks("%k4_0", e(f"select i1 {e(f'icmp slt i64 %k4_1, {whole}')}, i64 %k4_1, i64 {whole}"), False)
    blocks(k4, "%k4_1", True)  # (k4: where the first loop stopped, at least k4_0)


@functools.cache  # (the same text for every layer of a configuration: made once)
def quantize_ir(lanes: int) -> str:
    e = Builder(lanes)
    e.function(QUANTIZE_SIGNATURE, lambda: _quantize(e))
    return e.module("; sparsejit generated kernel: float xt quantized to uint8 and packed four inputs to an i32\n"
                    "; xq[k4, t].byte[i] = clamp(roundeven(xt[4 k4 + i, t] / scale) + zero, lo, hi) - lo")


QUANTIZE_FLOAT_SIGNATURE = Signature("quantize_float_rows", (
    ("xt", "ptr"), ("ldx", "i64"), ("xf", "ptr"), ("ldf", "i64"), ("grid", "ptr"), ("k0", "i64"), ("k1", "i64"),
    ("ntok", "i64")))


@functools.cache  # (the same text for every layer of a configuration: made once)
def quantize_float_ir(lanes: int) -> str:
    """xf[k, t] = clamp(roundeven(xt[k, t] / scale) + zero, lo, hi) - zero for rows [k0, k1),
    the grid's: x quantized as _quantize does, kept as the float of q - zero point
    (int8.Int8OnFloat)."""
    e = Builder(lanes)
    vt = e.vt

    def body():
        _load_grid(e)
        scale, zero, lo, hi = (e.splat(v) for v in ("%scale", "%zero", "%lo", "%hi"))

        def tile(k, t):
            (mask,) = e.lane_masks(t, 1, "%ntok")
            q = quantized(e, e.vload(e.gep("%xt", e.offset(k, "%ldx", t)), mask), scale, zero, lo, hi)
            e.vstore(e(f"fsub {vt} {q}, {zero}"), e.gep("%xf", e.offset(k, "%ldf", t)), mask)

        e.loop("%k0", "%k1", 1, [], lambda k, _: e.tiles("0", "%ntok", lanes, lambda t: tile(k, t)) or [])

    e.function(QUANTIZE_FLOAT_SIGNATURE, body)
    return e.module("; sparsejit generated kernel: float xt quantized, kept as floats q - zero point\n"
                    "; xf[k, t] = clamp(roundeven(xt[k, t] / scale) + zero, lo, hi) - zero")


RANGE_SIGNATURE = Signature("range_rows", (("xt", "ptr"), ("ldx", "i64"), ("k0", "i64"), ("k1", "i64"),
                                           ("ntok", "i64"), ("out", "ptr")))


def _range(e: Builder) -> None:
    """out[0:lanes] = per lane the minimum of 0 and xt[k0:k1, :ntok], out[lanes:2·lanes]
    the maximum; NaN in the minimum if any x is NaN, as numpy's min gives. The minimum is
    a compare and select (one vminps; `llvm.minimum`, which keeps NaN itself, expands to
    several instructions on x86, each one step of the loop's dependency chain)."""
    vt, L = e.vt, e.lanes
    iota = f"<{', '.join(f'i64 {i}' for i in range(L))}>"
    carried = [(vt, "zeroinitializer")] * 2 + [(f"<{L} x i1>", "zeroinitializer")]

    def row(k, acc):
        def vector(t, acc, mask=None):
            x = e.vload(e.gep("%xt", e.offset(k, "%ldx", t)), mask)
            lo = e(f"select <{L} x i1> {e(f'fcmp olt {vt} {x}, {acc[0]}')}, {vt} {x}, {vt} {acc[0]}")
            hi = e(f"select <{L} x i1> {e(f'fcmp ogt {vt} {x}, {acc[1]}')}, {vt} {x}, {vt} {acc[1]}")
            return [lo, hi, e(f"or <{L} x i1> {acc[2]}, {e(f'fcmp uno {vt} {x}, {x}')}")]

        t, acc = e.loop("0", "%ntok", L, list(zip([ty for ty, _ in carried], acc)), vector)
        # the last tokens, under one vector: masked lanes load 0, inside the range already
        mask = e(f"icmp slt <{L} x i64> {e(f'add <{L} x i64> {e.splat_i64(t)}, {iota}')}, {e.splat_i64('%ntok')}")
        return vector(t, acc, mask)

    _, (lo, hi, nan) = e.loop("%k0", "%k1", 1, carried, row)
    e.vstore(e(f"select <{L} x i1> {nan}, {vt} {e.const(float('nan'))}, {vt} {lo}"), "%out", None)
    e.vstore(hi, e.gep("%out", str(L)), None)


@functools.cache  # (the same text for every layer of a configuration: made once)
def range_ir(lanes: int) -> str:
    e = Builder(lanes)
    e.function(RANGE_SIGNATURE, lambda: _range(e))
    return e.module("; sparsejit generated kernel: the range of xt, for DynamicQuantizeLinear's scale\n"
                    "; out = (per lane min(0, xt[k0:k1, :ntok]), per lane max(0, xt[k0:k1, :ntok]))")


GRID_SIGNATURE = Signature("dynamic_grid", (
    ("ranges", "ptr"), ("parts", "i64"), ("kbias", "ptr"), ("nb", "i64"), ("m", "i64"), ("wscale", "ptr"),
    ("colsum", "ptr"), ("corr", "i64"), ("terms", "ptr"), ("grid", "ptr"), ("bad", "ptr")))


def _grid(e: Builder) -> None:
    """A dynamic x's grid from the range kernel's parts (`ranges`: per part its vector of
    lows, then of highs), in float32 as ops.range_scale computes it: lo = min(0, lows),
    hi = max(0, highs), scale = (hi - lo, or 1 where they are equal) / 255, zero point
    roundeven(clamp(0 - lo / scale, 0, 255)); grid = [scale, zero point, 0, 255]. Then the
    epilogue's terms for it: kbias[0:nb] copied, terms[m + j] = scale · wscale[j] and
    (`corr` not 0) the i32 terms[2m + j] = zero point · colsum[j]. bad[0] = 1 where a range
    is NaN or infinite (the call is an error; its grid is then [1, 0, 0, 255]), else 0."""
    vt, L = e.vt, e.lanes
    bt = f"<{L} x i1>"

    def part(p, acc):
        at = e(f"mul i64 {p}, {2 * L}")
        lo = e.vload(e.gep("%ranges", at), None)
        hi = e.vload(e.gep("%ranges", e(f"add i64 {at}, {L}")), None)
        bad = acc[2]
        for v in (lo, hi):  # (x - x is NaN where x is NaN or infinite)
            d = e(f"fsub {vt} {v}, {v}")
            bad = e(f"or {bt} {bad}, {e(f'fcmp uno {vt} {d}, zeroinitializer')}")
        lo = e(f"select {bt} {e(f'fcmp olt {vt} {lo}, {acc[0]}')}, {vt} {lo}, {vt} {acc[0]}")
        hi = e(f"select {bt} {e(f'fcmp ogt {vt} {hi}, {acc[1]}')}, {vt} {hi}, {vt} {acc[1]}")
        return [lo, hi, bad]

    _, (lows, highs, bads) = e.loop("0", "%parts", 1, [(vt, "zeroinitializer")] * 2 + [(bt, "zeroinitializer")],
                                    part)
    lo = e.call(f"llvm.vector.reduce.fmin.v{L}f32", "float", (vt, lows))
    hi = e.call(f"llvm.vector.reduce.fmax.v{L}f32", "float", (vt, highs))
    bad = e.call(f"llvm.vector.reduce.or.v{L}i1", "i1", (bt, bads))
    span = e(f"select i1 {e(f'fcmp oeq float {hi}, {lo}')}, float 1.0, float {e(f'fsub float {hi}, {lo}')}")
    scale = e(f"fdiv float {span}, {f32(255)}")
    zero = e(f"fsub float 0.0, {e(f'fdiv float {lo}, {scale}')}")
    zero = e.call("llvm.minimum.f32", "float", ("float", e.call("llvm.maximum.f32", "float", ("float", zero),
                                                                 ("float", "0.0"))), ("float", f32(255)))
    zero = e.call("llvm.roundeven.f32", "float", ("float", zero))
    scale = e(f"select i1 {bad}, float 1.0, float {scale}")
    zero = e(f"select i1 {bad}, float 0.0, float {zero}")
    for i, v in enumerate((scale, zero, "0.0", f32(255))):
        e.raw(f"  store float {v}, ptr {e.gep('%grid', str(i))}, align 4")
    e.raw(f"  store i64 {e(f'zext i1 {bad} to i64')}, ptr %bad, align 8")

    def copy(i, _):
        v = e(f"load i32, ptr {e.gep('%kbias', i, 'i32')}, align 4")
        e.raw(f"  store i32 {v}, ptr {e.gep('%terms', i, 'i32')}, align 4")
        return []

    e.loop("0", "%nb", 1, [], copy)

    def mult(j, _):
        w = e(f"load float, ptr {e.gep('%wscale', j)}, align 4")
        e.raw(f"  store float {e(f'fmul float {scale}, {w}')}, ptr {e.gep('%terms', e(f'add i64 %m, {j}'))}, align 4")
        return []

    e.loop("0", "%m", 1, [], mult)
    zi = e.call("llvm.fptosi.sat.i32.f32", "i32", ("float", zero))
    rows = e(f"select i1 {e('icmp ne i64 %corr, 0')}, i64 %m, i64 0")

    def corr(j, _):
        c = e(f"load i32, ptr {e.gep('%colsum', j, 'i32')}, align 4")
        at = e(f"add i64 {e('mul i64 %m, 2')}, {j}")
        e.raw(f"  store i32 {e(f'mul i32 {zi}, {c}')}, ptr {e.gep('%terms', at, 'i32')}, align 4")
        return []

    e.loop("0", rows, 1, [], corr)


@functools.cache  # (the same text for every lane count: made once)
def grid_ir(lanes: int) -> str:
    e = Builder(lanes)
    e.function(GRID_SIGNATURE, lambda: _grid(e))
    return e.module("; sparsejit generated kernel: a dynamic x's quantization grid and the int8 epilogue's terms\n"
                    "; scale = (max(0, x) - min(0, x), or 1) / 255, zero = roundeven(clamp(-min(0, x) / scale, 0, 255))\n"
                    "; terms = kbias, with terms[m + j] = scale * wscale[j], terms[2m + j] = i32(zero) * colsum[j]")


@functools.cache  # (the same text for every layer of a configuration: made once)
def int8_ir(cfg: Int8Config) -> str:
    if cfg.activation not in ACTIVATIONS or cfg.dot not in DOTS or cfg.pairs_first and cfg.dot != "pmaddwd" or \
            cfg.bytes_out and cfg.residual:
        raise ValueError(f"no int8 kernel for {cfg}")
    e = Builder(cfg.lanes)
    e.function(SIGNATURE, lambda: _rows(e, cfg))
    scaled = "float(sum over row j's stored 4-blocks b: xq[b, t] . w[b] - corr[j]) * scale[j]"
    if cfg.requantize:
        scaled = f"roundeven(clamp({scaled}, requant[4j + 1], requant[4j + 2])) * requant[4j]"
    y = f"act({scaled} + bias[j]){' + rt[j, t]' if cfg.residual else ''}"
    if cfg.bytes_out:
        y = f"bytes of quantized({y}, scale rt[4j], zero point rt[4j + 1], lowest rt[4j + 2], highest rt[4j + 3])"
    return e.module(f"; sparsejit generated kernel: int8 activation={cfg.activation} residual={cfg.residual} "
                    f"dot={cfg.dot} vectors={cfg.vectors} requantize={cfg.requantize} pairs_first={cfg.pairs_first}"
                    f"{' bytes_out' if cfg.bytes_out else ''}\n; yt[j, t] = {y}")
