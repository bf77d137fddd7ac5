"""QOperator attention (QAttentionCore) as LLVM IR, for CPUs with AVX-512 VNNI.

The same kernel as elementwise.QATTENTION_SOURCE with its "vnni" products, step for step
and bit for bit (tests/test_int8.py holds both to the reference): per (batch, head) task,
q·kᵀ's sums exact in int32 by `idot` (elementwise.idot_ir), each row of them requantized
and looked up (elementwise.row_bytes_ir, or the loops here where it is 0), the keys the mask
moves quantized again, QSoftmax's row by its table, then p·v's sums by `idot` and requantized
to the output's bytes.

Why IR: Numba took about 3 s to compile that kernel cold, most of it typing its numpy calls
(bench/README.md, twenty-second session), and a first load waited for it; this compiles in a
small part of that. Its scratch comes from the caller (`Scratch`) rather than per task.

Slots (int64, one row per part): elementwise.QAttention's 47, then the part's scratch
arrays' addresses (SCRATCH's order). Bytes are read with their strides as given (any layout);
the mask [mb, mh, mr, t] and the output [b, h, rows, dv] are C order.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

from .ir import Signature

SIGNATURE = Signature("qattention", (("slots", "ptr"), ("floats", "ptr"), ("t0", "i64"), ("t1", "i64")))
SLOTS = 47  # elementwise.QAttention's slots, before the scratch's
SCRATCH = ("a", "bp", "c", "sa", "sb", "byte", "qr", "es", "pq")


class Scratch(NamedTuple):
    """Bytes of each of a part's scratch arrays (SCRATCH's order), for `rows` queries of `d`
    features, `t` keys and `dv` values: x's bytes in rows of 4·k4 (`a`), y's packed in
    4-blocks [k4, n16, 4] (`bp`), the int32 sums [rows, n16] (`c`), x's row sums and y's
    column sums (int64), a row's bytes and looked-up bytes, its exponentials, and the
    probabilities' bytes [rows, t]."""

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
        return cls(rows * 4 * k4, 4 * k4 * n16, 4 * rows * n16, 8 * rows, 8 * n16, t, t, 4 * t, rows * t)


class _Emit:
    """IR text with structured loops: `loop` (an i64 counter from start while below end)
    and `when` (a branch), each knowing the block it came from; scalars that change in a
    loop live in `var`s (allocas in the entry block, which -O3 makes registers)."""

    def __init__(self):
        self.lines: list[str] = []
        self.allocas: list[str] = []
        self.block = "entry"
        self.n = 0

    def __call__(self, *lines: str) -> None:
        self.lines += [f"  {x}" for x in lines]

    def name(self, stem: str) -> str:
        self.n += 1
        return f"{stem}.{self.n}"

    def label(self, name: str) -> None:
        self.lines.append(f"{name}:")
        self.block = name

    def var(self, ty: str, init: str) -> str:
        p = f"%{self.name('var')}"
        self.allocas.append(f"  {p} = alloca {ty}")
        self(f"store {ty} {init}, ptr {p}")
        return p

    @contextlib.contextmanager
    def loop(self, start: str, end: str):
        tag = self.name("loop")
        i = f"%{tag}.i"
        came = self.block
        self(f"br label %{tag}.head")
        self.label(f"{tag}.head")
        self(f"{i} = phi i64 [ {start}, %{came} ], [ {i}.next, %{tag}.latch ]", f"%{tag}.more = icmp slt i64 {i}, {end}",
             f"br i1 %{tag}.more, label %{tag}.body, label %{tag}.exit")
        self.label(f"{tag}.body")
        yield i
        self(f"br label %{tag}.latch")
        self.label(f"{tag}.latch")
        self(f"{i}.next = add i64 {i}, 1", f"br label %{tag}.head")
        self.label(f"{tag}.exit")

    @contextlib.contextmanager
    def when(self, condition: str):
        tag = self.name("if")
        self(f"br i1 {condition}, label %{tag}.then, label %{tag}.end")
        self.label(f"{tag}.then")
        yield
        self(f"br label %{tag}.end")
        self.label(f"{tag}.end")

    def function(self, head: str) -> list[str]:
        """The lines of an internal function `head` (its name and parameters) whose body
        this is."""
        return [f"define internal void {head} {{", "entry:", *self.allocas, *self.lines, "  ret void", "}", ""]

    def at(self, ty: str, base: str, index: str) -> str:
        """The address of base[index] (elements of ty)."""
        p = f"%{self.name('at')}"
        self(f"{p} = getelementptr {ty}, ptr {base}, i64 {index}")
        return p

    def load(self, ty: str, base: str, index: str) -> str:
        v = f"%{self.name('v')}"
        self(f"{v} = load {ty}, ptr {self.at(ty, base, index)}")
        return v

    def store(self, ty: str, value: str, base: str, index: str) -> None:
        self(f"store {ty} {value}, ptr {self.at(ty, base, index)}")

    def op(self, text: str) -> str:
        v = f"%{self.name('v')}"
        self(f"{v} = {text}")
        return v


def _requantized(e: _Emit, acc: str, grid: list[str]) -> str:
    """QLinearMatMul's byte of the i32 sum acc, as an i32: clamp(acc · multiplier, lowest,
    highest), rounded half to even, plus the zero point (elementwise.requantized; the clamp as
    row_bytes_ir's)."""
    m, z, lo, hi = grid
    f = e.op(f"sitofp i32 {acc} to float")
    v = e.op(f"fmul float {f}, {m}")
    v = e.op(f"call float @llvm.maxnum.f32(float {v}, float {lo})")
    v = e.op(f"call float @llvm.minnum.f32(float {v}, float {hi})")
    v = e.op(f"call float @llvm.roundeven.f32(float {v})")
    v = e.op(f"fadd float {v}, {z}")
    return e.op(f"fptosi float {v} to i32")


def _quantized(e: _Emit, x: str, grid: list[str]) -> str:
    """QuantizeLinear's value of x as an i32: rint(x / scale) + zero, NaN as 0, clamped
    (elementwise.quantized)."""
    scale, zero, lo, hi = grid
    v = e.op(f"fdiv float {x}, {scale}")
    v = e.op(f"call float @llvm.roundeven.f32(float {v})")
    v = e.op(f"fadd float {v}, {zero}")
    nan = e.op(f"fcmp uno float {v}, 0.0")
    v = e.op(f"select i1 {nan}, float 0.0, float {v}")
    below = e.op(f"fcmp olt float {v}, {lo}")
    v = e.op(f"select i1 {below}, float {lo}, float {v}")
    above = e.op(f"fcmp ogt float {v}, {hi}")
    v = e.op(f"select i1 {above}, float {hi}, float {v}")
    return e.op(f"fptosi float {v} to i32")


PRODUCT_ARGS = ("ptr noalias %x, i64 %xs0, i64 %xs1, i64 %m, i64 %k, i8 %xflip, i64 %alpha, ptr noalias %y, i64 %ys0, "
                "i64 %ys1, i64 %n, i8 %yflip, i64 %beta, ptr noalias %a, ptr noalias %bp, ptr noalias %c, "
                "ptr noalias %sa, ptr noalias %sb, i64 %idot")


def _product() -> list[str]:
    """`@product`: c [m, n16] (i32, n16 = n rounded up to 16) = Σ_k (x - xz)(y - yz) for x
    [m, k] and y [k, n] bytes (strides xs0, xs1, ys0, ys1), exactly: x's bytes xor xflip as
    uint8 in rows of 4·k4 (`a`), y's xor yflip as int8 in 4-blocks (`bp`), their sums by
    `idot`, less what the zero points and offsets add (alpha = xz + cx, beta = yz - cy) from
    x's row sums and y's column sums (the "vnni" product of elementwise.PRODUCTS)."""
    e = _Emit()
    e("%k4 = add i64 %k, 3", "%k4q = lshr i64 %k4, 2", "%lda = shl i64 %k4q, 2", "%n15 = add i64 %n, 15",
      "%nv = lshr i64 %n15, 4", "%n16 = shl i64 %nv, 4", "%bpn = mul i64 %lda, %n16",
      "call void @llvm.memset.p0.i64(ptr %bp, i8 0, i64 %bpn, i1 false)",
      "%sbn = shl i64 %n, 3", "call void @llvm.memset.p0.i64(ptr %sb, i8 0, i64 %sbn, i1 false)",
      "%san = shl i64 %m, 3", "call void @llvm.memset.p0.i64(ptr %sa, i8 0, i64 %san, i1 false)",
      "%an = mul i64 %m, %lda", "call void @llvm.memset.p0.i64(ptr %a, i8 0, i64 %an, i1 false)")

    def put_x(i: str, kk: str) -> None:  # a[i, kk] = x[i, kk] ^ xflip; sa[i] += it
        at = e.op(f"mul i64 {i}, %xs0")
        at = e.op(f"add i64 {at}, {e.op(f'mul i64 {kk}, %xs1')}")
        u = e.op(f"xor i8 {e.load('i8', '%x', at)}, %xflip")
        e.store("i8", u, "%a", e.op(f"add i64 {e.op(f'mul i64 {i}, %lda')}, {kk}"))
        s = e.at("i64", "%sa", i)
        wide = e.op(f"zext i8 {u} to i64")
        total = e.op(f"load i64, ptr {s}")
        e(f"store i64 {e.op(f'add i64 {total}, {wide}')}, ptr {s}")

    def put_y(kk: str, j: str) -> None:  # bp[kk / 4, j, kk % 4] = y[kk, j] ^ yflip; sb[j] += it
        at = e.op(f"mul i64 {kk}, %ys0")
        at = e.op(f"add i64 {at}, {e.op(f'mul i64 {j}, %ys1')}")
        w = e.op(f"xor i8 {e.load('i8', '%y', at)}, %yflip")
        block = e.op(f"mul i64 {e.op(f'lshr i64 {kk}, 2')}, %n16")
        column = e.op(f"shl i64 {e.op(f'add i64 {block}, {j}')}, 2")
        slot = e.op(f"add i64 {column}, {e.op(f'and i64 {kk}, 3')}")
        e.store("i8", w, "%bp", slot)
        s = e.at("i64", "%sb", j)
        wide = e.op(f"sext i8 {w} to i64")
        total = e.op(f"load i64, ptr {s}")
        e(f"store i64 {e.op(f'add i64 {total}, {wide}')}, ptr {s}")

    # each loop along the contiguous axis where there is one, as the Numba product's
    rows_first = e.op("icmp sle i64 %xs1, %xs0")
    tag = e.name("xorder")
    e(f"br i1 {rows_first}, label %{tag}.rows, label %{tag}.cols")
    e.label(f"{tag}.rows")
    with e.loop("0", "%m") as i, e.loop("0", "%k") as kk:
        put_x(i, kk)
    e(f"br label %{tag}.done")
    e.label(f"{tag}.cols")
    with e.loop("0", "%k") as kk, e.loop("0", "%m") as i:
        put_x(i, kk)
    e(f"br label %{tag}.done")
    e.label(f"{tag}.done")
    cols_first = e.op("icmp slt i64 %ys0, %ys1")
    tag = e.name("yorder")
    e(f"br i1 {cols_first}, label %{tag}.cols, label %{tag}.rows")
    e.label(f"{tag}.cols")
    with e.loop("0", "%n") as j, e.loop("0", "%k") as kk:
        put_y(kk, j)
    e(f"br label %{tag}.done")
    e.label(f"{tag}.rows")
    with e.loop("0", "%k") as kk, e.loop("0", "%n") as j:
        put_y(kk, j)
    e(f"br label %{tag}.done")
    e.label(f"{tag}.done")
    e("%idot.f = inttoptr i64 %idot to ptr", "call void %idot.f(ptr %a, ptr %bp, ptr %c, i64 %m, i64 %k4q, i64 %nv)",
      "%ab = mul i64 %alpha, %beta", "%kab = mul i64 %k, %ab")
    with e.loop("0", "%m") as i:
        sa = e.load("i64", "%sa", i)
        row = e.op(f"sub i64 %kab, {e.op(f'mul i64 %beta, {sa}')}")
        first = e.op(f"mul i64 {i}, %n16")
        with e.loop("0", "%n") as j:
            at = e.op(f"add i64 {first}, {j}")
            c = e.op(f"sext i32 {e.load('i32', '%c', at)} to i64")
            less = e.op(f"mul i64 %alpha, {e.load('i64', '%sb', j)}")
            v = e.op(f"sub i64 {e.op(f'add i64 {c}, {row}')}, {less}")
            e.store("i32", e.op(f"trunc i64 {v} to i32"), "%c", at)
    return e.function(f"@product({PRODUCT_ARGS})")


ROW_ARGS = ("ptr noalias %acc, ptr noalias %mrow, ptr noalias %byte, ptr noalias %qr, ptr noalias %es, "
            "ptr noalias %prow, i64 %t, ptr noalias %floats, ptr noalias %plain, ptr noalias %scores, "
            "ptr noalias %value, ptr noalias %table, i64 %flip, i64 %row_bytes")


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
    grid1 = e.op("getelementptr float, ptr %floats, i64 4")
    flat = e.op("icmp slt i64 %flip, 0")
    flip8 = e.op("trunc i64 %flip to i8")
    row_bytes = "%row_bytes"
    tag = e.name("rowbytes")
    e(f"br i1 {e.op(f'icmp ne i64 {row_bytes}, 0')}, label %{tag}.ir, label %{tag}.loops")
    e.label(f"{tag}.ir")
    e(f"call void {e.op(f'inttoptr i64 {row_bytes} to ptr')}(ptr {acc}, i64 {t}, ptr {grid1}, "
      f"ptr {ptr['plain']}, ptr {byte}, ptr {qr})", f"br label %{tag}.done")
    e.label(f"{tag}.loops")
    with e.loop("0", t) as j:
        y = e.op(f"trunc i32 {_requantized(e, e.load('i32', acc, j), f[4:8])} to i8")
        e.store("i8", y, byte, j)
        e.store("i8", e.load("i8", ptr["plain"], e.op(f"zext i8 {y} to i64")), qr, j)
    e(f"br label %{tag}.done")
    e.label(f"{tag}.done")
    masked = e.var("i1", "false")
    with e.loop("0", t) as j:
        moved = e.op(f"fcmp une float {e.load('float', mrow, j)}, 0.0")
        old = e.load("i1", masked, "0")
        e(f"store i1 {e.op(f'or i1 {old}, {moved}')}, ptr {masked}")
    with e.when(e.load("i1", masked, "0")), e.loop("0", t) as j:  # (the keys the mask moves)
        add = e.load("float", mrow, j)
        with e.when(e.op(f"fcmp une float {add}, 0.0")):
            s = e.load("float", ptr["scores"], e.op(f"zext i8 {e.load('i8', byte, j)} to i64"))
            v = _quantized(e, e.op(f"fadd float {s}, {add}"), f[8:12])
            e.store("i8", e.op(f"trunc i32 {v} to i8"), qr, j)
    # the softmax of the row's bytes (elementwise.softmax_row): its top byte
    top = e.var("i64", "0")
    tag = e.name("top")
    e(f"br i1 {flat}, label %{tag}.values, label %{tag}.bytes")
    e.label(f"{tag}.values")
    first = e.op(f"zext i8 {e.load('i8', qr, '0')} to i64")
    e(f"store i64 {first}, ptr {top}")
    with e.loop("1", t) as j:
        bj = e.op(f"zext i8 {e.load('i8', qr, j)} to i64")
        best = e.load("i64", top, "0")
        higher = e.op(f"fcmp ogt float {e.load('float', ptr['value'], bj)}, "
                      f"{e.load('float', ptr['value'], best)}")
        e(f"store i64 {e.op(f'select i1 {higher}, i64 {bj}, i64 {best}')}, ptr {top}")
    e(f"br label %{tag}.done")
    e.label(f"{tag}.bytes")
    key = e.var("i8", "0")
    with e.loop("0", t) as j:
        k = e.op(f"xor i8 {e.load('i8', qr, j)}, {flip8}")
        old = e.load("i8", key, "0")
        e(f"store i8 {e.op(f'call i8 @llvm.umax.i8(i8 {k}, i8 {old})')}, ptr {key}")
    found = e.op(f"xor i8 {e.load('i8', key, '0')}, {flip8}")
    e(f"store i64 {e.op(f'zext i8 {found} to i64')}, ptr {top}")
    e(f"br label %{tag}.done")
    e.label(f"{tag}.done")
    top_at = e.op(f"shl i64 {e.load('i64', top, '0')}, 8")
    row = e.op(f"getelementptr float, ptr {ptr['table']}, i64 {top_at}")
    total = e.var("double", "0.0")
    with e.loop("0", t) as j:
        x = e.load("float", row, e.op(f"zext i8 {e.load('i8', qr, j)} to i64"))
        e.store("float", x, es, j)
        wide = e.op(f"fpext float {x} to double")
        old = e.load("double", total, "0")
        e(f"store double {e.op(f'fadd reassoc double {old}, {wide}')}, ptr {total}")
    sum32 = e.op(f"fptrunc double {e.load('double', total, '0')} to float")
    with e.loop("0", t) as j:
        p = _quantized(e, e.op(f"fdiv float {e.load('float', es, j)}, {sum32}"), f[12:16])
        e.store("i8", e.op(f"trunc i32 {p} to i8"), prow, j)
    return e.function(f"@row({ROW_ARGS})")


def _outputs() -> list[str]:
    """`@outputs`: the output's bytes out [rows, dv] (C order) of p·v's sums c [rows, n16]
    (i32), requantized (the floats' last grid)."""
    e = _Emit()
    grid = [e.load("float", "%floats", str(i)) for i in range(16, 20)]
    with e.loop("0", "%rows") as i:
        orow = e.op(f"mul i64 {i}, %dv")
        crow = e.op(f"mul i64 {i}, %n16")
        with e.loop("0", "%dv") as k:
            y = _requantized(e, e.load("i32", "%c", e.op(f"add i64 {crow}, {k}")), grid)
            e.store("i8", e.op(f"trunc i32 {y} to i8"), "%out", e.op(f"add i64 {orow}, {k}"))
    return e.function("@outputs(ptr noalias %c, ptr noalias %out, i64 %rows, i64 %dv, i64 %n16, ptr noalias %floats)")


def qattention_ir(offsets: tuple[int, int, int, int]) -> str:
    """The kernel for the bytes' offsets to vpdpbusd's types (elementwise.qattention_kernel's
    QA, KB, PA, VB: 128 where q, p are int8 or kt, v uint8, else 0)."""
    qa, kb, pa, vb = (-128 if o else 0 for o in offsets)  # (xor 128: the byte plus or less 128)
    e = _Emit()
    n = [f"%n{i}" for i in range(SLOTS + len(SCRATCH))]
    for i, s in enumerate(n):
        e(f"{s} = load i64, ptr {e.at('i64', '%slots', str(i))}")
    f = [e.load("float", "%floats", str(i)) for i in range(20)]
    ptr = {name: e.op(f"inttoptr i64 {n[i]} to ptr") for i, name in
           [(0, "q"), (10, "kt"), (20, "v"), (30, "mask"), (35, "out"), (40, "scores"), (41, "value"), (42, "table"),
            (45, "plain"), *[(SLOTS + k, s) for k, s in enumerate(SCRATCH)]]}
    heads, rows, d, t, dv = n[2 + 1], n[2 + 2], n[2 + 3], n[12 + 3], n[22 + 3]
    mb, mh, mr = n[31], n[32], n[33]
    flip, idot, row_bytes = n[43], n[44], n[46]
    qz, kz, vz, pz = (e.op(f"fptosi float {x} to i64") for x in f[:4])
    alpha1, beta1 = e.op(f"add i64 {qz}, {-qa}"), e.op(f"sub i64 {kz}, {-kb}")
    alpha2, beta2 = e.op(f"add i64 {pz}, {-pa}"), e.op(f"sub i64 {vz}, {-vb}")
    n16a = e.op(f"and i64 {e.op(f'add i64 {t}, 15')}, -16")
    n16b = e.op(f"and i64 {e.op(f'add i64 {dv}, 15')}, -16")
    mt = e.op(f"mul i64 {mr}, {t}")
    mht = e.op(f"mul i64 {mh}, {mt}")
    a, bp, c, sa, sb, byte, qr, es, pq = (ptr[s] for s in SCRATCH)
    with e.loop("%t0", "%t1") as task:
        b = e.op(f"sdiv i64 {task}, {heads}")
        h = e.op(f"sub i64 {task}, {e.op(f'mul i64 {b}, {heads}')}")

        def base(name: str, at: int) -> str:  # the (b, h) matrix of a 4-D input
            off = e.op(f"add i64 {e.op(f'mul i64 {b}, {n[at + 6]}')}, {e.op(f'mul i64 {h}, {n[at + 7]}')}")
            return e.op(f"getelementptr i8, ptr {ptr[name]}, i64 {off}")

        e(f"call void @product(ptr {base('q', 0)}, i64 {n[8]}, i64 {n[9]}, i64 {rows}, i64 {d}, i8 {qa}, i64 {alpha1}, "
          f"ptr {base('kt', 10)}, i64 {n[18]}, i64 {n[19]}, i64 {t}, i8 {kb}, i64 {beta1}, ptr {a}, ptr {bp}, "
          f"ptr {c}, ptr {sa}, ptr {sb}, i64 {idot})")
        mb1 = e.op(f"sub i64 {mb}, 1")
        mbi = e.op(f"select i1 {e.op(f'icmp slt i64 {b}, {mb1}')}, i64 {b}, i64 {mb1}")
        mh1 = e.op(f"sub i64 {mh}, 1")
        mhi = e.op(f"select i1 {e.op(f'icmp slt i64 {h}, {mh1}')}, i64 {h}, i64 {mh1}")
        mask0 = e.op(f"add i64 {e.op(f'mul i64 {mbi}, {mht}')}, {e.op(f'mul i64 {mhi}, {mt}')}")
        with e.loop("0", rows) as i:
            acc = e.op(f"getelementptr i32, ptr {c}, i64 {e.op(f'mul i64 {i}, {n16a}')}")
            mr1 = e.op(f"sub i64 {mr}, 1")
            mri = e.op(f"select i1 {e.op(f'icmp slt i64 {i}, {mr1}')}, i64 {i}, i64 {mr1}")
            moff = e.op(f"add i64 {mask0}, {e.op(f'mul i64 {mri}, {t}')}")
            mrow = e.op(f"getelementptr float, ptr {ptr['mask']}, i64 {moff}")
            prow = e.op(f"getelementptr i8, ptr {pq}, i64 {e.op(f'mul i64 {i}, {t}')}")
            e(f"call void @row(ptr {acc}, ptr {mrow}, ptr {byte}, ptr {qr}, ptr {es}, ptr {prow}, i64 {t}, "
              f"ptr %floats, ptr {ptr['plain']}, ptr {ptr['scores']}, ptr {ptr['value']}, ptr {ptr['table']}, "
              f"i64 {flip}, i64 {row_bytes})")
        e(f"call void @product(ptr {pq}, i64 {t}, i64 1, i64 {rows}, i64 {t}, i8 {pa}, i64 {alpha2}, "
          f"ptr {base('v', 20)}, i64 {n[28]}, i64 {n[29]}, i64 {dv}, i8 {vb}, i64 {beta2}, ptr {a}, ptr {bp}, "
          f"ptr {c}, ptr {sa}, ptr {sb}, i64 {idot})")
        bh = e.op(f"add i64 {e.op(f'mul i64 {b}, {heads}')}, {h}")
        matrix = e.op(f"mul i64 {rows}, {dv}")
        orows = e.op(f"getelementptr i8, ptr {ptr['out']}, i64 {e.op(f'mul i64 {bh}, {matrix}')}")
        e(f"call void @outputs(ptr {c}, ptr {orows}, i64 {rows}, i64 {dv}, i64 {n16b}, ptr %floats)")
    lines = ["; sparsejit generated kernel: QOperator attention by VNNI, (batch, head) tasks [t0, t1) (qattention_ir)",
             *_product(), *_row(), *_outputs(), SIGNATURE.define(), "entry:", *e.allocas, *e.lines, "  ret void", "}", ""]
    lines += ["declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)", "declare i8 @llvm.umax.i8(i8, i8)"]
    lines += [f"declare float @llvm.{fn}.f32(float{', float' if fn != 'roundeven' else ''})"
              for fn in ("maxnum", "minnum", "roundeven")]
    return "\n".join(lines) + "\n"
