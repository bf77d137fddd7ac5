"""The int8 sparse Linear kernel with outputs in the vector lanes, as LLVM IR (AVX-512 VNNI
and VBMI: `vpdpbusd`, `vpermi2b`).

Why: the 4-block kernel (sparse_ir's `int8`) adds one stored 4-block of weights to 16
tokens per `vpdpbusd`, and unstructured pruning leaves most kept blocks with one nonzero
of four (90%: 34% of the blocks hold a nonzero, 1.16 nonzeros each). Here each i32 lane
is one output, and its four bytes are four *nonzeros* of that output, wherever they are
in a window of 128 inputs: per token, `vpermi2b` gathers the 64 bytes of x that 16 outputs
× 4 nonzeros read from the token's 128 bytes of the window (two registers), and one
`vpdpbusd` adds the 64 products. The padding is now per output and window (a row's
nonzeros in a window rounded up to the slots of its group of 16 rows), not per 4-block.
What was measured: bench/README.md (seventeenth session).

Layout:
- xq: x quantized, in the 4-block rows every int8 kernel reads ([in/4, tokens] of i32,
  row stride `ldx` in i32, int8.py's quantize kernel, a LayerNorm's bytes), so that every
  producer of x's bytes serves this kernel too. Each tile of TOKENS tokens is first copied,
  transposed, into `scratch` ([T, kp4] of i32: token t's bytes in order, 128-byte windows).
- Weights, by groups of 16 consecutive outputs and windows of 128 inputs: `starts`
  [groups · windows + 1] (i32) the first slot of each (group, window); per slot, `idx` 64
  bytes (lane i's four input offsets in the window) and `w` 64 int8 (the weights; 0 in
  the padding, whose offsets are 0).
- Epilogue: int8.Int8Linear's (lowp_ir.scaled_sums) with the outputs in the lanes: the i32
  sums less the zero point's correction, times the output scale (requantized, for a
  QLinearMatMul's output, as int8_ir's epilogue does), plus the bias
  (`terms`: [bias | scale | correction] by output, then with requantize its output scale,
  lowest and highest value by output, then with quant_out the next layer's grid, or with
  bytes_out a QuantizeLinear grid by output: _store_bytes), the
  activation, transposed to rows of 8 tokens, plus the residual, into yᵀ. Each output is computed with the same float
  operations in the same order as there, so the two kernels agree bit for bit.

A part computes groups [g0, g1) for tokens [t0, t1); out_features is a multiple of 16.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .epilogue import ACTIVATIONS
from .ir import Builder, Signature
from .lowp_ir import quantized

WINDOW = 128  # inputs per window: the bytes two registers hold, what `vpermi2b` selects from
GROUP = 16    # outputs per group: the i32 lanes of a 512-bit register
TOKENS = 8    # tokens per tile: 2 registers of x each, and an accumulator (26 of the 32 registers)

SIGNATURE = Signature("int8_lanes", (
    ("xq", "ptr"), ("ldx", "i64"), ("k4", "i64"), ("starts", "ptr"), ("idx", "ptr"), ("w", "ptr"),
    ("terms", "ptr"), ("m", "i64"), ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"), ("ldr", "i64"),
    ("scratch", "ptr"), ("kp4", "i64"), ("nw", "i64"), ("g0", "i64"), ("g1", "i64"), ("t0", "i64"),
    ("t1", "i64")))

PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"
DOT = "llvm.x86.avx512.vpdpbusd.512"
IV, BV = "<16 x i32>", "<64 x i8>"


@dataclass(frozen=True)
class LanesConfig:
    activation: str = "none"  # a key of epilogue.ACTIVATIONS
    residual: bool = False
    quant_out: bool = False   # without residual: y quantized for the next int8 layer into rt (_store_quantized)
    requantize: bool = False  # the scaled sums requantized and dequantized before the bias (int8_ir's)
    bytes_out: bool = False   # without residual: y quantized per output (QuantizeLinear) into yᵀ's bytes (_store_bytes)


def _transpose8(e: Builder, ty: str, rows: list[str]) -> list[str]:
    """The 8 × 8 transpose of eight <8 x ty> rows: column j as a vector, for j = 0..7
    (unpack, shuffle, then 128-bit lane swaps: AVX's 24-shuffle transpose)."""
    vt = f"<8 x {ty}>"

    def shuf(a, b, idx):
        return e(f"shufflevector {vt} {a}, {vt} {b}, <8 x i32> <{', '.join(f'i32 {i}' for i in idx)}>")

    lo, hi = (0, 8, 1, 9, 4, 12, 5, 13), (2, 10, 3, 11, 6, 14, 7, 15)
    t = [shuf(rows[2 * k], rows[2 * k + 1], idx) for k in range(4) for idx in (lo, hi)]  # t0, t1 from r0, r1; ...
    first, second = (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15)
    # tt0..3 from (t0, t2), (t1, t3); tt4..7 the same from rows 4..7
    tt = [shuf(t[4 * h + p], t[4 * h + 2 + p], idx) for h in range(2) for p in range(2) for idx in (first, second)]
    low, high = (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15)
    cols = [None] * 8
    for j in range(4):
        cols[j] = shuf(tt[j], tt[4 + j], low)
        cols[4 + j] = shuf(tt[j], tt[4 + j], high)
    return cols


def _token_mask(e: Builder, t: str) -> str | None:
    """Lane i on when token t + i < t1 (None inside the whole tiles)."""
    if "%t1" in e.full_to:
        return None
    iota = "<" + ", ".join(f"i64 {i}" for i in range(TOKENS)) + ">"
    one = e(f"insertelement <{TOKENS} x i64> poison, i64 {t}, i32 0")
    base = e(f"shufflevector <{TOKENS} x i64> {one}, <{TOKENS} x i64> poison, <{TOKENS} x i32> zeroinitializer")
    one = e(f"insertelement <{TOKENS} x i64> poison, i64 %t1, i32 0")
    end = e(f"shufflevector <{TOKENS} x i64> {one}, <{TOKENS} x i64> poison, <{TOKENS} x i32> zeroinitializer")
    return e(f"icmp slt <{TOKENS} x i64> {e(f'add <{TOKENS} x i64> {base}, {iota}')}, {end}")


def _load8(e: Builder, ty: str, ptr: str, mask: str | None) -> str:
    vt = f"<8 x {ty}>"
    if mask is None:
        return e(f"load {vt}, ptr {ptr}, align 4")
    return e.call(f"llvm.masked.load.v8{'i32' if ty == 'i32' else 'f32'}.p0", vt, ("ptr", ptr), ("i32", "4"),
                  ("<8 x i1>", mask), (vt, "zeroinitializer"))


def _store8(e: Builder, ty: str, value: str, ptr: str, mask: str | None) -> None:
    vt = f"<8 x {ty}>"
    if mask is None:
        e.raw(f"  store {vt} {value}, ptr {ptr}, align 4")
    else:
        e.call(f"llvm.masked.store.v8{'i32' if ty == 'i32' else 'f32'}.p0", "void", (vt, value), ("ptr", ptr),
               ("i32", "4"), ("<8 x i1>", mask))


def _scratch(e: Builder, t: str, mask: str | None) -> None:
    """The tile's x bytes, token-major: scratch[j · kp4 + r] = xq[r, t + j] (i32 of 4 bytes),
    8 rows of xq at a time through an 8 × 8 transpose, then the rows left one by one."""
    def rows8(r, _):
        rows = [_load8(e, "i32", e.gep("%xq", e.offset(e(f"add i64 {r}, {i}") if i else r, "%ldx", t), "i32"), mask)
                for i in range(8)]
        for j, col in enumerate(_transpose8(e, "i32", rows)):
            _store8(e, "i32", col, e.gep("%scratch", e.offset(str(j), "%kp4", r), "i32"), None)
        return []

    start, _ = e.loop("0", "%k4", 8, [], rows8)

    def row1(r, _):
        v = _load8(e, "i32", e.gep("%xq", e.offset(r, "%ldx", t), "i32"), mask)
        for j in range(TOKENS):
            e.raw(f"  store i32 {e(f'extractelement <8 x i32> {v}, i32 {j}')}, "
                  f"ptr {e.gep('%scratch', e.offset(str(j), '%kp4', r), 'i32')}, align 4")
        return []

    e.loop(start, "%k4", 1, [], row1)


def _sums(e: Builder, g: str) -> list[str]:
    """Group g's i32 sums (as <16 x i32>) for the tile's tokens, from the scratch."""
    def window(win, accs):
        xs = []
        for j in range(TOKENS):
            at = e.offset(str(j), e("mul i64 %kp4, 4"), e(f"mul i64 {win}, {WINDOW}"))
            xs.append([e(f"load {BV}, ptr {e.gep('%scratch', e(f'add i64 {at}, {64 * h}') if h else at, 'i8')}, "
                         "align 64") for h in range(2)])
        gw = e.offset(g, "%nw", win)
        s0, s1 = (e(f"sext i32 {e(f'load i32, ptr {p}, align 4')} to i64")
                  for p in (e.gep("%starts", gw, "i32"), e.gep("%starts", e(f"add i64 {gw}, 1"), "i32")))

        def slot(s, accs):
            at = e(f"mul i64 {s}, 64")
            sel = e(f"load {BV}, ptr {e.gep('%idx', at, 'i8')}, align 64")
            w = e(f"load {IV}, ptr {e.gep('%w', at, 'i8')}, align 64")
            out = []
            for j in range(TOKENS):
                x = e.call(PERMUTE, BV, (BV, xs[j][0]), (BV, sel), (BV, xs[j][1]))
                out.append(e.call(DOT, IV, (IV, accs[j]), (IV, e(f"bitcast {BV} {x} to {IV}")), (IV, w)))
            return out

        return e.loop(s0, s1, 1, [(IV, a) for a in accs], slot)[1]

    return e.loop("0", "%nw", 1, [(IV, "zeroinitializer")] * TOKENS, window)[1]


def _epilogue(e: Builder, cfg: LanesConfig, g: str, t: str, sums: list[str], mask: str | None) -> None:
    """Group g's outputs for the tile: scaled as lowp_ir.scaled_sums does (lanes are
    outputs here), the activation, then by output row: the residual, the store."""
    vt = e.vt
    j0 = e(f"mul i64 {g}, {16}")
    bias = e(f"load {vt}, ptr {e.gep('%terms', j0)}, align 4")
    scale = e(f"load {vt}, ptr {e.gep('%terms', e(f'add i64 {j0}, %m'))}, align 4")
    corr_at = e.gep("%terms", e(f"add i64 {j0}, {e('mul i64 %m, 2')}"), "i32")
    corr = e(f"load {IV}, ptr {corr_at}, align 4")
    if cfg.requantize:  # terms[3m ..], [4m ..], [5m ..]: the output scale, its lowest and highest value
        # less its zero point
        starts = [e(f"add i64 {j0}, {e(f'mul i64 %m, {3 + i}')}") for i in range(3)]
        sy, lo, hi = (e(f"load {vt}, ptr {e.gep('%terms', at)}, align 4") for at in starts)
    ys = []
    for acc in sums:
        v = e(f"sitofp {IV} {e(f'sub {IV} {acc}, {corr}')} to {vt}")
        v = e(f"fmul {vt} {v}, {scale}")
        if cfg.requantize:  # (as int8_ir's epilogue: a multiply, then an add)
            v = e(f"fmul {vt} {e.vcall('roundeven', e.vcall('minnum', e.vcall('maxnum', v, lo), hi))}, {sy}")
        ys.append(ACTIVATIONS[cfg.activation](e, e(f"fadd {vt} {v}, {bias}")))
    if cfg.quant_out:
        _store_quantized(e, ys, j0, t, mask)
        return
    if cfg.bytes_out:
        _store_bytes(e, ys, j0, t, mask, 6 if cfg.requantize else 3)
        return
    for h in range(2):  # outputs j0 .. j0 + 7, then j0 + 8 .. j0 + 15
        half = f"<8 x i32> <{', '.join(f'i32 {8 * h + i}' for i in range(8))}>"
        rows = [e(f"shufflevector {vt} {y}, {vt} poison, {half}") for y in ys]
        for i, col in enumerate(_transpose8(e, "float", rows)):
            j = e(f"add i64 {j0}, {8 * h + i}")
            if cfg.residual:
                col = e(f"fadd <8 x float> {col}, {_load8(e, 'float', e.gep('%rt', e.offset(j, '%ldr', t)), mask)}")
            _store8(e, "float", col, e.gep("%yt", e.offset(j, "%ldy", t)), mask)


def _store_bytes(e: Builder, ys: list[str], j0: str, t: str, mask: str | None, row: int) -> None:
    """The group's outputs as QuantizeLinear makes them, each output on its own grid
    (terms[row · m ..] to [(row + 3) · m ..]: scale, zero point, lowest, highest; after the
    requantizing rows, if any), stored as bytes in yᵀ: output j's row of tokens `ldy` · 4
    bytes apart (yᵀ's rows are float rows of a buffer that holds bytes)."""
    vt = e.vt
    starts = [e(f"add i64 {j0}, {e(f'mul i64 %m, {row + i}')}") for i in range(4)]
    grid = [e(f"load {vt}, ptr {e.gep('%terms', at)}, align 4") for at in starts]
    qs = [e(f"fptosi {vt} {quantized(e, y, *grid)} to {IV}") for y in ys]
    ld = e("shl i64 %ldy, 2")
    for h in range(2):  # outputs j0 .. j0 + 7, then j0 + 8 .. j0 + 15
        half = f"<8 x i32> <{', '.join(f'i32 {8 * h + i}' for i in range(8))}>"
        rows = [e(f"shufflevector {IV} {q}, {IV} poison, {half}") for q in qs]
        for i, col in enumerate(_transpose8(e, "i32", rows)):
            j = e(f"add i64 {j0}, {8 * h + i}")
            row = e(f"mul i64 {j}, {ld}")
            at = e(f"getelementptr i8, ptr %yt, i64 {e(f'add i64 {row}, {t}')}")
            b = e(f"trunc <8 x i32> {col} to <8 x i8>")
            if mask is None:
                e.raw(f"  store <8 x i8> {b}, ptr {at}, align 1")
            else:
                e.call("llvm.masked.store.v8i8.p0", "void", ("<8 x i8>", b), ("ptr", at), ("i32", "1"),
                       ("<8 x i1>", mask))


def _store_quantized(e: Builder, ys: list[str], j0: str, t: str, mask: str | None) -> None:
    """The group's outputs quantized as the next int8 layer quantizes its x (sparse_ir's
    _store_quantized: lowp_ir.quantized, less the lowest value, a byte; the grid is
    terms[3m .. 3m + 3]) and stored where that layer's kernel reads them: the 16 bytes of
    token t are the i32 of 4-block rows j0/4 .. j0/4 + 3 (rt's rows, stride `ldr` in i32)."""
    vt = e.vt
    at = e("mul i64 %m, 3")
    scale, zero, lo, hi = (e.splat(e(f"load float, ptr {e.gep('%terms', e(f'add i64 {at}, {i}') if i else at)}, "
                                     "align 4")) for i in range(4))
    words = []  # per token, its four i32 of bytes
    for y in ys:
        q = e(f"fptosi {vt} {e(f'fsub {vt} {quantized(e, y, scale, zero, lo, hi)}, {lo}')} to {IV}")
        words.append(e(f"bitcast <16 x i8> {e(f'trunc {IV} {q} to <16 x i8>')} to <4 x i32>"))
    n = 4
    while len(words) > 1:  # concatenated: element 4·token + row
        ty = f"<{n} x i32>"
        order = ", ".join(f"i32 {i}" for i in range(2 * n))
        words = [e(f"shufflevector {ty} {a}, {ty} {b}, <{2 * n} x i32> <{order}>") for a, b in zip(words[::2], words[1::2])]
        n *= 2
    row0 = e(f"lshr i64 {j0}, 2")
    for r in range(4):
        picked = ", ".join(f"i32 {4 * j + r}" for j in range(TOKENS))
        row = e(f"shufflevector <{n} x i32> {words[0]}, <{n} x i32> poison, <{TOKENS} x i32> <{picked}>")
        _store8(e, "i32", row, e.gep("%rt", e.offset(e(f"add i64 {row0}, {r}") if r else row0, "%ldr", t), "i32"), mask)


@functools.cache  # (the same text for every layer of a config: made once)
def lanes_ir(cfg: LanesConfig) -> str:
    e = Builder(16)

    def body():
        def tile(t):
            mask = _token_mask(e, t)
            _scratch(e, t, mask)

            def group(g, _):
                _epilogue(e, cfg, g, t, _sums(e, g), mask)
                return []

            e.loop("%g0", "%g1", 1, [], group)

        e.tiles("%t0", "%t1", TOKENS, tile)

    e.function(SIGNATURE, body)
    return e.module(f"; sparsejit generated kernel: int8 sparse Linear, 16 outputs in the lanes, x gathered by "
                    f"vpermi2b from {WINDOW}-input windows, {TOKENS} tokens a tile, activation={cfg.activation} "
                    f"residual={cfg.residual}{' quant_out' if cfg.quant_out else ''}{' requantize' if cfg.requantize else ''}"
                    f"{' bytes_out' if cfg.bytes_out else ''}\n"
                    "; yt[j, t] = act((sum_k xq[k, t] w[k, j] - corr[j]) * scale[j] + bias[j]) (+ rt[j, t])")
