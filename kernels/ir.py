"""What every LLVM IR kernel generator here shares: float literals, a kernel's signature
written once (rendered to LLVM and to ctypes), an instruction emitter that names results
and declares the intrinsics it calls, and loops whose phis carry vectors.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import numpy as np


def f32(x: float) -> str:
    """An LLVM float literal: the float32 value, written as the exact double hex LLVM wants."""
    bits = struct.unpack("<Q", struct.pack("<d", float(np.float32(x))))[0]
    return f"0x{bits:016X}"


_CTYPES = {"ptr": ctypes.c_void_p, "i64": ctypes.c_int64, "float": ctypes.c_float}


@dataclass(frozen=True)
class Signature:
    """A kernel's argument list, the one source of both its LLVM definition and the
    ctypes prototype Python calls it through: `(("xt", "ptr"), ("ldx", "i64"), ...)`.
    Pointers are `noalias` in the definition (no kernel argument overlaps another)."""

    name: str
    args: tuple[tuple[str, str], ...]

    def params(self, noalias: bool = True) -> str:
        """The parameter list: `ptr noalias %xt, i64 %ldx, ...`."""
        return ", ".join(f"{t}{' noalias' if noalias and t == 'ptr' else ''} %{n}" for n, t in self.args)

    def define(self, extra: str = "", attrs: str = "") -> str:
        """`define void @name(params[, extra]) attrs {`; `attrs` "alwaysinline" makes it an
        internal helper inlined into its callers."""
        linkage = "internal " if "alwaysinline" in attrs else ""
        return (f"define {linkage}void @{self.name}({self.params()}{', ' + extra if extra else ''})"
                f"{' ' + attrs if attrs else ''} {{")

    def passing(self) -> str:
        """The arguments as a call passes them on: `ptr %xt, i64 %ldx, ...`."""
        return self.params(noalias=False)

    def extended(self, name: str, *more: tuple[str, str]) -> Signature:
        return Signature(name, self.args + more)

    def ctypes(self) -> type:
        return ctypes.CFUNCTYPE(None, *(_CTYPES[t] for _, t in self.args))


def tail_vectors(vectors: int) -> list[int]:
    """The widths of the tiles after the full ones: powers of two below `vectors`, largest first."""
    return [1 << b for b in range(vectors.bit_length() - 1, -1, -1) if 1 << b < vectors]


def with_driver(ir: str, driver: str) -> str:
    """What runs for one kernel, printable: its IR, then its Numba driver as comments, and
    the parallel loop that makes the driver's calls (launch.py) where it hands them over."""
    from .launch import LAUNCH_SOURCE

    if "launch_calls(" in driver:
        driver += "\n# the parallel loop (kernels/launch.py):\n" + LAUNCH_SOURCE
    return ir + "\n; driver (Numba):\n" + "".join("; " + line + "\n" for line in driver.splitlines())


class Emitter:
    """Appends instructions, naming each result freshly (%v0, %v1, ...), and records the
    declaration of every intrinsic called through `call`, for `declarations`."""

    def __init__(self, lanes: int):
        self.lines: list[str] = []
        self.n = 0
        self.vt = f"<{lanes} x float>"
        self.lanes = lanes
        self.declared: dict[str, str] = {}

    def __call__(self, text: str, name: str | None = None) -> str:
        if name is None:
            name = f"%v{self.n}"
            self.n += 1
        self.lines.append(f"  {name} = {text}")
        return name

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def call(self, intrinsic: str, ret: str, *args: tuple[str, str], name: str | None = None, flags: str = "") -> str:
        """`call [flags] ret @intrinsic(type value, ...)`, declared once; `ret` "void" emits no
        result; `flags`: fast-math flags, as "nnan"."""
        self.declared.setdefault(intrinsic, f"declare {ret} @{intrinsic}({', '.join(t for t, _ in args)})")
        text = f"call {flags + ' ' if flags else ''}{ret} @{intrinsic}({', '.join(f'{t} {v}' for t, v in args)})"
        if ret == "void":
            self.raw("  " + text)
            return ""
        return self(text, name)

    def declarations(self) -> str:
        return "\n".join(self.declared[k] for k in sorted(self.declared))

    def vcall(self, op: str, *values: str, name: str | None = None, flags: str = "") -> str:
        """A float-vector intrinsic (`llvm.<op>.v<lanes>f32`) of float-vector arguments."""
        return self.call(f"llvm.{op}.v{self.lanes}f32", self.vt, *((self.vt, v) for v in values), name=name,
                         flags=flags)

    def splat(self, scalar: str) -> str:
        one = self(f"insertelement {self.vt} poison, float {scalar}, i32 0")
        return self(f"shufflevector {self.vt} {one}, {self.vt} poison, <{self.lanes} x i32> zeroinitializer")

    def const(self, x: float) -> str:
        return f"<{', '.join(['float ' + f32(x)] * self.lanes)}>"

    def fma(self, a: str, b: str, c: str, name: str | None = None) -> str:
        return self.vcall("fma", a, b, c, name=name)

    def gep(self, base: str, index: str, ty: str = "float") -> str:
        return self(f"getelementptr inbounds {ty}, ptr {base}, i64 {index}")

    def vptr(self, base: str, start: str, v: int, ty: str = "float") -> str:
        """The address of vector v (v · lanes elements on) from element `start` of `base`."""
        return self.gep(base, self(f"add i64 {start}, {v * self.lanes}") if v else start, ty)

    def offset(self, row: str, ld: str, col: str) -> str:
        """The element index of (row, col) in a matrix of row stride `ld`."""
        return self(f"add i64 {self(f'mul i64 {row}, {ld}')}, {col}")

    def row_vectors(self, base: str, ld: str, row: str, col: str, masks: list) -> list[str]:
        """Consecutive vectors of one row of `base` from column `col`, one per mask
        (None: unmasked)."""
        start = self.offset(row, ld, col)
        return [self.vload(self.vptr(base, start, v), m) for v, m in enumerate(masks)]

    def prefetch_row(self, base: str, ld: str, row: str, col: str, vectors: int, write: bool = False) -> None:
        """Prefetch into L1 (for writing, if `write`) the lines of `vectors` vectors of one row
        of `base` from column `col`, as row_vectors would read them."""
        start = self.offset(row, ld, col)
        for v in range(vectors):
            self.call("llvm.prefetch.p0", "void", ("ptr", self.vptr(base, start, v)), ("i32", str(int(write))),
                      ("i32", "3"), ("i32", "1"))

    def vload(self, ptr: str, mask: str | None, name: str | None = None) -> str:
        vt, L = self.vt, self.lanes
        if mask is None:
            return self(f"load {vt}, ptr {ptr}, align 4", name)
        return self.call(f"llvm.masked.load.v{L}f32.p0", vt, ("ptr", ptr), ("i32", "4"), (f"<{L} x i1>", mask),
                         (vt, "zeroinitializer"), name=name)

    def vstore(self, value: str, ptr: str, mask: str | None) -> None:
        vt, L = self.vt, self.lanes
        if mask is None:
            self.raw(f"  store {vt} {value}, ptr {ptr}, align 4")
        else:
            self.call(f"llvm.masked.store.v{L}f32.p0", "void", (vt, value), ("ptr", ptr), ("i32", "4"),
                      (f"<{L} x i1>", mask))


class Builder(Emitter):
    """An emitter that knows its current block, for branches and for loops whose phis
    carry vectors (the one loop construct of every generator)."""

    def __init__(self, lanes: int):
        super().__init__(lanes)
        self.block = "entry"
        self.blocks = 0
        self.full_to: list[str] = []  # the ends of the tiles being emitted whole (see tiles)

    def label(self, name: str) -> None:
        self.raw(f"{name}:")
        self.block = name

    def fresh(self, stem: str) -> str:
        """A block name not used before in this function."""
        self.blocks += 1
        return f"{stem}{self.blocks}"

    def br(self, target: str) -> None:
        self.raw(f"  br label %{target}")

    def cond_br(self, cond: str, then: str, other: str) -> None:
        self.raw(f"  br i1 {cond}, label %{then}, label %{other}")

    def phi(self, ty: str, *incoming: tuple[str, str], name: str | None = None) -> str:
        """phi over (value, block) pairs."""
        return self(f"phi {ty} {', '.join(f'[ {v}, %{b} ]' for v, b in incoming)}", name)

    def loop(self, start: str, end: str, step: int, carried: list[tuple[str, str]], body) -> tuple[str, list[str]]:
        """for (i = start; i + step <= end; i += step) carried = body(i, carried).

        Returns (the first i that did not run, the carried values after the loop)."""
        n = self.fresh("L")
        head, body_l, done = f"{n}.head", f"{n}.body", f"{n}.done"
        pred = self.block
        self.br(head)
        self.label(head)
        phi_at = len(self.lines)
        i = f"%{n}.i"
        names = [f"%{n}.c{k}" for k in range(len(carried))]
        self.lines.append("")  # the phis, written once the back edge is known
        top = self(f"add i64 {i}, {step}")
        self.cond_br(self(f"icmp sle i64 {top}, {end}"), body_l, done)
        self.label(body_l)
        new = body(i, names)
        self.br(head)
        back = self.block
        phis = [f"  {i} = phi i64 [ {start}, %{pred} ], [ {top}, %{back} ]"]
        phis += [f"  {nm} = phi {ty} [ {init}, %{pred} ], [ {nv}, %{back} ]"
                 for nm, (ty, init), nv in zip(names, carried, new)]
        self.lines[phi_at] = "\n".join(phis)
        self.label(done)
        return i, names

    def splat_i32(self, scalar: str | int) -> str:
        """A vector of i32 lanes all `scalar` (a value or a literal)."""
        L = self.lanes
        if isinstance(scalar, int):
            return f"<{', '.join([f'i32 {scalar}'] * L)}>"
        one = self(f"insertelement <{L} x i32> poison, i32 {scalar}, i32 0")
        return self(f"shufflevector <{L} x i32> {one}, <{L} x i32> poison, <{L} x i32> zeroinitializer")

    def splat_i64(self, scalar: str) -> str:
        L = self.lanes
        one = self(f"insertelement <{L} x i64> poison, i64 {scalar}, i32 0")
        return self(f"shufflevector <{L} x i64> {one}, <{L} x i64> poison, <{L} x i32> zeroinitializer")

    def lane_masks(self, start: str, vectors: int, end: str) -> list[str]:
        """For `vectors` vectors from token `start`: lane i of vector v is on when
        start + v·lanes + i < end. None for each (unmasked) inside a whole tile of `tiles`
        up to `end`."""
        if end in self.full_to:
            return [None] * vectors
        L = self.lanes
        iota = f"<{', '.join(f'i64 {i}' for i in range(L))}>"
        end_v = self.splat_i64(end)
        masks = []
        for v in range(vectors):
            base = self.splat_i64(self(f"add i64 {start}, {v * L}"))
            masks.append(self(f"icmp slt <{L} x i64> {self(f'add <{L} x i64> {base}, {iota}')}, {end_v}"))
        return masks

    def tiles(self, start: str, end: str, width: int, body) -> None:
        """for (t = start; t < end; t += width) body(t), `body` emitted twice: for the whole
        tiles, where lane_masks(t, ..., end) gives None (plain loads and stores), then for
        the partial last tile, if any, masked. Masked moves are slow on AVX2 (AMD
        microcodes the masked store), and all but the last tile need none."""
        self.full_to.append(end)
        t, _ = self.loop(start, end, width, [], lambda t, _c: body(t) or [])
        self.full_to.pop()
        self.if_before(t, end, lambda: body(t))

    def vector_tiles(self, start: str, end: str, vectors: int, body) -> None:
        """As `tiles`, for a body of any number of vectors, `body(t, v)`: whole tiles of
        `vectors` vectors, then what is left in whole tiles of halving widths (each at most
        once), then a masked one-vector tail. So a few tokens take one vector's work, not a
        whole masked tile's (the masked-off lanes' loads and arithmetic cost as the others)."""
        L = self.lanes
        self.full_to.append(end)
        t, _ = self.loop(start, end, L * vectors, [], lambda t, _c: body(t, vectors) or [])
        for v in tail_vectors(vectors):
            t, _ = self.loop(t, end, L * v, [], lambda t, _c, v=v: body(t, v) or [])
        self.full_to.pop()
        self.if_before(t, end, lambda: body(t, 1))

    def if_before(self, t: str, end: str, emit) -> None:
        """emit() in a block run only if t < end (as a tile loop's masked last tile)."""
        tail = self.fresh("T")
        self.cond_br(self(f"icmp slt i64 {t}, {end}"), f"{tail}.body", f"{tail}.done")
        self.label(f"{tail}.body")
        emit()
        self.br(f"{tail}.done")
        self.label(f"{tail}.done")

    def function(self, signature: Signature, body, extra: str = "", attrs: str = "") -> None:
        """Appends a whole function: its definition line, `body()` from the entry block,
        `ret void`."""
        self.raw(signature.define(extra, attrs))
        self.label("entry")
        body()
        self.raw("  ret void")
        self.raw("}")
        self.raw("")

    def module(self, header: str) -> str:
        """The module: header comments, the intrinsics its functions called, the functions."""
        return "\n".join([header, self.declarations(), "", *self.lines])
