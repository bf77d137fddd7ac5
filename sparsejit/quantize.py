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
