"""Attention core softmax(scale(q·kᵀ) + mask)·v: the dense numpy reference and the kernel.

The fused node replaces MatMul → Div/Mul → Add → Softmax (→ NaN guard) → MatMul. The
reference keeps the exact semantics of the ops it replaces (the Softmax axis and opset,
the optional scale, mask and NaN guard). The kernel handles the case every BERT-family
export has, 4-D [batch, heads, seq, head_dim] with the softmax over the last axis;
`fused_attention` falls back to the reference otherwise.

The kernel is LLVM IR for one (batch, head) pair (attention_ir.py), driven by a Numba
prange over the pairs. It reads q, kᵀ and v feature-major, as the sparse Linear layers
leave them, and writes its output feature-major for the next one: no transposing copy
on either side.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ..ops import bind, op, softmax
from .attention_ir import SIGNATURE, AttentionConfig, attention_ir
from .compile import compile_ir, load_source, threads, vector_lanes
from .ir import Signature, f32, with_driver
from .launch import IMPORTS, address, put_source, run
from .layout import aligned_empty, feature_major_empty


@op("AttentionCore", fused=True)
def reference_attention(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | None = None,
                        scale: np.ndarray | None = None, q_scale: np.ndarray | None = None,
                        k_scale: np.ndarray | None = None, *, scale_op: str = "none", axis: int | None = None,
                        opset: int = 13, nan_guard: bool = False) -> np.ndarray:
    """The fused node (fuse.fuse_attention): the ops it replaces, in order (first q · q_scale
    and kᵀ · k_scale, where the export scaled them: fuse._prescaled)."""
    if isinstance(mask, PreparedMask):
        mask = mask.mask
    if q_scale is not None:
        q = np.multiply(q, q_scale)
    if k_scale is not None:
        kt = np.multiply(kt, k_scale)
    s = np.matmul(q, kt)
    if scale_op == "div":
        s = s / scale
    elif scale_op == "mul":
        s = s * scale
    if mask is not None:
        s = s + mask
    p = softmax(s, axis=axis, opset=opset)
    if nan_guard:
        p = np.where(np.isnan(p), np.float32(0), p)
    return np.matmul(p, v)


def reference_bf16_attention(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | None,
                             scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The numpy meaning of the bf16 kernel, and a bound on its distance from it: scores
    of q and kᵀ rounded to bfloat16 (exact products, float64 sums), · scale + mask, p =
    exp(s - max) summed unrounded, then p and v rounded to bfloat16, Σ p·v / Σ p. The
    kernel's exp and float32 sums may move a p across a bfloat16 rounding boundary: at
    most 2⁻⁸ of that p, so the bound is 2⁻⁸ · Σ p·|v| / Σ p (plus float32 rounding)."""
    from .bf16 import rounded

    s = (rounded(q).astype(np.float64) @ rounded(kt).astype(np.float64)).astype(np.float32) * np.float32(scale)
    if mask is not None:
        s = s + mask
    p = np.exp((s - s.max(axis=-1, keepdims=True)).astype(np.float64))
    total = p.sum(axis=-1, keepdims=True)
    out = (rounded(p.astype(np.float32)).astype(np.float64) @ rounded(v).astype(np.float64)) / total
    bound = 2.0 ** -8 * (p @ np.abs(v.astype(np.float64))) / total + 1e-5 * (1 + np.abs(out))
    return out.astype(np.float32), bound


HEADS_DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the attention IR kernel
# part c computes (batch, head) pairs [c * n / parts, (c + 1) * n / parts) in its rows of
# the scratch s and pk, pair i being (i % batch, i // batch): a part's heads of every
# sequence, whose q, k and v its thread made (an AMX group splits by members); arrays
# are [batch, head, feature, token] views (xq: [batch, head, feature / 4, token], where a
# quant_out kernel stores the outputs' bytes on grid)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_heads(launch, part, calls, fn, qt, kt, vt, mask, ot, scale, s, pk, xq, grid):
    n_batch, n_head, d, tq = qt.shape
    tk = kt.shape[3]
    mb, mh = mask.shape[0] > 1, mask.shape[1] > 1
    parts = calls.shape[0]
    for c in range(parts):
        s_at = s.ctypes.data + c * s.strides[0]
        s_at += (64 - s_at % 64) % 64  # (the scratch: whole AMX tiles of keys, 64-byte aligned)
        pk_at = pk.ctypes.data + c * pk.strides[0]
        pk_at += (64 - pk_at % 64) % 64  # (bf16: q, k and v packed, attention_ir._packed)
        for bh in range(c * n_batch * n_head // parts, (c + 1) * n_batch * n_head // parts):
            h = bh // n_batch
            b = bh % n_batch
            put_attention_head(calls, c, fn, qt.ctypes.data + b * qt.strides[0] + h * qt.strides[1],
                               qt.strides[2] // 4, kt.ctypes.data + b * kt.strides[0] + h * kt.strides[1],
                               kt.strides[2] // 4, vt.ctypes.data + b * vt.strides[0] + h * vt.strides[1],
                               vt.strides[2] // 4,
                               mask.ctypes.data + (b if mb else 0) * mask.strides[0] + (h if mh else 0) * mask.strides[1],
                               mask.strides[2] // 4, ot.ctypes.data + b * ot.strides[0] + h * ot.strides[1],
                               ot.strides[2] // 4, d, tq, tk, scale, s_at, pk_at,
                               xq.ctypes.data + b * xq.strides[0] + h * xq.strides[1], xq.strides[2] // 4,
                               grid.ctypes.data)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""

# Query vectors per tile and keys per pass over the head features (float32 products), by
# vector lanes. AVX-512 (32 registers): 4 × 6 accumulators, 10 loads to 24 fmas where
# 2 × 8 had 10 to 16 (bench/README.md, twenty-fifth session). AVX2 (16 registers): 2 × 4,
# as 2 × 8 left none for the operands, which spilled ("Measured and tried"). bfloat16
# products keep 2 × 8: their AMX tiles take two query vectors, and vdpbf16ps's was
# measured on Zen 4 with it.
ATTENTION_TILE = {16: (4, 6), 8: (2, 4)}
BF16_ATTENTION_TILE = (2, 8)


def attention_config(mask_per_query: bool, nan_guard: bool = False, lanes: int | None = None,
                     bf16: bool = False, amx: bool = False) -> AttentionConfig:
    lanes = lanes or vector_lanes()
    qvec, group = BF16_ATTENTION_TILE if bf16 else ATTENTION_TILE[lanes]
    return AttentionConfig(mask_per_query, lanes, qvec, group, nan_guard=nan_guard, bf16=bf16, amx=amx)


@functools.cache  # (asked on every call: the CPU and the permission do not change)
def amx_fits(head_size: int) -> bool:
    """Whether bf16 attention runs its products on AMX's tiles: the CPU has AMX-BF16 (and
    the process may use it), and the head size is whole tile rows of bfloat16 (32)."""
    from .amx import has_amx

    return head_size % 32 == 0 and vector_lanes() == 16 and has_amx("bf16")


@functools.cache
def _compiled(cfg: AttentionConfig):
    return compile_ir(attention_ir(cfg), SIGNATURE.name)


@functools.cache
def _kernel(mask_per_query: bool, nan_guard: bool, lanes: int, bf16: bool = False, amx: bool = False,
            quant: str = ""):
    """(config, IR function, Numba driver), looked up once per mask layout, NaN guard,
    vector width, precision, product unit and bytes stored (`quant`: "" none, "uint8" on
    a grid whose lowest value is 0, "any"), not built and hashed on every call."""
    cfg = dataclasses.replace(attention_config(mask_per_query, nan_guard, lanes, bf16, amx), quant_out=bool(quant),
                              unsigned_grid=quant == "uint8")
    return cfg, _compiled(cfg), load_source(HEADS_DRIVER_SOURCE).run_heads


NO_BYTES = np.zeros((1, 1, 1, 1), np.float32)  # the xq a kernel storing no bytes is passed
NO_GRID = np.zeros(4, np.float32)


def kernel_source(mask_per_query: bool = False, nan_guard: bool = False, bf16: bool = False,
                  amx: bool = False) -> str:
    """What runs: the IR for one head, then the Numba driver over (batch, head) pairs."""
    return with_driver(attention_ir(attention_config(mask_per_query, nan_guard, bf16=bf16, amx=amx)),
                       HEADS_DRIVER_SOURCE)


def _unit_last(a: np.ndarray) -> np.ndarray:
    """a (4-D float32) with unit stride on its last axis: a view when it has one, else a copy."""
    if a.shape[3] <= 1 or a.strides[3] == a.itemsize:
        return a
    return np.ascontiguousarray(a)


def _scalar(scale, scale_op: str) -> float | None:
    if scale_op == "none":
        return 1.0
    s = np.asarray(scale)
    if s.size != 1:
        return None
    return float(1.0 / s.ravel()[0]) if scale_op == "div" else float(s.ravel()[0])


@op("PrepareMask", needs_opset=True, fused=True)
def prepare_mask(source: np.ndarray, expand: np.ndarray | None = None, *, steps: tuple = (),
                 opset: int = 17) -> PreparedMask:
    """The node lower.prepare_masks puts before the first of the AttentionCore nodes that read
    one mask: the mask, made from `source` by `steps` (the per-element ops the graph made
    it with, as their own ops would) and, where the graph expanded it, Expand's broadcast to
    `expand` (a view), with its kernel layout made once per run."""
    return PreparedMask(source, mask_steps(steps, opset), float_steps(steps), expand)


def mask_steps(steps: tuple, opset: int):
    """A function source → mask running `steps` ((op, attributes, scalar constant or None, the
    constant first), lower._mask_steps) by the ops' own implementations; None for none.
    "Select" is Where(x, then, else) of its two constants, "MaskedFill" Where(Cast(x, bool),
    its constant, x)."""
    if not steps:
        return None
    where, to_bool = bind("Where", {}, opset, 1), bind("Cast", {"to": BOOL}, opset, 1)

    def step(op_type: str, attrs: dict, const, first: bool):
        if op_type == "Select":
            return lambda x: where(x, *const)[0]
        if op_type == "MaskedFill":
            return lambda x: where(to_bool(x)[0], const, x)[0]
        fn = bind(op_type, attrs, opset, 1)
        if const is None:
            return lambda x: fn(x)[0]
        return (lambda x: fn(const, x)[0]) if first else (lambda x: fn(x, const)[0])

    bound = [step(*s) for s in steps]

    def make(x: np.ndarray) -> np.ndarray:
        for fn in bound:
            x = fn(x)
        return x
    return make


# The steps a mask's fill kernel makes (mask_fill): float32 arithmetic with a constant.
FILL_OPS = {"Sub": "fsub", "Mul": "fmul", "Add": "fadd", "Div": "fdiv"}
FLOAT, BOOL = 1, 9  # ONNX's TensorProto.FLOAT and BOOL, a Cast's `to`


def float_steps(steps: tuple) -> tuple | None:
    """The mask's steps as the fill kernel takes them ((LLVM op, float32 constant, constant
    first) each, after the source's Cast to float32 if any), or None for a chain it does not
    make: first, one Cast to float32 or a Select of two float32 constants (of a bool
    source); then Sub, Mul, Add and Div of a float32 scalar and MaskedFill (BERT's exports:
    Cast, Sub from 1, Mul by a large negative; SDPA's: Cast, Sub from 1, MaskedFill with the
    lowest float32, or a Select of 0 and -inf)."""
    out = []
    for i, (op_type, attrs, const, first) in enumerate(steps):
        if op_type == "Cast" and i == 0 and attrs.get("to") == FLOAT:
            continue
        cs = [np.asarray(c) for c in (const if op_type == "Select" else (const,))] if const is not None else []
        if not cs or any(c.dtype != np.float32 or c.size != 1 for c in cs) or op_type == "Select" and i:
            return None
        values = tuple(float(c.ravel()[0]) for c in cs)
        if op_type in ("Select", "MaskedFill"):
            out.append((op_type, values if op_type == "Select" else values[0], False))
        elif op_type in FILL_OPS:
            out.append((FILL_OPS[op_type], values[0], bool(first)))
        else:
            return None
    return tuple(out)


FILL = Signature("mask_fill", (("source", "ptr"), ("n", "i64"), ("mask", "ptr"), ("layout", "ptr")))
# what a source element is read as, and made a float32 by
_SOURCE_TYPES = {"<i8": ("i64", "sitofp"), "<i4": ("i32", "sitofp"), "|b1": ("i8", "uitofp"),
                 "|u1": ("i8", "uitofp"), "<f4": ("float", None)}


def mask_fill_ir(steps: tuple, source: str) -> str:
    """The mask made from its source in one pass: element i of the source (numpy dtype
    `source`, a key of _SOURCE_TYPES) made a float32 as Cast does, the steps applied in
    float32 as numpy applies them, stored at i of mask and of layout (a kernel layout in the
    mask's own order: a mask by key)."""
    ty, cast = _SOURCE_TYPES[source]
    body = [f"  %sp = getelementptr inbounds {ty}, ptr %source, i64 %i", f"  %s = load {ty}, ptr %sp",
            f"  %x0 = {cast} {ty} %s to float" if cast else "  %x0 = freeze float %s"]
    for k, (fop, c, first) in enumerate(steps):
        x, y = f"%x{k}", f"%x{k + 1}"
        if fop == "Select":  # (of the bool source: then where it is nonzero)
            body += [f"  %b{k} = icmp ne {ty} %s, 0", f"  {y} = select i1 %b{k}, float {f32(c[0])}, float {f32(c[1])}"]
        elif fop == "MaskedFill":  # (where x is not 0: NaN too, as Cast to bool makes it true)
            body += [f"  %b{k} = fcmp une float {x}, 0.0", f"  {y} = select i1 %b{k}, float {f32(c)}, float {x}"]
        else:
            a, b = (f32(c), x) if first else (x, f32(c))
            body.append(f"  {y} = {fop} float {a}, {b}")
    last = f"%x{len(steps)}"
    body += ["  %mp = getelementptr inbounds float, ptr %mask, i64 %i", f"  store float {last}, ptr %mp",
             "  %lp = getelementptr inbounds float, ptr %layout, i64 %i", f"  store float {last}, ptr %lp"]
    return (f"; sparsejit generated kernel: an attention mask from its source ({source}), "
            f"steps {list(steps)}\n"
            f"define void @mask_fill({FILL.params()}) {{\nentry:\n  br label %head\nhead:\n"
            f"  %i = phi i64 [ 0, %entry ], [ %i1, %body ]\n  %more = icmp slt i64 %i, %n\n"
            f"  br i1 %more, label %body, label %done\nbody:\n" + "\n".join(body) +
            "\n  %i1 = add i64 %i, 1\n  br label %head\ndone:\n  ret void\n}\n")


@functools.cache
def _mask_fill(steps: tuple, source: str):
    return FILL.ctypes()(compile_ir(mask_fill_ir(steps, source), FILL.name))


class PreparedMask:
    """An additive mask that several AttentionCore nodes read (every BERT layer reads one),
    with the kernel's layout of it built once per run rather than once per layer. The
    executor holds it for one run only, so it never outlives the mask's values.
    `fill`: the steps as float_steps gives them, for the kernel a taped run's refill
    makes the mask and its layout with (None: numpy's ops, as `make`). `expand`: the shape
    the graph expanded the mask to (Expand's input), the mask then a broadcast view of the
    values made unexpanded."""

    def __init__(self, source: np.ndarray, make=None, fill: tuple | None = None, expand: np.ndarray | None = None):
        self.source, self._make, self._fill = source, make, fill
        self._filling: tuple | None = None  # (the layouts' count, _fill_call's) when refill last looked
        self._values = source if make is None else np.array(make(source))
        self.mask = self._values
        if expand is not None:  # (as Expand does: both ways, a 1 in the target keeps the size)
            target = tuple(int(d) for d in np.asarray(expand).ravel())
            self.mask = np.broadcast_to(self._values, np.broadcast_shapes(self._values.shape, target))
        self._layouts: dict[tuple, np.ndarray] = {}

    def kernel_layout(self, mask4: np.ndarray, tk: int) -> np.ndarray:
        """The kernel's layout of the mask for these scores (made at its first reader, held
        outside a taped run's arena: the mask's refill writes it before that reader runs,
        where the arena may give its memory to other buffers)."""
        key = (mask4.shape, tk)
        if key not in self._layouts:
            shape = mask4.shape[:2] + (tk, mask4.shape[2])
            self._layouts[key] = _kernel_mask(mask4, tk, aligned_empty(shape, lasting=True))
        return self._layouts[key]

    def layouts(self) -> list[np.ndarray]:
        return list(self._layouts.values())

    def refill(self) -> None:
        """The mask made again from its source, and each layout made so far, in place from
        the values now (a taped run's mask, refilled where the kernels read it:
        sparsejit.tape). Where the steps are ones the fill kernel makes, and the one layout
        is by key (in the mask's own order), one call of it makes both."""
        if self._filling is None or self._filling[0] != len(self._layouts):
            self._filling = (len(self._layouts), self._fill_call())
        call = self._filling[1]
        if call is not None:
            call[0](*call[1])
            return
        if self._make is not None:
            np.copyto(self._values, self._make(self.source))
        for (shape, tk), out in self._layouts.items():
            _kernel_mask(by_key(self.mask.reshape((1,) * (4 - self.mask.ndim) + self.mask.shape), shape), tk, out)

    def _fill_call(self) -> tuple | None:
        """(the fill kernel, its arguments) for this mask and its layout, or None where it
        does not make them."""
        src, values, fill = self.source, self._values, self._fill
        if fill is None or values is src or src.dtype.str not in _SOURCE_TYPES or len(self._layouts) > 1 \
                or not (src.flags.c_contiguous and values.flags.c_contiguous and values.dtype == np.float32) \
                or values.shape != src.shape or fill and fill[0][0] == "Select" and src.dtype != np.bool_:
            return None
        for (shape, tk), out in self._layouts.items():
            if not (shape[2] == 1 and shape[3] == tk and out.flags.c_contiguous and out.size == values.size):
                return None
        out = next(iter(self._layouts.values()), values)
        return _mask_fill(fill, src.dtype.str), (address(src), src.size, address(values), address(out))


def by_key(mask4: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    """A 4-D mask that is the same for every query (a broadcast along the query axis: an
    expanded mask) as its one query row, which the kernel's mask by key reads; else as it
    is. With `shape` (a layout's key), the one of the two of that shape."""
    if mask4.shape[2] > 1 and mask4.strides[2] == 0 and (shape is None or shape[2] == 1):
        return mask4[:, :, :1]
    return mask4


def _kernel_mask(mask4: np.ndarray, tk: int, out: np.ndarray | None = None) -> np.ndarray:
    """The 4-D mask as the kernel reads it: by key, [.., keys, queries] when it varies by
    query, with rows on 64-byte lines (they are read as vectors); into `out` if given."""
    src = np.broadcast_to(mask4, mask4.shape[:3] + (tk,)).transpose(0, 1, 3, 2)
    out = aligned_empty(src.shape) if out is None else out
    out[...] = src
    return out


def fused_attention(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | PreparedMask | None = None,
                    scale: np.ndarray | None = None, q_scale: np.ndarray | None = None,
                    k_scale: np.ndarray | None = None, *, scale_op: str = "none", axis: int | None = None,
                    opset: int = 13, nan_guard: bool = False, bf16: bool = False, amx: bool = True) -> np.ndarray:
    """The kernel where it applies, else the reference (same arguments, same result).
    `bf16`: the products in bfloat16 (the model's precision="bf16"), on AMX's tiles where
    `amx_fits` (unless `amx` is False), else AVX512-BF16's `vdpbf16ps`. Scalar q and kᵀ
    scales the kernel takes with the scores' own (one multiply of each score)."""
    return fused_attention_bytes(q, kt, v, mask, scale, q_scale, k_scale, scale_op=scale_op, axis=axis, opset=opset,
                                 nan_guard=nan_guard, bf16=bf16, amx=amx)[0]


def fused_attention_bytes(q: np.ndarray, kt: np.ndarray, v: np.ndarray, mask: np.ndarray | PreparedMask | None = None,
                          scale: np.ndarray | None = None, q_scale: np.ndarray | None = None,
                          k_scale: np.ndarray | None = None, *, scale_op: str = "none", axis: int | None = None,
                          opset: int = 13, nan_guard: bool = False, bf16: bool = False, amx: bool = True,
                          grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(fused_attention's output, and with a `grid` ([scale, zero point, lowest, highest],
    float32) the bytes an int8 layer on it makes of the heads' merged output, stored by the
    float32 kernel beside each output (attention_ir's quant_out): the token-major view
    [batch, query, heads·features / 4] of 4-block rows, as layernorm.layernorm_to_bytes
    gives; None where no kernel stored them (the reference, bf16, head sizes off 4)."""
    prepared = mask if isinstance(mask, PreparedMask) else None
    if prepared is not None:
        mask = prepared.mask
    mul = _scalar(scale, scale_op)
    for pre in (q_scale, k_scale):  # (float32 scalars only: else the reference, which broadcasts them)
        if mul is not None and pre is not None:
            pre = np.asarray(pre)
            mul = mul * float(pre.ravel()[0]) if pre.size == 1 and pre.dtype == np.float32 and pre.ndim <= 1 else None
    ok = (q.ndim == kt.ndim == v.ndim == 4 and mul is not None and q.dtype == kt.dtype == v.dtype == np.float32
          and (axis is None or axis in (-1, 3)) and q.shape[:2] == kt.shape[:2] == v.shape[:2]
          and q.shape[3] == kt.shape[2] == v.shape[3] and kt.shape[3] == v.shape[2])  # (one head size)
    if ok and mask is not None:  # broadcasts to the scores' shape (written out: np.broadcast_shapes is slower)
        scores = (q.shape[0], q.shape[1], q.shape[2], kt.shape[3])
        ok = mask.dtype == np.float32 and mask.ndim <= 4 and \
            all(m in (1, s) for m, s in zip(mask.shape[::-1], scores[::-1]))
    if not ok:
        return reference_attention(q, kt, v, mask, scale, q_scale, k_scale, scale_op=scale_op, axis=axis, opset=opset,
                                   nan_guard=nan_guard), None
    n_batch, n_head, tq = q.shape[:3]
    tk = kt.shape[3]
    if mask is None:
        mask = np.zeros((1, 1, 1, tk), np.float32)
    mask = by_key(mask.reshape((1,) * (4 - mask.ndim) + mask.shape))
    per_query = mask.shape[2] > 1
    mask_t = _kernel_mask(mask, tk) if prepared is None else prepared.kernel_layout(mask, tk)
    # Feature-major operands: [batch, head, feature, token] with unit token stride.
    qt = _unit_last(q.transpose(0, 1, 3, 2))
    kt = _unit_last(kt)
    vt = _unit_last(v.transpose(0, 1, 3, 2))
    # The output is written feature-major, [head·feature, batch·query]: the layout the
    # next sparse Linear reads without a copy, once transposed back and reshaped.
    # Splitting the two axes is a view, never a copy.
    ot = feature_major_empty(n_head * v.shape[3], n_batch * tq).reshape(n_head, v.shape[3], n_batch, tq)
    ot = ot.transpose(2, 0, 1, 3)
    amx = bf16 and amx and amx_fits(q.shape[3])
    d, lanes = v.shape[3], vector_lanes()
    quant = "" if grid is None or bf16 or d % 4 else "uint8" if grid[2] == 0 and lanes == 16 else "any"
    cfg, fn, run_heads = _kernel(per_query, bool(nan_guard), lanes, bf16, amx, quant)
    xb = feature_major_empty(n_head * d // 4, n_batch * tq) if quant else None
    pairs = n_batch * n_head
    parts = max(1, min(threads(), pairs))
    scratch = aligned_empty((parts, -(-tk // 16) * 16 * cfg.lanes * cfg.qvec + 16))
    packed = aligned_empty((parts, _packed_size(cfg, qt.shape[2], tq, tk) + 16))
    run(run_heads, SIGNATURE, parts, -(-pairs // parts), fn, qt, kt, vt, mask_t, ot, np.float32(mul), scratch, packed,
        NO_BYTES if xb is None else xb.reshape(n_head, d // 4, n_batch, tq).transpose(2, 0, 1, 3),
        NO_GRID if xb is None else grid)
    o = ot.transpose(0, 1, 3, 2)
    return o, None if xb is None else xb.view(np.int32).T.reshape(n_batch, tq, n_head * d // 4)


def _packed_size(cfg: AttentionConfig, d: int, tq: int, tk: int) -> int:
    """Floats of the bf16 kernel's packed operands for one head (attention_ir._packed)."""
    if not cfg.bf16:
        return 0
    whole = lambda n, to=cfg.lanes: -(-n // to) * to
    keys_by_row = whole(tk, 16) * -(-d // 2) if cfg.amx else 0  # attention_ir._keys_by_row
    return -(-d // 2) * (whole(tq) + whole(tk)) + d * whole(-(-tk // 2)) + keys_by_row
