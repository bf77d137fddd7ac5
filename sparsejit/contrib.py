"""ONNX Runtime's fused ops (the com.microsoft domain), as its transformer optimizer and its
EXTENDED-level saved models leave them, rewritten at import into standard ops, which
sparsejit's own passes then fuse again: a packed-QKV `Attention` becomes three MatMuls
(one LinearGroup once fused) and the attention ops (an AttentionCore), a
`SkipLayerNormalization` the residual add and a LayerNorm, and so on. A graph an
optimizer has fused thus runs the same kernels as the plain export of its weights.

Each entry of `CONTRIB` is the op's definition as ONNX Runtime documents it (its
schema's doc string, `onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema`),
written with standard ops; what an entry does not cover (a KV cache, rotary
embeddings, left-padding masks) is refused naming the node and what it uses.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np

from .graph import Graph, Node, UnsupportedModelError

DOMAIN = "com.microsoft::"


class _Rewrite:
    """The nodes and constants a rewrite adds, with names that cannot collide."""

    def __init__(self, graph: Graph, shapes: dict[str, tuple]):
        self.graph, self.shapes = graph, dict(shapes)
        self.constants = dict(graph.constants)
        self.nodes: list[Node] = []
        self.n = 0
        self.prefix = ""  # the name of the node being rewritten
        self.masks: dict[tuple, str] = {}  # (mask input, fill) → the additive mask made from it

    def fresh(self, stem: str) -> str:
        self.n += 1
        return f"{self.prefix}/{stem}::{self.n}"

    def const(self, value, stem: str = "const") -> str:
        name = self.fresh(stem)
        self.constants[name] = np.asarray(value)
        return name

    def op(self, op_type: str, inputs: list[str], stem: str, outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(stem)]
        self.nodes.append(Node(op_type, self.fresh(stem), inputs, outputs, attrs))
        return outputs[0]


def _refuse(node: Node, what: str) -> None:
    raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}) uses {what}, which sparsejit does not run")


def _input(node: Node, i: int) -> str:
    return node.inputs[i] if len(node.inputs) > i else ""


def _output(node: Node, i: int) -> str:
    return node.outputs[i] if len(node.outputs) > i else ""


def attention(node: Node, r: _Rewrite) -> None:
    """Packed-QKV multi-head attention: x·Wq + bq, x·Wk + bk, x·Wv + bv into heads,
    softmax(q·kᵀ·scale + mask)·v, heads merged back."""
    a = node.attrs
    for attr in ("unidirectional", "do_rotary", "past_present_share_buffer"):
        if a.get(attr):
            _refuse(node, f"the attribute {attr}")
    if any(_input(node, i) for i in (4, 5, 6)) or _output(node, 1):
        _refuse(node, "a KV cache or an attention bias")
    weights, bias = r.constants.get(node.inputs[1]), r.constants.get(_input(node, 2))
    if weights is None or (_input(node, 2) and bias is None):
        _refuse(node, "a weight or bias that is not a constant")
    heads = a["num_heads"]
    sizes = list(a.get("qkv_hidden_sizes") or [weights.shape[1] // 3] * 3)
    cuts = np.cumsum([0] + sizes)
    outs = []
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        y = r.op("MatMul", [node.inputs[0], r.const(weights[:, lo:hi], f"{node.name}/w{'qkv'[i]}")], "qkv")
        if bias is not None:
            y = r.op("Add", [y, r.const(bias[lo:hi], f"{node.name}/b{'qkv'[i]}")], "qkv")
        split = r.const(np.array([0, 0, heads, sizes[i] // heads], np.int64))
        outs.append(r.op("Transpose", [r.op("Reshape", [y, split], "heads")], "heads",
                         perm=[0, 2, 3, 1] if i == 1 else [0, 2, 1, 3]))
    scale = a.get("scale") or 1 / np.sqrt(sizes[0] // heads)
    scores = r.op("Mul", [r.op("MatMul", outs[:2], "scores"), r.const(np.float32(scale))], "scores")
    mask = _additive_mask(node, r)
    if mask:
        scores = r.op("Add", [scores, mask], "scores")
    ctx = r.op("MatMul", [r.op("Softmax", [scores], "probs", axis=-1), outs[2]], "context")
    merged = r.const(np.array([0, 0, sizes[2]], np.int64))
    r.op("Reshape", [r.op("Transpose", [ctx], "context", perm=[0, 2, 1, 3]), merged], "out", outputs=node.outputs[:1])


def _additive_mask(node: Node, r: _Rewrite) -> str:
    """The mask as scores see it ([batch, 1, 1 or seq, keys], 0 or mask_filter_value), from
    a raw 0/1 mask [batch, keys] or [batch, seq, keys], or the valid lengths [batch] of
    right-padded inputs."""
    mask = _input(node, 3)
    if not mask:
        return ""
    key = (mask, node.attrs.get("mask_filter_value", -10000.0))
    if key not in r.masks:  # one per mask, for every layer (PrepareMask then lays it out once)
        r.masks[key] = _mask_from(node, r, mask)
    return r.masks[key]


def _mask_from(node: Node, r: _Rewrite, mask: str) -> str:
    rank = len(r.shapes.get(mask) or ())
    fill = r.const(np.float32(node.attrs.get("mask_filter_value", -10000.0)))
    if rank == 1:  # valid lengths: keys j < length[b]
        keys = r.op("Gather", [r.op("Shape", [node.inputs[0]], "keys"), r.const(np.int64(1))], "keys", axis=0)
        positions = r.op("Range", [r.const(np.int64(0)), keys, r.const(np.int64(1))], "keys")
        lengths = r.op("Unsqueeze", [r.op("Cast", [mask], "lengths", to=7), r.const(np.array([1], np.int64))],
                       "lengths")
        valid = r.op("Less", [positions, lengths], "valid")
        zero = r.const(np.float32(0))
        return r.op("Unsqueeze", [r.op("Where", [valid, zero, fill], "mask"), r.const(np.array([1, 2], np.int64))],
                    "mask")
    if rank not in (2, 3):
        _refuse(node, f"a mask_index of rank {rank or 'unknown'} (left-padding positions, or a shape not inferred)")
    masked = r.op("Sub", [r.const(np.float32(1)), r.op("Cast", [mask], "mask", to=1)], "mask")
    axes = r.const(np.array([1, 2] if rank == 2 else [1], np.int64))
    return r.op("Unsqueeze", [r.op("Mul", [masked, fill], "mask"), axes], "mask")


def embed_layer_normalization(node: Node, r: _Rewrite) -> None:
    """Word + position (+ segment) embeddings, LayerNorm; the mask's valid lengths."""
    ids, segments = node.inputs[0], _input(node, 1)
    word, position, segment = node.inputs[2], node.inputs[3], _input(node, 4)
    positions = _input(node, 8)
    if not positions:
        length = r.op("Gather", [r.op("Shape", [ids], "positions"), r.const(np.int64(1))], "positions", axis=0)
        positions = r.op("Range", [r.const(np.int64(0)), length, r.const(np.int64(1))], "positions")
    total = r.op("Add", [r.op("Gather", [word, ids], "embed", axis=0),
                         r.op("Gather", [position, positions], "embed", axis=0)], "embed")
    if segment and segments:
        total = r.op("Add", [total, r.op("Gather", [segment, segments], "embed", axis=0)], "embed")
    if _output(node, 2):
        r.op("Identity", [total], "sum", outputs=[_output(node, 2)])
    r.op("LayerNormalization", [total, node.inputs[5], node.inputs[6]], "norm", outputs=node.outputs[:1], axis=-1,
         epsilon=node.attrs.get("epsilon", 1e-12))
    if _output(node, 1):
        if not _input(node, 7):
            _refuse(node, "a mask_index output without a mask input")
        summed = r.op("ReduceSum", [r.op("Cast", [node.inputs[7]], "lengths", to=6), r.const(np.array([1], np.int64))],
                      "lengths", keepdims=0)
        r.op("Identity", [summed], "lengths", outputs=[_output(node, 1)])
        r.shapes[_output(node, 1)] = (None,)  # [batch] (shape inference does not know the op)


def skip_layer_normalization(node: Node, r: _Rewrite) -> None:
    """LayerNorm(input (+ bias) + skip): the bias added first, so that the Linear before
    takes it and then the skip as its residual."""
    x = node.inputs[0]
    if _input(node, 4):
        x = r.op("Add", [x, node.inputs[4]], "skip")
    total = r.op("Add", [x, node.inputs[1]], "skip", outputs=[_output(node, 3)] if _output(node, 3) else None)
    inputs = [total, node.inputs[2]] + ([node.inputs[3]] if _input(node, 3) else [])
    r.op("LayerNormalization", inputs, "norm", outputs=node.outputs[:3], axis=-1,
         epsilon=node.attrs.get("epsilon", 1e-12))


def _gelu(approximate: str) -> Callable[[Node, _Rewrite], None]:
    def rewrite(node: Node, r: _Rewrite) -> None:
        x = r.op("Add", node.inputs[:2], "bias") if _input(node, 1) else node.inputs[0]
        r.op("Gelu", [x], "gelu", outputs=node.outputs[:1], approximate=approximate)

    return rewrite


def _transposed(r: _Rewrite, node: Node, x: str) -> str:
    rank = len(r.shapes.get(x) or ())
    if rank < 2:
        _refuse(node, "a transposed input of unknown rank")
    return r.op("Transpose", [x], "trans", perm=[*range(rank - 2), rank - 1, rank - 2])


def fused_matmul(node: Node, r: _Rewrite) -> None:
    """alpha · op(A) @ op(B), op a transpose of the last two axes where asked."""
    a = node.attrs
    if a.get("transBatchA") or a.get("transBatchB"):
        _refuse(node, "transBatchA or transBatchB")
    x, y = node.inputs[:2]
    x = _transposed(r, node, x) if a.get("transA") else x
    y = _transposed(r, node, y) if a.get("transB") else y
    alpha = a.get("alpha", 1.0)
    if alpha == 1.0:
        r.op("MatMul", [x, y], "matmul", outputs=node.outputs[:1])
    else:
        r.op("Mul", [r.op("MatMul", [x, y], "matmul"), r.const(np.float32(alpha))], "matmul", outputs=node.outputs[:1])


def fused_gemm(node: Node, r: _Rewrite) -> None:
    """Gemm, then its activation (Tanh, as the BERT pooler has)."""
    a = dict(node.attrs)
    activation = a.pop("activation", "")
    for k in ("activation_alpha", "activation_beta", "activation_gamma", "leaky_relu_alpha"):
        a.pop(k, None)
    if activation not in ("", "Tanh"):
        _refuse(node, f"the activation {activation!r}")
    y = r.op("Gemm", node.inputs, "gemm", outputs=None if activation else node.outputs[:1], **a)
    if activation:
        r.op("Tanh", [y], "gemm", outputs=node.outputs[:1])


def _dequantized(r: _Rewrite, node: Node, at: int) -> str:
    """DequantizeLinear of the quantized input at `at` (value, scale, zero point)."""
    zp = _input(node, at + 2)
    return r.op("DequantizeLinear", node.inputs[at:at + 2] + ([zp] if zp else []), "dequant")


def _quantized(r: _Rewrite, node: Node, x: str, at: int) -> None:
    """The node's output: x quantized with the scale and zero point at `at`."""
    zp = _input(node, at + 1)
    r.op("QuantizeLinear", [x, node.inputs[at]] + ([zp] if zp else []), "quant", outputs=node.outputs[:1])


def _qlinear_binary(op_type: str) -> Callable[[Node, _Rewrite], None]:
    """QLinearAdd and QLinearMul: quantize(dequantize(A) op dequantize(B))."""

    def rewrite(node: Node, r: _Rewrite) -> None:
        _quantized(r, node, r.op(op_type, [_dequantized(r, node, 0), _dequantized(r, node, 3)], op_type.lower()), 6)

    return rewrite


def qlinear_softmax(node: Node, r: _Rewrite) -> None:
    """quantize(Softmax(dequantize(X))), the axis as the opset attribute says."""
    axis = node.attrs.get("axis", -1 if node.attrs.get("opset", 13) >= 13 else 1)
    if node.attrs.get("opset", 13) < 13 and axis not in (-1, len(r.shapes.get(node.inputs[0]) or ()) - 1):
        _refuse(node, "a softmax over more than its last axis (opset < 13)")
    _quantized(r, node, r.op("Softmax", [_dequantized(r, node, 0)], "softmax", axis=axis), 3)


def qgemm(node: Node, r: _Rewrite) -> None:
    """ONNX Runtime's quantized Gemm as its kernel computes it: the int32 sums of
    (A - a_zero_point)(B - b_zero_point), plus C (int32, on the sums' scale), times the
    float32 alpha · a_scale · b_scale (per column of B where it has one per column), over
    y_scale; then requantized onto y's grid where there is one (a QuantizeLinear of scale
    1: clamped to y's type less its zero point, rounded half to even, plus it), else that
    float. QuantizeLinear's static scale makes such a layer's QOperator form."""
    a = node.attrs
    y_scale, y_zero = _input(node, 7), _input(node, 8)
    if bool(y_scale) != bool(y_zero):
        _refuse(node, "an output scale without an output zero point, or the reverse")
    x, w = node.inputs[0], node.inputs[3]
    x = r.op("Transpose", [x], "trans", perm=[1, 0]) if a.get("transA") else x
    w = r.op("Transpose", [w], "trans", perm=[1, 0]) if a.get("transB") else w
    zeros = [node.inputs[2]] + ([_input(node, 5)] if _input(node, 5) else [])
    acc = r.op("MatMulInteger", [x, w, *zeros], "sums")
    if _input(node, 6):
        acc = r.op("Add", [acc, node.inputs[6]], "bias")
    scale = r.op("Mul", [r.op("Mul", [r.const(np.float32(a.get("alpha", 1.0))), node.inputs[1]], "scale"),
                        node.inputs[4]], "scale")
    if y_scale:
        scale = r.op("Div", [scale, y_scale], "scale")
    y = r.op("Mul", [r.op("Cast", [acc], "float", to=1), scale], "scaled",
             outputs=None if y_scale else node.outputs[:1])
    if y_scale:
        r.op("QuantizeLinear", [y, r.const(np.float32(1)), y_zero], "requant", outputs=node.outputs[:1])


CONTRIB: dict[str, Callable[[Node, _Rewrite], None]] = {
    DOMAIN + "QLinearAdd": _qlinear_binary("Add"),
    DOMAIN + "QLinearMul": _qlinear_binary("Mul"),
    DOMAIN + "QLinearSoftmax": qlinear_softmax,
    DOMAIN + "QGemm": qgemm,
    DOMAIN + "Attention": attention,
    DOMAIN + "EmbedLayerNormalization": embed_layer_normalization,
    DOMAIN + "SkipLayerNormalization": skip_layer_normalization,
    DOMAIN + "BiasGelu": _gelu("none"),
    DOMAIN + "Gelu": _gelu("none"),
    DOMAIN + "FastGelu": _gelu("tanh"),
    DOMAIN + "FusedMatMul": fused_matmul,
    DOMAIN + "FusedGemm": fused_gemm,
}


def lower_contrib(graph: Graph, shapes: dict[str, tuple]) -> Graph:
    """`graph` with every com.microsoft node in CONTRIB rewritten into standard ops."""
    if not any(n.op_type in CONTRIB for n in graph.nodes):
        return graph
    r = _Rewrite(graph, shapes)
    for n in graph.nodes:
        if n.op_type in CONTRIB:
            r.prefix = n.name
            try:
                CONTRIB[n.op_type](n, r)
            except UnsupportedModelError as e:
                raise UnsupportedModelError(f"{graph.origin}: {e}") from e
        else:
            r.nodes.append(n)
    return Graph(r.nodes, graph.inputs, graph.outputs, r.constants, graph.opset, graph.origin)
