"""The sparse INT8 Linear kernel as LLVM IR: uint8 activations × int8 weights in 4-blocks.

Layout: the activations are quantized into xq [in/4, tokens_padded, 4] (uint8), so that
one 64-byte load is 16 tokens × one 4-block of inputs; the weights are stored per output
row as the 4-blocks (k/4) that hold a nonzero, each block's four int8 weights packed in
one i32. For every stored block the kernel broadcasts its i32 and adds, per token, the
4-input dot product into an i32 accumulator: one `vpdpbusd` with AVX-512 VNNI, or the
same sum written out with shifts and multiplies (`vnni=False`) on CPUs without it.

`int8_rows` computes rows [j0, j1) for all tokens: tiles of `vectors` × 16 tokens, then
single vectors; loads never pass the padded token count, stores stop at `ntok`. The
epilogue: y = float(acc - corr[j]) · scale[j], then the Linear epilogues (bias,
activation, residual), where corr[j] = zero point · Σ_k W[k, j] undoes the activations'
zero point exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from .epilogue import ACTIVATIONS, epilogue
from .ir import Builder, Signature

SIGNATURE = Signature("int8_rows", (
    ("xq", "ptr"), ("tp", "i64"), ("indptr", "ptr"), ("blocks", "ptr"), ("weights", "ptr"), ("corr", "ptr"),
    ("scale", "ptr"), ("bias", "ptr"), ("yt", "ptr"), ("ldy", "i64"), ("rt", "ptr"), ("ldr", "i64"),
    ("j0", "i64"), ("j1", "i64"), ("ntok", "i64")))
LANES = 16  # i32 accumulators per vector, 4 uint8 activations each


@dataclass(frozen=True)
class Int8Config:
    activation: str = "none"  # a key of epilogue.ACTIVATIONS
    residual: bool = False
    vnni: bool = True         # vpdpbusd (AVX-512 VNNI); else the dot products written out
    vectors: int = 8          # accumulators per token tile


def _dot4(e: Builder, cfg: Int8Config, acc: str, a: str, w: str, ws: list[str]) -> str:
    """acc + per lane Σ_i a.byte[i] (unsigned) · w.byte[i] (signed)."""
    iv = f"<{LANES} x i32>"
    if cfg.vnni:
        return e.call("llvm.x86.avx512.vpdpbusd.512", iv, (iv, acc), (iv, a), (iv, w))
    for i, wi in enumerate(ws):
        shifted = e(f"lshr {iv} {a}, {e.splat_i32(8 * i)}") if i else a
        byte = e(f"and {iv} {shifted}, {e.splat_i32(255)}")
        acc = e(f"add {iv} {acc}, {e(f'mul {iv} {byte}, {wi}')}")
    return acc


def _block_weights(e: Builder, cfg: Int8Config, packed: str) -> tuple[str, list[str]]:
    """The block's i32 broadcast, and (without VNNI) its four signed bytes broadcast."""
    w = e.splat_i32(packed)
    if cfg.vnni:
        return w, []
    ws = []
    for i in range(4):
        byte = e(f"trunc i32 {e(f'lshr i32 {packed}, {8 * i}') if i else packed} to i8")
        ws.append(e.splat_i32(e(f"sext i8 {byte} to i32")))
    return w, ws


def _tile(e: Builder, cfg: Int8Config, j: str, t: str, vectors: int) -> None:
    """Row j, tokens [t, t + 16·vectors): the stored blocks' dot products, the epilogue."""
    iv = f"<{LANES} x i32>"
    p0 = e(f"load i64, ptr {e.gep('%indptr', j, 'i64')}, align 8")
    p1 = e(f"load i64, ptr {e.gep('%indptr', e(f'add i64 {j}, 1'), 'i64')}, align 8")

    def block(p, accs):
        at = e.gep("%blocks", p, "i16")
        k4 = e(f"zext i16 {e(f'load i16, ptr {at}, align 2')} to i64")
        w, ws = _block_weights(e, cfg, e(f"load i32, ptr {e.gep('%weights', p, 'i32')}, align 4"))
        start = e(f"add i64 {e(f'mul i64 {k4}, %tp')}, {t}")  # in 4-byte units: one i32 per token
        out = []
        for u, acc in enumerate(accs):
            ptr = e.gep("%xq", e(f"add i64 {start}, {16 * u}") if u else start, "i32")
            out.append(_dot4(e, cfg, acc, e(f"load {iv}, ptr {ptr}, align 4"), w, ws))
        return out

    _, accs = e.loop(p0, p1, 1, [(iv, "zeroinitializer")] * vectors, block)
    corr = e.splat_i32(e(f"load i32, ptr {e.gep('%corr', j, 'i32')}, align 4"))
    scale = e.splat(e(f"load float, ptr {e.gep('%scale', j)}, align 4"))
    bias = e.splat(e(f"load float, ptr {e.gep('%bias', j)}, align 4"))
    masks = e.lane_masks(t, vectors, "%ntok")
    ystart, rstart = e.offset(j, "%ldy", t), e.offset(j, "%ldr", t) if cfg.residual else None
    for u, (acc, mask) in enumerate(zip(accs, masks)):
        y = e(f"sitofp {iv} {e(f'sub {iv} {acc}, {corr}')} to {e.vt}")
        y = e(f"fadd {e.vt} {e(f'fmul {e.vt} {y}, {scale}')}, {bias}")
        residual = e.vptr("%rt", rstart, u) if cfg.residual else None
        e.vstore(epilogue(e, cfg.activation, y, residual, mask), e.vptr("%yt", ystart, u), mask)


def _rows(e: Builder, cfg: Int8Config) -> None:
    def rows(width, vectors):
        def tile(t, _):
            e.loop("%j0", "%j1", 1, [], lambda j, _c: _tile(e, cfg, j, t, vectors) or [])
            return []
        return e.loop(width[0], "%tp", width[1], [], tile)[0]

    t = rows(("0", LANES * cfg.vectors), cfg.vectors)
    rows((t, LANES), 1)


QUANTIZE_SIGNATURE = Signature("quantize_rows", (
    ("xt", "ptr"), ("ldx", "i64"), ("xq", "ptr"), ("tp", "i64"), ("k", "i64"), ("scale", "float"), ("zero", "float"),
    ("lo", "float"), ("hi", "float"), ("k4_0", "i64"), ("k4_1", "i64"), ("ntok", "i64")))


def _quantize(e: Builder) -> None:
    """xq[k4, t] = the four uint8 q(k, t) of inputs k = 4·k4 .. 4·k4 + 3, packed in an i32:
    q = clamp(roundeven(x / scale) + zero, lo, hi) - lo, the zero point (less lo) where
    k or t is past its end."""
    iv, vt = f"<{LANES} x i32>", e.vt
    scale, zero, lo, hi = (e.splat(v) for v in ("%scale", "%zero", "%lo", "%hi"))
    zero_q = e(f"sub {iv} {e(f'fptosi {vt} {zero} to {iv}')}, {e(f'fptosi {vt} {lo} to {iv}')}")

    def tile(k4, t):
        (mask,) = e.lane_masks(t, 1, "%ntok")
        packed, kvec = e.splat_i32(0), e.splat_i64("%k")
        for i in range(4):
            k = e(f"add i64 {e(f'mul i64 {k4}, 4')}, {i}")
            inside = e(f"and <{LANES} x i1> {mask}, {e(f'icmp slt <{LANES} x i64> {e.splat_i64(k)}, {kvec}')}")
            at = e.offset(e(f"select i1 {e(f'icmp slt i64 {k}, %k')}, i64 {k}, i64 0"), "%ldx", t)
            x = e.vload(e.gep("%xt", at), inside)
            q = e.vcall("roundeven", e(f"fdiv {vt} {x}, {scale}"))
            q = e.vcall("minnum", e.vcall("maxnum", e(f"fadd {vt} {q}, {zero}"), lo), hi)
            q = e(f"sub {iv} {e(f'fptosi {vt} {q} to {iv}')}, {e(f'fptosi {vt} {lo} to {iv}')}")
            q = e(f"select <{LANES} x i1> {inside}, {iv} {q}, {iv} {zero_q}")
            packed = e(f"or {iv} {packed}, {e(f'shl {iv} {q}, {e.splat_i32(8 * i)}') if i else q}")
        e.raw(f"  store {iv} {packed}, ptr {e.gep('%xq', e.offset(k4, '%tp', t), 'i32')}, align 4")

    e.loop("%k4_0", "%k4_1", 1, [], lambda k4, _: e.loop("0", "%tp", LANES, [], lambda t, _c: tile(k4, t) or [])
           and [])


def quantize_ir() -> str:
    e = Builder(LANES)
    e.function(QUANTIZE_SIGNATURE, lambda: _quantize(e))
    return e.module("; sparsejit generated kernel: float xt quantized to uint8 and packed four inputs to an i32\n"
                    "; xq[k4, t].byte[i] = clamp(roundeven(xt[4 k4 + i, t] / scale) + zero, lo, hi) - lo")


def int8_ir(cfg: Int8Config) -> str:
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"no int8 kernel for {cfg}")
    e = Builder(LANES)
    e.function(SIGNATURE, lambda: _rows(e, cfg))
    return e.module(f"; sparsejit generated kernel: int8 activation={cfg.activation} residual={cfg.residual} "
                    f"vnni={cfg.vnni} vectors={cfg.vectors}\n"
                    "; yt[j, t] = act(float(sum over row j's stored 4-blocks b: xq[b, t] . w[b] - corr[j]) * scale[j]"
                    f" + bias[j]){' + rt[j, t]' if cfg.residual else ''}")
