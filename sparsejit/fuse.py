"""Fusion passes: recognise the blocks that get generated kernels.

- GELU written out as x·0.5·(1 + erf(x/√2)) (every exporter's order) → one `Gelu` node.
- `Linear`: MatMul or Gemm with a constant weight, then optionally + bias, GELU and
  + residual → one node, the unit a sparse kernel computes with its epilogue fused.
- `QLinear`: the same with a symmetric int8 weight, in each quantized form: dynamic,
  QDQ, SparseML's static MatMulInteger, and QOperator (QLinearMatMul, its output
  requantized then dequantized).
- `Lookup`: a DequantizeLinear of bytes and the per-element ops after it → a table of
  what they make of each of the 256 bytes, gathered.
- `QSoftmax`: DequantizeLinear, Softmax, QuantizeLinear → bytes in, bytes out, its
  exponentials from a table.
- `FakeQuantize`: QuantizeLinear then DequantizeLinear on a float → one pass.
- `QAttentionCore`: QOperator attention, QLinearMatMul(q, kᵀ) → Lookup → + mask →
  QuantizeLinear → QSoftmax → QLinearMatMul(·, v) → one node, its scores kept per head.
  A QDQ graph's quantized attention is first put in that form (`qdq_products`): its
  Reshapes and Transposes on the bytes, its MatMuls of two dequantized activations
  QLinearMatMul, as ONNX Runtime's optimizer makes them.
- `AttentionCore`: MatMul(q, kᵀ) → scale → + mask → Softmax (→ NaN guard) → MatMul(·, v)
  → one node.
- LayerNorm written out (ReduceMean, Sub, Pow, ReduceMean, Add ε, Sqrt, Div, Mul γ,
  Add β), as exporters before opset 17 emit it → one `LayerNormalization` node.
- `EmbedLayerNorm`: Gathers from constant tables (word, position, token type), summed by
  Adds, then LayerNorm → one node. A table quantized per tensor and gathered before its
  DequantizeLinear (ONNX Runtime's quantizer writes embeddings so) is dequantized at load
  first: the same values, gathered.

Each pass rewrites only chains whose intermediate values have no other reader, so
the fused graph computes exactly what the original did (but `qdq_products`' QLinearMatMul,
which rounds an integer sum once where the graph rounds a float sum first).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .fold import eliminate_dead, fold_constants, shape_only_values
from .graph import Graph, Node
from .kernels.elementwise import softmax_table
from .ops import dequantize_linear, evaluate, quantize_linear

SQRT2 = float(np.sqrt(2.0))


class _Matcher:
    """Graph lookups the patterns need, and the bookkeeping of one rewrite pass."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.consumers()
        self.producer = graph.producers()
        self.outputs = set(graph.outputs)
        self.removed: set[int] = set()
        self.placed: dict[int, list[Node]] = {}

    def const(self, name: str):
        return self.graph.constants.get(name)

    def is_scalar_const(self, name: str, value: float, rtol: float = 1e-4) -> bool:
        c = self.const(name)
        return c is not None and c.size == 1 and np.isclose(float(c.ravel()[0]), value, rtol=rtol)

    def only_user(self, name: str, op_type: str | None = None) -> Node | None:
        """The single node reading `name`, if nothing else (graph outputs included) does."""
        users = self.users.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        n = users[0]
        if id(n) in self.removed or (op_type and n.op_type != op_type):
            return None
        return n

    def made_by(self, name: str, op_type: str) -> Node | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type and id(n) not in self.removed else None

    def replace(self, chain: list[Node], fused: Node, before: tuple[Node, ...] = ()) -> None:
        """Put `fused` (after the nodes `before`) where the chain's last node stood; drop the chain."""
        for n in chain:
            self.removed.add(id(n))
        self.placed[id(chain[-1])] = [*before, fused]

    def result(self) -> Graph:
        nodes = []
        for n in self.graph.nodes:
            if id(n) in self.placed:
                nodes.extend(self.placed[id(n)])
            elif id(n) not in self.removed:
                nodes.append(n)
        g = self.graph
        return Graph(nodes, g.inputs, g.outputs, g.constants, g.opset, g.origin)


def _other(node: Node, name: str) -> str:
    a, b = node.inputs
    return b if a == name else a


def fuse_gelu(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for erf in graph.nodes:
        if erf.op_type != "Erf":
            continue
        scaled = m.producer.get(erf.inputs[0])
        if scaled is None or scaled.op_type not in ("Div", "Mul"):
            continue
        x, k = scaled.inputs
        want = SQRT2 if scaled.op_type == "Div" else 1 / SQRT2
        if not m.is_scalar_const(k, want):
            continue
        add = m.only_user(erf.outputs[0], "Add")
        if add is None or not m.is_scalar_const(_other(add, erf.outputs[0]), 1.0):
            continue
        m1 = m.only_user(add.outputs[0], "Mul")
        if m1 is None or m.only_user(scaled.outputs[0]) is not erf:
            continue
        o1 = _other(m1, add.outputs[0])
        chain = [scaled, erf, add, m1]
        if o1 == x or m.is_scalar_const(o1, 0.5):
            # (x·A)·0.5 or (0.5·A)·x
            m2 = m.only_user(m1.outputs[0], "Mul")
            if m2 is None:
                continue
            o2 = _other(m2, m1.outputs[0])
            if not ((o1 == x and m.is_scalar_const(o2, 0.5)) or (o2 == x and m.is_scalar_const(o1, 0.5))):
                continue
            chain.append(m2)
        else:
            # (x·0.5)·A
            half = m.made_by(o1, "Mul")
            if half is None or m.only_user(o1) is not m1 or set(half.inputs) - {x} == set() or \
                    not (x in half.inputs and m.is_scalar_const(_other(half, x), 0.5)):
                continue
            chain.insert(0, half)
        m.replace(chain, Node("Gelu", chain[-1].name, [x], [chain[-1].outputs[0]], {"approximate": "none"}))
    return m.result()


def _matmul_weight(m: _Matcher, mm: Node) -> tuple[str, np.ndarray, np.ndarray | None] | None:
    """(x, W [in, out], bias or None) of a MatMul or Gemm with a constant float32 weight."""
    if mm.op_type == "MatMul":
        w = m.const(mm.inputs[1])
        return None if w is None or w.ndim != 2 or w.dtype != np.float32 else (mm.inputs[0], w, None)
    if mm.op_type != "Gemm" or len(mm.inputs) < 2 or mm.attrs.get("transA", 0):
        return None
    w = m.const(mm.inputs[1])
    if w is None or w.dtype != np.float32:
        return None
    w = w.T if mm.attrs.get("transB", 0) else w
    alpha = np.float32(mm.attrs.get("alpha", 1.0))
    w = w * alpha if alpha != 1 else w
    c = m.const(mm.inputs[2]) if len(mm.inputs) > 2 and mm.inputs[2] else None
    if len(mm.inputs) > 2 and mm.inputs[2] and (c is None or c.size != w.shape[1] or c.ndim > 1 and c.shape[0] != 1):
        return None
    return mm.inputs[0], w, None if c is None else c.ravel() * np.float32(mm.attrs.get("beta", 1.0))


def _epilogue(m: _Matcher, chain: list[Node], attrs: dict, inputs: list[str]) -> str:
    """Extends `chain` over what follows the product (+ bias, GELU, + residual), filling
    `attrs` and `inputs`; returns the value the fused node makes."""
    out, width = chain[-1].outputs[0], attrs["weight"].shape[1]
    nxt = m.only_user(out, "Add")
    b = None if nxt is None or attrs["bias"] is not None else m.const(_other(nxt, out))
    if b is not None and b.dtype == np.float32 and b.size == width and b.shape[-1] == width:
        attrs["bias"] = b.ravel().copy()
        chain.append(nxt)
        out = nxt.outputs[0]
    nxt = m.only_user(out, "Gelu")
    if nxt is not None and nxt.attrs.get("approximate", "none") in ("none", "tanh"):
        attrs["activation"] = "gelu" if nxt.attrs.get("approximate", "none") == "none" else "gelu_tanh"
        chain.append(nxt)
        out = nxt.outputs[0]
    nxt = m.only_user(out, "Tanh") if attrs["activation"] == "none" else None
    if nxt is not None:  # (BERT's pooler)
        attrs["activation"] = "tanh"
        chain.append(nxt)
        out = nxt.outputs[0]
    nxt = m.only_user(out, "Add")
    if nxt is not None and m.const(_other(nxt, out)) is None and _other(nxt, out) != out:
        attrs["residual"] = True
        inputs.append(_other(nxt, out))
        chain.append(nxt)
        out = nxt.outputs[0]
    return out


def fuse_linear(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for mm in graph.nodes:
        found = None if id(mm) in m.removed else _matmul_weight(m, mm)
        if found is None:
            continue
        x, w, bias = found
        # The weight stays as it is (perhaps a transposed view, perhaps mapped from the
        # file; a copy only when a Gemm's alpha scales it): kernels copy or compress what
        # they need, so none is held twice.
        attrs = {"source_op": mm.op_type, "weight": w, "bias": bias, "activation": "none", "residual": False}
        chain, inputs = [mm], [x]
        out = _epilogue(m, chain, attrs, inputs)
        m.replace(chain, Node("Linear", mm.name, inputs, [out], attrs))
    return m.result()


def _quantized_input(m: _Matcher, q: Node | None, zero_point: str) -> tuple[str, dict] | None:
    """(x, its quantization attributes) when `q` quantizes x per tensor into what a
    MatMulInteger reads: DynamicQuantizeLinear, or QuantizeLinear with constant scale and
    zero point."""
    if q is None:
        return None
    if q.op_type == "DynamicQuantizeLinear" and zero_point == q.outputs[2]:
        return q.inputs[0], {"mode": "dynamic", "x_scale": None, "x_zero_point": None}
    if q.op_type != "QuantizeLinear":  # (x made by another op: a Transpose of bytes, say)
        return None
    scale, zero = m.const(q.inputs[1]), m.const(q.inputs[2]) if len(q.inputs) > 2 else None
    if scale is None or scale.size != 1 or zero is None or zero.size != 1 \
            or zero.dtype not in BYTE_TYPES or not _plain(q) \
            or (zero_point and not np.array_equal(m.const(zero_point), zero)):
        return None  # (16-bit activations, say: the int8 kernels quantize x to bytes)
    return q.inputs[0], {"mode": "static", "x_scale": np.float32(scale.reshape(())),
                         "x_zero_point": zero.reshape(())}


def _symmetric_int8(m: _Matcher, weight: str, zero_point: str) -> np.ndarray | None:
    w, zp = m.const(weight), m.const(zero_point) if zero_point else None
    ok = w is not None and w.ndim == 2 and w.dtype == np.int8 and (zp is None or not np.any(zp))
    return w if ok else None


def _integer_matmul(m: _Matcher, mm: Node) -> tuple[str, dict, list[Node]] | None:
    """A MatMulInteger → Cast → Mul(scale) chain of an int8 weight (the dynamic and the
    static MatMulInteger forms): (x, attributes, chain)."""
    w = _symmetric_int8(m, mm.inputs[1], mm.inputs[3] if len(mm.inputs) > 3 else "")
    found = None if w is None else _quantized_input(m, m.producer.get(mm.inputs[0]), mm.inputs[2]
                                                    if len(mm.inputs) > 2 else "")
    cast = m.only_user(mm.outputs[0], "Cast") if found else None
    mul = m.only_user(cast.outputs[0], "Mul") if cast is not None and cast.attrs.get("to") == 1 else None
    if mul is None:
        return None
    x, attrs = found
    scale_name = _other(mul, cast.outputs[0])
    if attrs["mode"] == "static":
        scale = m.const(scale_name)
    else:  # Mul(x's scale, the weights' scale)
        sm = m.made_by(scale_name, "Mul")
        q = m.producer[mm.inputs[0]]
        scale = None if sm is None or q.outputs[1] not in sm.inputs else m.const(_other(sm, q.outputs[1]))
    if scale is None or scale.size not in (1, w.shape[1]):
        return None
    return x, dict(attrs, weight=w, scale=scale.ravel().astype(np.float32), source_op="MatMulInteger"), [mm, cast, mul]


def _qdq_matmul(m: _Matcher, mm: Node) -> tuple[str, dict, list[Node]] | None:
    """MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(int8 weight)), the QDQ
    form: the int32 sums times the product of the two scales."""
    dqx, dqw = m.made_by(mm.inputs[0], "DequantizeLinear"), m.made_by(mm.inputs[1], "DequantizeLinear")
    if dqx is None or dqw is None or dqw.attrs.get("block_size") or dqw.attrs.get("axis", 1) not in (1, -1):
        return None
    w = _symmetric_int8(m, dqw.inputs[0], dqw.inputs[2] if len(dqw.inputs) > 2 else "")
    found = None if w is None else _quantized_input(m, m.made_by(dqx.inputs[0], "QuantizeLinear"),
                                                    dqx.inputs[2] if len(dqx.inputs) > 2 else "")
    sw = m.const(dqw.inputs[1])
    if found is None or sw is None or sw.size not in (1, w.shape[1]) or \
            not np.array_equal(m.const(dqx.inputs[1]), found[1]["x_scale"]):
        return None
    x, attrs = found
    return x, dict(attrs, weight=w, scale=np.float32(attrs["x_scale"]) * sw.ravel().astype(np.float32),
                   source_op="MatMul"), [mm]


def _scalar_consts(m: _Matcher, names: list[str]) -> list[np.ndarray] | None:
    values = [m.const(n) for n in names]
    return None if any(v is None or v.size != 1 for v in values) else [v.reshape(()) for v in values]


BYTE_TYPES = (np.uint8, np.int8)


def _byte_grid(m: _Matcher, node: Node) -> list[np.ndarray] | None:
    """[scale, zero point] of a QuantizeLinear or DequantizeLinear with one constant scale
    and an 8-bit integer zero point: the grid of bytes it maps onto or from."""
    found = _scalar_consts(m, node.inputs[1:3]) if len(node.inputs) >= 3 else None
    return found if found is not None and found[1].dtype in BYTE_TYPES else None


def _equal_grids(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Whether two _byte_grid grids are one: the same scale and zero point, of one type each."""
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def _plain(q: Node) -> bool:
    """A QuantizeLinear with none of opset 21's and later's variants (blocks, another
    output type, another precision)."""
    return not any(q.attrs.get(a) for a in ("block_size", "output_dtype", "precision"))


def _qlinear_matmul(m: _Matcher, mm: Node) -> tuple[str, dict, list[Node]] | None:
    """QLinearMatMul of an int8 weight whose output only a DequantizeLinear reads (the
    QOperator form): the int32 sums requantized to the output's type, then dequantized.
    x is the float a QuantizeLinear with a's scale and zero point quantized, or else a
    DequantizeLinear of a (`x_node`: the node to add), which the kernel quantizes back
    exactly."""
    w = _symmetric_int8(m, mm.inputs[3], mm.inputs[5])
    scalars = _scalar_consts(m, [mm.inputs[i] for i in (1, 2, 6, 7)])
    sw = m.const(mm.inputs[4])
    dq = m.only_user(mm.outputs[0], "DequantizeLinear")
    if w is None or scalars is None or sw is None or sw.size not in (1, w.shape[1]) or dq is None:
        return None
    x_scale, x_zero, y_scale, y_zero = scalars
    if x_zero.dtype not in BYTE_TYPES or y_zero.dtype not in BYTE_TYPES:  # (not float8)
        return None
    read = _byte_grid(m, dq)
    if read is None or not all(np.array_equal(a, b) for a, b in zip(read, (y_scale, y_zero))):
        return None
    q = m.made_by(mm.inputs[0], "QuantizeLinear")
    found = _quantized_input(m, q, mm.inputs[2])
    if found is None or not np.array_equal(found[1]["x_scale"], x_scale):
        x = f"{mm.inputs[0]}::dequantized"
        found = x, {"mode": "static", "x_scale": np.float32(x_scale), "x_zero_point": x_zero,
                    "x_node": Node("DequantizeLinear", f"{mm.name}::dequantize_input", list(mm.inputs[:3]), [x])}
    x, attrs = found
    lo, hi = np.iinfo(y_zero.dtype).min, np.iinfo(y_zero.dtype).max
    zero = np.float32(y_zero)
    width = w.shape[1]
    requantize = np.array([[y_scale] * width, [np.float32(lo) - zero] * width, [np.float32(hi) - zero] * width],
                          np.float32)
    multiplier = np.float32(x_scale) * sw.ravel().astype(np.float32) / np.float32(y_scale)
    return x, dict(attrs, weight=w, scale=multiplier, requantize=requantize, source_op="QLinearMatMul"), [mm, dq]


QUANTIZED_MATMULS = {"MatMulInteger": _integer_matmul, "MatMul": _qdq_matmul, "QLinearMatMul": _qlinear_matmul}


def fuse_quantized_linear(graph: Graph) -> Graph:
    """Quantized MatMuls of symmetric int8 weights, with their epilogue, → one `QLinear`
    node (x quantized per tensor, statically or dynamically; see kernels/int8.py)."""
    m = _Matcher(graph)
    for mm in graph.nodes:
        if id(mm) in m.removed or mm.op_type not in QUANTIZED_MATMULS:
            continue
        found = QUANTIZED_MATMULS[mm.op_type](m, mm)
        if found is None:
            continue
        x, attrs, chain = found
        x_node = attrs.pop("x_node", None)
        attrs = {"requantize": None, **attrs, "bias": None, "activation": "none", "residual": False}
        inputs = [x]
        out = _epilogue(m, chain, attrs, inputs)
        m.replace(chain, Node("QLinear", mm.name, inputs, [out], attrs), before=(x_node,) if x_node else ())
    return m.result()


def fuse_attention(graph: Graph) -> Graph:
    m = _Matcher(graph)
    fixed = shape_only_values(graph) | set(graph.constants)  # (what may scale q or kᵀ: _prescaled)
    for sm in graph.nodes:
        if sm.op_type != "Softmax":
            continue
        chain = [sm]
        src = sm.inputs[0]
        mask = None
        add = m.made_by(src, "Add")
        if add is not None and m.only_user(src) is sm:
            chain.insert(0, add)
            a, b = add.inputs
            qk_name, mask = (a, b) if m.made_by(a, "MatMul") or m.made_by(a, "Div") or m.made_by(a, "Mul") else (b, a)
            src = qk_name
        scale, scale_op = None, "none"
        for op in ("Div", "Mul"):
            sc = m.made_by(src, op)
            if sc is not None and m.only_user(src) is chain[0] and m.made_by(sc.inputs[0], "MatMul"):
                scale, scale_op = sc.inputs[1], op.lower()
                chain.insert(0, sc)
                src = sc.inputs[0]
                break
        qk = m.made_by(src, "MatMul")
        if qk is None or m.only_user(src) is not chain[0] or m.const(qk.inputs[1]) is not None:
            continue
        chain.insert(0, qk)
        probs = sm.outputs[0]
        guard = False
        users = m.users.get(probs, [])
        if len(users) == 2 and probs not in m.outputs:
            isnan = next((u for u in users if u.op_type == "IsNaN"), None)
            where = next((u for u in users if u.op_type == "Where"), None)
            if isnan is None or where is None or m.only_user(isnan.outputs[0]) is not where:
                continue
            c, zero, keep = where.inputs
            if c != isnan.outputs[0] or keep != probs or not m.is_scalar_const(zero, 0.0):
                continue
            chain += [isnan, where]
            probs, guard = where.outputs[0], True
        pv = m.only_user(probs, "MatMul")
        if pv is None or pv.inputs[0] != probs:
            continue
        chain.append(pv)
        (q, q_scale), (kt, k_scale) = (_prescaled(m, name, qk, fixed) for name in qk.inputs)
        chain[:0] = [m.producer[name] for name, by in zip(qk.inputs, (q_scale, k_scale)) if by]
        inputs = [q, kt, pv.inputs[1], mask or "", scale or ""] + ([q_scale, k_scale] if q_scale or k_scale else [])
        attrs = {"scale_op": scale_op, "axis": sm.attrs.get("axis"), "opset": graph.opset, "nan_guard": guard}
        m.replace(chain, Node("AttentionCore", qk.name, inputs, [pv.outputs[0]], attrs))
    return m.result()


def _prescaled(m: _Matcher, name: str, user: Node, fixed: set[str]) -> tuple[str, str]:
    """(x, c) where `name` is Mul(x, c), `user` its only reader and c a constant or a value of
    the input shapes only (SDPA's exports scale q and kᵀ each by √scale, computed from the
    head size, before their product), else (name, "")."""
    mul = m.made_by(name, "Mul")
    if mul is None or m.only_user(name) is not user:
        return name, ""
    for x, c in (mul.inputs, mul.inputs[::-1]):
        if c in fixed and x not in fixed:
            return x, c
    return name, ""


def _last_axis_mean(m: _Matcher, node: Node) -> bool:
    """A ReduceMean over the last axis only, keeping dims (axes as attribute or input)."""
    if node.op_type != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        c = m.const(node.inputs[1])
        axes = None if c is None else [int(a) for a in c.ravel()]
    return axes is not None and list(axes) == [-1]


def _deviation(m: _Matcher, mean: Node) -> tuple[Node, Node, Node] | None:
    """(Sub, Pow, Div) of x - mean(x) squared on one side and divided on the other."""
    x = mean.inputs[0]
    sub = m.only_user(mean.outputs[0], "Sub")
    if sub is None or sub.inputs != [x, mean.outputs[0]]:
        return None
    d = sub.outputs[0]
    users = m.users.get(d, [])
    if len(users) != 2 or d in m.outputs:
        return None
    pow_ = next((u for u in users if u.op_type == "Pow"), None)
    div = next((u for u in users if u.op_type == "Div"), None)
    if pow_ is None or div is None or pow_.inputs[0] != d or div.inputs[0] != d \
            or not m.is_scalar_const(pow_.inputs[1], 2.0):
        return None
    return sub, pow_, div


def _std(m: _Matcher, pow_: Node, div: Node) -> tuple[list[Node], float] | None:
    """([ReduceMean, Add ε, Sqrt], ε) from the squares to the divisor."""
    var = m.only_user(pow_.outputs[0])
    add_eps = m.only_user(var.outputs[0], "Add") if var is not None and _last_axis_mean(m, var) else None
    eps = None if add_eps is None else m.const(_other(add_eps, var.outputs[0]))
    sqrt = m.only_user(add_eps.outputs[0], "Sqrt") if eps is not None and eps.size == 1 else None
    if sqrt is None or m.only_user(sqrt.outputs[0]) is not div or div.inputs[1] != sqrt.outputs[0]:
        return None
    return [var, add_eps, sqrt], float(eps.ravel()[0])


def fuse_layernorm(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for mean in graph.nodes:
        dev = _deviation(m, mean) if _last_axis_mean(m, mean) and id(mean) not in m.removed else None
        std = None if dev is None else _std(m, dev[1], dev[2])
        if std is None:
            continue
        (sub, pow_, div), (var_chain, eps) = dev, std
        mul = m.only_user(div.outputs[0], "Mul")
        add_b = None if mul is None else m.only_user(mul.outputs[0], "Add")
        if add_b is None or m.const(_other(mul, div.outputs[0])) is None \
                or m.const(_other(add_b, mul.outputs[0])) is None:
            continue
        gamma, beta = _other(mul, div.outputs[0]), _other(add_b, mul.outputs[0])
        chain = [mean, sub, pow_, *var_chain, div, mul, add_b]
        m.replace(chain, Node("LayerNormalization", add_b.name, [mean.inputs[0], gamma, beta], [add_b.outputs[0]],
                              {"axis": -1, "epsilon": eps}))
    return m.result()


def _gathered_sum(m: _Matcher, value: str, users: int = 1) -> list[Node] | None:
    """The Gathers (axis 0, of a constant 2-D float32 table) an Add tree sums into
    `value`, in order, when every value inside the tree has one reader."""
    node = m.producer.get(value)
    if node is None or id(node) in m.removed or (users and m.only_user(value) is None):
        return None
    if node.op_type == "Gather":
        table = m.const(node.inputs[0])
        ok = table is not None and table.ndim == 2 and table.dtype == np.float32 and node.attrs.get("axis", 0) == 0
        return [node] if ok and m.const(node.inputs[1]) is None else None
    if node.op_type != "Add":
        return None
    parts = [_gathered_sum(m, i) for i in node.inputs]
    return None if None in parts else [*parts[0], *parts[1]]


def dequantize_gathered_tables(graph: Graph) -> Graph:
    """Gather(constant integer table) → DequantizeLinear with a per-tensor scale and zero
    point (ONNX Runtime's dynamic quantization of embeddings) → a Gather of the table
    dequantized now. Each element goes through the same (q - zero point) · scale either
    way, and the embeddings then fuse. (QDQ files quantize the gathered rows again before
    their Adds: those stay as they are.)"""
    m = _Matcher(graph)
    tables: dict[str, np.ndarray] = {}
    for dq in graph.nodes:
        gather = m.made_by(dq.inputs[0], "Gather") if dq.op_type == "DequantizeLinear" else None
        if gather is None or m.only_user(gather.outputs[0]) is not dq or gather.attrs.get("axis", 0) != 0:
            continue
        table = m.const(gather.inputs[0])
        params = [m.const(i) for i in dq.inputs[1:] if i]
        if table is None or table.ndim != 2 or table.dtype.kind not in "iu" or \
                any(p is None or p.size != 1 for p in params):
            continue
        name = f"{gather.inputs[0]}::dequantized"
        if name not in tables:
            params = [m.const(i) if i else None for i in dq.inputs[1:]]
            if table.dtype.itemsize == 1:  # (each byte's value once, then gathered: the same elements, sooner)
                values = evaluate("DequantizeLinear", [BYTES.view(table.dtype), *params], dq.attrs, graph.opset, 1)[0]
                tables[name] = values[table.view(np.uint8)]
            else:
                tables[name] = evaluate("DequantizeLinear", [table, *params], dq.attrs, graph.opset, 1)[0]
        m.replace([gather, dq], Node("Gather", gather.name, [name, gather.inputs[1]], [dq.outputs[0]], gather.attrs))
    g = m.result()
    return Graph(g.nodes, g.inputs, g.outputs, {**g.constants, **tables}, g.opset, g.origin)


def fuse_embeddings(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for ln in graph.nodes:
        if ln.op_type != "LayerNormalization" or ln.attrs.get("axis", -1) != -1 or len(ln.inputs) < 2 \
                or [o for o in ln.outputs if o] != ln.outputs[:1]:
            continue
        gathers = _gathered_sum(m, ln.inputs[0])
        tables = [m.const(g.inputs[0]) for g in gathers or []]
        if len(tables) < 2 or len({t.shape[1] for t in tables}) != 1:
            continue
        adds = _adds_of(m, ln.inputs[0])
        inputs = [g.inputs[1] for g in gathers] + [ln.inputs[1], ln.inputs[2] if len(ln.inputs) > 2 else ""]
        attrs = {"tables": tables, "gathers": [g.name for g in gathers], "epsilon": ln.attrs.get("epsilon", 1e-5)}
        m.replace([*gathers, *adds, ln], Node("EmbedLayerNorm", ln.name, inputs, ln.outputs[:1], attrs))
    return m.result()


def _adds_of(m: _Matcher, value: str) -> list[Node]:
    node = m.producer[value]
    return [] if node.op_type != "Add" else [node, *_adds_of(m, node.inputs[0]), *_adds_of(m, node.inputs[1])]


def fold_weights(graph: Graph) -> Graph:
    """The quantized weights no quantized Linear took, dequantized now (fold.quantized_weight)."""
    return fold_constants(graph)


# Ops that map each element alone: the chain value, and constants of one element
PER_ELEMENT = {"Abs", "Add", "Cast", "Ceil", "Cos", "DequantizeLinear", "Div", "Erf", "Gelu", "Log", "Mul", "Neg",
               "Pow", "QuantizeLinear", "Sign", "Sin", "Sqrt", "Sub", "Tanh"}
BYTES = np.arange(256, dtype=np.uint8)


def _maps_elements(m: _Matcher, n: Node, value: str) -> bool:
    """Whether node n maps `value` element by element (its other inputs constants of one
    element)."""
    others = [i for i in n.inputs if i and i != value]
    return n.op_type in PER_ELEMENT and len(n.outputs) == 1 and id(n) not in m.removed and \
        n.inputs.count(value) == 1 and all(m.const(i) is not None and m.const(i).size == 1 for i in others)


def _chain_from(m: _Matcher, first: Node) -> list[Node]:
    """`first`, then each next node that alone reads the value before and maps it element
    by element."""
    chain = [first]
    while (n := m.only_user(chain[-1].outputs[0])) is not None and _maps_elements(m, n, chain[-1].outputs[0]):
        chain.append(n)
    return chain


def _table(m: _Matcher, dq: Node, chain: list[Node], opset: int) -> np.ndarray:
    """What DequantizeLinear `dq` then `chain` make of each of the 256 bytes, in byte order."""
    table, prev = BYTES.view(m.const(dq.inputs[2]).dtype), dq.inputs[0]
    with np.errstate(all="ignore"):  # (a Pow of the largest byte may overflow: inf, as the op gives)
        for n in [dq, *chain]:
            args = [table if i == prev else m.const(i) if i else None for i in n.inputs]
            table, prev = evaluate(n.op_type, args, n.attrs, opset, 1)[0], n.outputs[0]
    return table


def fuse_lookups(graph: Graph) -> Graph:
    """A DequantizeLinear of 8-bit values followed by per-element ops (scalar constants on
    the side; QuantizeLinear and DequantizeLinear again, say) → one `Lookup` node: its
    output is a function of the input byte alone, so the chain's own ops run once at load
    on the 256 bytes, and each run gathers. QOperator and QDQ graphs quantize around
    every op: a GELU there is DequantizeLinear → Div → Erf → QuantizeLinear, one lookup.
    Each reader of the DequantizeLinear that maps it so starts a chain of its own (GELU's
    x/√2 branch, where x · ... reads it too); the DequantizeLinear goes when none is left.
    The table is what the ops compute, so the results are the same."""
    m = _Matcher(graph)
    for dq in graph.nodes:
        if dq.op_type != "DequantizeLinear" or _byte_grid(m, dq) is None or dq.outputs[0] in m.outputs:
            continue
        for user in list(m.users.get(dq.outputs[0], [])):
            if not _maps_elements(m, user, dq.outputs[0]):
                continue
            chain = _chain_from(m, user)
            table = _table(m, dq, chain, graph.opset)
            if np.size(table) != 256:
                continue
            attrs = {"table": np.ascontiguousarray(table).reshape(256),
                     "ops": [dq.op_type] + [n.op_type for n in chain],
                     "min_rank": np.ndim(table)}  # (a constant of rank 2 would make a rank-1 input's output rank 2)
            m.replace(chain, Node("Lookup", user.name, [dq.inputs[0]], [chain[-1].outputs[0]], attrs))
    return m.result()


def _ranked(table: np.ndarray, lookup: Node) -> np.ndarray:
    """A Lookup's table of what it makes of each byte, of the rank its output takes at least."""
    rank = lookup.attrs.get("min_rank", 1)
    return table.reshape((1,) * (rank - table.ndim) + table.shape) if table.ndim < rank else table


def _ops(n: Node) -> list[str]:
    """The ops node n stands for: a Lookup's chain, else its own."""
    return list(n.attrs["ops"]) if n.op_type == "Lookup" else [n.op_type]


class _ByteFunction(NamedTuple):
    """A value that is a function of the bytes `source` (fuse_byte_functions): its `table`
    over the 256 bytes, the `ops` it is from them, how many `nodes` of the graph make it
    and how many of those gather (Lookups)."""

    source: str
    table: np.ndarray
    ops: list[str]
    nodes: int
    gathers: int


def fuse_byte_functions(graph: Graph) -> Graph:
    """Per-element ops whose inputs are all functions of one byte tensor, or constants of
    one element → one `Lookup` of that byte tensor where their value leaves them, where
    that saves a gather. The functions of bytes b are its Lookups and DequantizeLinear,
    and what such ops make of them: a QOperator GELU is b = QuantizeLinear(x), then
    DequantizeLinear(b) · Lookup(b), quantized and looked up again, two gathers and as
    many passes over FFN1's output, where the value it hands on is one table's entry for
    b. The ops run once at load on the 256 bytes, as fuse_lookups' do, so the results are
    the same. The ops between stay while anything else reads them."""
    m = _Matcher(graph)
    made: dict[str, _ByteFunction] = {}
    for n in graph.nodes:
        read = [i for i in n.inputs if i and m.const(i) is None]
        if read and all(i in made for i in read) and len({made[i].source for i in read}) == 1 \
                and len(n.outputs) == 1 and (n.op_type in PER_ELEMENT or n.op_type == "Lookup") \
                and all(m.const(i).size == 1 for i in n.inputs if i and m.const(i) is not None):
            args = [made[i].table if i in made else m.const(i) if i else None for i in n.inputs]
            if n.op_type == "Lookup":
                table = _ranked(n.attrs["table"][args[0].view(np.uint8)], n) if args[0].dtype in BYTE_TYPES else None
            else:
                with np.errstate(all="ignore"):  # (as _table)
                    table = evaluate(n.op_type, args, n.attrs, graph.opset, 1)[0]
            if np.size(table) == 256:
                made[n.outputs[0]] = _ByteFunction(
                    made[read[0]].source, table, [*(op for i in read for op in made[i].ops), *_ops(n)],
                    1 + sum(made[i].nodes for i in read), (n.op_type == "Lookup") + sum(made[i].gathers for i in read))
        elif n.op_type == "Lookup":
            made[n.outputs[0]] = _ByteFunction(n.inputs[0], _ranked(n.attrs["table"], n), _ops(n), 1, 1)
        elif n.op_type == "DequantizeLinear" and _byte_grid(m, n) is not None:
            made[n.outputs[0]] = _ByteFunction(n.inputs[0], _table(m, n, [], graph.opset), ["DequantizeLinear"], 1, 0)
    for n in graph.nodes:
        f = made.get(n.outputs[0]) if len(n.outputs) == 1 else None
        if f is None or f.nodes < 2 or not f.gathers or \
                (n.outputs[0] not in m.outputs and all(u.outputs[0] in made for u in m.users.get(n.outputs[0], []))):
            continue  # (its own node already, no gather saved, or read only by ops folded further on)
        attrs = {"table": np.ascontiguousarray(f.table).reshape(256), "ops": f.ops, "min_rank": np.ndim(f.table)}
        m.replace([n], Node("Lookup", n.name, [f.source], list(n.outputs), attrs))
    return eliminate_dead(m.result())


def fuse_quantized_softmax(graph: Graph) -> Graph:
    """QuantizeLinear(Softmax(DequantizeLinear(bytes))), each with one scale and zero point
    → one `QSoftmax` node, bytes in and out (attention's in QOperator and QDQ graphs), its
    axis as the Softmax's (the kernels take the last axis, which an exporter before opset
    13 names by its index: elementwise.last_axis, at run time). Its exponentials are a
    table over the (row's largest byte, byte) pairs, computed at load by numpy's exp as the
    Softmax computes them; see kernels/elementwise.py."""
    m = _Matcher(graph)
    for sm in graph.nodes:
        axis = sm.attrs.get("axis", -1 if graph.opset >= 13 else 1)
        dq = m.made_by(sm.inputs[0], "DequantizeLinear") if sm.op_type == "Softmax" else None
        q = m.only_user(sm.outputs[0], "QuantizeLinear") if dq is not None else None
        read, wrote = (_byte_grid(m, dq), _byte_grid(m, q)) if q is not None and _plain(q) else (None, None)
        if read is None or wrote is None or read[0].dtype != np.float32 or wrote[0].dtype != np.float32:
            continue
        value, table = softmax_table(*read)
        attrs = {"in_scale": read[0], "in_zero": read[1], "out_scale": wrote[0], "out_zero": wrote[1],
                 "value": value, "table": table, "axis": axis, "opset": graph.opset}
        m.replace([sm, q], Node("QSoftmax", sm.name, [dq.inputs[0]], list(q.outputs), attrs))
    return m.result()


def fuse_fake_quantize(graph: Graph) -> Graph:
    """DequantizeLinear(QuantizeLinear(x)) with one scale and zero point, 8-bit → one
    `FakeQuantize` node reading x: x rounded to the quantization grid, in one pass (QDQ
    graphs put such a pair on every activation). The QuantizeLinear stays while anything
    else reads its bytes."""
    m = _Matcher(graph)
    for dq in graph.nodes:
        q = m.made_by(dq.inputs[0], "QuantizeLinear") if dq.op_type == "DequantizeLinear" else None
        read, wrote = (_byte_grid(m, dq), _byte_grid(m, q)) if q is not None and _plain(q) else (None, None)
        if read is None or wrote is None or read[0].dtype != np.float32 or not _equal_grids(read, wrote):
            continue
        m.replace([dq], Node("FakeQuantize", dq.name, [q.inputs[0], *q.inputs[1:3]], list(dq.outputs)))
    return m.result()


def _scalar_inputs(m: _Matcher, node: Node, at: tuple[int, ...]) -> list[np.ndarray] | None:
    return _scalar_consts(m, [node.inputs[i] if i < len(node.inputs) else "" for i in at])


def fuse_quantized_attention(graph: Graph) -> Graph:
    """QOperator attention: QLinearMatMul(q, kᵀ) → Lookup (the scaling, fuse_lookups') → +
    mask → QuantizeLinear → QSoftmax → QLinearMatMul(·, v), each scale and zero point one
    constant, each value read only by the next → one `QAttentionCore` node reading q, kᵀ,
    the mask and v. Its kernel computes each step as the node's own kernel does, for a
    head's rows while they are in cache; see kernels/elementwise.py."""
    m = _Matcher(eliminate_dead(graph))  # (fuse_quantized_softmax leaves its DequantizeLinear, unread)
    for qs in m.graph.nodes:
        if qs.op_type != "QSoftmax":
            continue
        qz = m.made_by(qs.inputs[0], "QuantizeLinear")
        add = m.made_by(qz.inputs[0], "Add") if qz is not None and _plain(qz) and m.only_user(qz.outputs[0]) is qs \
            else None
        if add is None or m.only_user(add.outputs[0]) is not qz or len(add.inputs) != 2:
            continue
        found = [(lk, other) for lk, other in (add.inputs, add.inputs[::-1])
                 if m.made_by(lk, "Lookup") is not None and m.only_user(lk) is add and other != lk]
        lk = m.made_by(found[0][0], "Lookup") if found else None
        mm1 = m.made_by(lk.inputs[0], "QLinearMatMul") if lk is not None else None
        mm2 = m.only_user(qs.outputs[0], "QLinearMatMul")
        if mm1 is None or mm2 is None or m.only_user(mm1.outputs[0]) is not lk or mm2.inputs[0] != qs.outputs[0]:
            continue
        qk, pv = _scalar_inputs(m, mm1, (1, 2, 4, 5, 6, 7)), _scalar_inputs(m, mm2, (1, 2, 4, 5, 6, 7))
        grid = _scalar_inputs(m, qz, (1, 2))
        if qk is None or pv is None or grid is None:
            continue
        attrs = {"qk": qk, "lookup": lk.attrs["table"], "ops": lk.attrs["ops"], "grid": grid, "softmax": qs.attrs,
                 "pv": pv}
        inputs = [mm1.inputs[0], mm1.inputs[3], found[0][1], mm2.inputs[3]]
        m.replace([mm1, lk, add, qz, qs, mm2], Node("QAttentionCore", mm1.name, inputs, list(mm2.outputs), attrs))
    return m.result()


MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})  # (values kept, moved)


def round_trips(grid: list[np.ndarray]) -> bool:
    """Whether every byte of the grid ([scale, zero point]) dequantized and quantized again
    is itself, by ops.py's own DequantizeLinear and QuantizeLinear (a tiny or huge scale
    might not give it back)."""
    every = np.arange(256, dtype=np.uint8).view(grid[1].dtype)
    with np.errstate(all="ignore"):
        return bool(np.array_equal(quantize_linear(dequantize_linear(every, *grid), *grid), every))


def _same_grid(m: _Matcher, a: Node, b: Node) -> bool:
    ga, gb = _byte_grid(m, a), _byte_grid(m, b)
    return ga is not None and gb is not None and _equal_grids(ga, gb) and round_trips(ga)


def _bytes_moved(m: _Matcher, q: Node) -> list[Node] | None:
    """For QuantizeLinear(moves(DequantizeLinear(bytes))) on one grid: the moves made on the
    bytes, the last giving q's output; else None."""
    chain, src = [], m.producer.get(q.inputs[0])
    while src is not None and src.op_type in MOVES and id(src) not in m.removed:
        chain.append(src)
        src = m.producer.get(src.inputs[0])
    if not chain or src is None or src.op_type != "DequantizeLinear" or not _same_grid(m, src, q):
        return None
    x, made = src.inputs[0], []
    for k, mv in enumerate(reversed(chain)):
        out = q.outputs[0] if k == len(chain) - 1 else mv.outputs[0] + "#bytes"
        made.append(Node(mv.op_type, mv.name + "#bytes", [x, *mv.inputs[1:]], [out], dict(mv.attrs)))
        x = out
    return made


def qdq_products(graph: Graph) -> Graph:
    """A QDQ graph's attention in the QOperator form, as ONNX Runtime's QDQ transformer
    makes it, so that the passes after this one take it as they take QOperator files'
    (a byte Lookup, QSoftmax, then one QAttentionCore):
    - QuantizeLinear(moves(DequantizeLinear(bytes))) on one grid → the moves on the bytes
      (exact: each byte of the grid dequantized and quantized again is itself);
    - QuantizeLinear(MatMul(DequantizeLinear(a), DequantizeLinear(b))) of two activations on
      per-tensor grids → QLinearMatMul(a, b) on the QuantizeLinear's grid: the int32 sums
      requantized, where the graph rounds a float sum first (the two differ where a sum
      lies within a float rounding of half a step; ONNX Runtime's optimized graph
      computes it as this one does)."""
    m = _Matcher(graph)
    for q in graph.nodes:
        if q.op_type != "QuantizeLinear" or not _plain(q) or _byte_grid(m, q) is None:
            continue
        moved = _bytes_moved(m, q)
        if moved is not None:
            m.replace([q], moved[-1], before=tuple(moved[:-1]))
            continue
        mm = m.made_by(q.inputs[0], "MatMul")
        dqs = [m.made_by(i, "DequantizeLinear") for i in mm.inputs] if mm is not None else [None]
        if mm is None or m.only_user(mm.outputs[0]) is not q or any(
                d is None or _byte_grid(m, d) is None or m.const(d.inputs[0]) is not None for d in dqs):
            continue
        (a, sa, za), (b, sb, zb) = (d.inputs[:3] for d in dqs)
        m.replace([mm, q], Node("QLinearMatMul", mm.name, [a, sa, za, b, sb, zb, *q.inputs[1:3]], list(q.outputs)))
    return eliminate_dead(m.result())


PASSES = (fuse_gelu, fuse_layernorm, dequantize_gathered_tables, fuse_embeddings, fuse_quantized_linear, fold_weights,
          fuse_linear, fuse_attention, qdq_products, fuse_lookups, fuse_byte_functions, fuse_quantized_softmax,
          fuse_quantized_attention,
          fuse_fake_quantize)


def fuse(graph: Graph) -> Graph:
    for p in PASSES:
        graph = p(graph)
    return eliminate_dead(graph)  # weights now held by Linear nodes leave the constants
