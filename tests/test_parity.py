"""Parity with ONNX Runtime on real torch exports (legacy opsets 11/14/17 and dynamo)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODEL_FILES, SHAPES, assert_parity, make_inputs, ort_run

import sparsejit

assert MODEL_FILES, "tests/models holds no exports"


@pytest.fixture(scope="module", params=MODEL_FILES, ids=lambda p: p.stem)
def model_file(request):
    return request.param


@pytest.mark.parametrize("kernels", ["auto", "sparse", "dense"])
def test_matches_onnxruntime(model_file, kernels):
    model = sparsejit.load(model_file, kernels=kernels)
    for batch, seq in SHAPES:
        feeds = make_inputs(model.input_names, batch, seq)
        assert_parity(model.run(feeds), ort_run(model_file, feeds), model.output_names)


def test_reference_mode_matches_onnxruntime(model_file):
    model = sparsejit.load(model_file, mode="reference")
    feeds = make_inputs(model.input_names, 2, 11, seed=3)
    assert_parity(model.run(feeds), ort_run(model_file, feeds), model.output_names)


def test_fused_blocks_recognised(model_file):
    """Every encoder matmul with a constant weight became a Linear; every attention fused."""
    model = sparsejit.load(model_file, kernels="sparse")
    ops = [n.op_type for n in model.graph.nodes]
    assert ops.count("AttentionCore") == 2, ops
    assert "Softmax" not in ops and "Erf" not in ops and "ReduceMean" not in ops
    # embeddings + 2 per layer (the embeddings' fused with their gathers where they have no other reader)
    assert ops.count("LayerNorm") + ops.count("EmbedLayerNorm") == 5
    assert ops.count("EmbedLayerNorm") == (0 if "distilbert" in model_file.name and "dynamo" not in model_file.name
                                           else 1)
    assert ops.count("LinearGroup") == 2  # Q, K and V of each layer: one kernel
    assert ops.count("PrepareMask") <= 1  # (a mask both layers read is laid out once)
    assert not any(n.op_type == "MatMul" and n.inputs[1] in model.graph.constants for n in model.graph.nodes)
    assert sum(1 for lp in model.layers if lp.kind == "sparse") >= 12


def test_one_model_many_shapes_and_repeat_runs(model_file):
    """One loaded model serves any batch and length, and the shape cache never leaks across shapes."""
    model = sparsejit.load(model_file, kernels="sparse")
    for batch, seq in [(2, 5), (1, 33), (2, 5), (4, 2), (1, 33)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=batch * 100 + seq)
        assert_parity(model.run(feeds), ort_run(model_file, feeds), model.output_names)


def test_padding_changes_nothing_but_padded_positions(model_file):
    """A padded row's real tokens give the same hidden states as the unpadded row alone."""
    model = sparsejit.load(model_file)
    feeds = make_inputs(model.input_names, 2, 12, seed=7)
    feeds["attention_mask"][1, :] = 1
    feeds["attention_mask"][1, 6:] = 0
    full = model.run(feeds)[0]
    alone = {k: v[1:2, :6].copy() for k, v in feeds.items()}
    np.testing.assert_allclose(model.run(alone)[0][0], full[1, :6], atol=1e-4, rtol=1e-4)
