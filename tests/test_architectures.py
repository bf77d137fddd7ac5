"""Every architecture the README claims, exported small (scripts/export_test_models.py,
tests/models/arch/), 90% pruned, against ONNX Runtime on the same file: MPNet,
DeBERTa-v2 (disentangled attention), ModernBERT (rotary embeddings, alternating global
and sliding-window attention), the ELECTRA discriminator (a hidden × 1 head), BERT for
question answering (Split into start and end logits), a sentence-transformers model with
mean pooling and normalisation in the graph, GPT-2 (causal), and BERT at opset 23 (ONNX's
Attention op). Attention the fuser does not recognise runs on the reference ops; every
pruned Linear layer around it is sparse all the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_parity, make_inputs, ort_run

import sparsejit

ARCH_FILES = sorted((Path(__file__).parent / "models" / "arch").glob("*.onnx"))


@pytest.fixture(scope="module", params=ARCH_FILES, ids=lambda p: p.stem)
def arch(request):
    return request.param, sparsejit.load(request.param)


def test_matches_onnx_runtime_with_padding(arch):
    path, model = arch
    for batch, seq in [(1, 7), (3, 20), (2, 33)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=batch * 100 + seq)
        assert_parity(model.run(feeds), ort_run(path, feeds), model.output_names)


def test_every_pruned_linear_runs_sparse(arch):
    _, model = arch
    assert model.layers, "no Linear layer found"
    pruned = [lp for lp in model.layers if lp.pattern.stored <= 0.25 * lp.pattern.in_features * lp.pattern.out_features]
    assert len(pruned) >= len(model.layers) - 2, [(lp.name, lp.pattern.density) for lp in model.layers]
    assert all(lp.kind == "sparse" for lp in pruned), [(lp.name, lp.kind) for lp in pruned]
    assert model.check().ok
