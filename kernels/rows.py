"""Row kernels: a group of per-element ops and means over the last axis, one Numba kernel.

QOperator and QDQ graphs quantize around every op, so what a float graph runs as one
LayerNorm runs there as a dozen nodes: FakeQuantize on each input of the residual Add
and on its output, ReduceMean, Sub, Pow, ReduceMean, a QuantizeLinear and Lookup for the
square root, Div, FakeQuantize, Mul γ, FakeQuantize, Add β. Each is a pass over the
tensor on its own kernel. lower.fuse_rows gathers such a group; `RowKernel` writes one
Numba function for it that takes each row of the tensor through every op while it is in
cache: one pass per mean instead of one per op.

Each op computes what its node's kernel computes, in the same float32 steps (see
elementwise.py): Add, Sub, Mul, Div and Sqrt per element; Pow with the exponent 2 as
x · x; FakeQuantize, QuantizeLinear and DequantizeLinear per tensor; Lookup from its
table; ReduceMean over the last axis, whose sum is taken in float64 and rounded to
float32 before the division by the row's length. That sum is exact but where the row's
values span more than 29 bits of exponent, so its order does not matter, and
`reference_rows`, each op on numpy in turn, gives the kernel's result bit for bit.

The kernel reads its inputs as they lie: token-major (C order), or feature-major (a
Linear kernel's output, the reverse of C order), looping over the features inside the
tokens for the first and outside for the second, and writes its outputs the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..graph import Node
from ..ops import evaluate, op
from .compile import load_source

ROW_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "FakeQuantize", "QuantizeLinear", "DequantizeLinear", "Lookup",
           "ReduceMean")
BYTES = (np.dtype(np.uint8), np.dtype(np.int8))
BLOCK = 16  # features per task, feature-major
SIGNS = {"Add": "+", "Sub": "-", "Mul": "*", "Div": "/"}

HELPERS = """\
@njit(inline="always")
def quantized(x, scale, zero, lo, hi):
    # QuantizeLinear's value as a float: clamp(rint(x / scale) + zero, lo, hi); NaN gives
    # the byte 0, as numpy's cast of NaN does on x86
    v = np.rint(x / scale) + zero
    v = np.float32(0) if v != v else v
    v = lo if v < lo else v
    return hi if v > hi else v


# (a float64 sum of float32 values: exact but where their exponents span more than 29
# bits, and then its rounding to float32 does not depend on the order)
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def total64(xs):
    total = 0.0
    for i in range(xs.size):
        total += np.float64(xs[i])
    return total
"""


def _const(consts: dict, name: str) -> np.ndarray | None:
    return consts.get(name) if name else None


def _scalar(c) -> bool:
    return c is not None and c.size == 1


def _vector(c) -> bool:
    """A constant that varies along the last axis only: [n], [1, n], [1, 1, n]."""
    return c is not None and c.ndim >= 1 and c.size == c.shape[-1] and c.size > 1


def _mean_axis(n: Node, consts: dict, opset: int) -> int | None:
    """The one axis a ReduceMean with keepdims reduces, None for another."""
    if not n.attrs.get("keepdims", 1) or n.attrs.get("noop_with_empty_axes", 0):
        return None
    axes = _const(consts, n.inputs[1]) if opset >= 18 and len(n.inputs) > 1 else n.attrs.get("axes")
    axes = None if axes is None else [int(a) for a in np.asarray(axes).ravel()]
    return axes[0] if axes is not None and len(axes) == 1 else None


def _grid(n: Node, consts: dict) -> bool:
    """One float32 scale and an 8-bit zero point, both constants, no blocks or other types."""
    s, z = (_const(consts, i) for i in (n.inputs[1:3] + ["", ""])[:2])
    return _scalar(s) and s.dtype == np.float32 and _scalar(z) and z.dtype in BYTES and not any(
        n.attrs.get(a) for a in ("block_size", "output_dtype", "precision"))


def row_op(n: Node, consts: dict, opset: int) -> bool:
    """Whether a RowKernel computes node n: one of ROW_OPS on one value that is not a
    constant (two for Add to Div), with float32 constants that are scalars or vary along
    the last axis, one grid for the quantizing ops, a float32 table of 256 for a Lookup,
    the last axis (kept) for a ReduceMean, the exponent 2 for a Pow."""
    op, cs = n.op_type, [_const(consts, i) for i in n.inputs]
    if op not in ROW_OPS or len(n.outputs) != 1 or cs[0] is not None:
        return False
    if op in ("Add", "Sub", "Mul", "Div"):
        c = cs[1]
        return len(n.inputs) == 2 and (c is None or (c.dtype == np.float32 and (_scalar(c) or _vector(c))))
    if op == "Pow":
        return len(n.inputs) == 2 and _scalar(cs[1]) and cs[1].dtype == np.float32 and float(cs[1].ravel()[0]) == 2.0
    if op == "Sqrt":
        return True
    if op in ("FakeQuantize", "QuantizeLinear", "DequantizeLinear"):
        return _grid(n, consts) and (op == "FakeQuantize" or n.attrs.get("axis", 1) is not None)
    if op == "Lookup":
        t = n.attrs["table"]
        return t.shape == (256,) and t.dtype == np.float32
    return _mean_axis(n, consts, opset) == -1


@dataclass
class _Value:
    kind: str         # "row": one per element; "mean": one per row
    stage: int        # the pass over the row that computes it (a mean ends its pass)
    node: Node | None = None


def reference_op(n: Node, args: list, opset: int) -> np.ndarray:
    """One op of a group on numpy: a mean as the kernel takes it (the sum in float64,
    rounded to float32, over the length), Pow's square as x · x, the others as ops.py's."""
    if n.op_type == "ReduceMean":
        x = args[0]
        return np.sum(x, axis=-1, keepdims=True, dtype=np.float64).astype(np.float32) / np.float32(x.shape[-1])
    if n.op_type == "Pow":
        return args[0] * args[0]
    return evaluate(n.op_type, args, n.attrs, opset, 1)[0]


def run_members(inputs, nodes: list[Node], names: list[str], outputs: list[str], consts: dict,
                run: Callable[[Node, list], np.ndarray]) -> tuple:
    """The group's ops one after another, each by `run(node, its inputs)`."""
    env = dict(zip(names, inputs))
    for n in nodes:
        env[n.outputs[0]] = run(n, [env[i] if i in env else consts.get(i) if i else None for i in n.inputs])
    return tuple(env[o] for o in outputs)


@op("RowGroup", fused=True, needs_opset=True)
def reference_rows(*inputs: np.ndarray, nodes: list[Node], names: list[str], outputs: list[str], consts: dict,
                   opset: int) -> tuple:
    """The fused node (lower.fuse_rows): its ops on numpy, one after another (reference_op)."""
    return run_members(inputs, nodes, names, outputs, consts, lambda n, args: reference_op(n, args, opset))


def _passed(c: np.ndarray):
    """A constant as the kernel takes it: a scalar, or the vector along the last axis."""
    return c.reshape(-1)[0] if c.size == 1 else np.ascontiguousarray(c.reshape(-1))


class RowKernel:
    """The Numba kernel of a group of row ops (`nodes`, in order) reading `names` (the
    values computed outside, each of the outputs' shape) and writing `outputs`."""

    def __init__(self, nodes: list[Node], names: list[str], outputs: list[str], consts: dict):
        self.nodes, self.names, self.outputs = nodes, names, outputs
        self.arrays = {i: consts[i] for n in nodes for i in n.inputs if i in consts}
        self.arrays.update({f"{n.outputs[0]}::table": n.attrs["table"] for n in nodes if n.op_type == "Lookup"})
        self.values: dict[str, _Value] = {x: _Value("row", 0) for x in names}
        for n in nodes:
            ins = [self.values[i] for i in n.inputs if i in self.values]
            stage = max(v.stage + (v.node is not None and v.node.op_type == "ReduceMean") for v in ins)
            rowwise = any(v.kind == "row" for v in ins) or any(_vector(self.arrays.get(i)) for i in n.inputs)
            kind = "mean" if n.op_type == "ReduceMean" or not rowwise else "row"
            self.values[n.outputs[0]] = _Value(kind, stage, n)
        self.stages = 1 + max(v.stage for v in self.values.values())
        self.types = {o: self._type(o) for o in outputs}
        self._compiled: dict[str, object] = {}

    def _type(self, name: str) -> np.dtype:
        n = self.values[name].node
        return self.arrays[n.inputs[2]].dtype if n.op_type == "QuantizeLinear" else np.dtype(np.float32)

    # --- source --------------------------------------------------------------------

    def _plan(self) -> None:
        """Each row value's variable, loop and storage. A pass over the row is a series of
        loops over its elements: the ops that vectorise share a loop, and each Lookup (a
        gather, which keeps a loop scalar) has one of its own. A value read by a later
        loop of its pass is stored in a temporary, by a later pass in a kept array."""
        self.var = {n.outputs[0]: f"v{i}" for i, n in enumerate(self.nodes)}
        self.loop: dict[str, tuple[int, int]] = {}
        self.loops: dict[int, list[list[Node]]] = {}
        for stage in range(self.stages):
            loops: list[list[Node]] = []
            for n in self.nodes:
                o = n.outputs[0]
                if self.values[o].stage != stage or (self.values[o].kind == "mean" and n.op_type != "ReduceMean"):
                    continue
                gather = n.op_type == "Lookup"
                if not loops or gather or loops[-1][-1].op_type == "Lookup":
                    loops.append([])
                loops[-1].append(n)
                self.loop[o] = (stage, len(loops) - 1)
            self.loops[stage] = loops
        readers = [(self.values[n.outputs[0]].stage, self.loop.get(n.outputs[0]), n) for n in self.nodes]
        self.keep, self.temps = [], {}
        for o, (stage, k) in self.loop.items():
            if self.values[o].kind != "row":
                continue
            read = [(s, lp) for s, lp, n in readers if o in n.inputs]
            if any(s > stage for s, _ in read):
                self.keep.append(o)
            if any(s == stage and lp is not None and lp[1] != k for s, lp in read):
                self.temps.setdefault(stage, []).append(o)

    def _ref(self, name: str, at: tuple[int, int], tm: bool) -> str:
        """How loop `at` (pass, loop) reads value `name`: at feature j of row r (token-
        major) or at row i of feature j (feature-major)."""
        e = "[j]" if tm else "[i]"
        if name in self.names:
            return f"x{self.names.index(name)}_{e}"
        if name in self.arrays:
            return f"k{list(self.arrays).index(name)}" + ("[j]" if _vector(self.arrays[name]) else "")
        v, var = self.values[name], self.var[name]
        if v.kind == "mean":
            return var if tm else f"{var}[i]"
        where = self.loop[name]
        if where == at:
            return var
        return f"{var}_t{e}" if where[0] == at[0] else f"{var}_kept_{e}"

    def _expr(self, n: Node, at: tuple[int, int], tm: bool) -> str:
        """The value of n's output, from its inputs as loop `at` reads them."""
        a = [self._ref(i, at, tm) if i else "" for i in n.inputs]
        op = n.op_type
        if op in SIGNS:
            return f"{a[0]} {SIGNS[op]} {a[1]}"
        if op == "Pow":
            return f"{a[0]} * {a[0]}"
        if op == "Sqrt":
            return f"np.sqrt({a[0]})"
        if op == "Lookup":
            return f"k{list(self.arrays).index(n.outputs[0] + '::table')}[np.int32({a[0]}) & 255]"
        scale, zero = f"np.float32({a[1]})", f"np.float32({a[2]})"
        if op == "DequantizeLinear":
            return f"(np.float32({a[0]}) - {zero}) * {scale}"
        info = np.iinfo(self.arrays[n.inputs[2]].dtype)
        q = f"quantized({a[0]}, {scale}, {zero}, np.float32({info.min}), np.float32({info.max}))"
        return q if op == "QuantizeLinear" else f"({q} - {zero}) * {scale}"

    def _cast(self, o: str) -> str:
        return "np.int32" if self.types[o] != np.float32 else ""

    def _body(self, stage: int, k: int, tm: bool, pad: str) -> list[str]:
        """The statements of loop k of pass `stage`, one element's."""
        e, out = "[j]" if tm else "[i]", []
        for n in self.loops[stage][k]:
            o, v = n.outputs[0], self.var[n.outputs[0]]
            if n.op_type == "ReduceMean":
                x = self._ref(n.inputs[0], (stage, k), tm)
                out.append(f"{pad}{v}_in_[j] = {x}" if tm else f"{pad}{v}_part_[i] += np.float64({x})")
                continue
            out.append(f"{pad}{v} = {self._expr(n, (stage, k), tm)}")
            if o in self.temps.get(stage, []):
                out.append(f"{pad}{v}_t{e} = {v}")
            if o in self.keep:
                out.append(f"{pad}{v}_kept_{e} = {v}")
            if o in self.outputs:
                out.append(f"{pad}y{self.outputs.index(o)}_{e} = {self._cast(o)}({v})")
        return out

    def _pass(self, stage: int, tm: bool, pad: str) -> list[str]:
        """One pass over the row(s): the values once per row (of means and constants), the
        loops over the elements, and the means it ends. Token-major, a row's pass;
        feature-major, the features in blocks on every thread, then the means' sums."""
        var, lines = self.var, []
        for n in self.nodes:
            o = n.outputs[0]
            if self.values[o].stage == stage and self.values[o].kind == "mean" and n.op_type != "ReduceMean":
                e = self._expr(n, (stage, -1), tm)
                lines += [f"{pad}{var[o]} = {e}"] if tm else [f"{pad}for i in range(rows):", f"{pad}    {var[o]}[i] = {e}"]
        means = [var[n.outputs[0]] for n in self.nodes
                 if n.op_type == "ReduceMean" and self.values[n.outputs[0]].stage == stage]
        if tm:
            for k in range(len(self.loops[stage])):
                lines += [f"{pad}for j in range(n):"] + self._body(stage, k, tm, pad + "    ")
            lines += [f"{pad}{v} = np.float32(np.float32(total64({v}_in_)) / nf)" for v in means]
            return lines
        if self.loops[stage]:
            sliced = [f"x{k}" for k in range(len(self.names))] + [
                f"y{k}" for k, o in enumerate(self.outputs) if self.values[o].kind == "row"] + [
                f"{var[o]}_kept" for o in self.keep]
            lines += [f"{pad}{v}_part = np.zeros((blocks, rows), np.float64)" for v in means]
            lines += [f"{pad}for b in prange(blocks):"]
            lines += [f"{pad}    {var[o]}_t = np.empty(rows, np.float32)" for o in self.temps.get(stage, [])]
            lines += [f"{pad}    {v}_part_ = {v}_part[b]" for v in means]
            lines += [f"{pad}    for j in range(b * {BLOCK}, min(n, (b + 1) * {BLOCK})):"]
            lines += [f"{pad}        {a}_ = {a}[j]" for a in sliced]
            for k in range(len(self.loops[stage])):
                lines += [f"{pad}        for i in range(rows):"] + self._body(stage, k, tm, pad + "            ")
        for v in means:  # each block's sums, added
            lines += [f"{pad}for i in range(rows):", f"{pad}    total = 0.0", f"{pad}    for b in range(blocks):",
                      f"{pad}        total += {v}_part[b, i]",
                      f"{pad}    {v}[i] = np.float32(np.float32(total) / nf)"]
        return lines

    def source(self, major: str) -> str:
        """The kernel's text; `major` "token" (inputs [rows, n]) or "feature" ([n, rows])."""
        tm = major == "token"
        self._plan()
        means = [self.var[n.outputs[0]] for n in self.nodes if n.op_type == "ReduceMean"]
        args = [f"x{k}" for k in range(len(self.names))] + [f"k{k}" for k in range(len(self.arrays))] + \
            [f"y{k}" for k in range(len(self.outputs))]
        lines = ["@njit(parallel=True, nogil=True, cache=True)",
                 f"def rows(rows, n, {', '.join(args)}):",
                 "    nf = np.float32(n)"]
        scratch = [f"{self.var[o]}_kept" for o in self.keep]
        if tm:
            pad = "        "
            lines.append("    for r in prange(rows):")
            temps = [f"{self.var[o]}_t" for t in self.temps.values() for o in t]
            lines += [f"{pad}{a}_ = np.empty(n, np.float32)" for a in scratch + [f"{v}_in" for v in means]]
            lines += [f"{pad}{a} = np.empty(n, np.float32)" for a in temps]
            lines += [f"{pad}x{k}_ = x{k}[r]" for k in range(len(self.names))]
            lines += [f"{pad}y{k}_ = y{k}[r]" for k, o in enumerate(self.outputs) if self.values[o].kind == "row"]
        else:
            pad = "    "
            lines.append(f"{pad}blocks = (n + {BLOCK} - 1) // {BLOCK}")
            lines += [f"{pad}{a} = np.empty((n, rows), np.float32)" for a in scratch]
            lines += [f"{pad}{self.var[n.outputs[0]]} = np.empty(rows, np.float32)" for n in self.nodes
                      if self.values[n.outputs[0]].kind == "mean"]
        for stage in range(self.stages):
            lines += self._pass(stage, tm, pad)
        for k, o in enumerate(self.outputs):
            if self.values[o].kind == "mean":
                v = self.var[o]
                lines += [f"{pad}y{k}[r, 0] = {self._cast(o)}({v})"] if tm else [
                    f"{pad}for i in range(rows):", f"{pad}    y{k}[0, i] = {self._cast(o)}({v}[i])"]
        head = (f"# sparsejit generated kernel: a row group ({' '.join(n.op_type for n in self.nodes)}), "
                f"{major}-major\nimport numpy as np\nfrom numba import njit, prange\n\n\n")
        return head + HELPERS + "\n\n" + "\n".join(lines) + "\n"

    # --- running -------------------------------------------------------------------

    def _broadcast(self, inputs: tuple[np.ndarray, ...]) -> tuple[int, ...] | None:
        """The shape every row value takes (the inputs' broadcast), where each output and
        each mean's input has it (an input smaller than it is then read broadcast, each
        output is as its node makes it); None otherwise."""
        shapes = {x: np.shape(v) for x, v in zip(self.names, inputs)}
        try:
            full = np.broadcast_shapes(*shapes.values())
            for n in self.nodes:
                ins = [shapes[i] if i in shapes else self.arrays[i].shape for i in n.inputs[:2] if i]
                shapes[n.outputs[0]] = (*shapes[n.inputs[0]][:-1], 1) if n.op_type == "ReduceMean" \
                    else np.broadcast_shapes(*ins) if n.op_type in SIGNS else shapes[n.inputs[0]]
        except ValueError:
            return None
        if not full:
            return None
        mean = (*full[:-1], 1)
        if any(shapes[o] != (full if self.values[o].kind == "row" else mean) for o in self.outputs) or \
                any(shapes[n.inputs[0]] != full for n in self.nodes if n.op_type == "ReduceMean"):
            return None
        return full

    def __call__(self, *inputs: np.ndarray) -> tuple | None:
        """The outputs, each in the layout the inputs mostly have; None where the kernel
        does not cover the inputs (see _broadcast; another type, a constant of another
        length, no elements)."""
        shape = inputs[0].shape if all(x.shape == inputs[0].shape for x in inputs) else self._broadcast(inputs)
        if shape is None or not shape or any(x.dtype not in (np.float32, *BYTES) for x in inputs):
            return None
        n, rows = shape[-1], int(np.prod(shape[:-1]))
        if n == 0 or rows == 0 or any(c.size not in (1, n) for k, c in self.arrays.items() if not k.endswith("::table")):
            return None
        inputs = tuple(x if x.shape == shape else np.broadcast_to(x, shape) for x in inputs)
        feature = 2 * sum(not x.flags.c_contiguous and x.T.flags.c_contiguous for x in inputs) >= len(inputs) \
            and len(shape) > 1
        major = "feature" if feature else "token"
        fn = self._compiled.get(major)
        if fn is None:
            fn = self._compiled[major] = load_source(self.source(major)).rows
        if feature:
            xs = [(x.T if x.T.flags.c_contiguous else np.ascontiguousarray(x.T)).reshape(n, rows) for x in inputs]
            mems = [np.empty(shape[::-1] if self.values[o].kind == "row" else (1, *shape[-2::-1]), self.types[o])
                    for o in self.outputs]
            flat = [m.reshape(n, rows) if self.values[o].kind == "row" else m.reshape(1, rows)
                    for m, o in zip(mems, self.outputs)]
            outs = [m.T for m in mems]
        else:
            xs = [np.ascontiguousarray(x).reshape(rows, n) for x in inputs]
            outs = [np.empty(shape if self.values[o].kind == "row" else (*shape[:-1], 1), self.types[o])
                    for o in self.outputs]
            flat = [m.reshape(rows, -1) for m in outs]
        fn(rows, n, *xs, *(_passed(c) for c in self.arrays.values()), *flat)
        return tuple(outs)
