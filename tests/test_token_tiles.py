"""Token tiles (executor.TokenChain): from executor.TILE_FROM tokens on, a block's two FFN
layers run over tiles of executor.TOKEN_TILE tokens, so that the inner value of one tile
stays in cache between them. Every such kernel computes a token from that token alone, so
the outputs are the untiled ones bit for bit; dynamic INT8 (its scale comes from every
token) is not tiled."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS_DIR, assert_parity, load_on_bf16_kernels, make_inputs, ort_run
from sparsejit.kernels.bf16 import has_bf16

import sparsejit
from sparsejit import executor, tape

INT8 = MODELS_DIR / "int8"
# (every test here is about one batch of many tokens run whole, not in parts)
pytestmark = pytest.mark.usefixtures("whole_batches")

TILED = "by token tiles"


def _counting(monkeypatch) -> list:
    """The tiles TokenChains run from now on (one entry each)."""
    tiles, run = [], executor.TokenChain._run
    monkeypatch.setattr(executor.TokenChain, "_run", lambda self, env: tiles.append(1) or run(self, env))
    return tiles


def _feeds(model):
    return make_inputs(model.input_names, 10, 110)  # 1100 tokens, rows padded from 110 down to 83


@pytest.fixture(scope="module")
def static_int8(tmp_path_factory):
    """The 4-block test BERT by `sparsejit quantize --mode static`: only the Linear layers
    are quantized, so each FFN's two layers follow each other (onnxruntime's own forms
    quantize every op, and a FakeQuantize, an Add and a GELU stand between them)."""
    pytest.importorskip("onnxruntime")
    from sparsejit.quantize import quantize_model

    out = tmp_path_factory.mktemp("static") / "static.onnx"
    return quantize_model(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", out, "static")


@pytest.mark.parametrize("which", ["bert_sdpa_h64_op14_legacy_p90", "bert_eager_h128_op17_legacy_block4_p90",
                                   "static int8", "bf16"])
def test_token_tiles_give_the_untiled_outputs(which, monkeypatch, request, tmp_path):
    path = request.getfixturevalue("static_int8") if which == "static int8" else \
        MODELS_DIR / f"{'bert_eager_h128_op17_legacy_block4_p90' if which == 'bf16' else which}.onnx"
    if which == "bf16" and not has_bf16():
        pytest.skip("no AVX512-BF16 on this CPU")
    # (sparse kernels: on a CPU with AMX, "auto" may put an int8 or bf16 FFN on AMX's dense
    # GEMM, which tiles the tokens itself and is left out of the chains)
    model = load_on_bf16_kernels(path, monkeypatch, tmp_path / "plan.json", kernels="sparse") if which == "bf16" \
        else sparsejit.load(path, kernels="sparse")
    feeds = _feeds(model)
    model.run(feeds)  # (the first run of a shape walks the steps one by one)
    chains = model.forward_source(feeds).count(TILED)
    assert chains == 2  # (each of the two blocks' FFN)
    tiles = _counting(monkeypatch)
    tiled = model.run(feeds)
    assert len(tiles) == chains * -(-1100 // executor.TOKEN_TILE)
    monkeypatch.setattr(executor, "TILE_FROM", 1 << 30)
    untiled = model.run(feeds)
    for a, b in zip(tiled, untiled):
        np.testing.assert_array_equal(a, b)
    kinds = {layer.kind for layer in model.layers if "intermediate" in layer.name}
    if which == "static int8":
        assert kinds == {"int8"}
    elif which == "bf16":  # (its tolerance against float32: tests/test_bf16.py)
        assert kinds <= {"sparse-bf16", "dense-bf16"}
    else:
        assert_parity(tiled, ort_run(path, feeds), model.output_names)


def test_dynamic_int8_and_few_tokens_are_not_tiled(monkeypatch):
    model = sparsejit.load(INT8 / "bert_block4_p90_int8_dynamic.onnx")
    feeds = _feeds(model)
    model.run(feeds)
    assert TILED not in model.forward_source(feeds)
    model = sparsejit.load(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx")
    few = make_inputs(model.input_names, 2, 110)
    model.run(few)
    assert TILED in model.forward_source(few)  # (the chain is in the code; it runs whole under TILE_FROM)
    tiles = _counting(monkeypatch)
    monkeypatch.setattr(tape, "ENABLED", False)  # (a tape made after this run would run the chains again)
    model.run(few)
    assert len(tiles) == 2


def test_an_inner_value_asked_for_is_computed_whole():
    """A value inside a chain that a caller asks for (`values`) ends the chain there."""
    model = sparsejit.load(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx")
    feeds = _feeds(model)
    ffn1 = next(layer for layer in model.layers if "intermediate" in layer.name)
    inner = ffn1.node.outputs[0]
    whole = model.run(feeds)
    got = model.values(feeds, [ffn1.node.inputs[0], inner, "last_hidden_state"])
    got = model.values(feeds, [ffn1.node.inputs[0], inner, "last_hidden_state"])  # (the generated forward)
    np.testing.assert_array_equal(got["last_hidden_state"], whole[0])
    np.testing.assert_allclose(got[inner], model.run_layer(ffn1, got[ffn1.node.inputs[0]]).reshape(got[inner].shape),
                               rtol=1e-6, atol=1e-6)


def test_a_failing_step_in_a_chain_is_named(monkeypatch):
    model = sparsejit.load(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx")
    feeds = _feeds(model)
    model.run(feeds)
    ffn2 = next(layer for layer in model.layers if layer.name.endswith("output/dense/MatMul")
                and "attention" not in layer.name)

    def broken(x, residual=None):
        raise ValueError("kernel broke")

    monkeypatch.setattr(ffn2, "impl", broken)
    for step in model._executor.steps:
        if step.node.name == ffn2.name:
            monkeypatch.setattr(step, "run", lambda x, residual=None: (broken(x, residual),))
    with pytest.raises(RuntimeError, match=f"node '{ffn2.name}' \\(Linear\\) failed: kernel broke"):
        model.run(feeds)


def test_a_chain_slices_what_is_per_token_and_runs_whole_on_a_broadcast_value():
    from sparsejit.graph import Node
    from sparsejit.plan import Step

    rows = []
    a = Step(Node("Linear", "a", ["x"], ["h"], {}), lambda x, residual=None: (2 * x,))
    b = Step(Node("Linear", "b", ["h", "r"], ["y"], {}), lambda h, r: (rows.append(len(h)) or h + r,))
    chain = executor.TokenChain((a, b))
    assert chain.outside == ["x", "r"]
    x = np.arange(1100 * 4, dtype=np.float32).reshape(1100, 4)
    for r, tiles in [(np.ones((1100, 4), np.float32), [128] * 8 + [76]), (np.ones(4, np.float32), [128] * 8 + [76]),
                     (np.ones((1, 4), np.float32), [1100])]:
        rows.clear()
        (y,) = chain(x, r)
        assert rows == tiles
        np.testing.assert_array_equal(y, 2 * x + r)


def test_static_int8_ffn_hands_its_inner_value_over_quantized(static_int8, monkeypatch):
    """In a chain, FFN1 (static int8) stores its output as the bytes FFN2's kernel reads
    (int8.Int8Chunked.quantized_for): the outputs are those of the plain handover, bit for
    bit, whole and by token tiles."""
    from sparsejit.kernels.int8 import Int8Chunked, has_vnni

    if not has_vnni():
        pytest.skip("the handover is the VNNI kernel's (Int8Chunked)")
    model = sparsejit.load(static_int8, kernels="sparse")  # (the VNNI kernels: AMX's hand nothing over)
    _hands_over_as_without(model, Int8Chunked, [make_inputs(model.input_names, 2, 9), _feeds(model)], monkeypatch)


def _hands_over_as_without(model, kind, feeds_list, monkeypatch) -> None:
    """Each feeds' outputs with the handover (executor.HANDOFF; some layer of `kind`
    handing over) are those without it, bit for bit."""
    handed, quantized_for = [], kind.quantized_for
    monkeypatch.setattr(kind, "quantized_for", lambda *a: handed.append(1) or quantized_for(*a))
    for feeds in feeds_list:
        model.run(feeds)
        handed.clear()
        monkeypatch.setattr(executor, "HANDOFF", True)
        got = model.run(feeds)
        assert handed, "no FFN handed its output over"
        monkeypatch.setattr(executor, "HANDOFF", False)
        for a, b in zip(got, model.run(feeds)):
            np.testing.assert_array_equal(a, b)


def test_dense_kernels_are_not_tiled():
    """A dense GEMM streams all its weights per call: by token tiles it would read them once per tile."""
    model = sparsejit.load(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx", kernels="dense")
    feeds = _feeds(model)
    model.run(feeds)
    assert TILED not in model.forward_source(feeds)


def test_static_int8_without_vnni_is_tiled_without_the_handover(static_int8, monkeypatch):
    """Where the CPU has no VNNI the int8 layers run on Int8Linear, which hands nothing on
    quantized: the chain runs each layer as it is, by token tiles, with the same outputs."""
    from sparsejit.kernels.int8 import Int8Chunked, Int8Linear

    from sparsejit import plan

    monkeypatch.setattr(plan, "host_dots", lambda: ["pmaddwd", "generic"])
    model = sparsejit.load(static_int8)
    assert all(isinstance(layer.impl, Int8Linear) for layer in model.layers if "intermediate" in layer.name)
    handed = []
    monkeypatch.setattr(Int8Chunked, "quantized_for", lambda *a: handed.append(1))
    feeds = _feeds(model)
    model.run(feeds)
    assert model.forward_source(feeds).count(TILED) == 2
    tiles = _counting(monkeypatch)
    tiled = model.run(feeds)
    assert tiles and not handed
    monkeypatch.setattr(executor, "TILE_FROM", 1 << 30)
    for a, b in zip(tiled, model.run(feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(not has_bf16(), reason="no AVX512-BF16 on this CPU")
@pytest.mark.parametrize("name,kernel", [("bert_sdpa_h64_op14_legacy_p90", "BF16ScatteredLinear"),
                                         ("bert_eager_h128_op17_legacy_block4_p90", "BF16SparseLinear")])
def test_bf16_ffn_hands_its_inner_value_over_as_the_next_kernels_x(name, kernel, monkeypatch, tmp_path):
    """precision="bf16": in a chain, FFN1 stores its output as the x FFN2's kernel reads
    (scattered weights: its bfloat16 rows, BF16ScatteredLinear.quantized_for; 4-block
    weights: its pair rows, BF16SparseLinear.quantized_for): the outputs are those of the
    plain handover, bit for bit, whole (a few tokens, as at batch 1) and by token tiles."""
    from sparsejit.kernels import bf16

    kind = getattr(bf16, kernel)
    model = load_on_bf16_kernels(MODELS_DIR / f"{name}.onnx", monkeypatch, tmp_path / "plan.json", kernels="sparse")
    assert any(type(layer.impl) is kind for layer in model.layers if "intermediate" in layer.name)
    feeds = [make_inputs(model.input_names, 2, 9), make_inputs(model.input_names, 1, 53), _feeds(model)]
    _hands_over_as_without(model, kind, feeds, monkeypatch)
