"""Float16 models compute in float32: the weights are widened at load, the activations and
every intermediate are float32 (so the sparse and dense float32 kernels run them), the
float16 inputs are widened as they enter and the outputs narrowed to the float16 the
graph declares. float16 keeps 11 bits of mantissa, and ONNX Runtime rounds each of its
float16 intermediates to them; sparsejit rounds only the outputs, so it is the closer
of the two to the same weights computed in float32.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import Graph, InputSpec, Node

HALF, FLOAT = TensorProto.FLOAT16, TensorProto.FLOAT


def _widened(value):
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def _node(n: Node, rename: dict[str, str]) -> Node:
    """The node reading renamed values, its float16 attributes float32, a Cast to float16
    a Cast to float32."""
    attrs = {k: _widened(v) for k, v in n.attrs.items()}
    if n.op_type == "Cast" and attrs.get("to") == HALF:
        attrs["to"] = FLOAT
    return Node(n.op_type, n.name, [rename.get(i, i) for i in n.inputs], [rename.get(o, o) for o in n.outputs],
                attrs)


def compute_in_float32(graph: Graph, output_types: dict[str, int]) -> Graph:
    """`graph` computing in float32 where it used float16 (unchanged when it has none)."""
    half_inputs = [i.name for i in graph.inputs if i.dtype == np.float16]
    half_outputs = [o for o in graph.outputs if output_types.get(o) == HALF]
    has_half = any(v.dtype == np.float16 for v in graph.constants.values()) or half_inputs or half_outputs or any(
        n.op_type == "Cast" and n.attrs.get("to") == HALF for n in graph.nodes)
    if not has_half:
        return graph
    rename = {name: f"{name}::float32" for name in half_inputs + half_outputs}
    nodes = [Node("Cast", f"{i}::widen", [i], [rename[i]], {"to": FLOAT}) for i in half_inputs]
    nodes += [_node(n, rename) for n in graph.nodes]
    nodes += [Node("Cast", f"{o}::narrow", [rename[o]], [o], {"to": HALF}) for o in half_outputs]
    constants = {k: _widened(v) for k, v in graph.constants.items()}
    inputs = [InputSpec(i.name, i.dtype, i.dims) for i in graph.inputs]
    return Graph(nodes, inputs, graph.outputs, constants, graph.opset, graph.origin)
