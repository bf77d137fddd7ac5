"""`sparsejit quantize`: an ONNX model to INT8 with onnxruntime.quantization, in the forms
sparsejit runs on its int8 kernels. The weights are quantized per output channel and
symmetrically (int8, zero point 0), so a pruned zero stays zero and the 4-block
structure survives; the activations per tensor, either dynamically (from each input's
range at run time) or statically (scales from calibration inputs, QDQ format).

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
        reader = _Calibration(onnx.load(source, load_external_data=False), batches, seq, calibration)
        quantize_static(source, output, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True})
    return output
