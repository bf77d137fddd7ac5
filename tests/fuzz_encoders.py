"""Generated encoders against ONNX Runtime: random widths, heads, depths, sparsity from 0 to
100% (unstructured and 4-block), opsets, NaN guard, batch, length and padding; every
output within atol and rtol 1e-4. Run by `test_robustness.py` in a subprocess (a crash
fails that test); `derandomize` gives the same cases on every run, and
SPARSEJIT_FUZZ_EXAMPLES asks for more:

    SPARSEJIT_FUZZ_EXAMPLES=500 python -c "import fuzz_encoders as f; f.generated_encoders_match_onnx_runtime()"
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from conftest import assert_parity
from encoders import EncoderSpec, make_encoder, padded_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsejit
from sparsejit import batching


@st.composite
def encoder_specs(draw) -> EncoderSpec:
    heads = draw(st.integers(1, 4))
    return EncoderSpec(
        hidden=heads * draw(st.integers(1, 16)), heads=heads, ffn=draw(st.integers(1, 80)),
        layers=draw(st.integers(1, 2)),
        sparsity=draw(st.one_of(st.sampled_from([0.0, 0.5, 0.8, 0.9, 0.97, 1.0]), st.floats(0, 1))),
        block=draw(st.sampled_from([1, 4])), opset=draw(st.sampled_from([14, 17])),
        nan_guard=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=int(os.environ.get("SPARSEJIT_FUZZ_EXAMPLES", "30")), deadline=None, derandomize=True,
          database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=encoder_specs(), batch=st.integers(1, 6), seq=st.integers(1, 40), seed=st.integers(0, 2**16),
       part=st.integers(0, 2))
def generated_encoders_match_onnx_runtime(spec: EncoderSpec, batch: int, seq: int, seed: int, part: int) -> None:
    """`part` > 0: parts of that many samples where the batch splits (batching.SAMPLE_TOKENS
    lowered; these batches are too small for the default); three runs, the later two the
    first one's outputs bit for bit (the first decides whether the batch splits)."""
    proto = make_encoder(spec)
    feeds = padded_inputs(np.random.default_rng(seed), batch, seq, spec.vocab)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    want = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)
    model = sparsejit.load(proto, num_threads=2)
    default = batching.SAMPLE_TOKENS
    batching.SAMPLE_TOKENS = part * seq or default
    try:
        runs = [model.run(feeds) for _ in range(3)]
    finally:
        batching.SAMPLE_TOKENS = default
    assert_parity(runs[0], want, model.output_names)
    for later in runs[1:]:
        for a, b in zip(later, runs[0]):
            np.testing.assert_array_equal(a, b)
