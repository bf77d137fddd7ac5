"""Folding passes: work done once instead of on every run.

- `fold_constants` evaluates, at load, every node whose inputs are all constants
  (exporters emit weight transposes, Identity copies and Constant nodes).
- `shape_only_values` finds the values that depend on the inputs' *shapes* only (the
  Shape → Gather → Concat → Reshape subgraphs). The executor computes them once per
  input-shape signature and reuses them, instead of re-running them op by op.
- `eliminate_dead` drops nodes nothing reads.
- `merge_duplicates` makes nodes that compute the same op of the same values one.
"""

from __future__ import annotations

import numpy as np

from .graph import Graph
from .ops import evaluate

# Ops whose output depends on their input's shape, never its values.
SHAPE_OPS = {"Shape"}


def quantized_weight(node, constants: dict) -> bool:
    """A DequantizeLinear of a constant integer matrix: kept unfolded until the quantized
    Linear fusion has seen it (it needs the integers, not their float values)."""
    w = constants.get(node.inputs[0]) if node.op_type == "DequantizeLinear" else None
    return w is not None and w.ndim == 2 and w.dtype in (np.int8, np.uint8)


def fold_constants(graph: Graph, keep=None) -> Graph:
    """Every node whose inputs are all constants, evaluated now, but those `keep(node,
    constants)` names. Nodes nothing reads are dropped first, not evaluated (after the
    quantized Linear fusion, the DequantizeLinear of each weight it took)."""
    graph = eliminate_dead(graph)
    consts = dict(graph.constants)
    kept = []
    for n in graph.nodes:
        if all((not i) or i in consts for i in n.inputs) and not (keep and keep(n, consts)):
            args = [consts[i] if i else None for i in n.inputs]
            try:
                outs = evaluate(n.op_type, args, n.attrs, graph.opset, len(n.outputs))
            except Exception as e:
                raise ValueError(f"{graph.origin}: node {n.name!r} ({n.op_type}) fails on its constant inputs: {e}") from e
            for name, val in zip(n.outputs, outs):
                if name:
                    consts[name] = val
        else:
            kept.append(n)
    return eliminate_dead(Graph(kept, graph.inputs, graph.outputs, consts, graph.opset, graph.origin))


def shape_only_values(graph: Graph) -> set[str]:
    """Names of the values fixed once the input shapes are (constants excluded)."""
    shape_only: set[str] = set()
    for n in graph.nodes:
        if n.op_type in SHAPE_OPS or all((not i) or i in shape_only or i in graph.constants for i in n.inputs):
            shape_only.update(o for o in n.outputs if o)
    return shape_only


def eliminate_dead(graph: Graph) -> Graph:
    live = set(graph.outputs)
    kept = []
    for n in reversed(graph.nodes):
        if any(o in live for o in n.outputs):
            kept.append(n)
            live.update(i for i in n.inputs if i)
    kept.reverse()
    consts = {k: v for k, v in graph.constants.items() if k in live}
    return Graph(kept, graph.inputs, graph.outputs, consts, graph.opset, graph.origin)


SMALL = 64  # elements: a constant this small is compared by value, a larger one by name


def merge_duplicates(graph: Graph) -> Graph:
    """Nodes of the same op, attributes and inputs (a small constant's value standing for
    its name) made one: the first, whose outputs the others' readers read. SDPA's exports
    make each layer's additive mask from the one expanded mask by a Where of its own (with
    constants of its own, equal): merged, every layer reads one mask, which the attention
    nodes then share (lower.prepare_masks). Every op run here gives the same outputs for
    the same inputs. A node with a graph output is kept."""
    outputs = set(graph.outputs)
    seen: dict = {}
    rename: dict[str, str] = {}
    kept = []
    for n in graph.nodes:
        inputs = [rename.get(i, i) for i in n.inputs]
        if inputs != n.inputs:
            n = type(n)(n.op_type, n.name, inputs, list(n.outputs), n.attrs)
        key = (n.op_type, tuple(_value_key(graph.constants, i) for i in inputs), _attrs_key(n.attrs), len(n.outputs))
        first = seen.get(key)
        if first is not None and not (set(n.outputs) & outputs):
            rename.update({o: f for o, f in zip(n.outputs, first.outputs) if o})
            continue
        seen.setdefault(key, n)
        kept.append(n)
    return Graph(kept, graph.inputs, graph.outputs, graph.constants, graph.opset, graph.origin)


def _value_key(constants: dict, name: str):
    c = constants.get(name)
    if c is None or np.size(c) > SMALL:
        return name
    c = np.asarray(c)
    return ("constant", c.dtype.str, c.shape, c.tobytes())


def _attrs_key(attrs: dict):
    def key(v):
        if isinstance(v, np.ndarray):  # (a fused node's weights: the same array object, or not equal)
            return ("array", v.dtype.str, v.shape, v.tobytes()) if v.size <= SMALL else ("id", id(v))
        if isinstance(v, (list, tuple)):
            return tuple(key(x) for x in v)
        if isinstance(v, dict):
            return tuple(sorted((k, key(x)) for k, x in v.items()))
        try:
            hash(v)
            return v
        except TypeError:
            return ("id", id(v))  # (unhashable and unknown: never equal to another node's)
    return key(attrs)
