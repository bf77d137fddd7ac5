"""QOperator attention (QAttentionCore) as LLVM IR, for CPUs with AVX-512 VNNI.

The same kernel as elementwise.QATTENTION_SOURCE with its "vnni" products, step for step
and bit for bit (tests/test_int8.py holds both to the reference): per (batch, head) task,
q·kᵀ's sums exact in int32 by `vpdpbusd` (`@product`), each row of them requantized and
looked up (elementwise.row_bytes_ir, or the loops here where it is 0), the keys the mask
moves quantized again, QSoftmax's row by its table, its bytes laid for p·v's product, whose
sums are requantized to the output's bytes.

Why IR: Numba's compile of that kernel, most of it typing its numpy calls, was what a first
load waited for; LLVM compiles this text without that typing (bench/README.md, twenty-second
session, has the times). Its scratch comes from the caller (`Scratch`) rather than per task.

Slots (int64, one row per part): elementwise.QAttention's 50, then the part's scratch
arrays' addresses (SCRATCH's order). Bytes are read with their strides as given (any layout);
the mask [mb, mh, mr, t] is C order, the output [b, h, rows, dv] has its strides in slots
46-49 (the last 1: the heads merged, [b, rows, h, dv], as QAttention makes it).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from .ir import Builder, Signature
from .lowp_ir import quantized_ir

SIGNATURE = Signature("qattention", (("slots", "ptr"), ("floats", "ptr"), ("t0", "i64"), ("t1", "i64")))
SLOTS = 50  # elementwise.QAttention's slots, before the scratch's
SCRATCH = ("a", "bp", "c", "sa", "sb", "byte", "qr", "es", "pq")


class Scratch(NamedTuple):
    """Bytes of each of a part's scratch arrays (SCRATCH's order), for `rows` queries of `d`
    features, `t` keys and `dv` values: x's bytes in 4-blocks [k4, rows] (`a`), y's
    [k4, n16] (`bp`), the int32 sums [rows, n16] (`c`), x's row sums and y's column sums
    (int32), a row's bytes and looked-up bytes, its exponentials, and its probabilities'
    bytes to the end of their last 4-block."""

    a: int
    bp: int
    c: int
    sa: int
    sb: int
    byte: int
    qr: int
    es: int
    pq: int

    @classmethod
    def of(cls, rows: int, d: int, t: int, dv: int) -> Scratch:
        k4 = max(-(-d // 4), -(-t // 4))
        n16 = max(-(-t // 16), -(-dv // 16)) * 16
        return cls(rows * 4 * k4, 4 * k4 * n16, 4 * rows * n16, 4 * rows, 4 * n16, t, t, 4 * t, 4 * -(-t // 4))


class _Emit(Builder):
    """ir.Builder (its fresh names, labels, branches and `gep`) with structured scalar code:
    `loop` (an i64 counter from start while below end, the body inline) and `when` (a
    branch) as context managers, and scalars that change in a loop kept in `var`s (allocas
    in the entry block, which -O3 makes registers), for the kernel's nested loops with
    early exits, which Builder.loop's carried values would make deep callbacks of."""

    def __init__(self):
        super().__init__(16)
        self.allocas: list[str] = []

    def put(self, *lines: str) -> None:
        """Instructions without a result (stores, calls, branches)."""
        self.lines += [f"  {x}" for x in lines]

    def var(self, ty: str, init: str) -> str:
        p = f"%{self.fresh('var')}"
        self.allocas.append(f"  {p} = alloca {ty}")
        self.put(f"store {ty} {init}, ptr {p}")
        return p

    @contextlib.contextmanager
    def loop(self, start: str, end: str):
        tag = self.fresh("loop")
        i = f"%{tag}.i"
        came = self.block
        self.br(f"{tag}.head")
        self.label(f"{tag}.head")
        self.put(f"{i} = phi i64 [ {start}, %{came} ], [ {i}.next, %{tag}.latch ]",
                 f"%{tag}.more = icmp slt i64 {i}, {end}")
        self.cond_br(f"%{tag}.more", f"{tag}.body", f"{tag}.exit")
        self.label(f"{tag}.body")
        yield i
        self.br(f"{tag}.latch")
        self.label(f"{tag}.latch")
        self.put(f"{i}.next = add i64 {i}, 1")
        self.br(f"{tag}.head")
        self.label(f"{tag}.exit")

    @contextlib.contextmanager
    def when(self, condition: str):
        tag = self.fresh("if")
        self.cond_br(condition, f"{tag}.then", f"{tag}.end")
        self.label(f"{tag}.then")
        yield
        self.br(f"{tag}.end")
        self.label(f"{tag}.end")

    def update(self, var: str, ty: str, make) -> None:
        """var (a `var` of type ty) = make(its value)."""
        self.put(f"store {ty} {make(self.load(ty, var, '0'))}, ptr {var}")

    def function(self, head: str) -> list[str]:
        """The lines of an internal function `head` (its name and parameters) whose body
        this is."""
        return [f"define internal void {head} {{", "entry:", *self.allocas, *self.lines, "  ret void", "}", ""]

    def load(self, ty: str, base: str, index: str) -> str:
        return self(f"load {ty}, ptr {self.gep(base, index, ty)}")

    def store(self, ty: str, value: str, base: str, index: str) -> None:
        self.put(f"store {ty} {value}, ptr {self.gep(base, index, ty)}")


def _requantized(e: _Emit, acc: str, grid: list[str]) -> str:
    """QLinearMatMul's byte of the i32 sum acc, as an i32: clamp(acc · multiplier, lowest,
    highest), rounded half to even, plus the zero point (elementwise.requantized; the clamp as
    row_bytes_ir's)."""
    m, z, lo, hi = grid
    f = e(f"sitofp i32 {acc} to float")
    v = e(f"fmul float {f}, {m}")
    v = e(f"call float @llvm.maxnum.f32(float {v}, float {lo})")
    v = e(f"call float @llvm.minnum.f32(float {v}, float {hi})")
    v = e(f"call float @llvm.roundeven.f32(float {v})")
    v = e(f"fadd float {v}, {z}")
    return e(f"fptosi float {v} to i32")


def _quantized(e: _Emit, x: str, grid: list[str]) -> str:
    """QuantizeLinear's value of x as an i32: rint(x / scale) + zero, NaN as 0, clamped
    (lowp_ir.quantized_ir, the Numba kernels' `quantized`)."""
    out = f"%{e.fresh('q')}"
    e.lines += quantized_ir(out, x, *grid).splitlines()
    return e(f"fptosi float {out} to i32")


PRODUCT_ARGS = ("ptr noalias %x, i64 %xs0, i64 %xs1, i64 %m, i64 %k, i8 %xflip, i64 %alpha, ptr noalias %y, i64 %ys0, "
                "i64 %ys1, i64 %n, i8 %yflip, i64 %beta, ptr noalias %a, ptr noalias %bp, ptr noalias %c, "
                "ptr noalias %sa, ptr noalias %sb")


def _pack(e: _Emit, src: str, at: str, step: str, flip: str, count: str | None = None) -> tuple[str, list[str]]:
    """The i32 of the 4 bytes src[at + r · step] (r < 4, or r < count: 0 past it), each xor
    flip, byte r at bits 8r; and the bytes (i8) it holds."""
    word, parts = None, []
    for r in range(4):
        off = e(f"add i64 {at}, {e(f'mul i64 {r}, {step}')}") if r else at
        byte = e(f"xor i8 {e.load('i8', src, off) if count is None else _guarded(e, src, off, r, count)}, {flip}")
        if count is not None:
            byte = e(f"select i1 {e(f'icmp slt i64 {r}, {count}')}, i8 {byte}, i8 0")
        parts.append(byte)
        wide = e(f"zext i8 {byte} to i32")
        wide = e(f"shl i32 {wide}, {8 * r}") if r else wide
        word = wide if word is None else e(f"or i32 {word}, {wide}")
    return word, parts


def _guarded(e: _Emit, src: str, at: str, r: int, count: str) -> str:
    """src[at] where r < count, else 0 (not read: past the matrix)."""
    inside = e(f"icmp slt i64 {r}, {count}")
    safe = e(f"select i1 {inside}, i64 {at}, i64 0")
    return e.load("i8", src, safe)


def _sum(e: _Emit, parts: list[str], ext: str) -> str:
    """The sum of the bytes `parts` as an i32, each zext or sext (`ext`)."""
    total = None
    for b in parts:
        v = e(f"{ext} i8 {b} to i32")
        total = v if total is None else e(f"add i32 {total}, {v}")
    return total


def _product() -> list[str]:
    """`@product`: c [m, n16] (i32, n16 = n rounded up to 16) = Σ_k (x - xz)(y - yz) for x
    [m, k] and y [k, n] bytes (strides xs0, xs1, ys0, ys1), exactly, by AVX-512 VNNI's
    `vpdpbusd`: `@pack_x` lays x's bytes xor xflip as uint8 in 4-blocks [k4, m] of i32
    (`a`: k 4q .. 4q + 3 of row i in a[q, i]) and sums its rows (`sa`), `@pack_y` y's xor
    yflip as int8 in 4-blocks [k4, n16] of i32 (`bp`, 0 past k and n) and sums its columns
    (`sb`), and `@finish` takes each i32 of c as the sum of its k4 products, less what the
    zero points and offsets add (alpha = xz + cx, beta = yz - cy), in the stores. The sums
    are taken modulo 2^32, as the int64 sums truncated to int32 are (the "vnni" product of
    elementwise's kernel before it was IR). p·v's x is laid in `a` by `@row`."""
    product = _Emit()
    product.put("call void @pack_x(ptr %x, i64 %xs0, i64 %xs1, i64 %m, i64 %k, i8 %xflip, ptr %a, ptr %sa)",
                "call void @pack_y(ptr %y, i64 %ys0, i64 %ys1, i64 %k, i64 %n, i8 %yflip, ptr %bp, ptr %sb)",
                "call void @finish(i64 %m, i64 %k, i64 %n, i64 %alpha, i64 %beta, ptr %a, ptr %bp, ptr %c, ptr %sa, ptr %sb)")
    return product.function(f"@product({PRODUCT_ARGS})") + _pack_x() + _pack_y() + _finish()


def _put_block(e: _Emit, src: tuple, dst: tuple, sums: tuple, count: str | None) -> None:
    """One 4-block: the i32 of src = (array, first byte, step to the next, flip) (`_pack`)
    stored at dst = (array, i32 index), and its bytes' sum (zext or sext) added to sums =
    (array, index, ext)."""
    word, parts = _pack(e, *src, count)
    e.store("i32", word, *dst)
    at, added = e.gep(sums[0], sums[1], "i32"), _sum(e, parts, sums[2])
    old = e(f"load i32, ptr {at}")
    e.put(f"store i32 {e(f'add i32 {old}, {added}')}, ptr {at}")


def _pack_x() -> list[str]:
    """`@pack_x`: x's bytes xor xflip in 4-blocks a [k4, m] of i32, its rows' sums in sa."""
    e = _Emit()
    e.put("%k4f = lshr i64 %k, 2", "%ktail = and i64 %k, 3", "%san = shl i64 %m, 2",
          "call void @llvm.memset.p0.i64(ptr %sa, i8 0, i64 %san, i1 false)")

    def put_a(i: str, q: str, count: str | None = None) -> None:  # a[q, i] and sa[i]
        k0 = e(f"shl i64 {q}, 2")
        at = e(f"add i64 {e(f'mul i64 {i}, %xs0')}, {e(f'mul i64 {k0}, %xs1')}")
        slot = e(f"add i64 {e(f'mul i64 {q}, %m')}, {i}")
        _put_block(e, ("%x", at, "%xs1", "%xflip"), ("%a", slot), ("%sa", i, "zext"), count)

    _by_layout(e, "%xs0", ("q", "%k4f"), ("i", "%m"), (("i", "%m"), ("q", "%k4f")), put_a)
    with e.when(e("icmp ne i64 %ktail, 0")), e.loop("0", "%m") as i:  # (the last 4-block, past k: 0)
        put_a(i, "%k4f", "%ktail")
    return e.function("@pack_x(ptr noalias %x, i64 %xs0, i64 %xs1, i64 %m, i64 %k, i8 %xflip, ptr noalias %a, "
                      "ptr noalias %sa)")


def _pack_y() -> list[str]:
    """`@pack_y`: y's bytes xor yflip in 4-blocks bp [k4, n16] of i32 (0 past k and n), its
    columns' sums (as int8) in sb."""
    e = _Emit()
    e.put("%k4f = lshr i64 %k, 2", "%k3 = add i64 %k, 3", "%k4 = lshr i64 %k3, 2", "%ktail = and i64 %k, 3",
          "%n15 = add i64 %n, 15", "%nv = lshr i64 %n15, 4", "%n16 = shl i64 %nv, 4",
          "%bpn = mul i64 %k4, %n16", "%bpb = shl i64 %bpn, 2",
          "call void @llvm.memset.p0.i64(ptr %bp, i8 0, i64 %bpb, i1 false)",
          "%sbn = shl i64 %n16, 2", "call void @llvm.memset.p0.i64(ptr %sb, i8 0, i64 %sbn, i1 false)",
          "%flip32 = zext i8 %yflip to i32", "%flip32b = mul i32 %flip32, 16843009")  # (the flip in each byte)

    def put_b(q: str, j: str, count: str | None = None) -> None:  # bp[q, j] and sb[j]
        k0 = e(f"shl i64 {q}, 2")
        at = e(f"add i64 {e(f'mul i64 {k0}, %ys0')}, {e(f'mul i64 {j}, %ys1')}")
        slot = e(f"add i64 {e(f'mul i64 {q}, %n16')}, {j}")
        _put_block(e, ("%y", at, "%ys0", "%yflip"), ("%bp", slot), ("%sb", j, "sext"), count)

    tag = e.fresh("ycols")
    e.cond_br(e('icmp eq i64 %ys0, 1'), f"{tag}.cols", f"{tag}.any")
    e.label(f"{tag}.cols")  # each column's k contiguous: its 4-blocks are i32s to move, its sum a loop along it
    with e.loop("0", "%n") as j:
        col = e(f"getelementptr i8, ptr %y, i64 {e(f'mul i64 {j}, %ys1')}")
        with e.loop("0", "%k4f") as q:
            word = e(f"load i32, ptr {e(f'getelementptr i32, ptr {col}, i64 {q}')}, align 1")
            e.store("i32", e(f"xor i32 {word}, %flip32b"), "%bp", e(f"add i64 {e(f'mul i64 {q}, %n16')}, {j}"))
        total = e.var("i32", "0")
        with e.loop("0", e("shl i64 %k4f, 2")) as kk:
            byte = e.load("i8", col, kk)
            w = e(f"sext i8 {e(f'xor i8 {byte}, %yflip')} to i32")
            e.update(total, "i32", lambda old, w=w: e(f"add i32 {old}, {w}"))
        e.store("i32", e.load("i32", total, "0"), "%sb", j)
    e.br(f"{tag}.tail")
    e.label(f"{tag}.any")
    _by_layout(e, "%ys1", ("q", "%k4f"), ("j", "%n"), (("j", "%n"), ("q", "%k4f")), put_b)
    e.br(f"{tag}.tail")
    e.label(f"{tag}.tail")
    with e.when(e("icmp ne i64 %ktail, 0")), e.loop("0", "%n") as j:
        put_b("%k4f", j, "%ktail")
    return e.function("@pack_y(ptr noalias %y, i64 %ys0, i64 %ys1, i64 %k, i64 %n, i8 %yflip, ptr noalias %bp, "
                      "ptr noalias %sb)")


def _finish() -> list[str]:
    """`@finish`: ra[i] = k·alpha·beta - beta·sa[i] (in sa), cb[j] = alpha·sb[j] (in sb),
    then `@idot` into c."""
    e = _Emit()
    e.put("%k3 = add i64 %k, 3", "%k4 = lshr i64 %k3, 2", "%n15 = add i64 %n, 15", "%nv = lshr i64 %n15, 4",
          "%n16 = shl i64 %nv, 4", "%ab = mul i64 %alpha, %beta", "%kab = mul i64 %k, %ab")
    with e.loop("0", "%m") as i:
        sa = e(f"sext i32 {e.load('i32', '%sa', i)} to i64")
        row = e(f"sub i64 %kab, {e(f'mul i64 %beta, {sa}')}")
        e.store("i32", e(f"trunc i64 {row} to i32"), "%sa", i)
    alpha32 = e("trunc i64 %alpha to i32")
    with e.loop("0", "%n16") as j:
        e.store("i32", e(f"mul i32 {alpha32}, {e.load('i32', '%sb', j)}"), "%sb", j)
    e.put("call void @idot(ptr %a, ptr %bp, ptr %c, ptr %sa, ptr %sb, i64 %m, i64 %k4, i64 %nv)")
    return e.function("@finish(i64 %m, i64 %k, i64 %n, i64 %alpha, i64 %beta, ptr noalias %a, ptr noalias %bp, "
                      "ptr noalias %c, ptr noalias %sa, ptr noalias %sb)")


def _by_layout(e: _Emit, along: str, outer: tuple, inner: tuple, other: tuple, put) -> None:
    """put(...) over the full 4-blocks: `inner` the inner loop where `along` (its stride) is
    1, so that it runs along contiguous bytes and vectorises, else in `other`'s order."""
    tag = e.fresh("order")
    e.cond_br(e(f'icmp eq i64 {along}, 1'), f"{tag}.along", f"{tag}.other")
    for label, (first, second) in (("along", (outer, inner)), ("other", other)):
        e.label(f"{tag}.{label}")
        with e.loop("0", first[1]) as u, e.loop("0", second[1]) as w:
            put(**{first[0]: u, second[0]: w})
        e.br(f"{tag}.done")
    e.label(f"{tag}.done")


def _idot() -> list[str]:
    """`@idot`: c[i, j] = Σ_q vpdpbusd over a[q, i] (4 uint8 of row i) and bp[q, j] (4 int8
    of column j), plus ra[i], less cb[j], for c [m, 16 nv] in rows: rows in blocks of 4 (4
    accumulators sharing each load of bp), then one at a time."""
    iv = "<16 x i32>"
    head = ("define internal void @idot(ptr noalias %a, ptr noalias %b, ptr noalias %c, ptr noalias %ra, "
            "ptr noalias %cb, i64 %m, i64 %k4, i64 %nv) {")
    lines = [head, "entry:", "  %ldc = shl i64 %nv, 4", "  %m4 = and i64 %m, -4", "  br label %r4.head"]
    for tag, rows, start, end, came, after in (("r4", 4, "0", "%m4", "entry", "r1.pre"),
                                               ("r1", 1, "%m4", "%m", "r1.pre", "done")):
        t = f"%{tag}"
        lines += [f"{tag}.head:", f"  {t}.i = phi i64 [ {start}, %{came} ], [ {t}.inext, {t}.cdone ]",
                  f"  {t}.more = icmp slt i64 {t}.i, {end}", f"  br i1 {t}.more, label {t}.cols, label %{after}",
                  f"{tag}.cols:", f"  br label {t}.chead",
                  f"{tag}.chead:", f"  {t}.jv = phi i64 [ 0, {t}.cols ], [ {t}.jvnext, {t}.kdone ]",
                  f"  {t}.cmore = icmp slt i64 {t}.jv, %nv", f"  br i1 {t}.cmore, label {t}.kpre, label {t}.cdone",
                  f"{tag}.kpre:", f"  {t}.j = shl i64 {t}.jv, 4", f"  br label {t}.khead",
                  f"{tag}.khead:", f"  {t}.kk = phi i64 [ 0, {t}.kpre ], [ {t}.kknext, {t}.kbody ]"]
        lines += [f"  {t}.acc{r} = phi {iv} [ zeroinitializer, {t}.kpre ], [ {t}.nacc{r}, {t}.kbody ]"
                  for r in range(rows)]
        lines += [f"  {t}.kmore = icmp slt i64 {t}.kk, %k4", f"  br i1 {t}.kmore, label {t}.kbody, label {t}.kdone",
                  f"{tag}.kbody:", f"  {t}.bo1 = mul i64 {t}.kk, %ldc", f"  {t}.bo = add i64 {t}.bo1, {t}.j",
                  f"  {t}.bp = getelementptr i32, ptr %b, i64 {t}.bo", f"  {t}.bv = load {iv}, ptr {t}.bp, align 4",
                  f"  {t}.ak = mul i64 {t}.kk, %m"]
        for r in range(rows):
            lines += [f"  {t}.row{r} = add i64 {t}.i, {r}", f"  {t}.ao{r} = add i64 {t}.ak, {t}.row{r}",
                      f"  {t}.ap{r} = getelementptr i32, ptr %a, i64 {t}.ao{r}",
                      f"  {t}.a{r} = load i32, ptr {t}.ap{r}, align 4",
                      f"  {t}.ai{r} = insertelement {iv} poison, i32 {t}.a{r}, i64 0",
                      f"  {t}.as{r} = shufflevector {iv} {t}.ai{r}, {iv} poison, {iv} zeroinitializer",
                      (f"  {t}.nacc{r} = call {iv} @llvm.x86.avx512.vpdpbusd.512({iv} {t}.acc{r}, {iv} {t}.as{r}, "
                       f"{iv} {t}.bv)")]
        lines += [f"  {t}.kknext = add i64 {t}.kk, 1", f"  br label {t}.khead", f"{tag}.kdone:",
                  f"  {t}.cbp = getelementptr i32, ptr %cb, i64 {t}.j", f"  {t}.cbv = load {iv}, ptr {t}.cbp, align 4"]
        for r in range(rows):
            lines += [f"  {t}.crow{r} = add i64 {t}.i, {r}", f"  {t}.rap{r} = getelementptr i32, ptr %ra, i64 {t}.crow{r}",
                      f"  {t}.ra{r} = load i32, ptr {t}.rap{r}, align 4",
                      f"  {t}.rai{r} = insertelement {iv} poison, i32 {t}.ra{r}, i64 0",
                      f"  {t}.ras{r} = shufflevector {iv} {t}.rai{r}, {iv} poison, {iv} zeroinitializer",
                      f"  {t}.s{r} = add {iv} {t}.acc{r}, {t}.ras{r}", f"  {t}.d{r} = sub {iv} {t}.s{r}, {t}.cbv",
                      f"  {t}.co1{r} = mul i64 {t}.crow{r}, %ldc", f"  {t}.co{r} = add i64 {t}.co1{r}, {t}.j",
                      f"  {t}.cp{r} = getelementptr i32, ptr %c, i64 {t}.co{r}",
                      f"  store {iv} {t}.d{r}, ptr {t}.cp{r}, align 4"]
        lines += [f"  {t}.jvnext = add i64 {t}.jv, 1", f"  br label {t}.chead",
                  f"{tag}.cdone:", f"  {t}.inext = add i64 {t}.i, {rows}", f"  br label {t}.head"]
        if tag == "r4":
            lines += ["r1.pre:", "  br label %r1.head"]
    return lines + ["done:", "  ret void", "}", ""]


ROW_ARGS = ("ptr noalias %acc, ptr noalias %mrow, ptr noalias %byte, ptr noalias %qr, ptr noalias %es, "
            "ptr noalias %prow, i64 %t, ptr noalias %floats, ptr noalias %plain, ptr noalias %scores, "
            "ptr noalias %value, ptr noalias %table, i64 %flip, i64 %row_bytes, i8 %pflip, ptr noalias %arow, i64 %m, "
            "ptr noalias %sai")


def _top_byte(e: _Emit, qr: str, t: str, value: str) -> str:
    """A var holding the byte of qr [t] whose value (value[b]: byte b dequantized) is
    largest (elementwise.top_byte): where the values rise with the bytes xor %flip (0 to
    255), the largest of those; else (%flip < 0) compared value by value."""
    flat = e("icmp slt i64 %flip, 0")
    flip8 = e("trunc i64 %flip to i8")
    top = e.var("i64", "0")
    tag = e.fresh("top")
    e.cond_br(flat, f"{tag}.values", f"{tag}.bytes")
    e.label(f"{tag}.values")
    first = e(f"zext i8 {e.load('i8', qr, '0')} to i64")
    e.put(f"store i64 {first}, ptr {top}")
    with e.loop("1", t) as j:
        bj = e(f"zext i8 {e.load('i8', qr, j)} to i64")
        best = e.load("i64", top, "0")
        higher = e(f"fcmp ogt float {e.load('float', value, bj)}, "
                      f"{e.load('float', value, best)}")
        e.put(f"store i64 {e(f'select i1 {higher}, i64 {bj}, i64 {best}')}, ptr {top}")
    e.br(f"{tag}.done")
    e.label(f"{tag}.bytes")
    key = e.var("i8", "0")
    with e.loop("0", t) as j:
        k = e(f"xor i8 {e.load('i8', qr, j)}, {flip8}")
        e.update(key, "i8", lambda old, k=k: e(f"call i8 @llvm.umax.i8(i8 {k}, i8 {old})"))
    found = e(f"xor i8 {e.load('i8', key, '0')}, {flip8}")
    e.put(f"store i64 {e(f'zext i8 {found} to i64')}, ptr {top}")
    e.br(f"{tag}.done")
    e.label(f"{tag}.done")
    return top


def _row() -> list[str]:
    """`@row`: one row of scores' sums acc (i32, t of them) to its probabilities' bytes prow:
    requantized and looked up (`row_bytes`' kernel, or the loops here where it is 0), the
    keys the mask row mrow moves quantized again, then QSoftmax by its table (the rows of
    elementwise.QATTENTION_SOURCE's loop and softmax_row). Its arrays apart (noalias), so
    that its loops vectorise."""
    e = _Emit()
    f = [e.load("float", "%floats", str(i)) for i in range(20)]
    ptr = {x: f"%{x}" for x in ("plain", "scores", "value", "table")}
    acc, mrow, byte, qr, es, prow, t = "%acc", "%mrow", "%byte", "%qr", "%es", "%prow", "%t"
    grid1 = e("getelementptr float, ptr %floats, i64 4")
    row_bytes = "%row_bytes"
    tag = e.fresh("rowbytes")
    e.cond_br(e(f'icmp ne i64 {row_bytes}, 0'), f"{tag}.ir", f"{tag}.loops")
    e.label(f"{tag}.ir")
    e.put(f"call void {e(f'inttoptr i64 {row_bytes} to ptr')}(ptr {acc}, i64 {t}, ptr {grid1}, "
          f"ptr {ptr['plain']}, ptr {byte}, ptr {qr})", f"br label %{tag}.done")
    e.label(f"{tag}.loops")
    with e.loop("0", t) as j:
        y = e(f"trunc i32 {_requantized(e, e.load('i32', acc, j), f[4:8])} to i8")
        e.store("i8", y, byte, j)
        e.store("i8", e.load("i8", ptr["plain"], e(f"zext i8 {y} to i64")), qr, j)
    e.br(f"{tag}.done")
    e.label(f"{tag}.done")
    masked = e.var("i1", "false")
    with e.loop("0", t) as j:
        moved = e(f"fcmp une float {e.load('float', mrow, j)}, 0.0")
        e.update(masked, "i1", lambda old, moved=moved: e(f"or i1 {old}, {moved}"))
    with e.when(e.load("i1", masked, "0")), e.loop("0", t) as j:  # (the keys the mask moves)
        add = e.load("float", mrow, j)
        with e.when(e(f"fcmp une float {add}, 0.0")):
            s = e.load("float", ptr["scores"], e(f"zext i8 {e.load('i8', byte, j)} to i64"))
            v = _quantized(e, e(f"fadd float {s}, {add}"), f[8:12])
            e.store("i8", e(f"trunc i32 {v} to i8"), qr, j)
    top = _top_byte(e, qr, t, ptr['value'])  # (the softmax of the row's bytes: elementwise.softmax_row)
    top_at = e(f"shl i64 {e.load('i64', top, '0')}, 8")
    row = e(f"getelementptr float, ptr {ptr['table']}, i64 {top_at}")
    total = e.var("double", "0.0")
    with e.loop("0", t) as j:
        x = e.load("float", row, e(f"zext i8 {e.load('i8', qr, j)} to i64"))
        e.store("float", x, es, j)
        wide = e(f"fpext float {x} to double")
        e.update(total, "double", lambda old, wide=wide: e(f"fadd reassoc double {old}, {wide}"))
    sum32 = e(f"fptrunc double {e.load('double', total, '0')} to float")
    # its probabilities' bytes xor pflip (p·v's x, as @pack_x lays it): in prow, 0 to the
    # end of the last 4-block, then a 4-block at a time to a[q, i] (arow[q · m]); their sum
    # to sa[i] (sai)
    psum = e.var("i32", "0")
    with e.loop("0", t) as j:
        p = _quantized(e, e(f"fdiv float {e.load('float', es, j)}, {sum32}"), f[12:16])
        u = e(f"xor i8 {e(f'trunc i32 {p} to i8')}, %pflip")
        e.store("i8", u, prow, j)
        wide = e(f"zext i8 {u} to i32")
        e.update(psum, "i32", lambda old, wide=wide: e(f"add i32 {old}, {wide}"))
    e.store("i32", e.load("i32", psum, "0"), "%sai", "0")
    k4 = e(f"lshr i64 {e(f'add i64 {t}, 3')}, 2")
    with e.loop(t, e(f"shl i64 {k4}, 2")) as j:
        e.store("i8", "0", prow, j)
    with e.loop("0", k4) as q:
        word = e(f"load i32, ptr {e(f'getelementptr i32, ptr {prow}, i64 {q}')}, align 1")
        e.store("i32", word, "%arow", e(f"mul i64 {q}, %m"))
    return e.function(f"@row({ROW_ARGS})")


def _outputs() -> list[str]:
    """`@outputs`: the output's bytes out [rows, dv] (rows `ld` bytes apart) of p·v's sums
    c [rows, n16] (i32), requantized (the floats' last grid)."""
    e = _Emit()
    grid = [e.load("float", "%floats", str(i)) for i in range(16, 20)]
    with e.loop("0", "%rows") as i:
        orow = e(f"mul i64 {i}, %ld")
        crow = e(f"mul i64 {i}, %n16")
        with e.loop("0", "%dv") as k:
            y = _requantized(e, e.load("i32", "%c", e(f"add i64 {crow}, {k}")), grid)
            e.store("i8", e(f"trunc i32 {y} to i8"), "%out", e(f"add i64 {orow}, {k}"))
    return e.function("@outputs(ptr noalias %c, ptr noalias %out, i64 %rows, i64 %dv, i64 %n16, ptr noalias %floats, "
                      "i64 %ld)")


def _broadcast(e: _Emit, i: str, n: str) -> str:
    """min(i, n - 1): index i of an axis of n (1, broadcast, or all of them) of the mask."""
    last = e(f"sub i64 {n}, 1")
    return e(f"select i1 {e(f'icmp slt i64 {i}, {last}')}, i64 {i}, i64 {last}")


def qattention_ir(offsets: tuple[int, int, int, int]) -> str:
    """The kernel for the bytes' offsets to vpdpbusd's types (elementwise.qattention_kernel's
    QA, KB, PA, VB: 128 where q, p are int8 or kt, v uint8, else 0)."""
    qa, kb, pa, vb = (-128 if o else 0 for o in offsets)  # (xor 128: the byte plus or less 128)
    e = _Emit()
    n = [f"%n{i}" for i in range(SLOTS + len(SCRATCH))]
    for i, s in enumerate(n):
        e.put(f"{s} = load i64, ptr {e.gep('%slots', str(i), 'i64')}")
    f = [e.load("float", "%floats", str(i)) for i in range(20)]
    ptr = {name: e(f"inttoptr i64 {n[i]} to ptr") for i, name in
           [(0, "q"), (10, "kt"), (20, "v"), (30, "mask"), (35, "out"), (40, "scores"), (41, "value"), (42, "table"),
            (44, "plain"), *[(SLOTS + k, s) for k, s in enumerate(SCRATCH)]]}
    batch, rows, d, t, dv = n[2], n[2 + 2], n[2 + 3], n[12 + 3], n[22 + 3]
    mb, mh, mr = n[31], n[32], n[33]
    flip, row_bytes = n[43], n[45]
    qz, kz, vz, pz = (e(f"fptosi float {x} to i64") for x in f[:4])
    alpha1, beta1 = e(f"add i64 {qz}, {-qa}"), e(f"sub i64 {kz}, {-kb}")
    alpha2, beta2 = e(f"add i64 {pz}, {-pa}"), e(f"sub i64 {vz}, {-vb}")
    n16a = e(f"and i64 {e(f'add i64 {t}, 15')}, -16")
    n16b = e(f"and i64 {e(f'add i64 {dv}, 15')}, -16")
    mt = e(f"mul i64 {mr}, {t}")
    mht = e(f"mul i64 {mh}, {mt}")
    a, bp, c, sa, sb, byte, qr, es, pq = (ptr[s] for s in SCRATCH)
    with e.loop("%t0", "%t1") as task:
        h = e(f"sdiv i64 {task}, {batch}")  # (head-major: a part's tasks are its heads, of every sequence)
        b = e(f"sub i64 {task}, {e(f'mul i64 {h}, {batch}')}")

        def base(name: str, at: int) -> str:  # the (b, h) matrix of a 4-D input
            off = e(f"add i64 {e(f'mul i64 {b}, {n[at + 6]}')}, {e(f'mul i64 {h}, {n[at + 7]}')}")
            return e(f"getelementptr i8, ptr {ptr[name]}, i64 {off}")

        e.put(f"call void @product(ptr {base('q', 0)}, i64 {n[8]}, i64 {n[9]}, i64 {rows}, i64 {d}, i8 {qa}, i64 {alpha1}, "
              f"ptr {base('kt', 10)}, i64 {n[18]}, i64 {n[19]}, i64 {t}, i8 {kb}, i64 {beta1}, ptr {a}, ptr {bp}, "
              f"ptr {c}, ptr {sa}, ptr {sb})")
        mbi, mhi = _broadcast(e, b, mb), _broadcast(e, h, mh)
        mask0 = e(f"add i64 {e(f'mul i64 {mbi}, {mht}')}, {e(f'mul i64 {mhi}, {mt}')}")
        with e.loop("0", rows) as i:
            acc = e(f"getelementptr i32, ptr {c}, i64 {e(f'mul i64 {i}, {n16a}')}")
            moff = e(f"add i64 {mask0}, {e(f'mul i64 {_broadcast(e, i, mr)}, {t}')}")
            mrow = e(f"getelementptr float, ptr {ptr['mask']}, i64 {moff}")
            arow = e(f"getelementptr i32, ptr {a}, i64 {i}")
            sai = e(f"getelementptr i32, ptr {sa}, i64 {i}")
            e.put(f"call void @row(ptr {acc}, ptr {mrow}, ptr {byte}, ptr {qr}, ptr {es}, ptr {pq}, i64 {t}, "
                  f"ptr %floats, ptr {ptr['plain']}, ptr {ptr['scores']}, ptr {ptr['value']}, ptr {ptr['table']}, "
                  f"i64 {flip}, i64 {row_bytes}, i8 {pa}, ptr {arow}, i64 {rows}, ptr {sai})")
        # p·v, its x laid in `a` by @row
        e.put(f"call void @pack_y(ptr {base('v', 20)}, i64 {n[28]}, i64 {n[29]}, i64 {t}, i64 {dv}, i8 {vb}, ptr {bp}, "
              f"ptr {sb})",
              f"call void @finish(i64 {rows}, i64 {t}, i64 {dv}, i64 {alpha2}, i64 {beta2}, ptr {a}, ptr {bp}, ptr {c}, "
              f"ptr {sa}, ptr {sb})")
        oat = e(f"add i64 {e(f'mul i64 {b}, {n[46]}')}, {e(f'mul i64 {h}, {n[47]}')}")  # (the output's strides)
        orows = e(f"getelementptr i8, ptr {ptr['out']}, i64 {oat}")
        e.put(f"call void @outputs(ptr {c}, ptr {orows}, i64 {rows}, i64 {dv}, i64 {n16b}, ptr %floats, i64 {n[48]})")
    lines = ["; sparsejit generated kernel: QOperator attention by VNNI, (batch, head) tasks [t0, t1) (qattention_ir)",
             *_product(), *_idot(), *_row(), *_outputs(), SIGNATURE.define(), "entry:", *e.allocas, *e.lines, "  ret void", "}", ""]
    lines += ["declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)", "declare i8 @llvm.umax.i8(i8, i8)",
              "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <16 x i32>, <16 x i32>)"]
    lines += [f"declare float @llvm.{fn}.f32(float{', float' if fn != 'roundeven' else ''})"
              for fn in ("maxnum", "minnum", "roundeven")]
    return "\n".join(lines) + "\n"
