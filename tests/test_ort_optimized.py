"""Graphs after ONNX Runtime's optimizers (tests/models/ortopt/, made from the plain BERT
export by scripts/export_test_models.py): the com.microsoft ops are rewritten at import
(sparsejit/contrib.py) into standard ops that fuse into the same kernels as the plain
export's, and every output matches ONNX Runtime on the optimized file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import MODELS_DIR, assert_parity, make_inputs, ort_run

import sparsejit

OPTIMIZED = sorted((Path(__file__).parent / "models" / "ortopt").glob("*.onnx"))
PLAIN = MODELS_DIR / "bert_eager_h64_op11_legacy_p90.onnx"
KERNELS = ("Linear", "LinearGroup", "AttentionCore", "LayerNorm", "EmbedLayerNorm", "PrepareMask", "Gelu",
           "Softmax", "MatMul")


@pytest.fixture(scope="module")
def plain():
    return sparsejit.load(PLAIN)


@pytest.mark.parametrize("path", OPTIMIZED, ids=lambda p: p.stem)
def test_optimized_graph_runs_the_plain_exports_kernels(path, plain):
    model = sparsejit.load(path)
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        assert_parity(model.run(feeds), ort_run(path, feeds), model.output_names)
    kinds = Counter(n.op_type for n in model.graph.nodes)
    want = Counter(n.op_type for n in plain.graph.nodes)
    assert {k: kinds[k] for k in KERNELS} == {k: want[k] for k in KERNELS}
    assert [lp.kind for lp in model.layers] == [lp.kind for lp in plain.layers]
    gelu = "gelu_tanh" if "approx" in path.stem else "gelu"
    assert {lp.node.attrs["activation"] for lp in model.layers} == {"none", gelu, "tanh"}  # (tanh: the pooler's)


def test_what_a_rewrite_does_not_cover_is_refused_naming_the_node(tmp_path):
    import onnx

    model = onnx.load(next(p for p in OPTIMIZED if "level1" in p.stem))
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("unidirectional", 1))
    onnx.save(model, tmp_path / "causal.onnx")
    with pytest.raises(sparsejit.UnsupportedModelError, match=rf"'{node.name}'.*unidirectional"):
        sparsejit.load(tmp_path / "causal.onnx")
