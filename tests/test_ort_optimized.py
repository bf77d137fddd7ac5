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


def test_an_optimized_graphs_embeddings_run_taped_on_its_int64_ids(monkeypatch):
    """ONNX Runtime's optimizer leaves Casts of the int64 ids to int32 before its
    EmbedLayerNormalization: folded into the embeddings kernel (its `wrap`), so that a
    taped run launches the embeddings, where the int32 copy made each call had kept them in
    Python; every taped run as the untaped one, within ONNX Runtime's tolerance."""
    from test_tape import assert_taped_as_untaped_and_ort

    from sparsejit import executor

    monkeypatch.setattr(executor, "TAPE_SAVES", 1.0)
    monkeypatch.setattr(executor, "TAPE_KEEP", float("inf"))
    path = next(p for p in OPTIMIZED if "level2" in p.stem and "approx" not in p.stem)
    model = sparsejit.load(path)
    (embed,) = [n for n in model.graph.nodes if n.op_type == "EmbedLayerNorm"]
    assert any(embed.attrs["wrap"]) and set(embed.inputs[:-2]) & {"input_ids", "token_type_ids"}

    def check(t):
        assert "EmbedLayerNorm" not in [g.steps[0].node.op_type for g in t._groups if g.kind == "host"]
    assert_taped_as_untaped_and_ort(model, path, check)


def test_what_a_rewrite_does_not_cover_is_refused_naming_the_node(tmp_path):
    import onnx

    model = onnx.load(next(p for p in OPTIMIZED if "level1" in p.stem))
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("unidirectional", 1))
    onnx.save(model, tmp_path / "causal.onnx")
    with pytest.raises(sparsejit.UnsupportedModelError, match=rf"'{node.name}'.*unidirectional"):
        sparsejit.load(tmp_path / "causal.onnx")
