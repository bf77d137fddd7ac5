"""The sparse Linear kernel as LLVM IR: a tile of outputs held in vector registers.

Layout, feature-major as in SparseDNN and XNNPACK: xᵀ [in, tokens] and yᵀ [out, tokens],
token stride 1, row strides `ldx`/`ldy`/`ldr` (in floats). `sparse_rows` computes output
rows [j0, j1) for all tokens: tiles of `lanes × vectors` tokens (16 × 8 = 128 with
AVX-512), then narrower ones, the last with its last vector masked. One output row's
tile stays in `vectors` registers while every stored weight adds weight × its row of xᵀ:
one load per fma (Numba could not keep the tile in registers, hence IR).

Tiles are the outer loop, so a thread's share of xᵀ stays in cache across its rows.
Inside a tile the inputs come in `nchunks` K-chunks (the weights stored chunk-major, see
compress.chunk_rows): every row takes chunk 0's weights, then every row chunk 1's, so
one chunk of xᵀ is read at a time and stays in L1 across the rows; partial sums pass
through yᵀ between chunks, and the epilogue runs on the last. Within a chunk the rows
come in the order `order` lists them (compress.order_rows: by count, so that the loop
exits are predictable).

With a residual, the last chunk's epilogue prefetches the residual of the row a few
slots on (RESIDUAL_AHEAD), and chunk 0 prefetches, for writing, the output of the row
a few slots on (OUTPUT_AHEAD); with few tokens, the driver first prefetches every line of
xᵀ (X_PREFETCH_TOKENS). The text is a pure function of `IRConfig`. What was measured
on the way to this design, and what did not help, is in bench/README.md ("Measured and
tried").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .epilogue import ACTIVATIONS, epilogue
from .ir import Builder, Signature, tail_vectors
from .lowp_ir import bf16_dot, quantized, scaled_sums, store_block_bytes, store_pair_halves, store_rows, vnni_dot

SIGNATURE = Signature("sparse_rows", (
    ("xt", "ptr"), ("ldx", "i64"), ("indptr", "ptr"), ("indices", "ptr"), ("values", "ptr"), ("bias", "ptr"),
    ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"), ("ldr", "i64"), ("m", "i64"), ("nchunks", "i64"),
    ("order", "ptr"), ("j0", "i64"), ("j1", "i64"), ("ntok", "i64"), ("nx", "i64")))
# A tile function takes what the kernel does, but for its rows and tokens: slot s of
# K-chunk c, tokens from t.
_SHARED = Signature("tile", SIGNATURE.args[:13])
# The epilogue adds a residual read nowhere else: a row's 512 bytes (128 tokens) that,
# once x has many tokens, lie in L3 or DRAM, 4 KB or more from the previous row's (the
# rows come in count order), where no hardware prefetcher looks. So each row's epilogue
# prefetches the residual of the row this many slots on. (bench/README, eighth session.)
RESIDUAL_AHEAD = 8
# ... and chunk 0 prefetches, for writing, the output tile of the row this many slots on:
# its lines are in no cache (a new yᵀ each call), and are written in the same count order.
OUTPUT_AHEAD = 16
# With this many tokens or fewer, the kernel first prefetches all of xᵀ (_prefetch_x).
X_PREFETCH_TOKENS = 32


@dataclass(frozen=True)
class IRConfig:
    block: int = 1            # consecutive input weights per stored index (1 or 4)
    activation: str = "none"  # a key of epilogue.ACTIVATIONS
    residual: bool = False
    lanes: int = 16           # floats per vector register
    vectors: int = 8          # registers per output tile
    index_bits: int = 32      # stored input index width: 16 (unsigned) when the inputs fit, else 32
    scaled: bool = False      # bias holds 2m floats: the sums times bias[m + j], plus bias[j], then act
    bf16: bool = False        # pairs of inputs in bfloat16 (see _add_pair): xt and values hold i32 pairs
    int8: bool = False        # 4-blocks of uint8 x and int8 w summed in i32 (see _add_block); bias holds 3m
    quant_out: bool = False   # int8 without residual: y quantized for the next layer into rt (_store_quantized)
    scattered: bool = False   # bf16 pairs of any two inputs of a row (see _add_scattered): xt holds bfloat16 rows
    rows_out: bool = False    # scattered without residual: y rounded to the bfloat16 rows the next reads, into rt
    pairs_out: bool = False   # bf16 pairs without residual: y rounded to the pair rows the next reads, into rt


FLAGS = ("scaled", "bf16", "scattered", "int8", "quant_out", "rows_out", "pairs_out")  # (IRConfig's, in the header)


def _add_pair(e: Builder, vectors: int, masks: list, at: str, k: str, accs: list[str]) -> list[str]:
    """accs + the bfloat16 pair of weights at slot `at` × pair row k of xᵀ: `vdpbf16ps`
    (AVX512-BF16) adds, per token, x[2k]·w[0] + x[2k + 1]·w[1] to a float sum. Each i32 of
    values and of xᵀ holds the pair, input 2k in its low 16 bits."""
    w = e.splat(e(f"load float, ptr {e.gep('%values', at)}, align 4"))  # (the pair's bits)
    start = e.offset(k, "%ldx", "%t")
    return [bf16_dot(e, accs[u], e.vload(e.vptr("%xt", start, u), masks[u]), w) for u in range(vectors)]


def _unpack_masks(lanes: int) -> tuple[str, str]:
    """The shuffles of two vectors of 2·lanes 16-bit values that interleave, within each
    128-bit lane, their first four values (vpunpcklwd) and their last four (vpunpckhwd)."""
    def mask(half: int) -> str:
        idx = [8 * (p // 8) + 4 * half + (p % 8) // 2 + (p % 2) * 2 * lanes for p in range(2 * lanes)]
        return f"<{', '.join(f'i32 {i}' for i in idx)}>"
    return mask(0), mask(1)


def _add_scattered(e: Builder, vectors: int, at: str, packed: str, accs: list[str]) -> list[str]:
    """accs + the bfloat16 pair of weights at slot `at` × rows ka and kb of xᵀ (`packed`:
    ka in its low 16 bits, kb in its high). xᵀ holds bfloat16 rows (row stride 2·ldx in
    16-bit units) in groups of 32 tokens stored so that interleaving two rows' groups
    within each 128-bit lane (one `vpunpcklwd`, one `vpunpckhwd`) gives the pairs of the
    group's first 16 tokens and of its last 16 (bf16.rows_ir writes them so), each for one
    `vdpbf16ps`. Any two inputs of a row make a pair, so scattered pruning stores half as
    many slots as it has weights, where pairs of consecutive inputs (_add_pair) store
    about as many slots as weights. A one-vector tile takes the half of the group its
    first token is in."""
    L = e.lanes
    gv = f"<{2 * L} x i16>"
    lo, hi = _unpack_masks(L)
    w = e.splat(e(f"load float, ptr {e.gep('%values', at)}, align 4"))  # (the pair's bits)
    ld = e("shl i64 %ldx, 1")
    group = e(f"and i64 %t, {-2 * L}")
    rows = [e(f"zext i32 {e(f'and i32 {packed}, 65535')} to i64"), e(f"zext i32 {e(f'lshr i32 {packed}, 16')} to i64")]
    starts = [e.offset(k, ld, group) for k in rows]

    def pairs(u: int) -> tuple[str, str]:
        a, b = (e(f"load {gv}, ptr {e.gep('%xt', e(f'add i64 {s}, {u * L}') if u else s, 'i16')}, align 64")
                for s in starts)
        return (e(f"bitcast {gv} {e(f'shufflevector {gv} {a}, {gv} {b}, <{2 * L} x i32> {m}')} to {e.vt}")
                for m in (lo, hi))

    if vectors == 1:
        first, second = pairs(0)
        upper = e(f"icmp ne i64 {e(f'and i64 %t, {L}')}, 0")
        x = e(f"select i1 {upper}, {e.vt} {second}, {e.vt} {first}")
        return [bf16_dot(e, accs[0], x, w)]
    out = []
    for u in range(0, vectors, 2):
        for acc, x in zip(accs[u:u + 2], pairs(u)):
            out.append(bf16_dot(e, acc, x, w))
    return out


def _add_block(e: Builder, vectors: int, masks: list, at: str, k4: str, accs: list[str]) -> list[str]:
    """accs + the int8 4-block of weights at slot `at` × 4-block row k4 of xᵀ: `vpdpbusd`
    (AVX-512 VNNI) adds, per token, the four products of uint8 x and int8 w to an i32 sum
    (int8_ir's layout: each i32 of values and of xᵀ holds the block's four bytes). The
    sums are carried as float vectors, bit for bit (every loop and store is the float
    kernel's), and read as i32 by the epilogue."""
    w = e.splat(e(f"load float, ptr {e.gep('%values', at)}, align 4"))  # (the block's bits)
    start = e.offset(k4, "%ldx", "%t")
    return [vnni_dot(e, accs[u], e.vload(e.vptr("%xt", start, u), masks[u]), w) for u in range(vectors)]


def _add_stored(e: Builder, cfg: IRConfig, vectors: int, masks: list, at: str, k_stored: str,
                accs: list[str]) -> list[str]:
    """accs + the weights stored at slot `at` (one, a block of four, or a bfloat16 pair) × their rows of xᵀ."""
    if cfg.scattered:
        return _add_scattered(e, vectors, at, k_stored, accs)
    k = e(f"{'zext' if cfg.index_bits == 16 else 'sext'} i{cfg.index_bits} {k_stored} to i64")
    if cfg.bf16:  # (k: the pair's first input, 2·its row of xᵀ)
        return _add_pair(e, vectors, masks, at, e(f"lshr i64 {k}, 1"), accs)
    if cfg.int8:  # (k: the block's first input, 4·its row of xᵀ)
        return _add_block(e, vectors, masks, at, e(f"lshr i64 {k}, 2"), accs)
    wbase = e(f"mul i64 {at}, {cfg.block}")
    for b in range(cfg.block):
        w = e.splat(e(f"load float, ptr {e.gep('%values', e(f'add i64 {wbase}, {b}') if b else wbase)}, align 4"))
        start = e.offset(e(f"add i64 {k}, {b}") if b else k, "%ldx", "%t")
        accs = [e.fma(w, e.vload(e.vptr("%xt", start, u), masks[u]), accs[u]) for u in range(vectors)]
    return accs


def _stored_weights(e: Builder, cfg: IRConfig, vectors: int, masks: list, p0: str, p1: str,
                    init: list[str]) -> list[str]:
    """The sums over the stored weights at slots [p0, p1). Unstructured, two at a time with
    their indices from one load (loads, not fmas, bound this loop), then the odd one."""
    ity = f"i{cfg.index_bits}"
    carried = [(e.vt, a) for a in init]

    def one(p, accs):
        k = e(f"load {ity}, ptr {e.gep('%indices', p, ity)}, align {cfg.index_bits // 8}")
        return _add_stored(e, cfg, vectors, masks, p, k, accs)

    def pair(p, accs):
        gty = f"i{2 * cfg.index_bits}"
        packed = e(f"load {gty}, ptr {e.gep('%indices', p, ity)}, align {cfg.index_bits // 8}")
        for i in range(2):
            k = e(f"trunc {gty} {e(f'lshr {gty} {packed}, {i * cfg.index_bits}') if i else packed} to {ity}")
            accs = _add_stored(e, cfg, vectors, masks, e(f"add i64 {p}, {i}") if i else p, k, accs)
        return accs

    if cfg.block == 1 and not cfg.scattered:
        p0, accs = e.loop(p0, p1, 2, carried, pair)
        carried = [(e.vt, a) for a in accs]
    return e.loop(p0, p1, 1, carried, one)[1]


def _tile(e: Builder, cfg: IRConfig, vectors: int, masked: bool) -> None:
    """Slot s of K-chunk c, tokens [t, t + lanes·vectors): row j = order[c·m + s]'s
    stored weights in that chunk (`masked`: the last vector's loads and stores under
    %mask, the tokens left). Chunk 0 starts from the bias, later ones from the partial
    sums in yᵀ; the last applies the epilogue. A middle chunk where the row has no stored
    weights is skipped."""
    vt = e.vt
    masks = [None] * (vectors - 1) + ["%mask" if masked else None]
    at = e.offset("%c", "%m", "%s")
    row = e(f"load i32, ptr {e.gep('%order', at, 'i32')}, align 4")
    e(f"sext i32 {row} to i64", "%j")
    p0 = e(f"load i64, ptr {e.gep('%indptr', at, 'i64')}, align 8")
    p1 = e(f"load i64, ptr {e.gep('%indptr', e(f'add i64 {at}, 1'), 'i64')}, align 8")
    last = e(f"icmp eq i64 %c, {e('add i64 %nchunks, -1')}")
    yptrs = [e.vptr("%yt", e.offset("%j", "%ldy", "%t"), u) for u in range(vectors)]
    e.cond_br(e("icmp eq i64 %c, 0"), "from.bias", "from.y")
    e.label("from.bias")
    if OUTPUT_AHEAD:
        _prefetch_ahead(e, vectors, OUTPUT_AHEAD, "%yt", "%ldy", write=True)
    binit = e.const(0.0) if cfg.scaled or cfg.int8 else e.splat(e(f"load float, ptr {e.gep('%bias', '%j')}, align 4"))
    from_bias = e.block
    e.br("start")
    e.label("from.y")
    e.cond_br(e(f"icmp ugt i1 {e(f'icmp sge i64 {p0}, {p1}')}, {last}"), "skip", "from.y.load")  # empty, not last
    e.label("skip")
    e.raw("  ret void")
    e.label("from.y.load")
    yinit = [e.vload(ptr, mk) for ptr, mk in zip(yptrs, masks)]
    e.br("start")
    e.label("start")
    init = [e.phi(vt, (binit, from_bias), (y, "from.y.load")) for y in yinit]
    sums = _stored_weights(e, cfg, vectors, masks, p0, p1, init)
    e.cond_br(last, "epilogue", "partial")
    e.label("partial")
    for v, ptr, mk in zip(sums, yptrs, masks):
        e.vstore(v, ptr, mk)
    e.raw("  ret void")
    e.label("epilogue")
    if cfg.residual and RESIDUAL_AHEAD:
        _prefetch_ahead(e, vectors, RESIDUAL_AHEAD, "%rt", "%ldr", write=False)
    rstart = e.offset("%j", "%ldr", "%t") if cfg.residual else None
    if cfg.scaled or cfg.int8:  # an int8 layer's exact sums (int8.Int8OnFloat, Int8Chunked): scaled, plus the bias
        sums = scaled_sums(e, sums, "%j", e.splat(e(f"load float, ptr {e.gep('%bias', '%j')}, align 4")), cfg.int8)
    if cfg.quant_out:
        _store_quantized(e, [epilogue(e, cfg.activation, v, None, mk) for v, mk in zip(sums, masks)], masks)
        return
    if cfg.rows_out:  # (row j of rt, as the next scattered layer reads its x: lowp_ir.store_rows)
        values = [epilogue(e, cfg.activation, v, None, mk) for v, mk in zip(sums, masks)]
        store_rows(e, values, masks, "%rt", "%j", e("shl i64 %ldr, 1"), "%t")
        return
    if cfg.pairs_out:
        store_pair_halves(e, [epilogue(e, cfg.activation, v, None, mk) for v, mk in zip(sums, masks)], "%j", "%rt",
                          "%ldr", "%t")
        return
    for u, (v, ptr, mk) in enumerate(zip(sums, yptrs, masks)):
        residual = e.vptr("%rt", rstart, u) if cfg.residual else None
        e.vstore(epilogue(e, cfg.activation, v, residual, mk), ptr, mk)


def _prefetch_ahead(e: Builder, vectors: int, ahead: int, base: str, ld: str, write: bool) -> None:
    """Prefetch the tile (tokens from t) of `base`'s row (stride `ld`) that `ahead` slots on
    in this chunk's order will take: the residual the last chunk's epilogue reads, or
    (`write`) the output tile chunk 0 writes first, its lines in no cache."""
    nxt = e(f"add i64 %s, {ahead}")
    go, done = e.fresh("prefetch"), e.fresh("prefetched")
    e.cond_br(e(f"icmp ult i64 {nxt}, %m"), go, done)
    e.label(go)
    row = e(f"load i32, ptr {e.gep('%order', e.offset('%c', '%m', nxt), 'i32')}, align 4")
    e.prefetch_row(base, ld, e(f"sext i32 {row} to i64"), "%t", vectors, write)
    e.br(done)
    e.label(done)


def _prefetch_x(e: Builder) -> None:
    """With at most X_PREFETCH_TOKENS tokens, every line of xᵀ's `nx` rows (its tokens)
    prefetched into L2 before the first row reads any. The stored weights read xᵀ's rows in
    index order, one line each at these sizes, and the previous launch wrote about half of
    them on the other core: each would otherwise be a miss met alone, as the fma chain
    reaches it, where issued together the misses overlap."""
    go, done = e.fresh("prefetch.x"), e.fresh("prefetched.x")
    e.cond_br(e(f"icmp sle i64 %ntok, {X_PREFETCH_TOKENS}"), go, done)
    e.label(go)

    def row(r, _):
        def line(c, _):
            e.call("llvm.prefetch.p0", "void", ("ptr", e.gep("%xt", e.offset(r, "%ldx", c))), ("i32", "0"),
                   ("i32", "2"), ("i32", "1"))
            return []
        e.loop("0", e("add i64 %ntok, 15"), 16, [], line)  # (a 64-byte line: 16 floats, i32 pairs or blocks)
        return []
    e.loop("0", "%nx", 1, [], row)
    e.br(done)
    e.label(done)


def _store_quantized(e: Builder, values: list[str], masks: list) -> None:
    """Row j's outputs (tokens from t) quantized as the next int8 layer quantizes its x
    (lowp_ir.quantized, less the lowest value: a byte) and stored where that layer's
    kernel reads them (lowp_ir.store_block_bytes: row j / 4 of rt, `ldr` its row stride
    in i32). The grid (scale, zero point, lowest, highest value) is bias[3m .. 3m + 3]."""
    vt, iv = e.vt, f"<{e.lanes} x i32>"
    at = e("mul i64 %m, 3")
    scale, zero, lo, hi = (e.splat(e(f"load float, ptr {e.gep('%bias', e(f'add i64 {at}, {i}') if i else at)}, "
                                     "align 4")) for i in range(4))
    qs = [e(f"fptosi {vt} {e(f'fsub {vt} {quantized(e, v, scale, zero, lo, hi)}, {lo}')} to {iv}") for v in values]
    store_block_bytes(e, qs, "%j", "%rt", "%ldr", "%t", masks)


def narrower_widths(cfg: IRConfig) -> list[int]:
    """The widths of the tiles after the full ones, largest first: tail_vectors (a full tile
    of one vector: one), and with AVX-512 and one weight a stored index 3 as well, so that
    any tokens short of 4 vectors take one pass (their last vector masked); not for
    scattered pairs, whose x comes in groups of two vectors."""
    widths = tail_vectors(cfg.vectors) or [1]
    if cfg.lanes == 16 and cfg.block == 1 and cfg.vectors > 4 and not cfg.scattered:
        widths = sorted({*widths, 3}, reverse=True)
    return widths


def masked_widths(cfg: IRConfig) -> list[int]:
    """The widths of the tiles whose last vector may be masked: every narrower one with
    AVX-512's mask registers, one weight a stored index; otherwise one vector alone (with
    AVX2 a mask takes a vector register, and wider tiles' accumulators spilled to the
    stack; with 4-blocks the stored weights' loop spilled a pointer)."""
    return narrower_widths(cfg) if cfg.lanes == 16 and cfg.block == 1 else [1]


def _driver(e: Builder, cfg: IRConfig) -> None:
    """Rows [j0, j1) for all ntok tokens: full tiles, then what is left in tiles of the
    narrower widths (narrower_widths: 4, 3, 2, 1 vectors), the last with its last vector
    masked, the tokens left; in each, the K-chunks in order and in each chunk the rows.
    Every pass streams all the weights once: the 20 tokens left after a 128-token tile
    take one 2-vector pass, the second masked, not one of a vector and one of a masked
    vector; 40 tokens one 3-vector pass."""
    L = cfg.lanes
    _prefetch_x(e)

    def rows(tile: str, t: str, mask: str | None = None):
        def chunk(c, _):
            def row(j, _):
                extra = f", <{L} x i1> {mask}" if mask else ""
                e.raw(f"  call void @{tile}({_SHARED.passing()}, i64 {j}, i64 {t}, i64 {c}{extra})")
                return []
            e.loop("%j0", "%j1", 1, [], row)
            return []
        e.loop("0", "%nchunks", 1, [], chunk)
        return []

    t, _ = e.loop("0", "%ntok", L * cfg.vectors, [], lambda t, _: rows("tile_full", t))
    iota = f"<{', '.join(f'i64 {i}' for i in range(L))}>"
    for v in narrower_widths(cfg):  # (what is left is under the width before)
        t, _ = e.loop(t, "%ntok", L * v, [], lambda t, _, v=v: rows(f"tile_{v}", t))  # (whole steps)
        if v not in masked_widths(cfg):
            continue
        left = e(f"sub i64 %ntok, {t}")  # (under the width: this width's masked tile if over v - 1 vectors)
        go, on = e.fresh("masked"), e.fresh("narrower")
        e.cond_br(e(f"icmp sgt i64 {left}, {L * (v - 1)}"), go, on)
        e.label(go)
        rows(f"tile_{v}m", t, e(f"icmp ult <{L} x i64> {iota}, {e.splat_i64(e(f'sub i64 {left}, {L * (v - 1)}'))}"))
        e.br("exit")
        e.label(on)
    e.br("exit")
    e.label("exit")


@functools.cache  # (the same text for every layer of a configuration: made once)
def ir_source(cfg: IRConfig) -> str:
    """The whole module's LLVM IR for one kernel configuration."""
    if cfg.block not in (1, 4) or cfg.activation not in ACTIVATIONS or cfg.index_bits not in (16, 32) or \
            (cfg.bf16 or cfg.int8) and (cfg.block != 1 or cfg.lanes != 16) or cfg.int8 and (cfg.bf16 or cfg.scaled) or \
            cfg.quant_out and (not cfg.int8 or cfg.residual) or cfg.scattered and (not cfg.bf16 or cfg.index_bits != 32) \
            or cfg.rows_out and (not cfg.scattered or cfg.residual) \
            or cfg.pairs_out and (not cfg.bf16 or cfg.scattered or cfg.residual):
        raise ValueError(f"no sparse kernel for {cfg}")
    e = Builder(cfg.lanes)
    tile_args = (("s", "i64"), ("t", "i64"), ("c", "i64"))
    tiles = [("tile_full", cfg.vectors, False), *((f"tile_{v}", v, False) for v in narrower_widths(cfg)),
             *((f"tile_{v}m", v, True) for v in masked_widths(cfg))]
    for name, vectors, masked in tiles:
        e.function(_SHARED.extended(name, *tile_args), lambda v=vectors, mk=masked: _tile(e, cfg, v, mk),
                   extra=f"<{cfg.lanes} x i1> %mask" if masked else "", attrs="alwaysinline")
    e.function(SIGNATURE, lambda: _driver(e, cfg))
    total = "bias[m + j] * (sum ...) + bias[j]" if cfg.scaled else "bias[j] + sum ..."
    if cfg.int8:
        total = "bias[m + j] * float(sum ... - bias[2m + j] as i32) + bias[j]"
    header = (f"; sparsejit generated kernel: block={cfg.block} activation={cfg.activation} "
              f"residual={cfg.residual} lanes={cfg.lanes} vectors={cfg.vectors} index_bits={cfg.index_bits}"
              + "".join(f" {flag}" for flag in FLAGS if getattr(cfg, flag)) + "\n"
              f"; yt[j, t] = act({total}), sum ... over row j's stored (k, w): w * xt[k, t]"
              f"{' + rt[j, t]' if cfg.residual else ''}")
    return e.module(header)
