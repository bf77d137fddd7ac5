"""The graph sparsejit compiles: ONNX file → `Graph` of `Node`s and constant arrays.

Importing validates everything a run would otherwise trip over later: the file, the
opset, every op against the supported set, and the graph's inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_file import load_mapped
from .ops import SUPPORTED_OPS

MIN_OPSET = 11


class UnsupportedModelError(ValueError):
    """The model uses something sparsejit does not implement."""


@dataclass
class Node:
    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"{self.op_type}({self.name!r})"


@dataclass
class InputSpec:
    """A graph input: its name, numpy dtype and dims (int for fixed, str/None for free)."""

    name: str
    dtype: np.dtype
    dims: tuple

    def describe(self) -> str:
        dims = ", ".join(str(d) if d is not None else "?" for d in self.dims)
        return f"{self.name}: {self.dtype}[{dims}]"


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output as the file declares it, in ONNX Runtime's terms: shape
    with free dimensions as their names (or None), type as "tensor(int64)"."""

    name: str
    shape: list
    type: str


@dataclass(frozen=True)
class ModelIO:
    """What an ONNX file declares of itself: inputs, outputs and metadata."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    producer_name: str = ""
    graph_name: str = ""
    domain: str = ""
    description: str = ""
    graph_description: str = ""
    version: int = 0
    custom_metadata_map: dict = field(default_factory=dict)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    elem = helper.tensor_dtype_to_string(tt.elem_type).removeprefix("TensorProto.").lower()
    return TensorInfo(vi.name, shape, f"tensor({elem})")


def model_io(proto: onnx.ModelProto) -> ModelIO:
    g = proto.graph
    initializers = {t.name for t in g.initializer}
    return ModelIO([_tensor_info(v) for v in g.input if v.name not in initializers],
                   [_tensor_info(v) for v in g.output],
                   proto.producer_name, g.name, proto.domain, proto.doc_string, g.doc_string,
                   # as ONNX Runtime reports an unset model_version: the largest int64
                   proto.model_version if proto.HasField("model_version") else 2**63 - 1,
                   {p.key: p.value for p in proto.metadata_props})


@dataclass
class Graph:
    nodes: list[Node]
    inputs: list[InputSpec]
    outputs: list[str]
    constants: dict[str, np.ndarray]
    opset: int
    origin: str = "<model>"  # where the model came from: its file, "<bytes>" or "<ModelProto>"
    io: ModelIO | None = None  # the file's own inputs, outputs and metadata (set by import_onnx)

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs if o}


def _attr_value(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [s.decode() for s in v]
    return v


def load_model_proto(model: str | os.PathLike | bytes | onnx.ModelProto, map_weights: bool = False
                     ) -> tuple[onnx.ModelProto, str, dict[str, np.ndarray]]:
    """Read an ONNX file (external data included), parse serialized bytes, or take a ModelProto as is.

    With map_weights, large inline initializers are not parsed but memory-mapped from
    the file and returned apart: (model without them, where, {name: mapped array}).
    """
    if isinstance(model, onnx.ModelProto):
        return model, "<ModelProto>", {}
    if isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as e:
            raise ValueError(f"the {len(model)} bytes given are not a readable ONNX model: {e}") from e
        if not proto.graph.node and not proto.graph.output:
            raise ValueError(f"the {len(model)} bytes given are not a readable ONNX model: they hold no graph")
        return proto, "<bytes>", {}
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"ONNX model file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an ONNX model file, got a directory: {path}")
    mapped: dict[str, np.ndarray] = {}
    try:
        if map_weights:
            model, mapped = load_mapped(path)
        else:
            model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, or others on truncated files
        raise ValueError(f"{path} is not a readable ONNX model: {e}") from e
    if not model.graph.node and not model.graph.output:
        raise ValueError(f"{path} is not a readable ONNX model: it holds no graph")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # OSError, or onnx's ValidationError for a missing data file
        raise FileNotFoundError(f"{path}: cannot read its external weight data: {e}") from e
    return model, str(path), mapped


def import_onnx(model: str | os.PathLike | bytes | onnx.ModelProto) -> Graph:
    """ONNX file, bytes or ModelProto → `Graph`, refusing what sparsejit cannot run."""
    proto, where, mapped = load_model_proto(model, map_weights=True)
    if not 3 <= proto.ir_version <= onnx.IR_VERSION:
        raise UnsupportedModelError(f"{where}: IR version {proto.ir_version} is not one this onnx ({onnx.__version__}) "
                                    f"knows (3 to {onnx.IR_VERSION})")
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise UnsupportedModelError(f"{where}: the model declares no default-domain opset")
    g = proto.graph
    _check_ops(g, where)
    if opset < MIN_OPSET:
        _check_old_opset(g, opset, where)
    _check_definitions(g, mapped, where)
    shapes = _inferred_shapes(proto, mapped, where)
    constants = {t.name: _tensor(t, where) for t in g.initializer}
    constants.update(mapped)
    inputs = []
    for vi in g.input:
        if vi.name in constants:  # IR < 4 lists initializers as inputs too
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim)
        inputs.append(InputSpec(vi.name, np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    nodes = []
    for i, n in enumerate(g.node):
        attrs = {a.name: _attr_value(a) for a in n.attribute}
        nodes.append(Node(_op_name(n), n.name or f"{n.op_type}_{i}", list(n.input), list(n.output), attrs))
    graph = Graph(nodes, inputs, [o.name for o in g.output], constants, opset, where)
    from .contrib import lower_contrib  # (these two build on this module's Graph)
    from .precision import compute_in_float32

    graph = lower_contrib(graph, shapes)
    graph = compute_in_float32(graph, {o.name: o.type.tensor_type.elem_type for o in g.output})
    _check_wiring(graph)
    _check_layernorm_scales(graph, shapes)
    graph.io = model_io(proto)
    return graph


def _op_name(n: onnx.NodeProto) -> str:
    return f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type


def _check_ops(g: onnx.GraphProto, where: str) -> None:
    """Refuses a graph with ops sparsejit does not implement, naming every one with its
    count and the first node of each."""
    from .contrib import CONTRIB

    bad: dict[str, list[str]] = {}
    for n in g.node:
        if _op_name(n) not in SUPPORTED_OPS and _op_name(n) not in CONTRIB:
            bad.setdefault(_op_name(n), []).append(n.name or "<unnamed>")
    if bad:
        listed = "; ".join(f"{op!r} ×{len(names)} (first: node {names[0]!r})" for op, names in bad.items())
        raise UnsupportedModelError(
            f"{where}: {sum(map(len, bad.values()))} node(s) use ops sparsejit does not support: {listed}. "
            f"Supported ops: {', '.join(sorted(SUPPORTED_OPS))}")


def _tensor(t: onnx.TensorProto, where: str) -> np.ndarray:
    try:
        return numpy_helper.to_array(t)
    except Exception as e:  # a raw_data length that does not match the dims, a bad type
        raise UnsupportedModelError(f"{where}: initializer {t.name!r} cannot be read: {e}") from e


def _check_definitions(g: onnx.GraphProto, mapped: dict, where: str) -> None:
    """Every value defined once, as ONNX Runtime requires: a second definition would
    otherwise silently win."""
    defined = {vi.name: "a graph input" for vi in g.input}
    for name in [t.name for t in g.initializer] + list(mapped):
        defined.setdefault(name, "an initializer")
    for n in g.node:
        for o in n.output:
            if not o:
                continue
            if o in defined:
                raise UnsupportedModelError(f"{where}: value {o!r} is defined twice: by {defined[o]} and by node "
                                            f"{n.name or '<unnamed>'!r} ({n.op_type})")
            defined[o] = f"node {n.name or '<unnamed>'!r} ({n.op_type})"


def _inferred_shapes(model: onnx.ModelProto, mapped: dict, where: str) -> dict[str, tuple]:
    """ONNX shape inference in strict mode, as ONNX Runtime runs it at load: an op whose
    inputs cannot fit (a weight of the wrong size, an axis or perm out of range) is
    refused, naming the node. Returns the inferred dims by value name (None: unknown)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name, a in mapped.items():  # the mapped weights, by type and shape only
        probe.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype),
                                                               a.shape))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise UnsupportedModelError(f"{where}: the model is invalid: {e}") from e
    g = inferred.graph
    shapes = {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    return shapes


def _check_layernorm_scales(graph: Graph, shapes: dict[str, tuple]) -> None:
    """A LayerNormalization's scale and bias must broadcast to the normalised shape
    (shape inference does not check it; ONNX Runtime fails at run time)."""
    for n in graph.nodes:
        dims = shapes.get(n.inputs[0]) if n.op_type == "LayerNormalization" else None
        if dims is None:
            continue
        normalised = dims[n.attrs.get("axis", -1) % len(dims):] if dims else ()
        for i in n.inputs[1:3]:
            c = graph.constants.get(i) if i else None
            if c is None or None in normalised:
                continue
            try:
                fits = np.broadcast_shapes(c.shape, normalised) == tuple(normalised)
            except ValueError:
                fits = False
            if not fits:
                raise UnsupportedModelError(
                    f"{graph.origin}: node {n.name!r} (LayerNormalization): {i!r} has shape {list(c.shape)}, "
                    f"which does not fit the normalised shape {list(normalised)}")


def _check_old_opset(g: onnx.GraphProto, opset: int, where: str) -> None:
    """Below opset 11, accept a node only if its op's definition is the one it has at 11
    (And-7 and Not-1 still are); an older definition (Reshape-1, Slice-1 …) is refused."""
    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        old = onnx.defs.get_schema(n.op_type, opset).since_version
        now = onnx.defs.get_schema(n.op_type, MIN_OPSET).since_version
        if old != now:
            raise UnsupportedModelError(
                f"{where}: node {n.name or '<unnamed>'!r} uses {n.op_type}-{old} (model opset {opset}); "
                f"sparsejit implements {n.op_type} as of opset {MIN_OPSET} and later")


def _check_wiring(graph: Graph) -> None:
    known = set(graph.constants) | {i.name for i in graph.inputs}
    for n in graph.nodes:
        for i in n.inputs:
            if i and i not in known:
                raise UnsupportedModelError(
                    f"{graph.origin}: node {n.name!r} ({n.op_type}) reads {i!r}, which no earlier node, "
                    "input or initializer produces (the graph is not topologically sorted, or is broken)"
                )
        known.update(o for o in n.outputs if o)
    for o in graph.outputs:
        if o not in known:
            raise UnsupportedModelError(f"{graph.origin}: graph output {o!r} is never produced")
