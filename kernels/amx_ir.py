"""The dense Linear kernel on AMX tiles, as LLVM IR: int8 (`tdpbsud`) or bfloat16 (`tdpbf16ps`).

AMX multiplies whole tiles, 16 rows of 64 bytes each, held in eight tile registers
tmm0..tmm7. One `tdpbsud` adds to a 16 × 16 tile of i32 sums the products of a 16 × 64
tile of int8 (A) and a 16 × 64 tile of uint8 (B, read as 16 rows of 16 groups of four
bytes): 16 384 multiply-adds, where one AVX-512 `vpdpbusd` does 64. `tdpbf16ps` is the
same on bfloat16 pairs, summed in float32.

The kernel computes yᵀ, as every Linear kernel here does, so A is the weight and B the
activations, in the layouts the other int8 and bf16 kernels already use:

- B: the activations as 4-block rows xq [in/4, tokens] of i32 (int8: four uint8 inputs
  per token, int8.py), or pair rows [in/2, tokens] (bf16: two bfloat16 inputs per
  token, bf16.py). A B tile is 16 such rows (64 inputs, or 32) × 16 tokens, loaded with
  the rows' stride `ldq` (i32), tokens 16·i on `ldt` · i on: a feature-major xq's
  (ldt = 16), or layout.TokenTiles' (ldq = 16, each tile 1 KB in one piece). No
  repacking of x.
- A: the weight, packed at load into tiles wa[p, kt] = Wᵀ[16p .. 16p + 15, the inputs of
  K-tile kt] (16 output features × 64 bytes of their inputs), each 1 KB contiguous.
- C: tiles of yᵀ, 16 output features × 16 tokens, i32 (int8) or float (bf16).

Register blocking: two A tiles (32 output features) × two B tiles (32 tokens) make four
C tiles, four products per four tile loads. Each call walks output pairs of panels
[pair0, pair1), and for each, every 32 tokens (a last 16 with one B tile): the K-tiles'
products, then the C tiles stored to a 4 KB stack buffer and read back 16 tokens at a
time through the Linear epilogue: int8 as Int8Linear's (lowp_ir.scaled_sums: less the
zero point's correction, times the scale, plus the bias), bf16 plus the bias; then the
activation and residual (epilogue.py). Stores stop at `ntok` and at `m`. `overlapped`
(every layer's, amx.OVERLAPPED): a block's epilogue waits, and the next block's K-steps
each take a share of its 16 rows, spread evenly, so that its vector work runs while the
tiles multiply.

A weight under half nonzero may be stored compressed (`compressed`): per tile row a bit
per element, then the row's nonzero elements. Each thread expands a pair of panels once,
one `vpexpandb` or `vpexpandw` (AVX512-VBMI2, `llvm.masked.expandload`) per tile row, into
a buffer of its own (`work`, 2 KB per K-tile) that every token tile of the pair then reads:
in the pair's first token block, each K-step expanding the two tiles the next one loads,
so that the expansion's vector work runs beside the tile products, and its stores are
done before the tile loads read them.

Inputs are padded to whole K-tiles (zeros in the weight; the activations' padded rows
must be zero for bf16, where garbage bits times zero could be NaN), tokens to 16 (the
B tiles read the rows' padding, whose columns are never stored).

A tile configuration (palette 1, every tile 16 rows × 64 bytes) is loaded at each call
(`ldtilecfg`) and released at its end: tile state belongs to the thread. The process
must first be allowed AMX's tile data (amx.request_amx).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from .epilogue import ACTIVATIONS, epilogue
from .ir import Builder, Signature
from .lowp_ir import quantized, scaled_sums, store_block_bytes, store_pair_halves, unsigned_bytes

SIGNATURE = Signature("amx_panels", (
    ("xq", "ptr"), ("ldq", "i64"), ("wa", "ptr"), ("bias", "ptr"), ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"),
    ("ldr", "i64"), ("ktiles", "i64"), ("m", "i64"), ("pair0", "i64"), ("pair1", "i64"), ("ntok", "i64"),
    ("masks", "ptr"), ("offsets", "ptr"), ("work", "ptr"), ("ldt", "i64"), ("ldyt", "i64")))

DOTS = {"int8": "llvm.x86.tdpbsud", "bf16": "llvm.x86.tdpbf16ps"}  # C += A (signed) · B (unsigned) / bf16 pairs
K_TILE = {"int8": 64, "bf16": 32}  # inputs per 64-byte tile row
ROWS = 16                          # rows per tile: output features in A and C, i32 rows of x in B
TOKENS = 16                        # tokens per B and C tile (16 i32 columns)
TILE_BYTES = ROWS * 64
A0, B0 = 4, 6                      # tmm4, tmm5: weights; tmm6, tmm7: activations; tmm0..3: sums
# The K-steps load both operands' tiles with `tileloaddt1`, the load whose hint is that its
# lines need not stay in cache: x's rows stream through for every pair of panels, a pair's
# weight tiles for every token block. Layers alone took less time with it than with the
# plain load; in a model, as much or less (bench/README.md, thirty-fifth session).
TILE_LOAD = "llvm.x86.tileloaddt164"
# The compressed weights whose pair of panels prefetches the next pair's into L2 as it
# expands its own (_prefetch_tiles): in a model each layer's weights come from L3, and the
# expansion's loads would stall the next pair's first K-steps. int8 only: bf16 layers
# (twice the K-tiles, twice the bytes a nonzero) were slower with it (bench/README.md,
# thirty-seventh session).
PREFETCH_NEXT = ("int8",)


@dataclass(frozen=True)
class AmxConfig:
    dot: str = "int8"          # a key of DOTS
    activation: str = "none"   # a key of epilogue.ACTIVATIONS
    residual: bool = False
    # the weight tiles stored compressed (see _expanded_tile): a bit per element, then the
    # nonzero elements, expanded once per pair of panels into %work (AVX512-VBMI2's vpexpandb/w)
    compressed: bool = False
    # each block's epilogue run during the next block's tile products, its rows spread over
    # the K-steps (_waiting_rows): the epilogue's vector work beside the tiles' instead of
    # after them
    overlapped: bool = False
    # int8 without residual: y quantized for the next int8 layer and stored as the bytes it
    # reads, in 4-block rows (yt: [m/4, tokens] of i32, tokens 16·i on `ldyt` · i on), on
    # the grid after the epilogue's terms (%bias[3m:3m + 4]: scale, zero point, lowest,
    # highest), instead of y
    quant_out: bool = False
    # with quant_out, the grid's lowest value is 0 (uint8): its bytes by lowp_ir.unsigned_bytes
    unsigned_grid: bool = False
    # bf16 without residual: y rounded to bfloat16 and stored as the pair rows the next bf16
    # layer reads (yt: [m/2, tokens] of i32, tokens 16·i on `ldyt` · i on;
    # lowp_ir.store_pair_halves), instead of y
    pairs_out: bool = False
    # int8: the scaled sums requantized and dequantized before the bias, as int8_ir's
    # (a QLinearMatMul's output): %bias[3m + j], [4m + j], [5m + j] the output scale, its
    # type's lowest and highest value less its zero point
    requantize: bool = False


class _Out(NamedTuple):
    """Where _block leaves a block: the scratch its C tiles are stored to, and, overlapped,
    the slots of the waiting block's pair and t; with quant_out, the next layer's grid
    (scale, zero point, lowest, highest, splat)."""
    scratch: str
    waiting: str | None = None
    grid: tuple | None = None


def tile_config() -> str:
    """The 64-byte tile configuration: palette 1, tiles 0..7 each 16 rows × 64 bytes."""
    cfg = bytearray(64)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64   # colsb[t] (u16, little-endian)
        cfg[48 + t] = ROWS     # rows[t]
    return "".join(f"\\{b:02X}" for b in cfg)


def _expanded_tile(e: Builder, cfg: AmxConfig, tile: str, buffer: str) -> str:
    """Weight tile `tile` expanded into `buffer` (1 KB), which it returns: each row's
    elements from %masks[16·tile + r] (a bit per element: 64 int8, or 32 bf16) and the
    nonzero elements stored from byte %offsets[tile] of %wa, row after row."""
    bits = 64 if cfg.dot == "int8" else 32
    elem = "i8" if cfg.dot == "int8" else "i16"
    vt, mt = f"<{bits} x {elem}>", f"<{bits} x i1>"
    off = e(f"load i64, ptr {e.gep('%offsets', tile, 'i64')}, align 8")
    base = e(f"mul i64 {tile}, {ROWS}")
    for r in range(ROWS):
        word = e(f"load i{bits}, ptr {e.gep('%masks', e(f'add i64 {base}, {r}'), f'i{bits}')}, align {bits // 8}")
        src = e(f"getelementptr inbounds i8, ptr %wa, i64 {off}")
        row = e.call(f"llvm.masked.expandload.v{bits}{elem}", vt, ("ptr", src), (mt, e(f"bitcast i{bits} {word} to {mt}")),
                     (vt, "zeroinitializer"))
        e.raw(f"  store {vt} {row}, ptr {e(f'getelementptr inbounds i8, ptr {buffer}, i64 {64 * r}')}, align 64")
        if r < ROWS - 1:
            count = e.call(f"llvm.ctpop.i{bits}", f"i{bits}", (f"i{bits}", word))
            count = count if bits == 64 else e(f"zext i{bits} {count} to i64")
            off = e(f"add i64 {off}, {count if cfg.dot == 'int8' else e(f'shl i64 {count}, 1')}")
    return buffer


def _block(e: Builder, cfg: AmxConfig, pair: str, t: str, tiles: int, out: _Out, weights: tuple,
           expand: tuple | None = None) -> None:
    """Output features [32·pair, 32·pair + 32) × tokens [t, t + 16·tiles): the products of
    every K-tile into C tiles 0..3 (C[2a + b]: features half a, tokens half b), stored to
    the scratch, then the epilogue; `overlapped`, the epilogue waits for the next block,
    whose K-steps take its rows (_waiting_rows). `weights`: (where the tiles are, the
    index there of each panel's K-tile 0)."""
    cs = [(2 * a + b, A0 + a, B0 + b) for a in range(2) for b in range(tiles)]  # (C, its A, its B)
    for c, _, _ in cs:
        e.call("llvm.x86.tilezero", "void", ("i8", str(c)))
    base, firsts = weights
    cols = [e(f"add i64 {t}, {TOKENS * b}") if b else t for b in range(tiles)]
    stride = e("mul i64 %ldq, 4")  # bytes between xq's rows

    if expand is not None:  # (the pair's first block: K-tile 0 expanded before the K-steps)
        _expand_ahead(e, cfg, expand, "0")

    def step(kt, _):
        if expand is not None:  # (the next K-step's weight tiles, expanded while this one's tiles multiply)
            _expand_ahead(e, cfg, expand, e(f"add i64 {kt}, 1"))
        for a, first in enumerate(firsts):
            tile = e(f"add i64 {first}, {kt}")
            at = e(f"getelementptr inbounds i8, ptr {base}, i64 {e(f'mul i64 {tile}, {TILE_BYTES}')}")
            e.call(TILE_LOAD, "void", ("i8", str(A0 + a)), ("ptr", at), ("i64", "64"))
        row = e(f"mul i64 {kt}, {ROWS}")
        for b, col in enumerate(cols):
            at = e.gep("%xq", e.offset(row, "%ldq", e(f"mul i64 {e(f'lshr i64 {col}, 4')}, %ldt")), "i32")
            e.call(TILE_LOAD, "void", ("i8", str(B0 + b)), ("ptr", at), ("i64", stride))
        for c, a, b in cs:
            e.call(DOTS[cfg.dot], "void", ("i8", str(c)), ("i8", str(a)), ("i8", str(b)))
        if cfg.overlapped:
            _waiting_rows(e, cfg, out, *_share(e, kt))
        return []

    e.loop("0", "%ktiles", 1, [], step)
    scratch = out.scratch
    if cfg.overlapped:  # (no K-steps: none took the waiting rows)
        _waiting_rows(e, cfg, out, e(f"select i1 {e('icmp sgt i64 %ktiles, 0')}, i64 {ROWS}, i64 0"), str(ROWS))
    for c, _, _ in cs:
        e.call("llvm.x86.tilestored64", "void", ("i8", str(c)), ("ptr", e.gep(scratch, str(c * ROWS * TOKENS))),
               ("i64", "64"))
    if cfg.overlapped:
        e.raw(f"  store i64 {pair}, ptr {out.waiting}, align 8")
        e.raw(f"  store i64 {t}, ptr {e.gep(out.waiting, '1', 'i64')}, align 8")
    else:
        e.loop("0", str(ROWS), 1, [], lambda r, _: _rows_out(e, cfg, pair, t, tiles, out, r) or [])


def _waiting_rows(e: Builder, cfg: AmxConfig, out: _Out, r0: str, r1: str) -> None:
    """Rows [r0, r1) of the waiting block's epilogue (_rows_out), if a block waits (its
    pair is not -1). Always two token tiles: a block of one is the last of the tokens, so
    its second tile's lanes are all past ntok, masked off (the scratch there holds an
    earlier block's sums, or zeros)."""
    pair = e(f"load i64, ptr {out.waiting}, align 8")
    t = e(f"load i64, ptr {e.gep(out.waiting, '1', 'i64')}, align 8")
    go, done = e.fresh("waiting"), e.fresh("waited")
    e.cond_br(e(f"icmp sge i64 {pair}, 0"), go, done)
    e.label(go)
    e.loop(r0, r1, 1, [], lambda r, _: _rows_out(e, cfg, pair, t, 2, out, r) or [])
    e.br(done)
    e.label(done)


def _share(e: Builder, kt: str) -> tuple[str, str]:
    """The rows [r0, r1) of the waiting block that K-step kt takes: the 16 rows spread
    evenly over the K-steps, [ceil(16·kt / ktiles), ceil(16·(kt + 1) / ktiles))."""
    def first(k: str) -> str:
        scaled = e(f"add i64 {e(f'mul i64 {k}, {ROWS}')}, {e('sub i64 %ktiles, 1')}")
        return e(f"udiv i64 {scaled}, %ktiles")
    return first(kt), first(e(f"add i64 {kt}, 1"))


def _overlap_state(e: Builder, scratch: str) -> _Out:
    """_block's `out` when overlapped: the scratch zeroed, and no block waiting (pair -1)."""
    waiting = e("alloca [2 x i64], align 8")  # the waiting block's pair and t
    e.call("llvm.memset.p0.i64", "void", ("ptr", scratch), ("i8", "0"), ("i64", str(16 * ROWS * TOKENS)),
           ("i1", "false"))
    e.raw(f"  store i64 -1, ptr {waiting}, align 8")
    return _Out(scratch, waiting)


def _expand_ahead(e: Builder, cfg: AmxConfig, firsts: list, kt: str) -> None:
    """K-tile kt of both panels (their K-tile 0 at `firsts` in %wa's tiles) expanded into
    %work, if there is such a K-tile. A K-step expands the next one's tiles, not its own:
    its tile loads would otherwise read the expansion's stores at once, and wait for them."""
    def expand():
        for a, first in enumerate(firsts):
            here = e(f"add i64 {kt}, {e(f'mul i64 %ktiles, {a}')}")  # K-tile kt of panel a, in %work
            at = e(f"mul i64 {here}, {TILE_BYTES}")
            _expanded_tile(e, cfg, e(f"add i64 {first}, {kt}"), e(f"getelementptr inbounds i8, ptr %work, i64 {at}"))
        if cfg.dot in PREFETCH_NEXT:  # the next pair's K-tile kt into L2, where there is a next
            # pair: its first feature, (2 · pair + 2) · 16, under m
            panel = e(f"sdiv i64 {firsts[0]}, %ktiles")
            first_feature = e(f"mul i64 {e(f'add i64 {panel}, 2')}, {ROWS}")
            e.if_before(first_feature, "%m", lambda: _prefetch_tiles(e, cfg, firsts, kt))

    e.if_before(kt, "%ktiles", expand)


def _prefetch_tiles(e: Builder, cfg: AmxConfig, firsts: list, kt: str) -> None:
    """Into L2, the compressed K-tile kt of the next pair of panels (its masks, its
    nonzero elements): read from L3 when that pair's first block expands them, they
    would stall its K-steps."""
    bits = 64 if cfg.dot == "int8" else 32
    two = e("mul i64 %ktiles, 2")
    for first in firsts:
        tile = e(f"add i64 {e(f'add i64 {first}, {two}')}, {kt}")
        words = e(f"mul i64 {tile}, {ROWS}")
        for line in range(ROWS * bits // 8 // 64):
            at = e.gep("%masks", e(f"add i64 {words}, {line * 512 // bits}"), f"i{bits}")
            e.call("llvm.prefetch.p0", "void", ("ptr", at), ("i32", "0"), ("i32", "2"), ("i32", "1"))
        start = e(f"load i64, ptr {e.gep('%offsets', tile, 'i64')}, align 8")
        end = e(f"load i64, ptr {e.gep('%offsets', e(f'add i64 {tile}, 1'), 'i64')}, align 8")

        def line(off, _c):
            at = e(f"getelementptr inbounds i8, ptr %wa, i64 {off}")
            e.call("llvm.prefetch.p0", "void", ("ptr", at), ("i32", "0"), ("i32", "2"), ("i32", "1"))
            return []

        e.loop(e(f"and i64 {start}, -64"), e(f"add i64 {end}, 63"), 64, [], line)  # (every line of [start, end))


def _pair_weights(e: Builder, cfg: AmxConfig, pair: str) -> tuple[tuple, list | None]:
    """_block's `weights` for a pair of panels: in %wa; or, compressed, in %work (2 · ktiles
    KB, the thread's own), where the pair's first token block expands them (_expand_ahead)
    and every later one reads them. And, compressed, where they are expanded from (each
    panel's K-tile 0 in %wa's tiles), else None."""
    panel = e(f"mul i64 {pair}, 2")
    firsts = [e(f"mul i64 {e(f'add i64 {panel}, {a}')}, %ktiles") for a in range(2)]  # each panel's K-tile 0
    if not cfg.compressed:
        return ("%wa", firsts), None
    return ("%work", ["0", "%ktiles"]), firsts


def _rows_out(e: Builder, cfg: AmxConfig, pair: str, t: str, tiles: int, out: _Out, r: str) -> None:
    """Row r of both features halves from the stored C tiles, through the epilogue into yᵀ
    (quant_out: y's bytes on the grid, byte j % 4 of row j / 4: the bytes QuantizeLinear
    then the next layer's quantize kernel make of y)."""
    scratch, iv = out.scratch, f"<{e.lanes} x i32>"
    for a in range(2):
        j = e(f"add i64 {e(f'mul i64 {pair}, 32')}, {e(f'add i64 {r}, {ROWS * a}')}")
        store, skip = e.fresh("store"), e.fresh("skip")
        e.cond_br(e(f"icmp slt i64 {j}, %m"), store, skip)
        e.label(store)
        bias = e.splat(e(f"load float, ptr {e.gep('%bias', j)}, align 4"))
        sums = [e.vload(e.gep(scratch, e(f"add i64 {e(f'mul i64 {r}, {TOKENS}')}, {(2 * a + b) * ROWS * TOKENS}")),
                        None) for b in range(tiles)]
        if cfg.dot == "int8":
            ys = scaled_sums(e, sums, j, bias, True, cfg.requantize)
        else:
            ys = [e(f"fadd {e.vt} {s}, {bias}") for s in sums]
        masks = e.lane_masks(t, tiles, "%ntok")
        if cfg.quant_out:
            step, zero, lo, hi = out.grid
            ys = [epilogue(e, cfg.activation, y, None, mask) for y, mask in zip(ys, masks)]
            if cfg.unsigned_grid:
                izero = e.splat_i32(e(f"fptosi float {e(f'extractelement {e.vt} {zero}, i32 0')} to i32"))
                qs = [unsigned_bytes(e, y, step, izero) for y in ys]
            else:
                qs = [e(f"fptosi {e.vt} {e(f'fsub {e.vt} {quantized(e, y, step, zero, lo, hi)}, {lo}')} to {iv}")
                      for y in ys]
            store_block_bytes(e, qs, j, "%yt", "%ldy", t, masks, "%ldyt")
        elif cfg.pairs_out:
            store_pair_halves(e, [epilogue(e, cfg.activation, y, None, mask) for y, mask in zip(ys, masks)], j, "%yt",
                              "%ldy", t, masks, "%ldyt")
        else:
            yoff = e.offset(j, "%ldy", t)
            roff = e.offset(j, "%ldr", t) if cfg.residual else None
            for b, (y, mask) in enumerate(zip(ys, masks)):
                residual = e.vptr("%rt", roff, b) if cfg.residual else None
                e.vstore(epilogue(e, cfg.activation, y, residual, mask), e.vptr("%yt", yoff, b), mask)
        e.br(skip)
        e.label(skip)


def _panels(e: Builder, cfg: AmxConfig) -> None:
    scratch = e(f"alloca [{4 * ROWS * TOKENS} x float], align 64")  # the 4 C tiles
    out = _overlap_state(e, scratch) if cfg.overlapped else _Out(scratch)
    if cfg.quant_out:
        at = e("mul i64 %m, 3")
        out = out._replace(grid=tuple(e.splat(e(f"load float, ptr {e.gep('%bias', e(f'add i64 {at}, {i}'))}, align 4"))
                                      for i in range(4)))
    e.call("llvm.x86.ldtilecfg", "void", ("ptr", "@amx_config"))
    padded = e(f"and i64 {e(f'add i64 %ntok, {TOKENS - 1}')}, {-TOKENS}")

    def blocks(p: str, weights: tuple, start: str) -> None:  # the token blocks from `start`
        t, _c = e.loop(start, padded, 2 * TOKENS, [], lambda t, _c: _block(e, cfg, p, t, 2, out, weights) or [])
        last, done = e.fresh("last"), e.fresh("done")
        e.cond_br(e(f"icmp slt i64 {t}, {padded}"), last, done)
        e.label(last)
        _block(e, cfg, p, t, 1, out, weights)
        e.br(done)
        e.label(done)

    def pair(p, _):
        weights, lazy = _pair_weights(e, cfg, p)
        if lazy is None:
            blocks(p, weights, "0")
            return []
        # the first block expands the weight tiles as it goes: of two token tiles, or of one
        # where there are 16 tokens or fewer (none where there are none)
        two, one, alone, done = e.fresh("two"), e.fresh("one"), e.fresh("alone"), e.fresh("pairdone")
        e.cond_br(e(f"icmp sge i64 {padded}, {2 * TOKENS}"), two, one)
        e.label(two)
        _block(e, cfg, p, "0", 2, out, weights, lazy)
        blocks(p, weights, str(2 * TOKENS))
        e.br(done)
        e.label(one)
        e.cond_br(e(f"icmp sgt i64 {padded}, 0"), alone, done)
        e.label(alone)
        _block(e, cfg, p, "0", 1, out, weights, lazy)
        e.br(done)
        e.label(done)
        return []

    e.loop("%pair0", "%pair1", 1, [], pair)
    if cfg.overlapped:
        _waiting_rows(e, cfg, out, "0", str(ROWS))  # the last block's
    e.call("llvm.x86.tilerelease", "void")


@functools.cache  # (the same text for every layer of a configuration: made once)
def amx_ir(cfg: AmxConfig) -> str:
    if cfg.dot not in DOTS or cfg.activation not in ACTIVATIONS or cfg.quant_out and (cfg.dot != "int8" or cfg.residual) \
            or cfg.pairs_out and (cfg.dot != "bf16" or cfg.residual) or cfg.requantize and (cfg.dot != "int8" or
                                                                                           cfg.quant_out):
        raise ValueError(f"no AMX kernel for {cfg}")
    e = Builder(16)
    e.function(SIGNATURE, lambda: _panels(e, cfg))
    e.raw(f'@amx_config = private unnamed_addr constant [64 x i8] c"{tile_config()}", align 64')
    epi = ("float(C - corr[j]) * scale[j] + bias[j]" if cfg.dot == "int8" else "C + bias[j]")
    if cfg.requantize:
        epi = "roundeven(clamp(float(C - corr[j]) * scale[j], lo[j], hi[j])) * out_scale[j] + bias[j]"
    return e.module(f"; sparsejit generated kernel: AMX dense {cfg.dot} activation={cfg.activation} "
                    f"residual={cfg.residual} compressed={cfg.compressed} overlapped={cfg.overlapped}"
                    f"{' quant_out' if cfg.quant_out else ''}{' unsigned_grid' if cfg.unsigned_grid else ''}"
                    f"{' pairs_out' if cfg.pairs_out else ''}{' requantize' if cfg.requantize else ''}\n"
                    f"; C[j, t] = sum over K-tiles kt: wa[j / 16, kt] (16 x 64 bytes) . xq[16 kt .. 16 kt + 15, t]"
                    f" ({DOTS[cfg.dot].rsplit('.', 1)[1]})\n"
                    f"; yt[j, t] = act({epi}){' + rt[j, t]' if cfg.residual else ''}")
