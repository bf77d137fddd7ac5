"""The numpy reference op set: one small function per ONNX op, mirroring the spec.

This is the oracle every generated kernel is compared with, and the implementation
of every op the planner does not hand to a generated kernel. Each function takes the
node's inputs positionally (None for an omitted optional input) and its attributes as
keywords; ops whose meaning changed across opsets also take `opset`. It returns one
array, or a tuple when the op has several outputs.

`SUPPORTED_OPS` is the one declaration of what sparsejit claims: the importer refuses
anything else, and the ONNX backend conformance tests are selected from it.

The fused ops the passes make (Linear, AttentionCore, LayerNorm ...) register their numpy
references here too, from beside their kernels (`@op(name, fused=True)`): one registry,
one reference per op, the oracle every kernel is tested against. They are not ONNX ops,
so not in `SUPPORTED_OPS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from onnx import helper

OPS: dict[str, Callable] = {}
NEEDS_OPSET: set[str] = set()
NEEDS_OUTPUTS: set[str] = set()  # ops whose result depends on how many outputs the node names (Split)
FUSED: set[str] = set()


def op(name: str, needs_opset: bool = False, fused: bool = False, needs_outputs: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        OPS[name] = fn
        for flag, names in ((needs_opset, NEEDS_OPSET), (fused, FUSED), (needs_outputs, NEEDS_OUTPUTS)):
            if flag:
                names.add(name)
        return fn

    return register


def _axes(axes, attr_axes) -> list[int] | None:
    """Axes given as an input (newer opsets) or an attribute (older ones)."""
    if axes is not None:
        return [int(a) for a in np.asarray(axes).ravel()]
    if attr_axes is not None:
        return [int(a) for a in attr_axes]
    return None


# --- elementwise arithmetic -------------------------------------------------------


@op("Add")
def add(a, b):
    return np.add(a, b)


@op("Sub")
def sub(a, b):
    return np.subtract(a, b)


@op("Mul")
def mul(a, b):
    return np.multiply(a, b)


@op("Div")
def div(a, b):
    if np.issubdtype(np.result_type(a, b), np.integer):
        # ONNX integer division truncates toward zero; numpy's // floors.
        return np.trunc(np.true_divide(a, b)).astype(np.result_type(a, b))
    return np.divide(a, b)


@op("Pow")
def pow_(a, b):
    return np.power(a, b).astype(a.dtype)


@op("Sqrt")
def sqrt(x):
    return np.sqrt(x)


def _erf(x):
    from scipy.special import erf  # (here: slow to import, and only the reference Erf and Gelu need it)

    return erf(x)


@op("Erf")
def erf(x):
    return _erf(x).astype(x.dtype)


@op("Tanh")
def tanh(x):
    return np.tanh(x)


@op("Max")
def max_(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.maximum(out, x)
    return out


@op("Min")
def min_(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = np.minimum(out, x)
    return out


@op("Abs")
def abs_(x):
    return np.abs(x)


@op("Neg")
def neg(x):
    return np.negative(x)


@op("Sign")
def sign(x):
    return np.sign(x)


@op("Ceil")
def ceil(x):
    return np.ceil(x)


@op("Log")
def log(x):
    return np.log(x)


@op("Sin")
def sin(x):
    return np.sin(x)


@op("Cos")
def cos(x):
    return np.cos(x)


@op("Clip", needs_opset=True)
def clip(x, lo=None, hi=None, min=None, max=None, opset=13):
    # min and max are inputs from opset 11, attributes before; min > max gives max.
    lo, hi = (lo, hi) if opset >= 11 else (min, max)
    if lo is not None:
        x = np.maximum(x, np.asarray(lo, x.dtype))
    if hi is not None:
        x = np.minimum(x, np.asarray(hi, x.dtype))
    return x


@op("Gelu")
def gelu(x, approximate="none"):
    if approximate == "tanh":
        inner = np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)
        return (0.5 * x * (1.0 + np.tanh(inner))).astype(x.dtype)
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(x.dtype)


# --- comparisons and logic ---------------------------------------------------------


@op("Equal")
def equal(a, b):
    return np.equal(a, b)


@op("Less")
def less(a, b):
    return np.less(a, b)


@op("GreaterOrEqual")
def greater_or_equal(a, b):
    return np.greater_equal(a, b)


@op("Greater")
def greater(a, b):
    return np.greater(a, b)


@op("LessOrEqual")
def less_or_equal(a, b):
    return np.less_equal(a, b)


@op("Not")
def not_(x):
    return np.logical_not(x)


@op("And")
def and_(a, b):
    return np.logical_and(a, b)


@op("IsNaN")
def isnan(x):
    return np.isnan(x)


@op("Where")
def where(cond, a, b):
    return np.where(cond, a, b)


@op("Cast")
def cast(x, to, saturate=1):
    return np.asarray(x).astype(helper.tensor_dtype_to_np_dtype(to))


# --- reductions and normalisation --------------------------------------------------


@op("ReduceMean", needs_opset=True)
def reduce_mean(x, axes=None, keepdims=1, noop_with_empty_axes=0, opset=18):
    ax = _axes(axes, None) if opset >= 18 else _axes(None, axes)
    if not ax:
        if noop_with_empty_axes:
            return x
        ax = None
    return np.mean(x, axis=None if ax is None else tuple(ax), keepdims=bool(keepdims)).astype(x.dtype)


def _reduce(fn, x, axes, keepdims, noop_with_empty_axes):
    if not axes:
        if noop_with_empty_axes:
            return x
        axes = None
    return fn(x, axis=None if axes is None else tuple(axes), keepdims=bool(keepdims)).astype(x.dtype)


@op("ReduceSum", needs_opset=True)
def reduce_sum(x, axes=None, keepdims=1, noop_with_empty_axes=0, opset=13):
    return _reduce(np.sum, x, _axes(axes, None) if opset >= 13 else _axes(None, axes), keepdims, noop_with_empty_axes)


@op("ReduceL2", needs_opset=True)
def reduce_l2(x, axes=None, keepdims=1, noop_with_empty_axes=0, opset=18):
    ax = _axes(axes, None) if opset >= 18 else _axes(None, axes)
    return np.sqrt(_reduce(np.sum, np.square(x), ax, keepdims, noop_with_empty_axes))


@op("Softmax", needs_opset=True)
def softmax(x, axis=None, opset=13):
    if opset < 13:
        # Before opset 13 the input is coerced to 2-D at `axis` (default 1).
        axis = 1 if axis is None else axis
        shape = x.shape
        flat = x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)
        return softmax(flat, axis=1, opset=13).reshape(shape)
    axis = -1 if axis is None else axis
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    # summed in float64, then rounded: the same total in any order (kernels.elementwise's
    # quantized softmax adds in its own), where float32 sums differ with numpy's pairing
    return e / np.sum(e, axis=axis, keepdims=True, dtype=np.float64).astype(e.dtype)


@op("LayerNormalization")
def layer_normalization(x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    axes = tuple(range(axis % x.ndim, x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(var + np.float32(epsilon))
    y = d * inv * scale
    if bias is not None:
        y = y + bias
    # The spec's optional Mean and InvStdDev outputs.
    return y.astype(x.dtype), mean.astype(np.float32), inv.astype(np.float32)


@op("CumSum")
def cumsum(x, axis, exclusive=0, reverse=0):
    ax = int(np.asarray(axis))
    y = np.flip(x, ax) if reverse else x
    out = np.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        out = out - y
    return np.flip(out, ax) if reverse else out


# --- linear algebra ----------------------------------------------------------------


@op("MatMul")
def matmul(a, b):
    return np.matmul(a, b)


@op("Gemm")
def gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.T if transA else a
    b = b.T if transB else b
    y = np.float32(alpha) * (a @ b) if alpha != 1.0 else a @ b
    if c is not None:
        y = y + (np.float32(beta) * c if beta != 1.0 else c)
    return y.astype(a.dtype)


# --- shape and indexing ------------------------------------------------------------


@op("Identity")
def identity(x):
    return x


@op("Constant")
def constant(value=None, value_float=None, value_floats=None, value_int=None, value_ints=None):
    if value is not None:
        return value
    if value_float is not None:
        return np.array(value_float, dtype=np.float32)
    if value_floats is not None:
        return np.array(value_floats, dtype=np.float32)
    if value_int is not None:
        return np.array(value_int, dtype=np.int64)
    if value_ints is not None:
        return np.array(value_ints, dtype=np.int64)
    raise ValueError("Constant node has no supported value attribute")


@op("Shape")
def shape(x, start=0, end=None):
    return np.array(x.shape[start:end], dtype=np.int64)


@op("ConstantOfShape")
def constant_of_shape(shape_, value=None):
    fill = np.zeros(1, dtype=np.float32) if value is None else value
    return np.full(tuple(int(s) for s in shape_), fill.ravel()[0], dtype=fill.dtype)


@op("Reshape")
def reshape(x, shape_, allowzero=0):
    target = np.asarray(shape_).tolist()  # Python ints, 4× faster than int() per element
    if not allowzero and 0 in target:
        target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
    if x.size == 0 and -1 in target:
        # numpy cannot size -1 for an empty tensor (the spec leaves it open). It takes
        # the input's zero dimensions that the shape does not already have, else the size
        # it has when they are not zero (a batch of 0 reshaped as a batch of 1 would be),
        # so that the reshapes after it agree.
        known = math.prod(d for d in target if d not in (0, -1))
        whole = math.prod(d for d in x.shape if d)
        fits = target.count(0) >= x.shape.count(0) and known and whole % known == 0
        target[target.index(-1)] = whole // known if fits else 0
    return x.reshape(target)


@op("Flatten")
def flatten(x, axis=1):
    axis = axis + x.ndim if axis < 0 else axis  # axis == ndim is allowed: [prod(shape), 1]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@op("Transpose")
def transpose(x, perm=None):
    return np.transpose(x, perm)


@op("Unsqueeze", needs_opset=True)
def unsqueeze(x, axes=None, opset=13):
    ax = _axes(axes, None) if opset >= 13 else _axes(None, axes)
    out_rank = x.ndim + len(ax)
    for a in sorted(a % out_rank for a in ax):
        x = np.expand_dims(x, a)
    return x


@op("Squeeze", needs_opset=True)
def squeeze(x, axes=None, opset=13):
    ax = _axes(axes, None) if opset >= 13 else _axes(None, axes)
    return np.squeeze(x, axis=None if ax is None else tuple(a % x.ndim for a in ax))


@op("Split", needs_opset=True, needs_outputs=True)
def split(x, split_=None, axis=0, num_outputs=None, split=None, outputs=1, opset=13):
    # Sizes as an input from opset 13, an attribute before; else equal parts, the last
    # smaller when they do not divide (num_outputs, opset 18).
    sizes = split_ if opset >= 13 else split
    n = x.shape[axis]
    if sizes is None:
        parts = num_outputs or outputs
        size = -(-n // parts)
        sizes = [size] * (parts - 1) + [n - size * (parts - 1)]
    cuts = np.cumsum(np.asarray(sizes, np.int64))[:-1]
    return tuple(np.split(x, cuts, axis=axis))


@op("Tile")
def tile(x, repeats):
    return np.tile(x, np.asarray(repeats, np.int64).tolist())


@op("Concat")
def concat(*xs, axis):
    return np.concatenate(xs, axis=axis)


@op("Gather")
def gather(x, indices, axis=0):
    idx = np.asarray(indices)
    n = x.shape[axis]
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"Gather index out of range [{-n}, {n}) on axis {axis}")
    # Indexing rather than np.take: take copies a non-contiguous x whole first (the
    # pooler's Gather of token 0 from a feature-major view). One index is a view of x
    # (as basic indexing gives), which a taped run need not copy (tape.VIEW_OPS).
    at = np.where(idx < 0, idx + n, idx)
    return x[(slice(None),) * (axis % x.ndim) + (int(at) if at.ndim == 0 else at,)]


@op("GatherElements")
def gather_elements(x, indices, axis=0):
    idx = np.asarray(indices)
    n = x.shape[axis]
    axis %= x.ndim
    # (the output has the indices' shape: on the other axes they may be shorter than x,
    # which np.take_along_axis would broadcast them to)
    x = x[tuple(slice(None) if a == axis else slice(0, d) for a, d in enumerate(idx.shape))]
    return np.take_along_axis(x, np.where(idx < 0, idx + n, idx), axis=axis)


@op("GatherND")
def gather_nd(x, indices, batch_dims=0):
    idx = np.asarray(indices)
    batch_shape = x.shape[:batch_dims]
    nb = int(np.prod(batch_shape, dtype=np.int64))
    xb = x.reshape((nb,) + x.shape[batch_dims:])
    ib = idx.reshape((nb,) + idx.shape[batch_dims:])
    k = idx.shape[-1]
    out = []
    for b in range(nb):
        flat = ib[b].reshape(-1, k)
        out.append(np.stack([xb[b][tuple(i)] for i in flat]) if len(flat) else
                   np.empty((0,) + xb.shape[1 + k:], dtype=x.dtype))
    res = np.stack(out)
    return res.reshape(batch_shape + idx.shape[batch_dims:-1] + x.shape[batch_dims + k:])


@op("Slice", needs_opset=True)
def slice_(x, starts=None, ends=None, axes=None, steps=None, opset=13):
    if opset < 10:
        raise ValueError("Slice before opset 10 is not supported")
    starts = [int(s) for s in np.asarray(starts).ravel()]
    ends = [int(e) for e in np.asarray(ends).ravel()]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).ravel()]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.asarray(steps).ravel()]
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        # Clamp the int64 sentinels ONNX uses for "to the end" before slicing.
        n = x.shape[a]
        s = max(min(s, n), -n - 1)
        e = max(min(e, n), -n - 1)
        if st < 0 and e < -n:
            e = None
        index[a % x.ndim] = slice(s, e, st)
    return x[tuple(index)]


@op("Range")
def range_(start, limit, delta):
    dtype = np.asarray(start).dtype
    return np.arange(np.asarray(start).item(), np.asarray(limit).item(),
                     np.asarray(delta).item()).astype(dtype)


@op("Expand")
def expand(x, shape_):
    target = tuple(int(s) for s in shape_)
    # ONNX Expand broadcasts both ways: a 1 in the target keeps the input's size.
    out = np.broadcast_shapes(x.shape, target)
    return np.broadcast_to(x, out)


# --- quantization ------------------------------------------------------------------

_INT_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
               np.dtype(np.int16): (-32768, 32767)}


def _per_axis(value, shape: tuple, axis: int, block_size: int = 0):
    """A scale or zero point broadcastable to `shape`: a scalar as it is, a vector along
    `axis`, or blocks of `block_size` along it."""
    value = np.asarray(value)
    if value.ndim == 0 or value.size == 1 and not block_size:
        return value.reshape(())
    if not block_size:
        dims = [1] * len(shape)
        dims[axis] = value.size
        return value.reshape(dims)
    return np.repeat(value, block_size, axis=axis).take(range(shape[axis]), axis=axis)


def _quant_dtype(zero_point, output_dtype) -> np.dtype:
    if zero_point is not None:
        return np.asarray(zero_point).dtype
    return np.dtype(helper.tensor_dtype_to_np_dtype(output_dtype)) if output_dtype else np.dtype(np.uint8)


@op("QuantizeLinear")
def quantize_linear(x, y_scale, y_zero_point=None, axis=1, saturate=1, block_size=0, output_dtype=0, precision=0):
    """saturate(round half to even(x / scale) + zero point), per tensor, axis or block."""
    dtype = _quant_dtype(y_zero_point, output_dtype)
    if dtype not in _INT_RANGES:
        raise ValueError(f"QuantizeLinear to {dtype}: sparsejit quantizes to 8- and 16-bit integers")
    scale = _per_axis(y_scale, x.shape, axis % x.ndim if x.ndim else 0, block_size)
    if precision:
        wide = helper.tensor_dtype_to_np_dtype(precision)
        x, scale = x.astype(wide), scale.astype(wide)
    q = np.rint(x / scale).astype(np.float64)  # (clamped as float64: a value past int32's range saturates
    if y_zero_point is not None:               # too, and a 16-bit zero point adds exactly to a float16 x)
        q = q + _per_axis(y_zero_point, x.shape, axis % x.ndim if x.ndim else 0, block_size).astype(np.float64)
    return np.clip(q, *_INT_RANGES[dtype]).astype(dtype)


@op("DequantizeLinear")
def dequantize_linear(x, x_scale, x_zero_point=None, axis=1, block_size=0, output_dtype=0):
    """(x - zero point) · scale, per tensor, axis or block."""
    ax = axis % x.ndim if x.ndim else 0
    d = x.astype(np.float32)
    if x_zero_point is not None:
        d = d - _per_axis(x_zero_point, x.shape, ax, block_size)
    y = d * _per_axis(x_scale, x.shape, ax, block_size)
    return y.astype(helper.tensor_dtype_to_np_dtype(output_dtype) if output_dtype else np.asarray(x_scale).dtype)


def dynamic_scale(x) -> tuple[np.float32, np.float32]:
    """(scale, zero point) of DynamicQuantizeLinear: uint8 over the range [min(x, 0), max(x, 0)]."""
    return range_scale(np.min(x, initial=0), np.max(x, initial=0))  # (the range includes 0)


def range_scale(lo, hi) -> tuple[np.float32, np.float32]:
    """dynamic_scale's (scale, zero point) from the range [lo, hi] (lo ≤ 0 ≤ hi)."""
    hi, lo = np.float32(hi), np.float32(lo)
    scale = np.float32(1.0 if hi == lo else hi - lo) / np.float32(255)
    return scale, np.rint(np.clip(np.float32(0) - lo / scale, 0, 255))


@op("DynamicQuantizeLinear")
def dynamic_quantize_linear(x):
    """x to uint8 over the range [min(x, 0), max(x, 0)]: (y, scale, zero point)."""
    scale, zero = dynamic_scale(x)
    y = np.clip(np.rint(x / scale) + zero, 0, 255)
    return y.astype(np.uint8), np.array(scale.astype(x.dtype)), np.array(zero.astype(np.uint8))


def _centred(x, zero_point, row_wise: bool):
    """x minus its zero point, as float32, exactly (integers of at most 17 bits; a vector
    zero point is per row of A, per column of B), in C order: a transposed view (attention's
    keys) would keep its strides and take numpy's matmul off BLAS."""
    x = x.astype(np.float32, order="C")
    if zero_point is None:
        return x
    zp = np.asarray(zero_point).astype(np.float32)
    if zp.ndim == 1 and zp.size > 1 and row_wise:
        zp = zp.reshape(-1, 1)
    return x - zp


EXACT_FLOAT32 = 1 << 24


def _largest_centred(x, zero_point) -> float:
    """The largest |x - zero point| x's integer type allows (inf for another type)."""
    if not np.issubdtype(x.dtype, np.integer):
        return float("inf")
    info = np.iinfo(x.dtype)
    zp = np.asarray(0 if zero_point is None else zero_point).astype(np.float64)
    return float(np.max(np.maximum(zp - info.min, info.max - zp), initial=0))


def exact_floats(k: int, a, a_zero_point, b, b_zero_point) -> type:
    """The float type in which sums of k products of (a - its zero point) and (b - its zero
    point) are exact: float32 when no partial sum can reach 2^24 (k times the largest
    product the types and zero points allow), else float64."""
    bound = k * _largest_centred(a, a_zero_point) * _largest_centred(b, b_zero_point)
    return np.float32 if bound < EXACT_FLOAT32 else np.float64


def _integer_product(a, b, a_zero_point, b_zero_point) -> np.ndarray:
    """The integer sums of (a - its zero point) · (b - its zero point), exactly, as floats,
    on BLAS (an integer matmul is not): in float32 when no partial sum can reach 2^24
    (K times the largest product the types and zero points allow: uint8 attention scores
    of up to 1024 keys), else in float64, which holds sums of up to 2^19 products of
    17-bit integers."""
    exact = exact_floats(a.shape[-1], a, a_zero_point, b, b_zero_point)
    a, b = _centred(a, a_zero_point, True), _centred(b, b_zero_point, False)
    return np.matmul(a, b) if exact is np.float32 else np.matmul(a.astype(np.float64), b.astype(np.float64))


@op("MatMulInteger")
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    return _integer_product(a, b, a_zero_point, b_zero_point).astype(np.int32)


def integer_weight(b, b_zero_point=None) -> np.ndarray:
    """A constant B of MatMulInteger centred, as floats in which its sums with any 8-bit A
    are exact (exact_floats, A's centred values at most 255: a uint8's from 0)."""
    exact = exact_floats(b.shape[0], np.empty(0, np.uint8), None, b, b_zero_point)
    return _centred(b, b_zero_point, False).astype(exact)


def integer_product_with(a, a_zero_point, b_floats: np.ndarray) -> np.ndarray:
    """MatMulInteger's int32 sums of 8-bit a and a B given as integer_weight's floats."""
    return np.matmul(_centred(a, a_zero_point, True).astype(b_floats.dtype, copy=False), b_floats).astype(np.int32)


@op("QLinearMatMul")
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    """The int32 sums requantized as ONNX Runtime does: in float32, times the multiplier
    a_scale · b_scale / y_scale, clamped to the output type's range less its zero point,
    rounded half to even, plus the zero point."""
    acc = _integer_product(a, b, a_zero_point, b_zero_point).astype(np.float32)
    a_scale = np.asarray(a_scale, np.float32)
    a_scale = a_scale.reshape(-1, 1) if a_scale.size > 1 else a_scale  # per row of a
    multiplier = a_scale * np.asarray(b_scale, np.float32) / np.asarray(y_scale, np.float32)
    dtype = np.asarray(y_zero_point).dtype if y_zero_point is not None else a.dtype
    zero = np.float32(0 if y_zero_point is None else np.asarray(y_zero_point).reshape(()))
    lo, hi = _INT_RANGES[np.dtype(dtype)]
    y = np.rint(np.clip(acc * multiplier, np.float32(lo) - zero, np.float32(hi) - zero)) + zero
    return y.astype(dtype)


# --- attention (ONNX Attention, opset 23) -------------------------------------------


def _to_heads(x, heads):
    """[batch, seq, heads·size] → [batch, heads, seq, size]."""
    return x.reshape(x.shape[0], x.shape[1], heads, x.shape[2] // heads).transpose(0, 2, 1, 3)


def _window_bias(q_len, kv_len, offset, dtype, causal, left, right):
    """0 where query i (at absolute position i + offset, offset maybe per batch) may
    attend key j, -inf elsewhere: j <= i + offset when causal, and within `left` keys
    before and `right` after when those are >= 0."""
    offset = np.asarray(offset).reshape(-1, 1, 1, 1) if np.ndim(offset) else offset
    diff = np.arange(q_len).reshape(q_len, 1) + offset - np.arange(kv_len).reshape(1, kv_len)
    allowed = np.ones(np.shape(diff), bool)
    if causal:
        allowed &= diff >= 0
    if left >= 0:
        allowed &= diff <= left
    if right >= 0:
        allowed &= -diff <= right
    return np.where(allowed, dtype.type(0), dtype.type(-np.inf))


def _attention_bias(q, kv_len, mask, past_len, nonpad, causal, left, right):
    """The additive bias of the scores: the mask (bool: False → -inf; padded with -inf
    to kv_len), the causal and window limits, and the keys past `nonpad` per batch."""
    bias = np.zeros((q.shape[2], kv_len), q.dtype)
    if mask is not None:
        if mask.shape[-1] < kv_len:
            pad = [(0, 0)] * (mask.ndim - 1) + [(0, kv_len - mask.shape[-1])]
            mask = np.pad(mask, pad, constant_values=False if mask.dtype == np.bool_ else -np.inf)
        bias = bias + (np.where(mask, q.dtype.type(0), q.dtype.type(-np.inf)) if mask.dtype == np.bool_ else mask)
    if causal or left >= 0 or right >= 0:
        offset = past_len if nonpad is None or past_len else np.asarray(nonpad).reshape(-1) - q.shape[2]
        bias = bias + _window_bias(q.shape[2], kv_len, offset, q.dtype, causal, left, right)
    if nonpad is not None:
        keys = np.arange(kv_len) < np.asarray(nonpad).reshape(-1, 1)
        bias = bias + np.where(keys, 0, -np.inf).astype(q.dtype).reshape(q.shape[0], 1, 1, kv_len)
    return bias


def _softmax_rows(x):
    """Softmax over the last axis, a row of -inf giving zeros (not NaN)."""
    top = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isneginf(top), 0, top).astype(x.dtype))
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1, total).astype(x.dtype)


@op("Attention")
def attention(q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *, scale=None,
              is_causal=0, q_num_heads=None, kv_num_heads=None, softmax_precision=None, softcap=0.0,
              qk_matmul_output_mode=0, left_window_size=-1, right_window_size=-1):
    """ONNX Attention: 3-D inputs are split into heads; past keys and values are prepended;
    grouped-query heads repeated; scores scaled (√scale on each side), softcapped, biased,
    softmaxed (a fully masked row gives zeros) and applied to v. Returns (y, present key,
    present value, the scores at the stage qk_matmul_output_mode names)."""
    three_d = q.ndim == 3
    if three_d:
        q, k, v = _to_heads(q, q_num_heads), _to_heads(k, kv_num_heads), _to_heads(v, kv_num_heads)
    root = q.dtype.type(np.sqrt(1 / np.sqrt(q.shape[3]) if scale is None else scale))
    past_len = 0 if past_key is None else past_key.shape[2]
    k = k if past_key is None else np.concatenate([past_key, k], axis=2)
    v = v if past_value is None else np.concatenate([past_value, v], axis=2)
    present_k, present_v = k, v
    if q.shape[1] != k.shape[1] and q.shape[1] % k.shape[1] == 0:
        k, v = np.repeat(k, q.shape[1] // k.shape[1], axis=1), np.repeat(v, q.shape[1] // k.shape[1], axis=1)
    bias = _attention_bias(q, k.shape[2], attn_mask, past_len, nonpad_kv_seqlen, is_causal, left_window_size,
                           right_window_size)
    scores = np.matmul(q * root, np.swapaxes(k * root, 2, 3))
    if softcap and softcap > 0:
        scores = np.tanh(scores / softcap) * softcap
    biased = scores + bias
    stage = {1: scores, 2: biased}.get(qk_matmul_output_mode, scores)
    p = _softmax_rows(biased.astype(helper.tensor_dtype_to_np_dtype(softmax_precision)) if softmax_precision
                      else biased)
    p = np.where(np.isneginf(np.max(bias, axis=-1, keepdims=True)), 0, p).astype(q.dtype)
    y = np.matmul(p, v)
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], y.shape[2], -1)
    return y, present_k, present_v, (p if qk_matmul_output_mode == 3 else stage).astype(q.dtype)


SUPPORTED_OPS: frozenset[str] = frozenset(OPS)


def bind(op_type: str, attrs: dict, opset: int, outputs: int | None = None) -> Callable[..., tuple]:
    """The op with its attributes (and opset) bound: a function of the node's inputs that
    returns a tuple of `outputs` values (all the op returns when None; an op's optional
    outputs, LayerNormalization's mean and inverse std, are dropped when the node does
    not name them)."""
    fn = OPS[op_type]
    kwargs = dict(attrs, opset=opset) if op_type in NEEDS_OPSET else dict(attrs)
    if op_type in NEEDS_OUTPUTS:
        kwargs["outputs"] = outputs or 1

    def run(*inputs):
        out = fn(*inputs, **kwargs)
        return out[:outputs] if isinstance(out, tuple) else (out,)

    return run


def evaluate(op_type: str, inputs: list, attrs: dict, opset: int, outputs: int | None = None) -> tuple:
    """Run one op on numpy inputs; always returns a tuple of outputs."""
    return bind(op_type, attrs, opset, outputs)(*inputs)
