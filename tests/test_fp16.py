"""float16 models (model.half() from both exporters, tests/models/fp16/) compute in float32
(sparsejit/precision.py): their outputs have the float16 dtype the graph declares, and
every pruned Linear runs a sparse kernel.

Tolerance against ONNX Runtime on the same file: ONNX Runtime rounds its float16
intermediates to 11-bit mantissas, sparsejit only its outputs, so they differ by the
rounding ONNX Runtime accumulates. Outputs reach |x| ≈ 4, where a float16 ulp is 2⁻⁸ ≈
0.004; 1e-2 absolute (about 2.5 ulps there) and 1e-2 relative bound what two encoder
layers of float16 rounding leave. And sparsejit must be the nearer of the two to the
same weights computed in float32 (the float32 export of the model, by ONNX Runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_inputs, ort_run

import sparsejit

FP16 = Path(__file__).parent / "models" / "fp16"
FP32_ORACLE = FP16 / "bert_fp32_op14_legacy_p90.onnx"
HALF_FILES = sorted(FP16.glob("bert_fp16_*.onnx"))


@pytest.mark.parametrize("path", HALF_FILES, ids=lambda p: p.stem)
def test_float16_exports_match_onnx_runtime_and_are_nearer_float32(path):
    model = sparsejit.load(path)
    assert all(lp.kind == "sparse" for lp in model.layers if lp.pattern.density < 0.25) and model.layers
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        got, half, full = model.run(feeds), ort_run(path, feeds), ort_run(FP32_ORACLE, feeds)
        for g, h, f, name in zip(got, half, full, model.output_names):
            assert g.dtype == h.dtype == np.float16 and g.shape == h.shape, name
            np.testing.assert_allclose(g.astype(np.float32), h.astype(np.float32), atol=1e-2, rtol=1e-2, err_msg=name)
            ours = np.abs(g.astype(np.float64) - f).max()
            theirs = np.abs(h.astype(np.float64) - f).max()
            assert ours <= theirs + 1e-6, f"{name}: {ours} from float32 against ONNX Runtime's {theirs}"
