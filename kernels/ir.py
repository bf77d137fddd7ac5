"""What every LLVM IR kernel generator here shares: float literals, an instruction
emitter that names results, and a builder with loops whose phis carry vectors and the
lane masks of a token tile that may run past the end.
"""

from __future__ import annotations

import struct

import numpy as np


def f32(x: float) -> str:
    """An LLVM float literal: the float32 value, written as the exact double hex LLVM wants."""
    bits = struct.unpack("<Q", struct.pack("<d", float(np.float32(x))))[0]
    return f"0x{bits:016X}"


class Emitter:
    """Appends instructions, naming each result freshly (%v0, %v1, ...)."""

    def __init__(self, lanes: int):
        self.lines: list[str] = []
        self.n = 0
        self.vt = f"<{lanes} x float>"
        self.lanes = lanes

    def __call__(self, text: str, name: str | None = None) -> str:
        if name is None:
            name = f"%v{self.n}"
            self.n += 1
        self.lines.append(f"  {name} = {text}")
        return name

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def splat(self, scalar: str) -> str:
        one = self(f"insertelement {self.vt} poison, float {scalar}, i32 0")
        return self(f"shufflevector {self.vt} {one}, {self.vt} poison, <{self.lanes} x i32> zeroinitializer")

    def const(self, x: float) -> str:
        return f"<{', '.join(['float ' + f32(x)] * self.lanes)}>"

    def fma(self, a: str, b: str, c: str, name: str | None = None) -> str:
        vt = self.vt
        return self(f"call {vt} @llvm.fma.v{self.lanes}f32({vt} {a}, {vt} {b}, {vt} {c})", name)

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

    def vload(self, ptr: str, mask: str | None) -> str:
        vt = self.vt
        if mask is None:
            return self(f"load {vt}, ptr {ptr}, align 4")
        return self(f"call {vt} @llvm.masked.load.v{self.lanes}f32.p0(ptr {ptr}, i32 4, "
                    f"<{self.lanes} x i1> {mask}, {vt} zeroinitializer)")

    def vstore(self, value: str, ptr: str, mask: str | None) -> None:
        vt = self.vt
        if mask is None:
            self.raw(f"  store {vt} {value}, ptr {ptr}, align 4")
        else:
            self.raw(f"  call void @llvm.masked.store.v{self.lanes}f32.p0({vt} {value}, ptr {ptr}, i32 4, "
                     f"<{self.lanes} x i1> {mask})")


class Builder(Emitter):
    """An emitter that knows its current block, for loops whose phis carry vectors."""

    def __init__(self, lanes: int):
        super().__init__(lanes)
        self.block = "entry"
        self.loops = 0

    def label(self, name: str) -> None:
        self.raw(f"{name}:")
        self.block = name

    def loop(self, start: str, end: str, step: int, carried: list[tuple[str, str]], body) -> tuple[str, list[str]]:
        """for (i = start; i + step <= end; i += step) carried = body(i, carried).

        Returns (the first i that did not run, the carried values after the loop)."""
        n = self.loops
        self.loops += 1
        head, body_l, done = f"L{n}.head", f"L{n}.body", f"L{n}.done"
        pred = self.block
        self.raw(f"  br label %{head}")
        self.label(head)
        phi_at = len(self.lines)
        i = f"%L{n}.i"
        names = [f"%L{n}.c{k}" for k in range(len(carried))]
        self.lines.append("")  # the phis, written once the back edge is known
        top = self(f"add i64 {i}, {step}")
        ok = self(f"icmp sle i64 {top}, {end}")
        self.raw(f"  br i1 {ok}, label %{body_l}, label %{done}")
        self.label(body_l)
        new = body(i, names)
        self.raw(f"  br label %{head}")
        back = self.block
        phis = [f"  {i} = phi i64 [ {start}, %{pred} ], [ {top}, %{back} ]"]
        phis += [f"  {nm} = phi {ty} [ {init}, %{pred} ], [ {nv}, %{back} ]"
                 for nm, (ty, init), nv in zip(names, carried, new)]
        self.lines[phi_at] = "\n".join(phis)
        self.label(done)
        return i, names

    def splat_i64(self, scalar: str) -> str:
        L = self.lanes
        one = self(f"insertelement <{L} x i64> poison, i64 {scalar}, i32 0")
        return self(f"shufflevector <{L} x i64> {one}, <{L} x i64> poison, <{L} x i32> zeroinitializer")

    def lane_masks(self, start: str, vectors: int, end: str) -> list[str]:
        """For `vectors` vectors from token `start`: lane i of vector v is on when
        start + v·lanes + i < end."""
        L = self.lanes
        iota = f"<{', '.join(f'i64 {i}' for i in range(L))}>"
        end_v = self.splat_i64(end)
        masks = []
        for v in range(vectors):
            base = self.splat_i64(self(f"add i64 {start}, {v * L}"))
            masks.append(self(f"icmp slt <{L} x i64> {self(f'add <{L} x i64> {base}, {iota}')}, {end_v}"))
        return masks

    def tiles(self, start: str, end: str, width: int, body) -> None:
        """for (t = start; t < end; t += width) body(t): the last tile may be partial,
        for `body` to mask with lane_masks(t, ..., end)."""
        self.loop(start, self(f"add i64 {end}, {width - 1}"), width, [], lambda t, _c: body(t) or [])
