"""`sparsejit quantize`: an ONNX model to INT8 with onnxruntime.quantization, in the forms
sparsejit runs on its int8 kernels. The weights are quantized per output channel and
symmetrically (int8, zero point 0), so a pruned zero stays zero and the 4-block
structure survives; the activations per tensor, either dynamically (from each input's
range at run time) or statically (scales from calibration inputs, QDQ format).

Static quantization covers the Linear layers only: MatMul and Gemm with a constant
weight, their inputs and not their outputs. By default onnxruntime's static quantizer
also wraps attention's MatMuls, Softmax, the Adds and the LayerNorm pieces in
QuantizeLinear/DequantizeLinear pairs, which keeps the attention and the epilogues from
fusing (measured in bench/README, fourth session of 2026-12-02).

Needs onnxruntime (`pip install sparsejit[check]` or the test extra).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

MODES = ("dynamic", "static")


class _Calibration:
    """Batches of generated token ids (or the arrays of an .npz) for static calibration."""

    def __init__(self, model: onnx.ModelProto, batches: int, seq: int, inputs: str | None):
        from .benchmark import make_inputs

        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        if inputs:
            with np.load(inputs) as data:
                feeds = [{n: data[n] for n in names}]
        else:
            specs = [(n, "int64") for n in names]
            feeds = [dict(zip(names, make_inputs(specs, 2, seq, seed=s))) for s in range(batches)]
        self.data = iter(feeds)

    def get_next(self):
        return next(self.data, None)


LINEAR_OPS = ("MatMul", "Gemm")


def _activation_products(model: onnx.ModelProto) -> list[str]:
    """The MatMul and Gemm nodes whose B is not a constant (attention's), by name."""
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in LINEAR_OPS and n.input[1] not in consts]


def quantize_model(source: str | os.PathLike, output: str | os.PathLike, mode: str = "dynamic",
                   calibration: str | None = None, batches: int = 8, seq: int = 64) -> Path:
    """Quantize `source` to `output` (`mode` "dynamic" or "static"); returns the output path."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    except ImportError as e:
        raise ImportError("sparsejit quantize needs onnxruntime: pip install 'sparsejit[check]'") from e
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    source, output = Path(source), Path(output)
    if mode == "dynamic":
        quantize_dynamic(source, output, weight_type=QuantType.QInt8, per_channel=True)
    else:
        model = onnx.load(source, load_external_data=False)
        reader = _Calibration(model, batches, seq, calibration)
        quantize_static(source, output, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=list(LINEAR_OPS), nodes_to_exclude=_activation_products(model),
                        extra_options={"WeightSymmetric": True, "OpTypesToExcludeOutputQuantization": list(LINEAR_OPS)})
    return output


_u8s8_exact: bool | None = None


def ort_u8s8_exact() -> bool:
    """Whether ONNX Runtime's MatMulInteger (uint8 × int8) gives exact int32 sums on this CPU.
    Without VNNI (AVX2 only) its kernels add pairs of products in int16 with saturation
    (`vpmaddubsw`), so its int8 results are not what the graph says. Needs onnxruntime."""
    global _u8s8_exact
    if _u8s8_exact is None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        w = rng.integers(-127, 128, (64, 32)).astype(np.int8)
        x = rng.integers(0, 256, (8, 64)).astype(np.uint8)
        graph = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, 64])],
                                  [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 32])],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        _u8s8_exact = bool(np.array_equal(y, x.astype(np.int32) @ w.astype(np.int32)))
    return _u8s8_exact


# --- each quantized layer against the FP32 weights it came from ---------------------------

# What exporters append to a MatMul's name when they quantize it: onnxruntime's dynamic and
# QOperator quantizers ("_quant"), SparseML's MatMulInteger form ("_integer").
_QUANTIZED_SUFFIXES = ("_quant", "_integer")


def _source_name(name: str) -> str:
    for suffix in _QUANTIZED_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def match_layers(quantized: list, fp32: list) -> list[tuple]:
    """(int8 layer, its FP32 layer or None) for each int8 layer: by node name, less what
    the quantizers append; failing that, by position when both models have as many layers
    (a quantizer that renamed every node). A pair must have the same shape."""
    by_name = {lp.name: lp for lp in fp32}
    same_count = len(quantized) == len(fp32)
    pairs = []
    for i, q in enumerate(quantized):
        if not q.int8:
            continue
        f = by_name.get(q.name) or by_name.get(_source_name(q.name)) or (fp32[i] if same_count else None)
        pairs.append((q, f if f is not None and f.pattern_shape == q.pattern_shape else None))
    return pairs


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    """‖a − b‖ / ‖b‖ (0 when both are zero), in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm else float(np.linalg.norm(a) > 0)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms else float(not a.any() and not b.any())


def _dequantized_weight(layer) -> np.ndarray:
    """The int8 layer's weight [in, out] as floats: each int8 value times its column's step."""
    from .kernels.int8 import weight_step

    impl = getattr(layer.impl, "group", layer.impl)
    start, stop = getattr(layer.impl, "start", 0), getattr(layer.impl, "stop", None)
    return layer.impl.dense_weight().astype(np.float32) * weight_step(impl)[start:stop]


def _outputs(x: np.ndarray, *layers) -> list[np.ndarray]:
    """Each (model, layer)'s output for x, a zero residual where the layer adds one."""
    x = x.reshape(-1, x.shape[-1])
    out = []
    for model, layer in layers:
        r = np.zeros((x.shape[0], layer.pattern_shape[1]), np.float32) if layer.node.attrs["residual"] else None
        out.append(model.run_layer(layer, x, r))
    return out


def layer_errors(quantized, fp32, feeds: dict[str, np.ndarray]) -> list[dict]:
    """One row per int8 layer of the Model `quantized`: how far its weight and its output
    are from the FP32 layer it came from in the Model `fp32` (the unquantized file).
    The outputs are compared on the activations the FP32 model computes for `feeds`, so
    each row is that layer's own error, not what the layers before it added."""
    pairs = match_layers(quantized.layers, fp32.layers)
    values = fp32.values(feeds, [f.node.inputs[0] for _, f in pairs if f is not None])
    rows = []
    for q, f in pairs:
        row = {"layer": q.name, "fp32_layer": f.name if f else None, "shape": q.pattern_shape}
        if f is not None:
            w, wq = f.weight, _dequantized_weight(q)
            row.update(weight_error=_relative(wq, w), zeros_kept=bool(not np.any(wq[w == 0])))
            if q.node.attrs["activation"] == f.node.attrs["activation"]:
                got, want = _outputs(values[f.node.inputs[0]], (quantized, q), (fp32, f))
                row.update(output_error=_relative(got, want), output_cosine=_cosine(got, want))
        rows.append(row)
    return rows
