"""Row kernels: a group of per-element ops and means over the last axis, one kernel.

QOperator and QDQ graphs quantize around every op, so what a float graph runs as one
LayerNorm runs there as a dozen nodes: FakeQuantize on each input of the residual Add
and on its output, ReduceMean, Sub, Pow, ReduceMean, a QuantizeLinear and Lookup for the
square root, Div, FakeQuantize, Mul γ, FakeQuantize, Add β. Each is a pass over the
tensor on its own kernel. lower.fuse_rows gathers such a group; `RowKernel` writes LLVM
IR for it that takes every element through the ops, one pass over the tensor per mean
(a pass ends where a mean is summed), on every thread (launch.py's launcher).

Each op computes what its node's kernel computes, in the same float32 steps (see
elementwise.py): Add, Sub, Mul, Div and Sqrt per element; Pow with the exponent 2 as
x · x; FakeQuantize, QuantizeLinear and DequantizeLinear per tensor; Lookup from its
table; ReduceMean over the last axis, whose sum is taken in float64 and rounded to
float32 before the division by the row's length. That sum is exact but where the row's
values span more than 29 bits of exponent, so its order does not matter, and
`reference_rows`, each op on numpy in turn, gives the kernel's result bit for bit.

A group with a mean to wait for, feature-major, on more than one thread (or at up to
SPLIT_MEANS tokens on one) runs split: the parts take features, a launch a pass, and
each part makes every token's means from all parts' sums at the start of each pass but
the first (`stage<stage>`), so that a loop runs along a feature's every token (a few
tokens a part made loops too short to vectorise), and a thread, claiming the same end of
each launch (launch.WALK_IR), reads the features the Linear before wrote on its core. On
one thread, at up to BLOCKED tokens, it runs blocked: the part takes the tokens, BLOCK at
a time, through every pass, making the block's means between the passes in IR
(`means<stage>`), in one call. Token-major, such a group runs blocked at any length, each
part taking its rows BLOCK at a time. Otherwise:
a part of the threads takes a range of features (feature-major: a Linear kernel's
output at a batch's tokens, [features, tokens] in memory, read as it lies, where an input
lies so) or of tokens (token-major, C order); the outputs are written the same way. A
pass is a series of loops (along a feature's tokens, or a token's features), a Lookup (a
gather, which keeps a loop scalar) in a loop of its own so that the others vectorise;
the loops are marked free of dependences between their iterations, so LLVM vectorises
them without checks. What is one per row (a mean, and
what is made from means and constants alone) is made between the passes on numpy, by the
reference ops. (Why IR and not Numba, and what each layout costs: bench/README.md,
eighteenth and nineteenth sessions.)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..graph import Node
from ..ops import bind, evaluate, op
from .compile import host_cpu, ir_engine, load_source, threads
from .ir import Signature
from .launch import IMPORTS, address, part_ir, put_source, python_between, run  # noqa: F401 (part_ir: prebuild's BUILDS)
from .layout import (
    ALIGN,
    aligned_empty,
    call_scratch,
    feature_major_empty,
    taping,
    thread_arena,
    transposed,
    transposed_copy,
    unit_token_stride,
    zero_launch,
)
from .lowp_ir import inverse, quantized_ir

ROW_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "FakeQuantize", "QuantizeLinear", "DequantizeLinear", "Lookup",
           "ReduceMean")
BYTES = (np.dtype(np.uint8), np.dtype(np.int8))
INVERSE = object()  # (INVERSE, key): the scalar that is scalar key's inverse (RowKernel.scalars)
SIGNS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}  # (LLVM's f<sign>)


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
    if op in SIGNS:
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


def _once_fn(n: Node, opset: int) -> Callable[..., np.ndarray]:
    """reference_op for node n, its op looked up once."""
    if n.op_type in ("ReduceMean", "Pow"):
        return lambda *args: reference_op(n, list(args), opset)
    fn = bind(n.op_type, n.attrs, opset, 1)
    return lambda *args: fn(*args)[0]


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


ROWS = Signature("rows", (("p", "ptr"), ("rows", "i64"), ("j0", "i64"), ("j1", "i64"), ("slot", "i64")))
BLOCK_ARGS = (("p", "ptr"), ("rows", "i64"), ("ib", "i64"), ("ie", "i64"), ("slot", "i64"))  # (a blocked pass's)
BLOCK = 64  # tokens a part takes through every pass at a time, blocked (RowKernel.source)
BLOCKED = 256  # tokens a part takes at most, blocked: with more, each pass at once over the features' rows is faster
PART_ROW = 16  # floats: each part's row of a call's temporaries starts on a 64-byte line (so do its bytes' and
# sums' rows), so that two threads' parts never write one line
SPLIT_MEANS = 64  # tokens up to which such a group runs split on one thread (RowKernel.source; on more, at any)

ROWS_DRIVER = """\
# sparsejit generated kernel: the driver of the row kernels (rows.py); part c takes the
# features [c * n / parts, (c + 1) * n / parts) and slot c of the scratch; p holds the
# addresses of the kernel's arrays
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(ROWS) + """

@njit(nogil=True, cache=True)
def run_row_group(launch, part, calls, fn, p, rows, n):
    parts = calls.shape[0]
    for c in range(parts):
        if c * n // parts < (c + 1) * n // parts:
            put_rows(calls, c, fn, p.ctypes.data, rows, c * n // parts, (c + 1) * n // parts, c)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""

_DECLARES = """
declare float @llvm.roundeven.f32(float)
declare float @llvm.maxnum.f32(float, float)
declare float @llvm.minnum.f32(float, float)
declare float @llvm.sqrt.f32(float)
declare float @llvm.fma.f32(float, float, float)
declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)
!0 = distinct !{}
attributes #1 = { "prefer-vector-width"="512" }
"""
WIDE = '!{} = !{{!"llvm.loop.vectorize.width", i32 16}}'  # (a wide kernel's loops': 16 floats a step)
MASKED = '!{} = !{{!"llvm.loop.vectorize.predicate.enable", i1 true}}'  # (a masked kernel's: the last step masked)
SPLIT = 4  # parts a thread of a feature-major group not blocked: the threads claim them in turn, so that
# one whose features' rows another core wrote (in its cache, not this one's) does not set the launch's time
WIDE_FROM = 32  # the loops' length from which a kernel's loops are wide (shorter ones fit in a step or two of 8)
MASKED_BELOW = 64  # feature-major loops of more than 8 tokens and fewer than this are wide, their last step masked


def loop_widths(token: bool, loop: int) -> tuple[bool, bool]:
    """Whether a kernel whose loops run `loop` floats is wide (`wide_loops`), and whether
    its last step is masked rather than a float at a time: feature-major loops of 9 to
    MASKED_BELOW - 1 tokens (a few tokens of a batch, where the tail is much of the loop),
    by LLVM's tail folding (`llvm.loop.vectorize.predicate.enable`)."""
    if not wide_loops():
        return False, False
    if not token and 8 < loop < MASKED_BELOW:
        return True, True
    return loop >= WIDE_FROM, False


def wide_loops() -> bool:
    """Whether loops of WIDE_FROM or more floats take 16 at a time in zmm registers
    (`_DECLARES`' #1, WIDE in each loop's metadata; the tail a float at a time, which
    masked steps would cost more than) where the CPU has AVX-512. LLVM's cost model took
    4 or 8, the row sums' doubles in 256 bits, the width it prefers on Intel's cores;
    shorter loops and AVX2 keep its choice."""
    return "+avx512f" in host_cpu()[1].split(",")


def permutes() -> bool:
    """Whether this CPU has AVX-512 VBMI's byte permutes (vpermi2b)."""
    return "+avx512vbmi" in host_cpu()[1].split(",")


def _token_rows(v: np.ndarray) -> np.ndarray | None:
    """v as a view [tokens, n] (its tokens in C order) where each feature's tokens are
    contiguous (unit token stride: a Linear kernel's output, rows padded or not), or of one
    token whose features are apart (such an output at one token: the pooler's); None
    otherwise."""
    if v.ndim == 0 or v.size == 0:
        return None
    try:
        rows = np.reshape(v, (-1, v.shape[-1]), copy=False)
    except ValueError:  # (not a view)
        return None
    if rows.shape[1] < 2:
        return None
    if rows.shape[0] == 1:
        return rows if rows.strides[1] != rows.itemsize and rows.strides[1] % rows.itemsize == 0 else None
    return rows if unit_token_stride(rows) else None


def _feature_major(full: list[np.ndarray]) -> bool:
    """Whether a row kernel over inputs `full` (those of the whole shape) runs feature-major:
    where any lies so (_token_rows: a Linear kernel's output). Its outputs then lie so too,
    as the Linear kernels read x, and the others are transposed to it (in a transformer,
    the residual of the first block only)."""
    return any(_token_rows(x) is not None for x in full)


def _lay_kind(v: np.ndarray, shape: tuple, token: bool) -> str:
    """How `_lay` lays v for the kernel (by v's shape, layout and type alone)."""
    full = v.shape == shape
    rows = _token_rows(v) if full else None
    if token:
        if full and v.flags.c_contiguous:
            return "rows"
        if _repeated_rows(v, shape):
            return "rows mod"
        return "transposed copy" if rows is not None and v.dtype == np.float32 else "copy"
    if rows is not None:
        return "rows T"
    return "transposed" if full and v.dtype == np.float32 else "copy T"


def _repeated_rows(v: np.ndarray, shape: tuple) -> bool:
    """Whether v, C order, broadcasts to `shape` by repeating its rows whole: its shape
    that of shape's last axes after leading ones (position embeddings [1, S, n] over a
    batch's [B, S, n]), so that row j of the whole is v's row j mod its rows."""
    core = v.shape[next((i for i, d in enumerate(v.shape) if d != 1), v.ndim):]
    return v.flags.c_contiguous and len(core) >= 1 and core[-1] == shape[-1] and \
        tuple(shape[len(shape) - len(core):]) == core


def _lay(kind: str, v: np.ndarray, shape: tuple) -> np.ndarray:
    """v broadcast to `shape`, as the kernel reads it: [rows, n] token-major, C order;
    [n, rows] feature-major, each feature's tokens contiguous, rows maybe padded (a view
    where v lies so; a float32 v of the whole shape by the tiled transpose, not numpy's
    element-by-element copy)."""
    n = shape[-1]
    if kind in ("rows", "rows mod"):  # (rows mod: v's own rows, which the kernel repeats)
        return v.reshape(-1, n)
    if kind == "transposed copy":
        return transposed_copy(np.reshape(v, (-1, n)))
    if kind == "transposed":
        return transposed(np.reshape(v, (-1, n)))
    if kind == "rows T":
        return np.reshape(v, (-1, n)).T
    if kind == "copy":
        return np.ascontiguousarray(np.broadcast_to(v, shape)).reshape(-1, n)
    return np.ascontiguousarray(np.broadcast_to(v, shape).reshape(-1, n).T)


def quad_empty(n: int, tokens: int) -> np.ndarray:
    """Room for the bytes of `tokens` × `n` values as the int8 kernels read x: 4-block rows
    [ceil(n / 4), tokens] of i32, unit token stride, 0 past the last value."""
    q = feature_major_empty(-(-n // 4), tokens).view(np.int32)
    if n % 4:
        q[-1] = 0
    return q


def grid_bytes(y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """QuantizeLinear's bytes of float32 y on `grid` ([scale, zero point, lowest, highest],
    float32) less the lowest, as uint8: clamp(rint(y / scale) + zero, lowest, highest),
    NaN giving 0 before the clamp, in the kernels' float32 steps (lowp_ir.quantized_ir)."""
    q = np.rint(np.asarray(y, np.float32) / grid[0]) + grid[1]
    return (np.clip(np.where(np.isnan(q), np.float32(0), q), grid[2], grid[3]) - grid[2]).astype(np.uint8)


def quad_bytes(y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """What RowKernel stores for a value y [..., n] in `quads`, by numpy: QuantizeLinear's
    byte of each element on `grid` ([scale, zero point, lowest, highest], float32), less the
    lowest, at byte (f mod 4) of i32 [f / 4, token] (quad_empty), as the token-major view
    [..., ceil(n / 4)] (what layernorm.layernorm_to_bytes hands over; int8.byte_rows)."""
    n = y.shape[-1]
    y2 = np.asarray(y, np.float32).reshape(-1, n)
    out = quad_empty(n, y2.shape[0])
    padded = np.zeros((y2.shape[0], 4 * out.shape[0]), np.uint8)
    padded[:, :n] = grid_bytes(y2, grid)
    out[:] = padded.view(np.int32).T
    return out.T.reshape((*y.shape[:-1], out.shape[0]))


def bytes_rows(b: np.ndarray) -> np.ndarray:
    """uint8 b [..., n] (any layout) in the 4-block rows the int8 kernels read x from
    (quad_empty's, as the token-major view [..., ceil(n / 4)] quad_bytes gives): each
    token's four bytes an i32, moved by the tiled transpose (as floats: bits moved, not
    computed with)."""
    n = b.shape[-1]
    b2 = np.reshape(b, (-1, n))
    if n % 4:
        b2 = np.concatenate([b2, np.zeros((b2.shape[0], -n % 4), np.uint8)], axis=1)
    words = np.ascontiguousarray(b2).view(np.float32)  # [tokens, ceil(n / 4)]
    return transposed(words).view(np.int32).T.reshape((*b.shape[:-1], words.shape[1]))


def _lit(x: float) -> str:
    """An integral float as an LLVM literal."""
    return f"{float(x):e}"


class RowKernel:
    """The kernel of a group of row ops (`nodes`, in order) reading `names` (values made
    outside it, of the outputs' shape or broadcast to it) and writing `outputs`; and for
    each float row value in `quads` (name → an int8 layer's grid [scale, zero point,
    lowest, highest], float32), the bytes that layer would quantize it to, as the int8
    kernels read x (`quad_bytes`), after the outputs."""

    def __init__(self, nodes: list[Node], names: list[str], outputs: list[str], consts: dict, opset: int = 17,
                 quads: dict[str, np.ndarray] | None = None):
        self.nodes, self.names, self.outputs, self.opset = nodes, names, outputs, opset
        self.quads = dict(quads or {})
        self.arrays = {i: consts[i] for n in nodes for i in n.inputs if i in consts}
        self.tables = {n.outputs[0]: n.attrs["table"] for n in nodes if n.op_type == "Lookup"}
        self.values: dict[str, _Value] = {x: _Value("row", 0) for x in names}
        for n in nodes:
            ins = [self.values[i] for i in n.inputs if i in self.values]
            stage = max(v.stage + (v.node is not None and v.node.op_type == "ReduceMean") for v in ins)
            rowwise = any(v.kind == "row" for v in ins) or any(_vector(self.arrays.get(i)) for i in n.inputs)
            kind = "mean" if n.op_type == "ReduceMean" or not rowwise else "row"
            self.values[n.outputs[0]] = _Value(kind, stage, n)
        self.stages = 1 + max(v.stage for v in self.values.values())
        self.types = {o: self._type(o) for o in outputs}
        self.index = {n.outputs[0]: i for i, n in enumerate(nodes)}  # (its value is %v<i> in the IR)
        self._plan()
        self._compiled: dict[tuple, list | None] = {}
        # the constants as the kernel reads them, made once: kept here, their addresses passed
        self._constants = {("vector", v): np.ascontiguousarray(self.arrays[v].reshape(-1), np.float32)
                           for v in self.vectors}
        self._constants.update({("table", t): np.ascontiguousarray(table) for t, table in self.tables.items()})
        self._constants.update({("quad table", o): grid_bytes(self.tables[o], self.quads[o]) for o in self.quads
                                if o in self.tables})  # (a Lookup's bytes: looked up, not quantized)
        self._constants["scalars", ""] = np.array([self._scalar(i) for i in self.scalars], np.float32)
        self._fixed = {s: address(a) for s, a in self._constants.items()}
        self._lock = threading.Lock()
        self._once = {stage: [(n, _once_fn(n, opset)) for n in nodes] for stage, nodes in self.once.items()}
        self._calls: dict[tuple, _Call | None] = {}  # by the inputs' shapes, layouts and types: see _prepare
        self._taped: dict[tuple, np.ndarray] = {}  # (the slots of the tape made last, by the same key)

    def _scalar(self, key) -> np.float32:
        """The float32 the kernel reads as scalar `key` (`scalars`): a constant's, a quad's
        grid's m-th (o, m), or the inverse of another's (INVERSE, key)."""
        if isinstance(key, tuple) and key[0] is INVERSE:
            return inverse(self._scalar(key[1]))
        if isinstance(key, tuple):
            return np.float32(self.quads[key[0]][key[1]])
        return np.float32(self.arrays[key].reshape(-1)[0])

    def _inverse(self, key) -> str | None:
        """The IR name of scalar `key`'s inverse, where the kernel has it and its loops are
        wide (`wide_loops`: long, where the divider's throughput bounds them; in short
        loops the correction's chain of four is the longer wait)."""
        k = self.scalars.get((INVERSE, key))
        return None if k is None or not self.wide else f"%k{k}"

    def _type(self, name: str) -> np.dtype:
        n = self.values[name].node
        return self.arrays[n.inputs[2]].dtype if n.op_type == "QuantizeLinear" else np.dtype(np.float32)

    def _plan(self) -> None:
        """Each pass's loops, and where each row value lives. A pass is a series of loops
        over a feature's tokens: the ops that vectorise share a loop, and each Lookup (a
        gather) has one of its own. A value read by a later loop of its pass is kept in a
        temporary (a row per part of the threads), by a later pass in a kept array."""
        self.loops: dict[int, list[list[Node]]] = {}
        self.loop: dict[str, tuple[int, int]] = {}
        self.once: dict[int, list[Node]] = {}
        for stage in range(self.stages):
            loops: list[list[Node]] = []
            for n in self.nodes:
                o = n.outputs[0]
                if self.values[o].stage != stage:
                    continue
                if self.values[o].kind == "mean" and n.op_type != "ReduceMean":
                    self.once.setdefault(stage, []).append(n)
                    continue
                if not loops or n.op_type == "Lookup" or loops[-1][-1].op_type == "Lookup":
                    loops.append([])
                loops[-1].append(n)
                self.loop[o] = (stage, len(loops) - 1)
            self.loops[stage] = loops
        read_by = {v: [n for n in self.nodes if v in n.inputs] for v in self.values}
        self.keep = [o for o, (s, _) in self.loop.items() if self.values[o].kind == "row"
                     and any(self.values[n.outputs[0]].stage > s and n.outputs[0] in self.loop for n in read_by[o])]
        self.temps = [o for o, (s, k) in self.loop.items() if self.values[o].kind == "row"
                      and any(self.loop.get(n.outputs[0], (s, k))[0] == s and self.loop[n.outputs[0]][1] != k
                              for n in read_by[o] if n.outputs[0] in self.loop)]
        self.means = [v for v, val in self.values.items() if val.kind == "mean"
                      and any(n.outputs[0] in self.loop for n in read_by[v])]
        self.sums = [n.outputs[0] for n in self.nodes if n.op_type == "ReduceMean"]
        self.scalars = {i: k for k, i in enumerate(i for i, c in self.arrays.items() if c.size == 1)}
        for o in self.quads:  # (its grid's four floats, keyed (o, 0..3))
            if self.values[o].kind != "row" or self._type(o) != np.float32:
                raise ValueError(f"a row group stores the bytes of a float row value, not of {o!r}")
            self.scalars.update({(o, m): len(self.scalars) + m for m in range(4)})
        # each grid's scale's inverse, where the quotient may be taken by it (lowp_ir.inverse)
        scales = [n.inputs[1] for n in self.nodes if n.op_type in ("FakeQuantize", "QuantizeLinear")]
        for key in dict.fromkeys(scales + [(o, 0) for o in self.quads if o not in self.tables]):
            if inverse(self._scalar(key)) is not None:
                self.scalars[INVERSE, key] = len(self.scalars)
        self.vectors = [i for i, c in self.arrays.items() if c.size > 1]
        rows_out = self.rows_out = [o for o in self.outputs if self.values[o].kind == "row"]
        self.slots = ([("x", x) for x in self.names] + [("y", o) for o in rows_out] + [("kept", o) for o in self.keep]
                      + [("x rows", x) for x in self.names] + [("y rows", o) for o in rows_out]
                      + [("x period", x) for x in self.names]
                      + [("mean", v) for v in self.means] + [("sum", v) for v in self.sums]
                      + [("temp", o) for o in self.temps] + [("vector", v) for v in self.vectors]
                      + [("table", t) for t in self.tables] + [("scalars", "")]
                      + [(kind, o) for o in self.quads for kind in ("quad", "quad rows", "quad temp")]
                      + [("quad table", o) for o in self.quads if o in self.tables] + [("n", "")])
        self.slot = {s: k for k, s in enumerate(self.slots)}

    # --- IR ------------------------------------------------------------------------

    def _bytes(self, name: str, bytes_in: dict) -> bool:
        """Whether value `name` is bytes: an 8-bit input, or a QuantizeLinear's output."""
        v = self.values.get(name)
        return name in bytes_in or (v is not None and v.node is not None and v.node.op_type == "QuantizeLinear")

    def _load(self, name: str, k: int, into: str, bytes_in: dict) -> list[str]:
        """Lines that load value `name` into %into, as loop k of its pass reads it."""
        if name in self.scalars or name in self.vectors:
            return []
        if name in bytes_in:
            return self._x_index(name, k, into) + [
                    f"  {into}.at = getelementptr i8, ptr %s{self.slot['x', name]}, i64 {into}.xi",
                    f"  {into} = load i8, ptr {into}.at, !llvm.access.group !0"]
        where = ("x", name) if name in self.names else ("mean", name) if self.values[name].kind == "mean" else \
            ("temp", name) if self.loop[name][1] != k and name in self.temps else ("kept", name)
        index = {"x": f"{into}.xi", "kept": f"%x{k}", "mean": "%j" if self.token else f"%t{k}" if self.split else
                 f"%i{k}", "temp": f"%t{k}"}[where[0]]
        return (self._x_index(name, k, into) if where[0] == "x" else []) + [
                f"  {into}.at = getelementptr float, ptr %s{self.slot[where]}, i64 {index}",
                f"  {into} = load float, ptr {into}.at, !llvm.access.group !0"]

    def _x_index(self, name: str, k: int, into: str) -> list[str]:
        """Lines making {into}.xi, input `name`'s element of row j, loop k: its rows lie
        `x rows` elements apart (C order, or a feature's tokens in a padded row)."""
        j = "%j"
        if self.token:  # (row j of an input whose rows repeat, _repeated_rows: its row j mod its rows)
            j = f"{into}.jm"
            lines = [f"  {j} = urem i64 %j, %s{self.slot['x period', name]}.i"]
        else:
            lines = []
        return lines + [f"  {into}.xr = mul i64 {j}, %s{self.slot['x rows', name]}.i",
                        f"  {into}.xi = add i64 {into}.xr, %i{k}"]

    def _operand(self, name: str, here: set, k: int, v: str, bytes_in: dict) -> tuple[list[str], str]:
        if name in self.scalars:
            return [], f"%k{self.scalars[name]}"
        if name in self.vectors and self.token:  # (along the loop)
            return [f"  {v}.at = getelementptr float, ptr %s{self.slot['vector', name]}, i64 %i{k}",
                    f"  {v} = load float, ptr {v}.at, !llvm.access.group !0"], v
        if name in self.vectors:
            return [], f"%vc{self.vectors.index(name)}"
        if name in here:
            return [], f"%v{self.index[name]}"
        return self._load(name, k, v, bytes_in), v

    def _op(self, n: Node, k: int, here: set, bytes_in: dict) -> list[str] | None:
        """The lines computing n's output %v<i> in loop k; None where the kernel cannot
        (arithmetic on bytes, which ONNX does in integers)."""
        i = self.index[n.outputs[0]]
        ins = [self._operand(x, here, k, f"%a{i}_{j}", bytes_in) for j, x in enumerate(n.inputs[:3]) if x]
        lines = [line for ls, _ in ins for line in ls]
        a = [op for _, op in ins]
        op, v = n.op_type, f"%v{i}"
        if op not in ("DequantizeLinear", "Lookup") and self._bytes(n.inputs[0], bytes_in):
            return None
        if op in SIGNS:
            return lines + [f"  {v} = f{SIGNS[op]} float {a[0]}, {a[1]}"]
        if op == "Pow":
            return lines + [f"  {v} = fmul float {a[0]}, {a[0]}"]
        if op == "Sqrt":
            return lines + [f"  {v} = call float @llvm.sqrt.f32(float {a[0]})"]
        if op == "Lookup":
            x = a[0]
            if n.inputs[0] in bytes_in:
                lines.append(f"  {v}.k = zext i8 {x} to i64")
            else:
                lines += [f"  {v}.q = fptosi float {x} to i32", f"  {v}.b = and i32 {v}.q, 255",
                          f"  {v}.k = zext i32 {v}.b to i64"]
            return lines + [f"  {v}.at = getelementptr float, ptr %s{self.slot['table', n.outputs[0]]}, i64 {v}.k",
                            f"  {v} = load float, ptr {v}.at, !llvm.access.group !0"]
        x, scale, zero = a
        if op == "DequantizeLinear":
            if n.inputs[0] in bytes_in:
                lines.append(f"  {v}.f = {'sitofp' if bytes_in[n.inputs[0]] == np.int8 else 'uitofp'} i8 {x} to float")
                x = f"{v}.f"
            return lines + [f"  {v}.d = fsub float {x}, {zero}", f"  {v} = fmul float {v}.d, {scale}"]
        info = np.iinfo(self.arrays[n.inputs[2]].dtype)
        q = v if op == "QuantizeLinear" else f"{v}.q"
        lines += quantized_ir(q, x, scale, zero, _lit(info.min), _lit(info.max), self._inverse(n.inputs[1])).splitlines()
        if op == "FakeQuantize":
            lines += [f"  {v}.s = fsub float {v}.q, {zero}", f"  {v} = fmul float {v}.s, {scale}"]
        return lines

    def _stores(self, o: str, k: int) -> list[str]:
        """Where loop k puts the value %v<i> it made: output, kept array, temporary, sum."""
        v, lines = f"%v{self.index[o]}", []
        if o in self.temps:
            lines += [f"  {v}.tat = getelementptr float, ptr %s{self.slot['temp', o]}, i64 %t{k}",
                      f"  store float {v}, ptr {v}.tat, !llvm.access.group !0"]
        if o in self.keep:
            lines += [f"  {v}.kat = getelementptr float, ptr %s{self.slot['kept', o]}, i64 %x{k}",
                      f"  store float {v}, ptr {v}.kat, !llvm.access.group !0"]
        if ("y", o) in self.slot:  # (rows `y rows` elements apart)
            lines += [f"  {v}.yr = mul i64 %j, %s{self.slot['y rows', o]}.i", f"  {v}.yx = add i64 {v}.yr, %i{k}"]
            if self.types[o] == np.float32:
                lines += [f"  {v}.yat = getelementptr float, ptr %s{self.slot['y', o]}, i64 {v}.yx",
                          f"  store float {v}, ptr {v}.yat, !llvm.access.group !0"]
            else:
                lines += [f"  {v}.yi = fptosi float {v} to i32", f"  {v}.yb = trunc i32 {v}.yi to i8",
                          f"  {v}.yat = getelementptr i8, ptr %s{self.slot['y', o]}, i64 {v}.yx",
                          f"  store i8 {v}.yb, ptr {v}.yat, !llvm.access.group !0"]
        if o in self.quads:  # its bytes to the part's temporary rows (_flush_quad takes them on)
            scale, zero, lo, hi = (f"%k{self.scalars[o, m]}" for m in range(4))
            if o in self.tables:  # (a Lookup: its byte from the table's bytes, grid_bytes)
                lines += [f"  {v}.qbat = getelementptr i8, ptr %s{self.slot['quad table', o]}, i64 {v}.k",
                          f"  {v}.qb = load i8, ptr {v}.qbat, !llvm.access.group !0"]
            else:
                lines += quantized_ir(f"{v}.qq", v, scale, zero, lo, hi, self._inverse((o, 0))).splitlines()
                lines += [f"  {v}.qd = fsub float {v}.qq, {lo}", f"  {v}.qi = fptosi float {v}.qd to i32",
                          f"  {v}.qb = trunc i32 {v}.qi to i8"]
            at = f"%i{k}" if self.token else f"{v}.qx"  # (feature-major: row j mod 4 of the four)
            if not self.token:
                lines += [f"  {v}.qm = and i64 %j, 3", f"  {v}.qy = mul i64 {v}.qm, %rows",
                          f"  {v}.qx = add i64 {v}.qy, %i{k}"]
            lines += [f"  {v}.qz = add i64 %qrow4, {at}",
                      f"  {v}.qat = getelementptr i8, ptr %s{self.slot['quad temp', o]}, i64 {v}.qz",
                      f"  store i8 {v}.qb, ptr {v}.qat, !llvm.access.group !0"]
        return lines

    def _after_loop(self, stage: int, k: int, loop: list[Node], sums: list[str], loop_ids: list) -> tuple[list, str]:
        """Lines after loop k of a pass (its sums stored, token-major; its values' bytes
        put in place, _flush_quad), and the label they end at."""
        lines = []
        for s in sums if self.token else []:  # (row j's own slot of the first part's sums)
            o = next(n.outputs[0] for n in loop if f"%sum{self.index[n.outputs[0]]}" == s)
            lines += [f"  {s}.at = getelementptr double, ptr %s{self.slot['sum', o]}, i64 %j",
                      f"  store double {s}, ptr {s}.at"]
        before = f"l{k}.done"
        for q, o in enumerate(self.quads):
            if self.loop.get(o) == (stage, k):
                got, before = self._flush_quad(o, f"qf{k}_{q}", before, loop_ids)
                lines += got
        return lines, before

    def _flush_quad(self, o: str, tag: str, came: str, loop_ids: list) -> tuple[list[str], str]:
        """Lines after the loop that made o's bytes in the part's temporary rows, which put
        them where the int8 kernels read x: byte (f mod 4) of i32 [f / 4, token] of rows
        `quad rows` i32 apart. Token-major (row j): each four features' i32 to its row.
        Feature-major (feature j), after a quad's last feature: its four rows of bytes
        as one row of i32 (a vector loop), or where the part holds only some of the quad
        (the parts split the features anywhere), those bytes one by one. And the label the
        lines end at."""
        tmp, out, ld = (f"%s{self.slot[kind, o]}" for kind in ("quad temp", "quad", "quad rows"))
        t = f"%{tag}"
        if self.token:
            return [f"  br label {t}.head", f"{tag}.head:",
                    f"  {t}.q = phi i64 [ 0, %{came} ], [ {t}.qn, {t}.body ]",
                    f"  {t}.more = icmp slt i64 {t}.q, %quads", f"  br i1 {t}.more, label {t}.body, label {t}.done",
                    f"{tag}.body:", f"  {t}.si = add i64 %crow, {t}.q",
                    f"  {t}.sat = getelementptr i32, ptr {tmp}, i64 {t}.si", f"  {t}.w = load i32, ptr {t}.sat",
                    f"  {t}.dr = mul i64 {t}.q, {ld}.i", f"  {t}.di = add i64 {t}.dr, %j",
                    f"  {t}.dat = getelementptr i32, ptr {out}, i64 {t}.di", f"  store i32 {t}.w, ptr {t}.dat",
                    f"  {t}.qn = add i64 {t}.q, 1", f"  br label {t}.head", f"{tag}.done:"], f"{tag}.done"
        m = len(loop_ids)
        loop_ids.append(m)
        lines = [f"  {t}.j3 = and i64 %j, 3", f"  {t}.last = icmp eq i64 {t}.j3, 3", f"  {t}.jn = add i64 %j, 1",
                 f"  {t}.end = icmp eq i64 {t}.jn, %j1", f"  {t}.go = or i1 {t}.last, {t}.end",
                 f"  br i1 {t}.go, label {t}.check, label {t}.done",
                 f"{tag}.check:", f"  {t}.q4 = lshr i64 %j, 2", f"  {t}.f0 = shl i64 {t}.q4, 2",
                 f"  {t}.in = icmp sge i64 {t}.f0, %j0", f"  {t}.whole = and i1 {t}.in, {t}.last",
                 f"  {t}.row = mul i64 {t}.q4, {ld}.i",
                 f"  br i1 {t}.whole, label {t}.w.head, label {t}.p.pre",
                 f"{tag}.w.head:", f"  {t}.i = phi i64 [ %ib, {t}.check ], [ {t}.inext, {t}.w.body ]",
                 f"  {t}.imore = icmp slt i64 {t}.i, %ie", f"  br i1 {t}.imore, label {t}.w.body, label {t}.done",
                 f"{tag}.w.body:"]
        word = None
        for r in range(4):
            lines += [f"  {t}.o{r} = mul i64 %rows, {r}", f"  {t}.a{r} = add i64 %qrow4, {t}.o{r}",
                      f"  {t}.x{r} = add i64 {t}.a{r}, {t}.i",
                      f"  {t}.at{r} = getelementptr i8, ptr {tmp}, i64 {t}.x{r}",
                      f"  {t}.b{r} = load i8, ptr {t}.at{r}, !llvm.access.group !0",
                      f"  {t}.z{r} = zext i8 {t}.b{r} to i32", f"  {t}.s{r} = shl i32 {t}.z{r}, {8 * r}"]
            if word is not None:
                lines.append(f"  {t}.or{r} = or i32 {word}, {t}.s{r}")
            word = f"{t}.or{r}" if r else f"{t}.s0"
        lines += [f"  {t}.di = add i64 {t}.row, {t}.i", f"  {t}.dat = getelementptr i32, ptr {out}, i64 {t}.di",
                  f"  store i32 {word}, ptr {t}.dat, !llvm.access.group !0", f"  {t}.inext = add i64 {t}.i, 1",
                  f"  br label {t}.w.head, !llvm.loop !{2 * m + 1}",
                  # (some of the quad: its features from max(j0, f0) to j, byte by byte)
                  f"{tag}.p.pre:", f"  {t}.pin = icmp sge i64 {t}.f0, %j0",
                  f"  {t}.fs = select i1 {t}.pin, i64 {t}.f0, i64 %j0", f"  br label {t}.f.head",
                  f"{tag}.f.head:", f"  {t}.f = phi i64 [ {t}.fs, {t}.p.pre ], [ {t}.fnext, {t}.t.end ]",
                  f"  {t}.fmore = icmp sle i64 {t}.f, %j", f"  br i1 {t}.fmore, label {t}.t.pre, label {t}.done",
                  f"{tag}.t.pre:", f"  {t}.fm = and i64 {t}.f, 3", f"  {t}.fo = mul i64 {t}.fm, %rows",
                  f"  {t}.fa = add i64 %qrow4, {t}.fo", f"  br label {t}.t.head",
                  f"{tag}.t.head:", f"  {t}.ti = phi i64 [ %ib, {t}.t.pre ], [ {t}.tnext, {t}.t.body ]",
                  f"  {t}.tmore = icmp slt i64 {t}.ti, %ie", f"  br i1 {t}.tmore, label {t}.t.body, label {t}.t.end",
                  f"{tag}.t.body:", f"  {t}.tx = add i64 {t}.fa, {t}.ti",
                  f"  {t}.tat = getelementptr i8, ptr {tmp}, i64 {t}.tx", f"  {t}.tb = load i8, ptr {t}.tat",
                  f"  {t}.tw = add i64 {t}.row, {t}.ti", f"  {t}.ty = shl i64 {t}.tw, 2",
                  f"  {t}.tz = or i64 {t}.ty, {t}.fm", f"  {t}.tdat = getelementptr i8, ptr {out}, i64 {t}.tz",
                  f"  store i8 {t}.tb, ptr {t}.tdat", f"  {t}.tnext = add i64 {t}.ti, 1", f"  br label {t}.t.head",
                  f"{tag}.t.end:", f"  {t}.fnext = add i64 {t}.f, 1", f"  br label {t}.f.head",
                  f"{tag}.done:"]
        return lines, f"{tag}.done"

    def _entry(self, name: str) -> list[str]:
        """A pass's (or a block's means', `_means_ir`) definition and entry block, up to its
        loop: the slots' addresses and scalars loaded; the tokens %ib to %ie its loops
        take, and the features %j0 to %j1 (blocked: a part's tokens' block, every feature)."""
        attrs = self._attrs()
        if self.blocked and not self.token:  # (a function `blocked` calls, on a block of tokens)
            lines = [Signature(name, BLOCK_ARGS).define(attrs=attrs), "entry:", "  %j0 = add i64 0, 0"]
        else:
            lines = [Signature(name, ROWS.args).define(attrs=attrs), "entry:", "  %ib = add i64 0, 0",
                     "  %ie = add i64 %rows, 0"]
        for k, _ in enumerate(self.slots):
            lines += [f"  %s{k}.at = getelementptr i64, ptr %p, i64 {k}", f"  %s{k}.i = load i64, ptr %s{k}.at",
                      f"  %s{k} = inttoptr i64 %s{k}.i to ptr"]
        if self.blocked and not self.token:
            lines.append(f"  %j1 = add i64 %s{self.slot['n', '']}.i, 0")
        for k in self.scalars.values():
            lines += [f"  %k{k}.at = getelementptr float, ptr %s{self.slot['scalars', '']}, i64 {k}",
                      f"  %k{k} = load float, ptr %k{k}.at"]
        # (each part's rows of the temporaries, sums and split means PART_ROW-aligned: %crow)
        return lines + [f"  %rowsp.a = add i64 %rows, {PART_ROW - 1}", f"  %rowsp = and i64 %rowsp.a, {-PART_ROW}",
                        "  %crow = mul i64 %slot, %rowsp", "  %qrow4 = shl i64 %crow, 2"]

    def _attrs(self) -> str:
        """A function's attributes: a wide kernel's prefer 512-bit vectors (_DECLARES' #1)."""
        return "#1" if self.wide else ""

    def _means_ir(self, stage: int, bytes_in: dict, loop_ids: list) -> list[str] | None:
        """Blocked: `means<stage>`, what the block's tokens have one of before pass `stage`
        (> 0), as `_run` makes it between the passes: each mean summed in the pass before
        (the sum rounded to float32, over the row's length), then the ops on means and
        constants of this pass, the means its loops read stored."""
        m = len(loop_ids)
        loop_ids.append(m)
        # (feature-major: the block's tokens %i0, their sums the part's; token-major: its rows %j, each
        # row's sum its own, the row's length %rows; split: every token, each sum the parts', the
        # means stored in the part's own row)
        i, start, end, n, at = ("%j", "%j0", "%j1", "%rows", "%j") if self.token else \
            ("%i0", "%ib", "%ie", f"%s{self.slot['n', '']}.i" if self.split else "%j1", "%crow")
        lines = self._entry(f"means{stage}") + [
            f"  %nf = uitofp i64 {n} to float", "  br label %l0.head", "l0.head:",
            f"  {i} = phi i64 [ {start}, %entry ], [ {i}.next, %l0.body ]", f"  %l0.more = icmp slt i64 {i}, {end}",
            "  br i1 %l0.more, label %l0.body, label %l0.done", "l0.body:",
            f"  %t0 = add i64 {at}, {'0' if self.token else i}"]
        here: set[str] = set()
        for o in self.sums:
            if self.values[o].stage == stage - 1:
                v = f"%v{self.index[o]}"
                lines += self._sum_ir(v, f"%s{self.slot['sum', o]}") + [
                    f"  {v}.f = fptrunc double {v}.d to float", f"  {v} = fdiv float {v}.f, %nf"]
                here.add(o)
        for n in self.once.get(stage, ()):
            got = self._op(n, 0, here, bytes_in)
            if got is None:
                return None
            lines += got
            here.add(n.outputs[0])
        for o in sorted(here & set(self.means), key=self.index.get):
            at = "%t0" if self.split else i  # (split: the part's own row of the means)
            lines += [f"  %v{self.index[o]}.mat = getelementptr float, ptr %s{self.slot['mean', o]}, i64 {at}",
                      f"  store float %v{self.index[o]}, ptr %v{self.index[o]}.mat, !llvm.access.group !0"]
        return lines + [f"  {i}.next = add i64 {i}, 1", f"  br label %l0.head, !llvm.loop !{2 * m + 1}", "l0.done:",
                        "  ret void", "}", ""]

    def _sum_ir(self, v: str, sums: str) -> list[str]:
        """_means_ir's lines making {v}.d, the sum of token %t0's row: its part's, or split,
        the sum of every part's (%i0's in each part's row of the sums, in order)."""
        if not self.split:
            return [f"  {v}.at = getelementptr double, ptr {sums}, i64 %t0",
                    f"  {v}.d = load double, ptr {v}.at, !llvm.access.group !0"]
        lines, total = [], None
        for part in range(self.split):
            at = f"{v}.p{part}" if part else (f"{v}.d" if self.split == 1 else f"{v}.p0")
            lines += [f"  {at}.o = mul i64 %rowsp, {part}", f"  {at}.i = add i64 {at}.o, %i0",
                      f"  {at}.at = getelementptr double, ptr {sums}, i64 {at}.i",
                      f"  {at} = load double, ptr {at}.at, !llvm.access.group !0"]
            if total is not None:
                into = f"{v}.d" if part == self.split - 1 else f"{v}.a{part}"
                lines.append(f"  {into} = fadd double {total}, {at}")
                at = into
            total = at
        return lines

    def _split_ir(self) -> list[str]:
        """Split: `stage<s>` for each pass s > 0 that loops, a part's call: every token's means
        (`means<s>`, from every part's sums: each part has finished the pass before, a launch
        of its own), then the pass over the part's features."""
        call = "(ptr %p, i64 %rows, i64 %j0, i64 %j1, i64 %slot)"
        lines = []
        for stage in range(1, self.stages):
            if self.loops[stage]:
                lines += [Signature(f"stage{stage}", ROWS.args).define(attrs=self._attrs()), "entry:",
                          f"  call void @means{stage}{call}", f"  call void @pass{stage}{call}", "  ret void", "}", ""]
        return lines

    def _blocked_ir(self) -> list[str]:
        """Blocked: `blocked`, which takes a part's tokens [j0, j1) (token-major: its rows)
        BLOCK at a time through every pass (`means<stage>` before each but the first)."""
        call = "(ptr %p, i64 %rows, i64 %b, i64 %bend, i64 %slot)"
        lines = [Signature("blocked", ROWS.args).define(attrs=self._attrs()), "entry:", "  br label %head", "head:",
                 "  %b = phi i64 [ %j0, %entry ], [ %bend, %body ]", "  %more = icmp slt i64 %b, %j1",
                 "  br i1 %more, label %body, label %exit", "body:", f"  %bn = add i64 %b, {BLOCK}",
                 "  %bin = icmp slt i64 %bn, %j1", "  %bend = select i1 %bin, i64 %bn, i64 %j1"]
        for stage in range(self.stages):
            lines += [f"  call void @means{stage}{call}"] * (stage > 0)
            lines += [f"  call void @pass{stage}{call}"] * bool(self.loops[stage])
        return lines + ["  br label %head", "exit:", "  ret void", "}", ""]

    def _blocked_ok(self) -> bool:
        """Whether the group runs blocked (`blocked`): it has a mean to wait
        for (more than one pass), no output that is a mean (the kernel stores means for its
        loops alone), and each mean an op on means reads made in its block's `means<stage>`
        or stored there."""
        made = {o: self.values[o].stage + 1 for o in self.sums} | {
            n.outputs[0]: s for s, nodes in self.once.items() for n in nodes}
        return self.stages > 1 and all(self.values[o].kind == "row" for o in self.outputs) and all(
            made.get(i) == s or i in self.means for s, nodes in self.once.items() for n in nodes for i in n.inputs
            if i in self.values and self.values[i].kind == "mean")

    def _permutes(self, loop: list[Node]) -> bool:
        """Whether loop `loop` (feature-major) is a Lookup whose value the group keeps as
        bytes alone (`quads`), looked up 64 at a time by AVX-512 VBMI's byte permutes
        (`_permuted_ir`) where the CPU has them; elsewhere byte by byte."""
        o = loop[0].outputs[0]
        return permutes() and not self.token and loop[0].op_type == "Lookup" and o in self.quads and \
            o not in self.temps and o not in self.keep and ("y", o) not in self.slot

    def _permuted_ir(self, n: Node, k: int, bytes_in: dict, before: str) -> tuple[list[str], str]:
        """Lines taking loop k's tokens 64, then 16, then 8 at a time, up to the last 8 (the
        loop takes the rest), for Lookup n (`_permutes`): each index's byte from the table's
        bytes (`grid_bytes`) by two vpermi2b (of its 128 entries each) and a select on the
        index's top bit, stored where `_stores` stores it. And the label they end at; the
        loop starts at %i{k}w."""
        table = f"%s{self.slot['quad table', n.outputs[0]]}"
        t = f"%l{k}v"
        lines = [f"  {t}.tab{h}.at = getelementptr i8, ptr {table}, i64 {64 * h}" for h in range(4)]
        lines += [f"  {t}.tab{h} = load <64 x i8>, ptr {t}.tab{h}.at, align 1" for h in range(4)]
        lines += self._permute_loop(n, k, bytes_in, f"%{before}", "%ib", "v", 64)
        lines += self._permute_loop(n, k, bytes_in, f"%l{k}v.done", f"%i{k}v", "u", 16)
        return lines + self._permute_loop(n, k, bytes_in, f"%l{k}u.done", f"%i{k}u", "w", 8), f"l{k}w.done"

    def _permute_loop(self, n: Node, k: int, bytes_in: dict, before: str, start: str, tag: str,
                      width: int) -> list[str]:
        """_permuted_ir's loop taking `width` tokens (64, 16 or 8) a step from `start`: the
        table's bytes in %l{k}v.tab0..3; its index %i{k}{tag}, its label l{k}{tag}."""
        x, t, i = n.inputs[0], f"%l{k}{tag}", f"%i{k}{tag}"
        bt = f"<{width} x i8>"
        lines = [f"  br label %l{k}{tag}.head", f"l{k}{tag}.head:",
                 f"  {i} = phi i64 [ {start}, {before} ], [ {i}.next, %l{k}{tag}.body ]",
                 f"  {i}.end = add i64 {i}, {width}", f"  {t}.more = icmp sle i64 {i}.end, %ie",
                 f"  br i1 {t}.more, label %l{k}{tag}.body, label %l{k}{tag}.done", f"l{k}{tag}.body:",
                 f"  %x{k}{tag} = add i64 %jrow, {i}", f"  %t{k}{tag} = add i64 %crow, {i}"]
        address = self._load(x, f"{k}{tag}", f"{t}.x", bytes_in)[:-1]  # (its scalar load left out)
        if x in bytes_in:
            lines += address + [f"  {t}.b = load {bt}, ptr {t}.x.at, align 1"]
        else:
            lines += address + [f"  {t}.f = load <{width} x float>, ptr {t}.x.at, align 4",
                                f"  {t}.i = fptosi <{width} x float> {t}.f to <{width} x i32>",
                                f"  {t}.b = trunc <{width} x i32> {t}.i to {bt}"]
        b = f"{t}.b"
        if width < 64:  # (the permutes take 64 bytes: the indices in the low lanes)
            lanes = ", ".join(f"i32 {m % width}" for m in range(64))
            lines.append(f"  {t}.b64 = shufflevector {bt} {b}, {bt} poison, <64 x i32> <{lanes}>")
            b = f"{t}.b64"
        permute, v = "call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512", f"%l{k}v"
        lines += [f"  {t}.lo = {permute}(<64 x i8> {v}.tab0, <64 x i8> {b}, <64 x i8> {v}.tab1)",
                  f"  {t}.hi = {permute}(<64 x i8> {v}.tab2, <64 x i8> {b}, <64 x i8> {v}.tab3)",
                  f"  {t}.top = icmp slt <64 x i8> {b}, zeroinitializer",
                  f"  {t}.y = select <64 x i1> {t}.top, <64 x i8> {t}.hi, <64 x i8> {t}.lo"]
        y = f"{t}.y"
        if width < 64:
            lanes = ", ".join(f"i32 {m}" for m in range(width))
            lines.append(f"  {t}.yw = shufflevector <64 x i8> {y}, <64 x i8> poison, <{width} x i32> <{lanes}>")
            y = f"{t}.yw"
        return lines + [
            f"  {t}.qm = and i64 %j, 3", f"  {t}.qy = mul i64 {t}.qm, %rows", f"  {t}.qx = add i64 {t}.qy, {i}",
            f"  {t}.qz = add i64 %qrow4, {t}.qx",
            f"  {t}.qat = getelementptr i8, ptr %s{self.slot['quad temp', n.outputs[0]]}, i64 {t}.qz",
            f"  store {bt} {y}, ptr {t}.qat, align 1", f"  {i}.next = add i64 {i}, {width}",
            f"  br label %l{k}{tag}.head", f"l{k}{tag}.done:"]

    def _pass_ir(self, stage: int, bytes_in: dict, loop_ids: list) -> list[str] | None:
        lines = self._entry(f"pass{stage}")
        lines += ["  %quads.r = add i64 %rows, 3", "  %quads = lshr i64 %quads.r, 2", "  br label %jhead", "jhead:",
                  "  %j = phi i64 [ %j0, %entry ], [ %jnext, %jlatch ]", "  %jmore = icmp slt i64 %j, %j1",
                  "  br i1 %jmore, label %jbody, label %exit", "jbody:"]
        if self.blocked and not self.token:  # (kept values: the part's own [features, BLOCK], which stays in cache)
            lines += ["  %kpart = mul i64 %slot, %j1", f"  %jrow.f = mul i64 %j, {BLOCK}", "  %jrow.p = add i64 %jrow.f, %kpart",
                      f"  %jrow.b = mul i64 %kpart, {BLOCK - 1}", "  %jrow.c = add i64 %jrow.p, %jrow.b",
                      "  %jrow = sub i64 %jrow.c, %ib"]
        else:
            lines.append("  %jrow = mul i64 %j, %rows")
        for k, name in enumerate([] if self.token else self.vectors):  # (one per feature: the loop's)
            lines += [f"  %vc{k}.at = getelementptr float, ptr %s{self.slot['vector', name]}, i64 %j",
                      f"  %vc{k} = load float, ptr %vc{k}.at"]
        before = "jbody"
        for k, loop in enumerate(self.loops[stage]):
            m = len(loop_ids)
            loop_ids.append(m)
            if loop[0].op_type == "Lookup":
                self._gathers.add(m)
            sums = [f"%sum{self.index[n.outputs[0]]}" for n in loop if n.op_type == "ReduceMean"]
            start = "%ib"
            if self._permutes(loop):
                got, before = self._permuted_ir(loop[0], k, bytes_in, before)
                lines, start = lines + got, f"%i{k}w"
            lines += [f"  br label %l{k}.head", f"l{k}.head:",
                      f"  %i{k} = phi i64 [ {start}, %{before} ], [ %i{k}.next, %l{k}.body ]"]
            lines += [f"  {s} = phi double [ 0.0, %{before} ], [ {s}.new, %l{k}.body ]" for s in sums if self.token]
            lines += [f"  %l{k}.more = icmp slt i64 %i{k}, %ie",
                      f"  br i1 %l{k}.more, label %l{k}.body, label %l{k}.done",
                      f"l{k}.body:", f"  %x{k} = add i64 %jrow, %i{k}", f"  %t{k} = add i64 %crow, %i{k}"]
            here: set[str] = set()
            for n in loop:
                o = n.outputs[0]
                if n.op_type == "ReduceMean":
                    x = n.inputs[0]
                    if self._bytes(x, bytes_in):
                        return None
                    ld, a = self._operand(x, here, k, f"%m{self.index[o]}", bytes_in)
                    s = f"%sum{self.index[o]}"
                    if self.token:  # the row's sum in the loop (its order free: see the module's note)
                        lines += ld + [f"  {s}.x = fpext float {a} to double",
                                       f"  {s}.new = fadd reassoc double {s}, {s}.x"]
                        continue
                    lines += ld + [f"  {s}.at = getelementptr double, ptr %s{self.slot['sum', o]}, i64 %t{k}",
                                   f"  {s}.old = load double, ptr {s}.at, !llvm.access.group !0",
                                   f"  {s}.x = fpext float {a} to double", f"  {s}.new = fadd double {s}.old, {s}.x",
                                   f"  store double {s}.new, ptr {s}.at, !llvm.access.group !0"]
                    continue
                got = self._op(n, k, here, bytes_in)
                if got is None:
                    return None
                lines += got + self._stores(o, k)
                here.add(o)
            lines += [f"  %i{k}.next = add i64 %i{k}, 1", f"  br label %l{k}.head, !llvm.loop !{2 * m + 1}",
                      f"l{k}.done:"]
            got, before = self._after_loop(stage, k, loop, sums, loop_ids)
            lines += got
        lines += ["  br label %jlatch", "jlatch:", "  %jnext = add i64 %j, 1", "  br label %jhead", "exit:",
                  "  ret void", "}", ""]
        return lines

    def source(self, bytes_in: dict, token: bool = False, blocked: bool = False, wide: bool = False,
               split: int = 0, masked: bool = False) -> str | None:
        """The IR of the passes (`pass<stage>`, those that loop), for inputs of which
        `bytes_in` are 8-bit (name → type), `token`-major (each part takes rows, a loop
        runs along a row) or feature-major (each part takes features, a loop runs along a
        feature's tokens), either `blocked` (each part takes tokens, feature-major, or rows,
        BLOCK at a time through every pass, the means made between them: `blocked`, one
        call) or not (the passes one call each, the means made on numpy between them); None
        where the kernel cannot run them. `wide`: the loops 16 floats a step (`wide_loops`);
        `masked`: their last step masked, but a Lookup's gather's (`loop_widths`).
        `split` (a count of parts, feature-major, not blocked): the means made in IR, each
        part making every token's at the start of each pass but the first (`stage<s>`, from
        the `split` parts' sums), so that nothing runs on numpy between the passes."""
        self.token, self.blocked, self.wide, self.split = token, blocked, wide, split
        self._gathers: set[int] = set()  # (the loops of a Lookup's gather, by id: LLVM's width, unmasked)
        body, loop_ids = [f"; sparsejit generated kernel: a row group ({' '.join(n.op_type for n in self.nodes)})"], []
        for stage in range(self.stages):
            got = [self._means_ir(stage, bytes_in, loop_ids)] if (blocked or split) and stage else []
            got += [self._pass_ir(stage, bytes_in, loop_ids)] if self.loops[stage] else []
            if None in got:
                return None
            body += [line for lines in got for line in lines]
        if blocked:
            body += self._blocked_ir()
        if split:
            body += self._split_ir()
        w = 2 * len(loop_ids) + 1  # (the width's and the mask's metadata, after the loops')
        meta = [f"!{2 * m + 1} = distinct !{{!{2 * m + 1}, !{2 * m + 2}{self._widths(m, w, wide, masked)}}}\n"
                f"!{2 * m + 2} = !{{!\"llvm.loop.parallel_accesses\", !0}}" for m in loop_ids]
        meta += [WIDE.format(w)] if wide else []
        meta += [MASKED.format(w + 1)] if masked else []
        return "\n".join(body) + _DECLARES + "\n".join(meta) + "\n"

    def _widths(self, m: int, w: int, wide: bool, masked: bool) -> str:
        """Loop m's references to the width's (!w) and the mask's (!w + 1) metadata."""
        if masked and m in self._gathers:
            return ""
        return (f", !{w}" if wide else "") + (f", !{w + 1}" if masked else "")

    def _passes(self, bytes_in: dict, token: bool, blocked: bool = False, wide: bool = False,
                split: int = 0, masked: bool = False) -> list | None:
        """The passes' addresses for these inputs (blocked: `blocked`'s alone; made once;
        `source` keeps its layout on the kernel while it writes, so under a lock: a model
        may run on several threads)."""
        key = (token, blocked, wide, split, masked, *sorted((k, np.dtype(v).str) for k, v in bytes_in.items()))
        found = self._compiled.get(key, False)
        if found is not False:
            return found
        with self._lock:
            if key not in self._compiled:
                src = self.source(bytes_in, token, blocked, wide, split, masked)
                engine = None if src is None else ir_engine(src)
                self._compiled[key] = None if engine is None else [engine.get_function_address("blocked")] \
                    if blocked else [engine.get_function_address(f"{'stage' if split and s else 'pass'}{s}")
                                     if self.loops[s] else 0 for s in range(self.stages)]
        return self._compiled[key]

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
        """The outputs, written feature-major (each feature's tokens contiguous, rows
        padded, as the Linear kernels write and read x) where an input of the full shape
        lies so (`_feature_major`), else token-major (C order); None where the kernel does
        not cover the inputs (see _broadcast; another type, a constant of another length,
        no elements, arithmetic on bytes). What depends on the inputs' shapes, layouts and
        types alone is worked out once for them (`_prepare`)."""
        key = (threads(), *[(x.shape, x.strides, x.dtype.num) for x in inputs])
        call = self._calls.get(key, False)
        if call is False:
            if len(self._calls) >= 64:  # (a server seeing many shapes)
                self._calls.clear()
            call = self._calls[key] = self._prepare(inputs)
        if call is None:
            return None
        return self._taped_run(call, inputs, key) if taping() else self._run(call, inputs)

    def _prepare(self, inputs: tuple[np.ndarray, ...]) -> _Call | None:
        """How the kernel runs on inputs of these shapes, layouts and types; None where it
        does not cover them."""
        shape = inputs[0].shape if all(x.shape == inputs[0].shape for x in inputs) else self._broadcast(inputs)
        if shape is None or not shape or any(x.dtype not in (np.float32, *BYTES) for x in inputs):
            return None
        n, rows = shape[-1], int(np.prod(shape[:-1]))
        if n == 0 or rows == 0 or any(c.size not in (1, n) for c in self.arrays.values()):
            return None
        full = [x for x in inputs if x.shape == shape]
        token = len(shape) == 1 or not _feature_major(full)
        waits = self._blocked_ok()  # (a mean to wait for, made in IR)
        spread = waits and not token and (threads() > 1 or rows <= SPLIT_MEANS)
        blocked = waits and (token or not spread and rows <= BLOCKED)  # (not spread: one thread)
        loop = n if token else min(BLOCK, -(-rows // threads())) if blocked else rows  # (a loop's length)
        parts = threads() * (SPLIT if not token and not blocked and threads() > 1 else 1)
        split = parts if spread else 0
        wide, masked = loop_widths(token, loop)
        passes = self._passes({x: v.dtype for x, v in zip(self.names, inputs) if v.dtype in BYTES}, token, blocked,
                              wide, split, masked)
        if passes is None:
            return None
        own = tuple((k, s) for k, s in enumerate(self.slots) if s[0] in ("x", "y", "quad", *_APART, *_PERIOD))
        scratch = sum(-(-math.prod(s) * np.dtype(t).itemsize // ALIGN) * ALIGN
                      for _, s, t in self._scratch_shapes(n, rows, parts, token, blocked, split))
        return _Call(shape, n, rows, token, passes, parts, tuple(_lay_kind(v, shape, token) for v in inputs),
                     blocked, own, scratch=scratch, split=split)

    def _scratch_shapes(self, n: int, rows: int, parts: int, token: bool, blocked: bool, split: int) -> list[tuple]:
        """(key, shape, dtype) of each array a call works in and does not return: kept
        values, means, sums, temporaries, the bytes' temporary rows."""
        outer, inner = (rows, n) if token else (n, rows)
        part = -(-inner // PART_ROW) * PART_ROW  # (a part's row: on lines of its own, %crow)
        return ([(("kept", o), (parts, n * BLOCK) if blocked and not token else (outer, inner), np.float32)
                 for o in self.keep] +
                [(("mean", v), (split * part if split else rows,), np.float32) for v in self.means] +
                [(("sum", v), (parts, rows if token else part), np.float64) for v in self.sums] +
                [(("temp", o), (parts, part), np.float32) for o in self.temps] +
                [(("quad temp", o), (parts, 4 * part), np.uint8) for o in self.quads])

    def _scratch(self, c: _Call, arena: np.ndarray) -> tuple[dict, np.ndarray]:
        """The call's scratch arrays (_scratch_shapes), each from a 64-byte line of `arena`,
        and its slots with them, the constants and the length filled in (the call's own
        arrays and their strides left to fill)."""
        arrays, at = {}, 0
        for key, shape, dtype in self._scratch_shapes(c.n, c.rows, c.parts, c.token, c.blocked, c.split):
            size = math.prod(shape) * np.dtype(dtype).itemsize
            arrays[key] = arena[at:at + size].view(dtype).reshape(shape)
            at += -(-size // ALIGN) * ALIGN
        p = np.array([address(arrays[s]) if s in arrays else c.n if s[0] == "n" else self._fixed.get(s, 0)
                      for s in self.slots], np.int64)
        return arrays, p

    def _run(self, c: _Call, inputs: tuple[np.ndarray, ...]) -> tuple:
        """The call, in this thread's scratch arena (layout.thread_arena, shared by the
        kernels the thread calls): its arrays and slots there kept for the layout while the
        arena stays (made anew where another thread is in them), the sums and the bytes'
        temporary rows zeroed, then the passes."""
        arena = thread_arena(c.scratch)
        mine = c.lock.acquire(blocking=False)
        try:
            if mine and c.spare and c.spare[0] is arena:
                _, scratch, p = c.spare
            else:
                scratch, p = self._scratch(c, arena)
                if mine:
                    c.spare[:] = [arena, scratch, p]
            for key, a in scratch.items():
                if key[0] in ("sum", "quad temp"):
                    a.fill(0)
            return self._passes_run(c, inputs, scratch, p)
        finally:
            if mine:
                c.lock.release()

    def _taped_run(self, c: _Call, inputs: tuple[np.ndarray, ...], key: tuple) -> tuple:
        """The call while a tape is made (layout.taping): its scratch the tape's
        (layout.call_scratch), the sums the passes add into and the bytes' rows zeroed by a
        launch (layout.zero_launch) where _run has numpy fill them, its slots kept here
        (the replays read them). Where numpy works between its passes (sums the means, runs
        ops on them: a group not blocked with more than one pass) or copies an input (its
        slots then hold the copy's address, which a replay would read again), the tape is
        told (launch.python_between)."""
        scratch, p = self._scratch(c, call_scratch(c.scratch))
        self._taped[key] = p
        zeroed = [a for k, a in scratch.items() if k[0] in ("sum", "quad temp")]
        if zeroed:
            zero_launch(zeroed)
        if not (c.blocked or c.split) and (self.stages > 1 or self._once or self.sums) or {"copy", "copy T"} & set(c.lay):
            python_between()
        return self._passes_run(c, inputs, scratch, p)

    def _passes_run(self, c: _Call, inputs: tuple[np.ndarray, ...], scratch: dict, p: np.ndarray) -> tuple:
        shape, n, rows, token, passes, parts = c.shape, c.n, c.rows, c.token, c.passes, c.parts
        outer, inner = (rows, n) if token else (n, rows)
        arrays = {("x", x): _lay(kind, v, shape) for x, v, kind in zip(self.names, inputs, c.lay)}
        outs = {o: aligned_empty((rows, n), self.types[o]) if token else feature_major_empty(n, rows)
                if self.types[o] == np.float32 else aligned_empty((n, rows), self.types[o])
                for o in self.rows_out}
        arrays.update({("y", o): m for o, m in outs.items()})
        quads = {o: quad_empty(n, rows) for o in self.quads}
        arrays.update({("quad", o): q for o, q in quads.items()})
        for k, s in c.own:  # (the call's arrays, and their row strides in elements)
            a = arrays[_APART.get(s[0], _PERIOD.get(s[0], s[0])), s[1]]
            p[k] = a.strides[0] // a.itemsize if s[0] in _APART else a.shape[0] if s[0] in _PERIOD else address(a)
        arrays.update(scratch)
        driver = load_source(ROWS_DRIVER).run_row_group
        env: dict[str, np.ndarray] = {}
        if c.blocked:  # (every pass in one call; the parts take tokens, feature-major, or rows)
            run(driver, ROWS, parts, 1, passes[0], p, inner, outer if token else inner)
        for stage in range(0 if c.blocked else self.stages):
            if c.split:  # (the means made by the passes)
                if passes[stage]:
                    run(driver, ROWS, parts, 1, passes[stage], p, inner, outer)
                continue
            for node, fn in self._once.get(stage, ()):  # one per row: of means and constants, on numpy
                env[node.outputs[0]] = fn(*[env[i] if i in env else self.arrays.get(i) if i else None
                                           for i in node.inputs])
            for v in self.means:
                if v in env and self.values[v].stage <= stage:
                    arrays["mean", v][:] = env[v].reshape(-1)
            if passes[stage]:
                run(driver, ROWS, parts, 1, passes[stage], p, inner, outer)
            for v in self.sums:
                if self.values[v].stage == stage:
                    env[v] = arrays["sum", v].sum(axis=0)[:rows].astype(np.float32) / np.float32(n)
        means = {o: env[o].astype(self.types[o]).reshape((*shape[:-1], 1))
                 for o in self.outputs if self.values[o].kind == "mean"}
        return tuple((outs[o] if token else outs[o].T).reshape(shape) if o in outs else means[o]
                     for o in self.outputs) + tuple(q.T.reshape((*shape[:-1], q.shape[0])) for q in quads.values())


_APART = {"x rows": "x", "y rows": "y", "quad rows": "quad"}  # (a row stride slot, in elements: whose)
_PERIOD = {"x period": "x"}  # (an input's rows, which repeat over the whole's: whose)


@dataclass(frozen=True)
class _Call:
    """RowKernel._prepare's: the inputs' broadcast shape, its last axis and rows, the
    layout, the passes' addresses, the parts, and how each input is laid (_lay_kind)."""

    shape: tuple
    n: int
    rows: int
    token: bool
    passes: list
    parts: int
    lay: tuple[str, ...]
    blocked: bool
    own: tuple  # (slot index, slot) of the call's own arrays and their row strides
    lock: threading.Lock = field(default_factory=threading.Lock)  # (whoever holds it uses spare)
    spare: list = field(default_factory=list)  # [arena, its scratch arrays, the slots] (_run)
    scratch: int = 0  # bytes of scratch the call takes (_scratch_shapes)
    split: int = 0  # feature-major, not blocked: the means made in IR by the parts, this many (RowKernel.source)
