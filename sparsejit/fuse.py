"""Fusion passes: recognise the blocks that get generated kernels.

- GELU written out as x·0.5·(1 + erf(x/√2)) (every exporter's order) → one `Gelu` node.
- `Linear`: MatMul or Gemm with a constant weight, then optionally + bias, GELU and
  + residual → one node, the unit a sparse kernel computes with its epilogue fused.
- `Attention`: MatMul(q, kᵀ) → scale → + mask → Softmax (→ NaN guard) → MatMul(·, v)
  → one node.
- LayerNorm written out (ReduceMean, Sub, Pow, ReduceMean, Add ε, Sqrt, Div, Mul γ,
  Add β), as exporters before opset 17 emit it → one `LayerNormalization` node.

Each pass rewrites only chains whose intermediate values have no other reader, so
the fused graph computes exactly what the original did.
"""

from __future__ import annotations

import numpy as np

from .fold import eliminate_dead
from .graph import Graph, Node

SQRT2 = float(np.sqrt(2.0))


class _Matcher:
    """Graph lookups the patterns need, and the bookkeeping of one rewrite pass."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.users = graph.consumers()
        self.producer = graph.producers()
        self.outputs = set(graph.outputs)
        self.removed: set[int] = set()
        self.placed: dict[int, Node] = {}

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

    def replace(self, chain: list[Node], fused: Node) -> None:
        """Put `fused` where the chain's last node stood; drop the chain."""
        for n in chain:
            self.removed.add(id(n))
        self.placed[id(chain[-1])] = fused

    def result(self) -> Graph:
        nodes = []
        for n in self.graph.nodes:
            if id(n) in self.placed:
                nodes.append(self.placed[id(n)])
            elif id(n) not in self.removed:
                nodes.append(n)
        g = self.graph
        return Graph(nodes, g.inputs, g.outputs, g.constants, g.opset, g.source)


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


def fuse_linear(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for mm in graph.nodes:
        if id(mm) in m.removed:
            continue
        if mm.op_type == "MatMul":
            x, w_name = mm.inputs
            w = m.const(w_name)
            if w is None or w.ndim != 2 or w.dtype != np.float32:
                continue
            bias = None
        elif mm.op_type == "Gemm":
            if len(mm.inputs) < 2 or mm.attrs.get("transA", 0):
                continue
            x, w_name = mm.inputs[:2]
            w = m.const(w_name)
            if w is None or w.dtype != np.float32:
                continue
            w = w.T if mm.attrs.get("transB", 0) else w
            w = w * np.float32(mm.attrs.get("alpha", 1.0))
            bias = None
            if len(mm.inputs) > 2 and mm.inputs[2]:
                c = m.const(mm.inputs[2])
                if c is None or c.size != w.shape[1] or c.ndim > 1 and c.shape[0] != 1:
                    continue
                bias = c.ravel() * np.float32(mm.attrs.get("beta", 1.0))
        else:
            continue
        chain, out = [mm], mm.outputs[0]
        # The weight stays as it is (perhaps a transposed view, perhaps mapped from the
        # file): kernels copy or compress what they need, so none is held twice.
        attrs = {"source_op": mm.op_type, "weight": w, "bias": bias,
                 "activation": "none", "residual": False}
        inputs = [x]
        nxt = m.only_user(out, "Add")
        if bias is None and nxt is not None:
            b = m.const(_other(nxt, out))
            if b is not None and b.dtype == np.float32 and b.size == w.shape[1] and b.shape[-1] == w.shape[1]:
                attrs["bias"] = b.ravel().copy()
                chain.append(nxt)
                out = nxt.outputs[0]
        nxt = m.only_user(out, "Gelu")
        if nxt is not None and nxt.attrs.get("approximate", "none") == "none":
            attrs["activation"] = "gelu"
            chain.append(nxt)
            out = nxt.outputs[0]
        nxt = m.only_user(out, "Add")
        if nxt is not None and m.const(_other(nxt, out)) is None and _other(nxt, out) != out:
            attrs["residual"] = True
            inputs.append(_other(nxt, out))
            chain.append(nxt)
            out = nxt.outputs[0]
        m.replace(chain, Node("Linear", mm.name, inputs, [out], attrs))
    return m.result()


def fuse_attention(graph: Graph) -> Graph:
    m = _Matcher(graph)
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
        inputs = [qk.inputs[0], qk.inputs[1], pv.inputs[1], mask or "", scale or ""]
        attrs = {"scale_op": scale_op, "axis": sm.attrs.get("axis"), "opset": graph.opset, "nan_guard": guard}
        m.replace(chain, Node("Attention", qk.name, inputs, [pv.outputs[0]], attrs))
    return m.result()


def _last_axis_mean(m: _Matcher, node: Node) -> bool:
    """A ReduceMean over the last axis only, keeping dims (axes as attribute or input)."""
    if node.op_type != "ReduceMean" or not node.attrs.get("keepdims", 1):
        return False
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        c = m.const(node.inputs[1])
        axes = None if c is None else [int(a) for a in c.ravel()]
    return axes is not None and list(axes) == [-1]


def fuse_layernorm(graph: Graph) -> Graph:
    m = _Matcher(graph)
    for mean in graph.nodes:
        if not _last_axis_mean(m, mean) or id(mean) in m.removed:
            continue
        x = mean.inputs[0]
        sub = m.only_user(mean.outputs[0], "Sub")
        if sub is None or sub.inputs != [x, mean.outputs[0]]:
            continue
        d = sub.outputs[0]
        users = m.users.get(d, [])
        if len(users) != 2 or d in m.outputs:
            continue
        pow_ = next((u for u in users if u.op_type == "Pow"), None)
        div = next((u for u in users if u.op_type == "Div"), None)
        if pow_ is None or div is None or pow_.inputs[0] != d or not m.is_scalar_const(pow_.inputs[1], 2.0) \
                or div.inputs[0] != d:
            continue
        var = m.only_user(pow_.outputs[0])
        if var is None or not _last_axis_mean(m, var):
            continue
        add_eps = m.only_user(var.outputs[0], "Add")
        if add_eps is None:
            continue
        eps = m.const(_other(add_eps, var.outputs[0]))
        if eps is None or eps.size != 1:
            continue
        sqrt = m.only_user(add_eps.outputs[0], "Sqrt")
        if sqrt is None or m.only_user(sqrt.outputs[0]) is not div or div.inputs[1] != sqrt.outputs[0]:
            continue
        mul = m.only_user(div.outputs[0], "Mul")
        if mul is None:
            continue
        gamma = _other(mul, div.outputs[0])
        add_b = m.only_user(mul.outputs[0], "Add")
        if m.const(gamma) is None or add_b is None:
            continue
        beta = _other(add_b, mul.outputs[0])
        if m.const(beta) is None:
            continue
        chain = [mean, sub, pow_, var, add_eps, sqrt, div, mul, add_b]
        m.replace(chain, Node("LayerNormalization", add_b.name, [x, gamma, beta], [add_b.outputs[0]],
                              {"axis": -1, "epsilon": float(eps.ravel()[0])}))
    return m.result()


PASSES = (fuse_gelu, fuse_layernorm, fuse_linear, fuse_attention)


def fuse(graph: Graph) -> Graph:
    for p in PASSES:
        graph = p(graph)
    return eliminate_dead(graph)  # weights now held by Linear nodes leave the constants
