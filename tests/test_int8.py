"""Quantized models (tests/models/int8/: the 4-block-pruned BERT quantized by
onnxruntime.quantization, scripts/export_test_models.py) in every form sparsejit reads:
dynamic (DynamicQuantizeLinear → MatMulInteger → Cast → Mul), static QDQ, static
QOperator (QLinearMatMul, with com.microsoft QLinearAdd/Mul/Softmax) and SparseML's
static MatMulInteger form.

Tolerance: sparsejit computes what the graph says (the int32 sums exactly, then the
float epilogue), so it must match ONNX Runtime with its graph optimizations off within
1e-4. ONNX Runtime's optimizations rewrite quantized graphs (QDQ pairs into integer
kernels, requantized outputs), which moves its own results: against the optimized
session the bound is that spread (optimized against unoptimized, measured per file and
shape), and 1e-4 where the spread is smaller.

One exception: on a CPU without VNNI (AVX2 only), ONNX Runtime's uint8 × int8 kernels
add pairs of products in int16 with saturation (`vpmaddubsw`), so its MatMulInteger and
QLinearMatMul are not what the graph says (`ort_u8s8_exact` probes it). There the
oracle is the graph run on sparsejit's numpy reference ops (int32 sums, as ONNX defines
them; themselves checked by the ONNX backend node tests), as `sparsejit check` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_inputs

import sparsejit
from sparsejit.quantize import ort_u8s8_exact

INT8 = Path(__file__).parent / "models" / "int8"
FORMS = ("dynamic", "qdq", "sparseml", "qoperator")


def _ort(path: Path, feeds: dict, optimized: bool) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _oracle(path: Path, feeds: dict) -> list[np.ndarray]:
    """What the graph says: ONNX Runtime unoptimized where its u8s8 products are exact, else the
    reference ops."""
    if ort_u8s8_exact():
        return _ort(path, feeds, False)
    return sparsejit.load(path, mode="reference").run(feeds)


def _unfolded(graph) -> list:
    """The graph's nodes, a RowGroup's (lower.fuse_rows) in its place."""
    return [m for n in graph.nodes for m in (n.attrs["nodes"] if n.op_type == "RowGroup" else [n])]


def _qgemm_model(rng, a_type, b_type, trans_a, trans_b, per_column, bias, out_type, alpha):
    """One com.microsoft QGemm of a [5, 24] input and a [24, 11] weight (constants but A)."""
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = 5, 24, 11
    lo = {np.uint8: 0, np.int8: -128}
    b = rng.integers(lo[b_type], lo[b_type] + 256, (n, k) if trans_b else (k, n)).astype(b_type)
    shape = (n,) if per_column else ()
    consts = {"a_scale": np.float32(0.037), "a_zero": np.array(lo[a_type] + 100 if a_type == np.uint8 else 3, a_type),
              "b": b, "b_scale": (rng.random(shape) * 0.02 + 0.001).astype(np.float32),
              "b_zero": (rng.integers(0, 9, shape) if b_type == np.uint8 else np.zeros(shape)).astype(b_type)}
    inputs = ["a", "a_scale", "a_zero", "b", "b_scale", "b_zero"]
    if bias:
        consts["c"] = rng.integers(-20000, 20000, n).astype(np.int32)
        inputs.append("c")
    if out_type is not None:
        inputs += [""] * (not bias) + ["y_scale", "y_zero"]
        consts["y_scale"], consts["y_zero"] = np.float32(0.05), np.array(7, out_type)
    elem = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8, None: TensorProto.FLOAT}
    node = helper.make_node("QGemm", inputs, ["y"], domain="com.microsoft", alpha=alpha, transA=int(trans_a),
                            transB=int(trans_b))
    graph = helper.make_graph([node], "qgemm", [helper.make_tensor_value_info("a", elem[a_type], [k, m] if trans_a
                                                                               else [m, k])],
                              [helper.make_tensor_value_info("y", elem[out_type], [m, n])],
                              [numpy_helper.from_array(np.asarray(v), name) for name, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    a = rng.integers(lo[a_type], lo[a_type] + 256, (k, m) if trans_a else (m, k)).astype(a_type)
    return model, {"a": a}


def test_qgemm_is_onnx_runtimes(tmp_path):
    """com.microsoft QGemm (ONNX Runtime's QOperator form of a Gemm, a pooler's say) runs as
    ONNX Runtime's kernel computes it, bit for bit: uint8 and int8 inputs, either operand
    transposed, per-tensor and per-column weight scales and zero points, with and without
    the int32 C, alpha 1 and 0.5, float outputs and outputs requantized to uint8 and int8;
    an untransposed constant weight's floats made once at load (MatMulIntegerB). (Where ONNX Runtime's uint8 × int8 sums saturate, on CPUs without VNNI, those cases are
    left out: its result is not the op's.)"""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    rng = np.random.default_rng(31)
    cases = [(np.uint8, np.int8, False, True, True, True, np.uint8, 1.0),
             (np.uint8, np.int8, True, False, False, False, None, 1.0),
             (np.uint8, np.uint8, False, False, True, True, None, 0.5),
             (np.int8, np.int8, False, True, False, True, np.int8, 1.0),
             (np.int8, np.int8, True, True, True, False, None, 0.5),
             (np.uint8, np.int8, False, False, False, True, np.uint8, 0.5)]
    for case in cases:
        if case[:2] == (np.uint8, np.int8) and not ort_u8s8_exact():
            continue
        model, feeds = _qgemm_model(rng, *case)
        path = tmp_path / "qgemm.onnx"
        onnx.save(model, path)
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        model = sparsejit.load(path)
        got = model.run(feeds)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want), (case, np.abs(got.astype(float) - want).max())
        if not case[3]:  # (B constant: its floats made once, lower.integer_weights)
            assert any(n.op_type == "MatMulIntegerB" for n in model.graph.nodes), case


@pytest.mark.parametrize("k", [24, 3000])
def test_integer_weight_floats_give_matmul_integers_sums(k):
    """A constant B's floats (ops.integer_weight, MatMulIntegerB's) give MatMulInteger's
    int32 sums exactly: float32 where K · 255 · B's largest centred value stays below 2^24,
    float64 past it (3000 inputs: sums float32 would round), with zero points per column
    of B and per row of A."""
    from sparsejit import ops

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3, 5, k)).astype(np.uint8)
    b = rng.integers(-128, 128, (k, 7)).astype(np.int8)
    for a_zero, b_zero in [(None, None), (np.uint8(131), rng.integers(-9, 9, 7).astype(np.int8))]:
        floats = ops.integer_weight(b, b_zero)
        assert floats.dtype == (np.float32 if k == 24 else np.float64)
        got = ops.integer_product_with(a, a_zero, floats)
        want = ops.matmul_integer(a, b, a_zero, b_zero)
        assert got.dtype == np.int32 and np.array_equal(got, want)
        exact = (a.astype(np.int64) - (0 if a_zero is None else int(a_zero))) @ (
            b.astype(np.int64) - (0 if b_zero is None else b_zero.astype(np.int64)))
        assert np.array_equal(got, exact)
    rows = rng.integers(0, 256, 5).astype(np.uint8)  # (a zero point per row of a 2-D A)
    assert np.array_equal(ops.integer_product_with(a[0], rows, ops.integer_weight(b)),
                          ops.matmul_integer(a[0], b, rows))


def test_qdq_requantizing_of_moved_bytes_and_bias_adds(tmp_path):
    """QDQ files quantize again after every Reshape and Transpose, and put their bias Add's
    constant first: a QuantizeLinear of moved dequantized bytes on their own grid becomes
    the moves on the bytes (fuse.qdq_products; on another grid it stays), and the Add
    reads the constant second and joins the row group of the ops around it
    (lower.constants_second). The outputs are ONNX Runtime's bit for bit, on values on
    half steps too."""
    ort = pytest.importorskip("onnxruntime")
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    s1, s2 = np.float32(0.0173), np.float32(0.0291)
    consts = {"s1": s1, "z1": np.uint8(121), "s2": s2, "z2": np.uint8(30), "shape": np.array([2, 3, 2, 4], np.int64),
              "bias": np.linspace(-1, 1, 8).astype(np.float32)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s1", "z1"], ["d"]),
             helper.make_node("Reshape", ["d", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("QuantizeLinear", ["t", "s1", "z1"], ["tq"]),   # the same grid: moves on bytes
             helper.make_node("DequantizeLinear", ["tq", "s1", "z1"], ["y1"]),
             helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["rq"]),   # another grid: stays
             helper.make_node("DequantizeLinear", ["rq", "s2", "z2"], ["rd"]),
             helper.make_node("Mul", ["rd", "s1"], ["y2"]),
             helper.make_node("Add", ["bias", "d"], ["a"]),
             helper.make_node("QuantizeLinear", ["a", "s1", "z1"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "s1", "z1"], ["ad"]),
             helper.make_node("Reshape", ["ad", "shape"], ["ar"]),
             helper.make_node("QuantizeLinear", ["ar", "s1", "z1"], ["arq"]),
             helper.make_node("DequantizeLinear", ["arq", "s1", "z1"], ["ard"]),
             helper.make_node("Mul", ["ard", "s2"], ["y3"])]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "y3")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])], outs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = sparsejit.load(path)
    made = {o: n for n in model.graph.nodes for o in n.outputs}
    assert made["tq"].op_type == "Transpose" and made[made["tq"].inputs[0]].inputs[0] == "q"  # (the bytes moved)
    grouped = [m for n in model.graph.nodes if n.op_type == "RowGroup" for m in n.attrs["nodes"]]
    assert any(m.op_type == "Add" and m.inputs == ["d", "bias"] for m in grouped), grouped
    assert any(m.op_type == "QuantizeLinear" and m.inputs[1] == "s2" for m in grouped), grouped  # (another grid)
    rng = np.random.default_rng(5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (rng.standard_normal((2, 3, 8)).astype(np.float32) * 2,
              ((rng.integers(-130, 130, (2, 3, 8)) + 0.5) * s1).astype(np.float32)):  # (on half steps of s1)
        for got, want in zip(model.run({"x": x}), sess.run(None, {"x": x})):
            np.testing.assert_array_equal(got, want)


def test_qdq_attention_runs_on_the_qoperator_attention_kernel():
    """A QDQ file whose attention is quantized (ONNX Runtime's quantize_static default):
    its products in QOperator form (fuse.qdq_products), so each block's attention is one
    QAttentionCore as a QOperator file's, and no float MatMul is left; what it computes
    is checked against ONNX Runtime by test_quantized_forms_compute_what_the_graph_says."""
    model = sparsejit.load(INT8 / "bert_block4_p90_int8_qdq.onnx")
    ops = [n.op_type for n in model.graph.nodes]
    assert ops.count("QAttentionCore") == 2 and "MatMul" not in ops, ops


@pytest.mark.parametrize("form", FORMS)
def test_quantized_forms_compute_what_the_graph_says(form):
    path = INT8 / f"bert_block4_p90_int8_{form}.onnx"
    model = sparsejit.load(path)
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        got, plain, optimized = model.run(feeds), _oracle(path, feeds), _ort(path, feeds, True)
        for g, p, o, name in zip(got, plain, optimized, model.output_names):
            np.testing.assert_allclose(g, p, atol=1e-4, rtol=1e-4, err_msg=f"{form} {name} against the oracle")
            if ort_u8s8_exact():  # (otherwise ONNX Runtime's spread is its saturation's)
                spread = float(np.abs(p - o).max())
                assert np.abs(g - o).max() <= max(1e-4, 1.5 * spread), (form, name, spread)
    encoder = [lp for lp in model.layers if "encoder" in lp.name]
    assert len(encoder) == 12 and {lp.kind for lp in encoder} == {"int8"}, [(lp.name, lp.kind) for lp in encoder]
    # Q, K and V quantize their shared input alike: one kernel each block, x quantized once
    groups = [n for n in model.graph.nodes if n.op_type == "QLinearGroup"]
    assert len(groups) == 2 and all(len(n.attrs["members"]) == 3 for n in groups), form
    if form == "qoperator":  # every weight's QLinearMatMul fused, its output requantized in the kernel
        assert all("output requantized" in lp.reason for lp in encoder), [lp.reason for lp in encoder]
        # attention's two QLinearMatMul, and the steps between, one node per block
        assert [n.op_type for n in model.graph.nodes].count("QAttentionCore") == 2
        assert not any(n.op_type == "QLinearMatMul" for n in model.graph.nodes)
        # each block's GELU, quantized around every op: one table lookup, in the row kernel of its steps
        gelus = [m for n in model.graph.nodes if n.op_type == "RowGroup" for m in n.attrs["nodes"]
                 if m.op_type == "Lookup" and "Erf" in m.attrs["ops"]]
        assert len(gelus) == 2
    if form in ("qdq", "sparseml"):  # each LayerNorm rounds its output to the next Linear's grid as it stores it
        norms = [n for n in model.graph.nodes if n.op_type == "LayerNorm"]
        assert len(norms) == 5 and all(n.attrs.get("quantize") is not None for n in norms), form
    if form == "dynamic":  # its embedding tables, gathered then dequantized, dequantized at load and fused
        assert [n.op_type for n in model.graph.nodes].count("EmbedLayerNorm") == 1
        assert "DequantizeLinear" not in {n.op_type for n in model.graph.nodes}
    assert model.check().ok


@pytest.mark.parametrize("form", ["qdq", "sparseml"])
@pytest.mark.usefixtures("whole_batches")
def test_layernorms_hand_their_bytes_to_the_int8_layers_reading_them(form, monkeypatch):
    """Each LayerNorm rounding to its readers' grid stores the bytes of its output too
    (plan.hand_layernorm_bytes), and the QKV group and FFN1 run on them without
    quantizing x: the outputs are those of the model without the handover, bit for bit,
    over padded rows, whole and by token tiles (1100 tokens), which the test above holds
    to ONNX Runtime; on AMX's kernels too, and without VNNI, on Int8Linear (AVX2's
    vpmaddwd), which reads the bytes as well. For AMX's kernels alone they are TokenTiles."""
    from sparsejit.kernels.int8 import has_vnni

    from sparsejit import plan

    if not has_vnni():
        pytest.skip("the bytes are the VNNI kernel's (Int8Chunked)")
    path = INT8 / f"bert_block4_p90_int8_{form}.onnx"
    calls, to_bytes = [], plan.layernorm_to_bytes
    monkeypatch.setattr(plan, "layernorm_to_bytes", lambda *a: calls.append(a[5]) or to_bytes(*a))  # (a[5]: tiled)
    handing = sparsejit.load(path, kernels="sparse")  # (VNNI's kernels here, AMX's below)
    monkeypatch.setattr(plan, "LAYERNORM_BYTES", False)
    plain = sparsejit.load(path, kernels="sparse")
    for batch, seq in [(2, 37), (10, 110)]:
        feeds = make_inputs(handing.input_names, batch, seq, seed=seq)
        calls.clear()
        got = handing.run(feeds)
        assert calls == [False] * 4  # each block's two LayerNorms but the last (the pooler reads it)
        for a, b in zip(got, plain.run(feeds)):
            np.testing.assert_array_equal(a, b)
    # on AMX's kernels (kernels="dense"), the same bytes read as tiles
    monkeypatch.setattr(plan, "LAYERNORM_BYTES", True)
    from sparsejit.kernels.amx import has_amx

    if has_amx("int8"):
        tiles = sparsejit.load(path, kernels="dense")
        calls.clear()
        for a, b in zip(tiles.run(feeds), plain.run(feeds)):
            np.testing.assert_array_equal(a, b)
        assert calls == [True] * 4  # (as TokenTiles: only AMX layers read them)
    # without VNNI the readers run on Int8Linear, which reads the bytes too
    monkeypatch.setattr(plan, "host_dots", lambda: ["pmaddwd", "generic"])
    without = sparsejit.load(path, kernels="sparse")
    monkeypatch.setattr(plan, "LAYERNORM_BYTES", False)
    without_plain = sparsejit.load(path, kernels="sparse")
    calls.clear()
    outs = without.run(feeds)
    assert calls == [False] * 4
    for a, b, c in zip(outs, without_plain.run(feeds), got):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-4, rtol=1e-4)


def test_amx_ffn1_hands_its_bytes_to_ffn2(tmp_path, monkeypatch):
    """On AMX's kernels each block's FFN1 (GELU fused) of a static file as `sparsejit
    quantize` makes it (MatMul inputs quantized only) stores its output as the bytes FFN2
    quantizes x to (plan.hand_amx_bytes, Int8Amx.bytes_on), and FFN2 runs on them: the
    outputs are those without the handover bit for bit, and what the graph says against
    ONNX Runtime, over padded rows and several shapes, untaped and taped; FFN1's floats,
    where asked for (Model.values), are its float output still."""
    from conftest import MODELS_DIR, assert_handover_runs_as_plain
    from sparsejit.kernels.amx import Int8Amx, has_amx
    from sparsejit.kernels.layout import TokenTiles

    from sparsejit import plan
    from sparsejit.quantize import quantize_model

    if not has_amx("int8"):
        pytest.skip("this CPU has no AMX-INT8")
    path = quantize_model(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx", tmp_path / "static.onnx", "static")
    calls, bytes_on = [], Int8Amx.bytes_on
    monkeypatch.setattr(Int8Amx, "bytes_on", lambda *a: calls.append(1) or bytes_on(*a))
    handing = sparsejit.load(path, kernels="dense")
    handed = [s for s in handing._executor.steps if s.node.op_type == "QLinear" and len(s.node.outputs) == 2]
    assert len(handed) == 2 and all("intermediate" in s.node.name for s in handed), [s.node.name for s in handed]
    monkeypatch.setattr(plan, "AMX_BYTES", False)
    plain = sparsejit.load(path, kernels="dense")
    shapes = [(1, 16), (2, 37), (3, 20)]
    for batch, seq in shapes:
        feeds = make_inputs(handing.input_names, batch, seq, seed=seq)
        for g, w in zip(handing.run(feeds), _oracle(path, feeds)):
            _assert_as_the_graph(g, w, static=True)
    assert_handover_runs_as_plain(handing, plain, shapes, monkeypatch, handed[0].node.outputs[0], calls)
    made = []  # (FFN2 runs on AMX too: the bytes as TokenTiles)
    monkeypatch.setattr(Int8Amx, "bytes_on", lambda *a: made.append(bytes_on(*a)) or made[-1])
    handing.run(make_inputs(handing.input_names, 1, 45, seed=1))  # (a shape not taped above)
    assert len(made) == 2 and all(isinstance(b, TokenTiles) and b.lead == (1, 45) for b in made)


@pytest.mark.parametrize("bytes_from", [0, 512])
@pytest.mark.usefixtures("whole_batches")
def test_the_attention_hands_its_bytes_to_the_output_layer(tmp_path, monkeypatch, bytes_from):
    """In a static file as `sparsejit quantize` makes it, each attention stores the bytes
    its output layer quantizes x to, its heads merged (plan.hand_attention_bytes), from
    plan.ATTENTION_BYTES_FROM tokens (under it the layer quantizes x itself): the outputs
    are those without the handover bit for bit, and what the graph says against ONNX
    Runtime, over padded rows, shapes under and over the limit, untaped and taped."""
    from conftest import MODELS_DIR, assert_handover_runs_as_plain
    from sparsejit.kernels import attention

    from sparsejit import plan
    from sparsejit.quantize import quantize_model

    monkeypatch.setattr(plan, "ATTENTION_BYTES_FROM", bytes_from)
    path = quantize_model(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", tmp_path / "static.onnx", "static")
    calls, stored = [], attention.fused_attention_bytes

    def counted(*a, **k):
        made = stored(*a, **k)
        calls.append(made[1] is not None)
        return made

    monkeypatch.setattr(plan, "fused_attention_bytes", counted)
    handing = sparsejit.load(path)
    handed = [s for s in handing._executor.steps if s.node.op_type == "AttentionCore" and len(s.node.outputs) == 2]
    assert len(handed) == 2, [s.node.name for s in handing._executor.steps if s.node.op_type == "AttentionCore"]
    monkeypatch.setattr(plan, "ATTENTION_BYTES", False)
    plain = sparsejit.load(path)
    shapes = [(2, 37), (8, 70)]
    for batch, seq in shapes:
        feeds = make_inputs(handing.input_names, batch, seq, seed=seq)
        calls.clear()
        for g, w in zip(handing.run(feeds), _oracle(path, feeds)):
            _assert_as_the_graph(g, w, static=True)
        assert calls == [batch * seq >= bytes_from] * 2, calls
    assert_handover_runs_as_plain(handing, plain, shapes, monkeypatch)


def test_a_reference_run_agrees_with_the_int8_kernels():
    path = INT8 / "bert_block4_p90_int8_dynamic.onnx"
    feeds = make_inputs(sparsejit.load(path).input_names, 2, 11)
    compiled, reference = sparsejit.load(path).run(feeds), sparsejit.load(path, mode="reference").run(feeds)
    for c, r in zip(compiled, reference):
        np.testing.assert_allclose(c, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("form", ["dynamic", "sparseml"])
def test_int8_layers_on_amx_tiles_give_the_vnni_kernels_outputs(form, monkeypatch, tmp_path):
    """Where the CPU has AMX, each int8 layer's kernel is the faster of the VNNI one and the
    dense AMX GEMM (amx.Int8Amx), timed on the first layer of each kind, at 128 tokens and
    then at more while VNNI wins; a layer AMX wins only at many tokens runs both, by the
    call's token count (linear.ByTokens). All sum the same integers exactly, so a model
    on AMX alone (kernels="dense"), or switching, gives the VNNI model's outputs bit for
    bit, over padding and several shapes. The decisions are kept in the plan and taken
    from it, untimed, by the next load (an entry made for another weight is not). Without
    AMX the plan is the VNNI one, untimed."""
    from sparsejit.kernels.amx import Int8Amx, has_amx
    from sparsejit.kernels.linear import ByTokens

    from sparsejit import plan

    path = INT8 / f"bert_block4_p90_int8_{form}.onnx"
    if has_amx("int8"):
        tiles, vnni = (sparsejit.load(path, kernels=k) for k in ("dense", "sparse"))
        auto = sparsejit.load(path, plan=tmp_path / "auto.plan.json")  # (a new file: decided afresh, then saved)
        encoder = [lp for lp in tiles.layers if "encoder" in lp.name]
        assert all(isinstance(getattr(lp.impl, "group", lp.impl), Int8Amx) and "AMX tiles" in lp.reason
                   for lp in encoder), [lp.reason for lp in encoder]
        assert not any(isinstance(getattr(lp.impl, "group", lp.impl), Int8Amx) for lp in vnni.layers)
        measured = [lp for lp in auto.layers if "encoder" in lp.name]
        assert all(lp.decided_by == "measured" and 128 in lp.timings_ms and "AMX" in lp.reason for lp in measured)
        _the_plan_keeps_the_int8_kernels(path, tmp_path / "auto.plan.json", auto, monkeypatch)
        # a layer AMX wins only from 384 tokens on runs both kernels, by the call's tokens
        monkeypatch.setattr(plan.Chooser, "race_layers",
                            lambda self, kind, layers, *a: ("", {"vnni": 1, "amx": 0.5 if a[-1] >= 384 else 0.95},
                                                            False))
        switching = sparsejit.load(path, plan=tmp_path / "switching.plan.json")
        encoder = [lp for lp in switching.layers if "encoder" in lp.name]
        assert all(isinstance(getattr(lp.impl, "group", lp.impl), ByTokens) for lp in encoder)
        runs = []
        monkeypatch.setattr(Int8Amx, "_tiles_run", lambda self, *a, real=Int8Amx._tiles_run: runs.append(1)
                            or real(self, *a))
        for batch, seq in [(1, 7), (2, 37), (4, 100)]:
            feeds = make_inputs(tiles.input_names, batch, seq, seed=seq)
            runs.clear()
            got = switching.run(feeds)
            assert bool(runs) == (batch * seq >= 384), (batch, seq, len(runs))
            for a, b, c, d in zip(tiles.run(feeds), vnni.run(feeds), auto.run(feeds), got):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(c, b)
                np.testing.assert_array_equal(d, b)
        assert tiles.check().ok and switching.check().ok
    monkeypatch.setattr(plan, "has_amx", lambda dot="int8": False)
    without = sparsejit.load(path)
    assert not any(isinstance(getattr(lp.impl, "group", lp.impl), Int8Amx) or lp.decided_by == "measured"
                   for lp in without.layers)


def _the_plan_keeps_the_int8_kernels(path: Path, plan_file: Path, auto, monkeypatch) -> None:
    """A load with `auto`'s plan file runs the same int8 kernels, none timed; an entry whose
    weight facts no longer match is timed again."""
    import json

    from sparsejit.choose import Chooser

    def untimed(*a):
        raise AssertionError("a saved int8 decision was timed again")

    with monkeypatch.context() as m:
        m.setattr(Chooser, "race_layers", untimed)
        again = sparsejit.load(path, plan=plan_file)
    kinds = [(lp.name, type(getattr(lp.impl, "group", lp.impl))) for lp in auto.layers]
    assert [(lp.name, type(getattr(lp.impl, "group", lp.impl))) for lp in again.layers] == kinds
    assert {lp.decided_by for lp in again.layers if "encoder" in lp.name} == {"plan file"}
    saved = json.loads(plan_file.read_text())
    layers = {lp.name for lp in auto.layers if not hasattr(lp.impl, "group")}  # (a group's entry decides its members)
    name = next(n for n, e in saved["layers"].items() if str(e["kernel"]).startswith("int8-") and n in layers)
    saved["layers"][name]["nnz"] += 1
    plan_file.write_text(json.dumps(saved))
    decided = {lp.name: lp.decided_by for lp in sparsejit.load(path, plan=plan_file).layers if "encoder" in lp.name}
    assert decided.pop(name) == "measured" and set(decided.values()) == {"plan file"}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sparsejit_quantize_makes_models_the_int8_kernels_run(tmp_path, mode):
    import subprocess
    import sys

    from conftest import MODELS_DIR

    source, out = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", tmp_path / f"{mode}.onnx"
    p = subprocess.run([sys.executable, "-m", "sparsejit", "quantize", str(source), "--mode", mode, "-o", str(out)],
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0 and str(out) in p.stdout, p.stderr
    model = sparsejit.load(out)
    assert {lp.kind for lp in model.layers if "encoder" in lp.name} == {"int8"}
    # only the Linear layers are quantized: attention fuses, as in the float model
    ops = [n.op_type for n in model.graph.nodes]
    assert ops.count("AttentionCore") == 2
    if mode == "static":  # every (Embed)LayerNorm rounds its output to the next Linear's grid itself
        norms = [n for n in model.graph.nodes if "LayerNorm" in n.op_type]
        assert len(norms) == 5 and all(n.attrs.get("quantize") is not None for n in norms[:-1]), norms
        made_by = model.graph.producers()
        assert not [n for n in model.graph.nodes if n.op_type == "FakeQuantize" and "LayerNorm" in made_by[n.inputs[0]].op_type]
    feeds = make_inputs(model.input_names, 2, 9)
    for g, w in zip(model.run(feeds), _oracle(out, feeds)):
        _assert_as_the_graph(g, w, static=mode == "static")


def _assert_as_the_graph(got: np.ndarray, want: np.ndarray, static: bool) -> None:
    """Dynamic: within 1e-4. Static with float attention between quantized layers: the
    fused attention kernel rounds its float32 sums otherwise than numpy (an ulp), and the
    next layer's static quantization turns an ulp at a rounding boundary into a whole
    step of its scale, moving a few outputs by far more than 1e-4. So: nearly every
    output within 1e-4 (measured: 99% on the 4-block test BERT, batch 2 x 9), and the
    pooled outputs' cosine at least `check`'s 0.999 for int8 models."""
    if not static:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        return
    assert np.isclose(got, want, atol=1e-4, rtol=1e-4).mean() >= 0.95
    a, b = got.reshape(got.shape[0], -1, got.shape[-1]).mean(axis=1), want.reshape(want.shape[0], -1,
                                                                                   want.shape[-1]).mean(axis=1)
    cosine = (a * b).sum(axis=-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.999, cosine


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_unstructured_int8_without_vnni_runs_on_the_fp32_sparse_kernel_exactly(tmp_path, mode):
    """An unstructured 90% model quantized: its 4-blocks would store about 3x the nonzeros,
    so a CPU without VNNI runs its layers on the FP32 sparse kernel (int8.Int8OnFloat),
    whose float sums are the integer ones; with VNNI, on the int8 kernel. Either way what
    the graph says (static: see _assert_as_the_graph)."""
    from conftest import MODELS_DIR
    from sparsejit.kernels.int8 import host_dots

    from sparsejit.quantize import quantize_model

    out = tmp_path / f"{mode}.onnx"
    quantize_model(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx", out, mode)
    model = sparsejit.load(out)
    encoder = [lp for lp in model.layers if "encoder" in lp.name]
    assert {lp.kind for lp in encoder} == {"int8"}
    on_float = ["on the FP32 sparse kernel" in lp.reason for lp in encoder]
    assert all(on_float) if "vnni" not in host_dots() else not any(on_float)
    for batch, seq in [(1, 5), (2, 23)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        for g, w in zip(model.run(feeds), _oracle(out, feeds)):
            _assert_as_the_graph(g, w, static=mode == "static")
    assert model.check().ok


@pytest.mark.usefixtures("whole_batches")
def test_an_unpruned_model_quantized_static_loads_and_runs_as_the_graph(tmp_path):
    """`sparsejit quantize --mode static` on an unpruned encoder: its layers are dense, on
    Int8Dense, which quantizes x itself. Where the CPU has AMX the load races it against
    AMX's kernel, each as the model runs it; it was timed on x's bytes as the sparse kernels
    are, which Int8Dense has no entry for, and the load raised AttributeError."""
    import onnx
    from encoders import EncoderSpec, make_encoder

    from sparsejit.quantize import quantize_model

    spec = EncoderSpec(hidden=64, heads=2, ffn=128, sparsity=0.0, vocab=128, seed=1)  # (calibration ids < 100)
    onnx.save(make_encoder(spec), tmp_path / "dense.onnx")
    out = quantize_model(tmp_path / "dense.onnx", tmp_path / "static.onnx", "static")
    model = sparsejit.load(out, plan=tmp_path / "plan.json")  # (decided afresh: not the cache's plan)
    assert all(lp.kind == "int8" for lp in model.layers if "MatMul" in lp.name)
    for batch, seq in [(1, 5), (2, 23), (8, 60)]:  # (480 tokens: AMX for a layer whose ByTokens takes it from 384)
        feeds = make_inputs(model.input_names, batch, seq, seed=seq, vocab=spec.vocab)
        for g, w in zip(model.run(feeds), _oracle(out, feeds)):
            _assert_as_the_graph(g, w, static=True)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_per_element_chains_on_bytes_become_one_lookup(dtype):
    """DequantizeLinear of 8-bit x, then per-element ops with scalar constants (a GELU as
    QOperator writes it, requantized on the way, and a power that overflows for some
    bytes): one Lookup node whose table the ops computed, so compiled and reference runs
    agree exactly, on every byte; a value read twice ends the chain there, and ops of two
    such values of x that save a gather (the Muls of d and `twice`, d and y) are Lookups
    of x too (fuse_byte_functions), so no DequantizeLinear stays."""
    from onnx import TensorProto, helper, numpy_helper

    onnx_type = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    c = {"s": np.float32(0.07), "z": dtype(3), "root2": np.float32(1.4142135), "one": np.float32(1.0),
         "s2": np.float32(0.02), "z2": dtype(-100 if dtype == np.int8 else 7), "big": np.float32(60.0),
         "p": np.float32(40.0)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("Div", ["d", "root2"], ["a"]),
             helper.make_node("Erf", ["a"], ["e"]),
             helper.make_node("QuantizeLinear", ["e", "s2", "z2"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s2", "z2"], ["d2"]),
             helper.make_node("Add", ["one", "d2"], ["y"]),                    # constant first
             helper.make_node("Mul", ["y", "big"], ["b"]),
             helper.make_node("Pow", ["b", "p"], ["overflow"]),
             helper.make_node("Add", ["y", "overflow"], ["twice"]),          # y read twice: the chain ends at y
             helper.make_node("Mul", ["d", "twice"], ["both"]),              # d read by a Mul of two values too
             helper.make_node("Mul", ["d", "y"], ["scaled"])]                # (finite: x · GELU's table, say)
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx_type, [None, 300])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in ("y", "twice", "both", "scaled")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    compiled, reference = sparsejit.load(model), sparsejit.load(model, mode="reference")
    lookups = [n.attrs["ops"] for n in _unfolded(compiled.graph) if n.op_type == "Lookup"]
    assert ["DequantizeLinear", "Div", "Erf", "QuantizeLinear", "DequantizeLinear", "Add"] in lookups, lookups
    assert {n.op_type for n in _unfolded(compiled.graph)} == {"Lookup"}
    assert [n.inputs for n in _unfolded(compiled.graph)] == [["x"]] * 4
    x = np.resize(np.arange(256, dtype=np.uint8).view(dtype), (3, 300))
    for feed in (x, x[:, ::-1], x[:0]):
        got, want = compiled.run({"x": feed}), reference.run({"x": feed})
        for g, w in zip(got, want):
            assert g.shape == w.shape
            np.testing.assert_array_equal(g, w)
        assert np.isinf(want[1]).any() or not feed.size


def test_quantize_then_dequantize_is_one_pass():
    """DequantizeLinear(QuantizeLinear(x)) with the same scale and zero point → one
    FakeQuantize node reading x, equal to the pair on every value (ties, both ends of the
    range, NaN); the QuantizeLinear stays where another node reads its bytes, and a pair
    with another scale is left as it is."""
    from onnx import TensorProto, helper, numpy_helper

    c = {"s": np.float32(0.25), "z": np.uint8(100), "s2": np.float32(0.5)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
             helper.make_node("DequantizeLinear", ["q", "s2", "z"], ["other_scale"]),
             helper.make_node("QuantizeLinear", ["y", "s", "z"], ["q2"]),
             helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y2"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                               for o in ("y", "other_scale", "y2")],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    compiled, reference = sparsejit.load(model), sparsejit.load(model, mode="reference")
    ops = [n.op_type for n in _unfolded(compiled.graph)]
    assert ops.count("FakeQuantize") == 2 and ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    x = (np.random.default_rng(0).standard_normal((5, 64)) * 40).astype(np.float32)
    x[0, :6] = [0.125, 0.375, -25.125, 1e9, -1e9, np.nan]  # ties, past either end, NaN
    for g, w in zip(compiled.run({"x": x}), reference.run({"x": x})):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
@pytest.mark.parametrize("scale", [0.09, -0.09, 0.0])
def test_quantized_softmax_is_exact(dtype, scale):
    """QuantizeLinear(Softmax(DequantizeLinear(bytes))) over the last axis → one QSoftmax
    node (exponentials from a table numpy's exp filled at load), equal to the three ops on
    every row: random bytes, a row of one byte, a row holding both ends of the type, rows
    of 1, 7 and 300 (where a total summed otherwise than the reference differs: tried, a
    float32 running sum fails). The last axis named by its index is the last axis; a
    QSoftmax over another axis runs its reference. The input scale positive, negative (the
    largest value at the smallest byte) and 0 (the kernel's value-by-value path)."""
    from onnx import TensorProto, helper, numpy_helper

    onnx_type = TensorProto.UINT8 if dtype == np.uint8 else TensorProto.INT8
    # a fine output step (1/4096), so that an ulp in the row's total moves some outputs by a step
    c = {"s": np.float32(scale), "z": dtype(10), "ps": np.float32(1 / 4096),
         "pz": dtype(0 if dtype == np.uint8 else -128)}
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["d"]),
             helper.make_node("Softmax", ["d"], ["p"], axis=-1),
             helper.make_node("QuantizeLinear", ["p", "ps", "pz"], ["y"]),
             helper.make_node("Softmax", ["d"], ["p0"], axis=0),
             helper.make_node("QuantizeLinear", ["p0", "ps", "pz"], ["y0"]),
             helper.make_node("Softmax", ["d"], ["p1"], axis=1),
             helper.make_node("QuantizeLinear", ["p1", "ps", "pz"], ["y1"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx_type, [None, None])],
                              [helper.make_tensor_value_info(o, onnx_type, None) for o in ("y", "y0", "y1")],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    compiled, reference = sparsejit.load(model), sparsejit.load(model, mode="reference")
    assert sorted(n.attrs["axis"] for n in compiled.graph.nodes if n.op_type == "QSoftmax") == [-1, 0, 1]
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype)
    for n in (1, 7, 300):
        x = rng.integers(info.min, info.max + 1, (400, n)).astype(dtype)
        x[1] = x[1, 0]
        x[2, :2] = [info.min, info.max] if n > 1 else info.max
        for g, w in zip(compiled.run({"x": x}), reference.run({"x": x})):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("form", FORMS)
def test_each_int8_layer_against_the_fp32_weights_it_came_from(form):
    """`check --fp32`'s rows: every int8 layer found in the FP32 file it was quantized from,
    its weight within int8's rounding of the FP32 one (symmetric per channel: a step of
    max|w| / 127, so a relative error of about 0.3 steps over the weights' spread, under
    2% here) with every pruned zero still zero, and its output on the FP32 model's own
    activations close to the FP32 layer's. Against another model's weights of the same
    shapes, the same measure says they differ."""
    from conftest import MODELS_DIR

    from sparsejit.quantize import layer_errors

    model = sparsejit.load(INT8 / f"bert_block4_p90_int8_{form}.onnx")
    fp32 = sparsejit.load(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx")
    feeds = make_inputs(fp32.input_names, 2, 13)
    rows = layer_errors(model, fp32, feeds)
    assert len(rows) == sum(lp.int8 for lp in model.layers) >= 12
    for r in rows:
        assert r["fp32_layer"] is not None and r["zeros_kept"], r
        assert 0 < r["weight_error"] < 0.02, r
        if "output_cosine" in r:  # not where a quantized GELU runs outside the int8 layer (static files)
            assert r["output_cosine"] > 0.99 and r["output_error"] < 0.2, r
    assert sum("output_cosine" in r for r in rows) >= (12 if form == "dynamic" else 8)
    other = sparsejit.load(MODELS_DIR / "roberta_sdpa_h128_op17_legacy_p90.onnx")
    matched = [r for r in layer_errors(model, other, make_inputs(other.input_names, 2, 13)) if r["fp32_layer"]]
    assert matched and all(r["weight_error"] > 0.5 for r in matched), matched


def test_check_with_fp32_shows_each_layer_and_refuses_a_model_without_int8(tmp_path):
    import subprocess
    import sys

    from conftest import MODELS_DIR

    fp32 = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"
    cmd = [sys.executable, "-m", "sparsejit", "check", str(INT8 / "bert_block4_p90_int8_dynamic.onnx"),
           "--fp32", str(fp32), "--seq", "9"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "each int8 layer against the FP32 layer it came from" in p.stdout and "zeros kept" in p.stdout
    p = subprocess.run([*cmd[:4], str(fp32), *cmd[5:]], capture_output=True, text=True, check=False)
    assert p.returncode != 0 and "has no int8 layer" in p.stdout + p.stderr, p.stdout + p.stderr
    other = MODELS_DIR / "distilbert_eager_h64_op11_legacy_p90.onnx"  # not the file it came from
    p = subprocess.run([*cmd[:6], str(other), *cmd[7:]], capture_output=True, text=True, check=False)
    assert p.returncode != 0 and "give the FP32 file it was quantized from" in p.stdout + p.stderr, p.stdout


@pytest.mark.parametrize("dtype", [np.uint16, np.int16])
def test_16_bit_activations_are_not_quantized_to_bytes(dtype):
    """A QDQ MatMul whose activations are quantized to 16 bits (onnxruntime's
    activation_type=QUInt16) reads x on a grid of 65536 steps; the int8 kernels quantize
    x to bytes, so such a MatMul must not become an int8 layer (it did, and its outputs
    were off by 0.2 on the test BERT). It runs on the float kernels, as the graph says."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w = (rng.integers(-127, 128, (48, 24)) * (rng.random((48, 24)) < 0.2)).astype(np.int8)
    c = {"xs": np.float32(1e-4), "xz": dtype(30000 if dtype == np.uint16 else 100), "w": w,
         "ws": (rng.random(24) * 0.01 + 0.001).astype(np.float32), "wz": np.zeros(24, np.int8)}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    compiled, reference = sparsejit.load(model), sparsejit.load(model, mode="reference")
    assert {lp.kind for lp in compiled.layers} != {"int8"}, [lp.kind for lp in compiled.layers]
    x = rng.standard_normal((9, 48)).astype(np.float32)
    np.testing.assert_allclose(compiled.run({"x": x})[0], reference.run({"x": x})[0], atol=1e-5, rtol=1e-5)


def test_each_driver_compiles_once_for_the_int8_forms_and_token_counts():
    """A fresh process running the static and the dynamic model at 16 tokens (buffers of
    whole 64-byte rows: contiguous) and 21 (padded rows: views), x handed over as bytes
    or quantized by the layer, compiles each Numba function of the drivers that only
    read their arrays (ANY_LAYOUT) once: every extra signature is another compile
    in a first load on an empty cache (compile._any_layout; bench/README, twelfth session)."""
    import json
    import subprocess
    import sys

    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import sparsejit
from conftest import make_inputs
from sparsejit.kernels import compile as c
for form in ("sparseml", "dynamic"):
    m = sparsejit.load({str(INT8)!r} + f"/bert_block4_p90_int8_{{form}}.onnx")
    for batch, seq in ((1, 16), (2, 21), (1, 16)):
        m.run(make_inputs([i.name for i in m.inputs], batch, seq))
counts = {{f"{{name}}": [str(s) for s in f.signatures] for mod in c._loaded.values() if vars(mod).get("ANY_LAYOUT")
          for name, f in vars(mod).items() if getattr(f, "signatures", None)}}
print(json.dumps(counts))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    counts = json.loads(p.stdout.strip().splitlines()[-1])
    assert "run_columns" in counts and "run_quantize" in counts and ("run_rows" in counts or "run_amx" in counts), counts
    assert all(len(sigs) == 1 for sigs in counts.values()), {k: v for k, v in counts.items() if len(v) > 1}


def test_the_int8_probe_is_exact_at_the_extremes():
    """plan.int_weight_probe sums in float32 pieces of PROBE_ROWS inputs: exact against
    integer arithmetic for weights all at -128 or 127 (every piece at its largest sum),
    for input counts of one piece, several, and a partial last one."""
    from sparsejit.plan import PROBE_ROWS, int_probe_input, int_weight_probe

    for k in (PROBE_ROWS, 3 * PROBE_ROWS + 7, 3072, 5):
        for fill in (-128, 127):
            w = np.full((k, 3), fill, np.int8)
            w[::7, 1] = 0
            exact = int_probe_input(k).astype(np.int64) @ w.astype(np.int64)
            assert np.array_equal(int_weight_probe(w), exact)


# --- the kernel with outputs in the lanes (kernels/lanes_ir.py) -----------------------------

def _lanes_cpu() -> None:
    from sparsejit.kernels.int8 import has_lanes

    if not has_lanes():
        pytest.skip("this CPU has no AVX-512 VBMI (vpermi2b) and VNNI")


@pytest.mark.parametrize(("k", "m", "tokens", "activation", "residual", "mode"), [
    (768, 3072, 128, "gelu", False, "static"),   # whole token tiles, 6 windows
    (3072, 768, 37, "none", True, "static"),     # a partial last tile, 24 windows
    (100, 48, 13, "none", False, "static"),      # inputs not a multiple of 4, 8 (rows of 4-blocks) or 128
    (130, 32, 1, "gelu_tanh", True, "dynamic"),  # a window of 2 inputs; one token; x's range per call
    (768, 2304, 203, "none", False, "dynamic"),
])
def test_the_lanes_kernel_gives_the_4_block_kernels_outputs_bit_for_bit(k, m, tokens, activation, residual, mode):
    """Int8Lanes against Int8Chunked (the same epilogue, the integer sums exact in both) and,
    with no activation, against numpy: the int64 sums, then float32 · scale + bias (+ the
    residual), as lowp_ir.scaled_sums computes them. Also on x's bytes (from_quantized, as a
    LayerNorm hands them over), and its weights rebuilt from the slots."""
    _lanes_cpu()
    from sparsejit.kernels.int8 import Int8Chunked, Int8Lanes, byte_rows, quantize_x

    rng = np.random.default_rng(k + m + tokens)
    w = rng.integers(-128, 128, (k, m)).astype(np.int8)
    w[rng.random((k, m)) < 0.9] = 0
    w[:, 5] = 0  # an output with no weights
    w[:3, 7] = 127  # and one with a window's first inputs at the extreme
    scale = ((rng.random(m) + 0.5) * 0.01).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    args = (w, scale, mode, np.float32(0.05) if mode == "static" else None, np.uint8(3) if mode == "static" else None,
            bias, activation, residual)
    lanes, blocks = Int8Lanes(*args), Int8Chunked(*args)
    assert np.array_equal(lanes.dense_weight(), w)
    x = (rng.standard_normal((tokens, k)) * 3).astype(np.float32)
    r = rng.standard_normal((tokens, m)).astype(np.float32) if residual else None
    got = lanes(x, r)
    np.testing.assert_array_equal(got, blocks(x, r))
    if activation == "none":
        q, xs, zero = quantize_x(x, mode, lanes.x_scale, lanes.x_zero_point)
        sums = (q.astype(np.int64) - zero) @ w.astype(np.int64)
        mult = scale if mode == "static" else np.float32(xs) * scale
        want = sums.astype(np.float32) * mult + bias
        np.testing.assert_array_equal(got, want + r if residual else want)
    if mode == "static":
        q = quantize_x(x, mode, lanes.x_scale, lanes.x_zero_point)[0]
        rows = byte_rows(np.pad(q, ((0, 0), (0, -k % 4))).view(np.int32))
        np.testing.assert_array_equal(lanes.from_quantized(rows, (tokens,), r), got)
    assert lanes(x[:0], r[:0] if residual else None).shape == (0, m)


def test_int8_layers_take_the_lanes_kernel_for_scattered_weights_only(monkeypatch):
    """The planner's rule (plan.LANES_WORTH): 90% unstructured → Int8Lanes, 80% in 4-blocks →
    the 4-block kernel; without VBMI, or with outputs not in groups of 16, the 4-block kernel."""
    _lanes_cpu()
    from sparsejit.kernels.int8 import Int8Chunked, Int8Lanes

    from sparsejit import plan

    rng = np.random.default_rng(0)
    scattered = rng.integers(-128, 128, (768, 768)).astype(np.int8)
    scattered[rng.random(scattered.shape) < 0.9] = 0
    blocked = rng.integers(-128, 128, (768, 768)).astype(np.int8)
    blocked *= np.repeat(rng.random((192, 768)) < 0.2, 4, axis=0)

    def kernel(w):
        a = {"weight": w, "scale": np.float32(0.01), "mode": "static", "x_scale": np.float32(0.1),
             "x_zero_point": np.uint8(0), "bias": None, "activation": "none", "residual": False}
        return plan._int8(a, plan._int8_weight_facts(w))[0]

    assert kernel(scattered) is Int8Lanes and kernel(blocked) is Int8Chunked
    assert kernel(scattered[:, :760]) is Int8Chunked
    monkeypatch.setattr(plan, "has_lanes", lambda: False)
    assert kernel(scattered) is Int8Chunked


def test_an_unstructured_int8_model_on_the_lanes_kernel_computes_what_the_graph_says(monkeypatch):
    """tests/models/int8/roberta_p90_int8_sparseml.onnx (unstructured 90%, static INT8 in
    SparseML's form): every encoder layer on Int8Lanes where the CPU has VBMI; what the graph
    says for several shapes with padding, and bit for bit what the 4-block kernel gives.
    (kernels="sparse": where the CPU has AMX, its dense kernel is not raced against them.)"""
    from sparsejit.kernels.int8 import Int8Lanes, has_lanes

    from sparsejit import plan

    path = INT8 / "roberta_p90_int8_sparseml.onnx"
    model = sparsejit.load(path, kernels="sparse")
    kernels = {type(getattr(lp.impl, "group", lp.impl)) for lp in model.layers if "encoder" in lp.name}
    assert (kernels == {Int8Lanes}) if has_lanes() else (Int8Lanes not in kernels)
    monkeypatch.setattr(plan, "LANES_WORTH", 0.0)
    blocks = sparsejit.load(path, kernels="sparse")
    assert Int8Lanes not in {type(getattr(lp.impl, "group", lp.impl)) for lp in blocks.layers}
    for batch, seq in [(1, 7), (3, 20), (2, 37)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        got = model.run(feeds)
        for g, w, b in zip(got, _oracle(path, feeds), blocks.run(feeds)):
            _assert_as_the_graph(g, w, static=True)
            np.testing.assert_array_equal(g, b)


def test_the_lanes_kernel_hands_its_output_over_quantized_bit_for_bit():
    """FFN1 → FFN2 as executor.TokenChain runs them: a static layer whose output the next
    static layer reads stores it as that layer's bytes (quantized_for), which the next runs
    on (from_quantized). Between Int8Lanes and Int8Chunked both ways, with x quantized or
    given as bytes: the same output as the plain path, bit for bit."""
    _lanes_cpu()
    from sparsejit.kernels.int8 import Int8Chunked, Int8Lanes, byte_rows, quantize_x

    rng = np.random.default_rng(7)

    def weight(k, m):
        w = rng.integers(-128, 128, (k, m)).astype(np.int8)
        w[rng.random((k, m)) < 0.9] = 0
        return w

    w1, w2 = weight(200, 64), weight(64, 48)
    x = (rng.standard_normal((37, 200)) * 2).astype(np.float32)
    r = rng.standard_normal((37, 48)).astype(np.float32)
    for first, second in [(Int8Lanes, Int8Lanes), (Int8Chunked, Int8Lanes), (Int8Lanes, Int8Chunked)]:
        a = first(w1, np.float32(0.01), "static", np.float32(0.04), np.uint8(5), None, "gelu", False)
        b = second(w2, np.float32(0.02), "static", np.float32(0.03), np.uint8(128), None, "none", True)
        assert a.hands_to(b)
        want = b(a(x), r)
        np.testing.assert_array_equal(b.from_quantized(a.quantized_for(x, b), (37,), r), want)
        q = np.pad(quantize_x(x, "static", a.x_scale, a.x_zero_point)[0], ((0, 0), (0, 4 - 200 % 4 if 200 % 4 else 0)))
        given = np.ascontiguousarray(q).view(np.int32)
        np.testing.assert_array_equal(b.from_quantized(a.quantized_for(x, b, given), (37,), r), want)
        assert byte_rows(given).shape[0] == 50


THREADS_AT_ONCE = """
import sys, threading
import numpy as np
from conftest import make_inputs
import sparsejit
model = sparsejit.load(sys.argv[1], num_threads=2, kernels="sparse")
assert any(type(getattr(lp.impl, "group", lp.impl)).__name__ == "Int8Lanes" for lp in model.layers)
feeds = [make_inputs(model.input_names, 2, seq, seed=seq) for seq in (19, 37, 64)]
want = [model.run(f) for f in feeds]
bad = []
def worker(i):
    for r in range(30):
        f = (i + r) % 3
        if not all(np.array_equal(a, b) for a, b in zip(model.run(feeds[f]), want[f])):
            bad.append(f)
threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
for t in threads: t.start()
for t in threads: t.join()
print(len(bad))
"""


def test_a_model_on_the_lanes_kernel_runs_in_several_threads_at_once(tmp_path):
    """Three threads running one INT8 model on Int8Lanes layers at once, on inputs of
    different shapes, get each input's outputs as a lone run does (the kernel's rows of
    calls and its scratch are per call). In a subprocess: a race could crash."""
    import os
    import subprocess
    import sys

    _lanes_cpu()
    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", THREADS_AT_ONCE, str(INT8 / "roberta_p90_int8_sparseml.onnx")],
                       capture_output=True, text=True, env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "0", p.stdout


def _requantizing_case(tokens: int, k: int, m: int) -> tuple:
    """(rng, a 90%-sparse int8 weight [k, m], its scales, a QLinearMatMul's requantize rows for
    an int8 output of zero point 3, x [tokens, k], a residual [tokens, m])."""
    rng = np.random.default_rng(tokens)
    w = rng.integers(-128, 128, (k, m)).astype(np.int8)
    w[rng.random((k, m)) < 0.9] = 0
    scale = ((rng.random(m) + 0.5) * 0.002).astype(np.float32)
    requantize = np.stack([np.full(m, 0.05, np.float32), np.full(m, -128 - 3, np.float32),
                           np.full(m, 127 - 3, np.float32)])
    x = (rng.standard_normal((tokens, k)) * 4).astype(np.float32)
    return rng, w, scale, requantize, x, rng.standard_normal((tokens, m)).astype(np.float32)


@pytest.mark.parametrize("tokens", [1, 37])
def test_the_lanes_kernel_requantizes_as_the_int8_kernel_does(tokens):
    """A QLinearMatMul's output (QOperator files): the scaled sums clamped to the output
    type's range, rounded half to even and scaled back, then the bias; Int8Lanes bit for
    bit Int8Linear, which the QOperator tests hold to ONNX Runtime."""
    _lanes_cpu()
    from sparsejit.kernels.int8 import Int8Lanes, Int8Linear

    rng, w, scale, requantize, x, r = _requantizing_case(tokens, 300, 64)
    args = (w, scale, "static", np.float32(0.05), np.uint8(128), rng.standard_normal(64).astype(np.float32), "none",
            True, requantize)
    lanes, plain = Int8Lanes(*args), Int8Linear(*args)
    got = lanes(x, r)
    np.testing.assert_array_equal(got, plain(x, r))
    np.testing.assert_array_equal(got, lanes.reference(x, r))
    clamped = (got - r - plain.bias) / np.float32(0.05)
    assert np.allclose(clamped, np.rint(clamped), atol=1e-3) and np.isclose(np.abs(clamped - 0.5).max(), 131.5)  # (clamped)
    assert not lanes.hands_to(lanes)


@pytest.mark.parametrize("tokens", [1, 37, 130])
def test_the_amx_kernel_requantizes_as_the_int8_kernel_does(tokens):
    """A QLinearMatMul's output on AMX's tiles (amx_ir's `requantize`: QOperator files' int8
    layers): bit for bit Int8Linear's, whose QOperator tests hold it to ONNX Runtime, with
    and without a residual and GELU, its tiles compressed and dense."""
    from sparsejit.kernels.amx import Int8Amx, has_amx
    from sparsejit.kernels.int8 import Int8Linear

    if not has_amx("int8"):
        pytest.skip("no AMX-INT8 on this CPU (or no permission for its tiles)")
    rng, w, scale, requantize, x, r = _requantizing_case(tokens, 300, 72)
    for activation, residual in [("none", True), ("gelu", False), ("none", False)]:
        args = (w, scale, "static", np.float32(0.05), np.uint8(128), rng.standard_normal(72).astype(np.float32),
                activation, residual)
        want = Int8Linear(*args, requantize)(x, r if residual else None)
        for compressed in (True, False):
            amx = Int8Amx(*args, compressed=compressed, requantize=requantize)
            assert amx.config.requantize and amx.config.compressed == compressed
            np.testing.assert_array_equal(amx(x, r if residual else None), want, err_msg=f"{activation} {compressed}")


@pytest.mark.parametrize(("k", "m", "tokens", "requantize", "signed", "mode"), [
    (768, 48, 128, True, False, "static"),    # whole tiles, a QLinearMatMul's requantized sums (QOperator's Q, K, V)
    (256, 32, 37, False, True, "static"),     # a partial last tile, int8 bytes
    (130, 16, 5, True, True, "static"),       # a window of 2 inputs, one partial tile
    (384, 64, 1030, False, False, "static"),  # a batch's tokens
    (256, 32, 37, False, False, "dynamic"),   # x's scale from its range, per call
])
def test_the_lanes_kernel_stores_each_outputs_quantized_bytes(k, m, tokens, requantize, signed, mode):
    """Int8Lanes.bytes_for (lanes_ir's `bytes_out`): each output quantized on its own grid
    as QuantizeLinear quantizes the float y the kernel gives, bit for bit; from x (its
    scale static or dynamic), and from x's bytes as a LayerNorm or row group hands them
    over."""
    _lanes_cpu()
    from sparsejit.kernels.int8 import Int8Lanes

    rng = np.random.default_rng(tokens)
    w = rng.integers(-128, 128, (k, m)).astype(np.int8)
    w[rng.random((k, m)) < 0.9] = 0
    scale = ((rng.random(m) + 0.5) * 0.002).astype(np.float32)
    req = np.stack([np.full(m, 0.05, np.float32), np.full(m, -131, np.float32), np.full(m, 124, np.float32)])
    static = mode == "static"
    layer = Int8Lanes(w, scale, mode, np.float32(0.05) if static else None, np.uint8(128) if static else None,
                      rng.standard_normal(m).astype(np.float32), "none", False, req if requantize else None)
    x = (rng.standard_normal((1, tokens, k)) * 4).astype(np.float32)
    y = layer(x)
    lo, hi = (-128, 127) if signed else (0, 255)
    grids = np.stack([rng.uniform(0.01, 0.05, m), rng.integers(lo + 20, hi - 20, m), np.full(m, lo),
                      np.full(m, hi)]).astype(np.float32)
    want = np.clip(np.rint(y / grids[0]) + grids[1], grids[2], grids[3]).astype(np.int8 if signed else np.uint8)
    assert len(np.unique(want)) > 40  # (not saturated)
    terms = layer.bytes_terms(grids)
    got = layer.bytes_for(x, terms)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if not static:  # (bytes are handed over to static layers only)
        return
    xq = np.clip(np.rint(x / np.float32(0.05)) + 128, 0, 255).astype(np.uint8)  # (x's bytes, as handed over)
    padded = np.zeros((tokens, -(-k // 4) * 4), np.uint8)
    padded[:, :k] = xq[0]
    np.testing.assert_array_equal(layer.bytes_for(None, terms, padded.view(np.int32)[None]), want)


def test_qoperator_q_k_and_v_are_stored_as_their_quantizelinears_bytes(monkeypatch):
    """plan.hand_quantized_outputs: QOperator's Q, K and V projections (one lanes kernel)
    each read by a QuantizeLinear alone store those bytes themselves, and the
    QuantizeLinears are no longer steps. Outputs bit for bit those of a load without it, at
    several shapes with padding; `Model.values` still gives the floats, the same. (VNNI's
    kernels forced: where the CPU has AMX, its requantizing kernel may win the race.)"""
    _lanes_cpu()
    from sparsejit import plan

    path = INT8 / "bert_op14_p90_int8_qoperator.onnx"
    model = sparsejit.load(path, kernels="sparse")
    groups = [s for s in model._executor.steps if s.lean is not None and s.node.op_type == "QLinearGroup"]
    assert len(groups) == 2 and all(len(s.node.outputs) == 6 for s in groups)
    kinds = [s.node.op_type for s in model._executor.steps]
    monkeypatch.setattr(plan, "QUANTIZED_OUTPUTS", False)
    plain = sparsejit.load(path, kernels="sparse")
    assert [s.node.op_type for s in plain._executor.steps].count("QuantizeLinear") == kinds.count("QuantizeLinear") + 6
    _same_outputs_and_floats(model, plain, [o for s in groups for o in s.lean[0]])


def _same_outputs_and_floats(model, plain, floats: list[str]) -> None:
    """model (bytes handed over) and plain (a load without) give the same outputs, bit for
    bit, at several shapes with padding, and the same `floats` (the values a lean run
    leaves out) when asked for them."""
    for batch, seq in [(1, 7), (3, 20), (2, 37), (1, 64)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        for g, p, name in zip(model.run(feeds), plain.run(feeds), model.output_names):
            np.testing.assert_array_equal(g, p, err_msg=f"{name} {batch} {seq}")
        got, want = model.values(feeds, floats), plain.values(feeds, floats)
        for name in floats:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _block4_layer_data(rng) -> tuple:
    """(in, out, an int8 weight [in, out] 80% pruned in 4-blocks, a QLinearMatMul's output
    grid per output as Int8Linear's `requantize` takes it)."""
    k, m = 200, 48
    w = rng.integers(-128, 128, (k, m)).astype(np.int8)
    w[rng.random((k // 4, m)).repeat(4, axis=0) < 0.8] = 0  # (4-blocks)
    req = np.stack([np.full(m, 0.05, np.float32), np.full(m, -128 - 3, np.float32), np.full(m, 127 - 3, np.float32)])
    return k, m, w, req


@pytest.mark.parametrize("dot", ["vnni", "pmaddwd", "generic"])
def test_the_4_block_int8_layer_runs_on_bytes_handed_over(dot):
    """Int8Linear (a QLinearMatMul's requantized output on 4-block weights; every int8
    layer where the CPU has no VNNI) on x's bytes as a row group, a LayerNorm or
    attention hands them over (from_quantized) gives what it gives on x, bit for bit,
    with each dot product this CPU runs: requantized or not, residual or not, tokens off
    16 and none."""
    from sparsejit.kernels.int8 import Int8Linear, host_dots
    from sparsejit.kernels.rows import quad_bytes

    if dot not in host_dots():
        pytest.skip(f"this CPU does not run {dot}")
    rng = np.random.default_rng(11)
    k, m, w, req = _block4_layer_data(rng)
    grid = np.array([0.05, 128, 0, 255], np.float32)
    for requantize, residual in [(req, False), (None, True)]:
        layer = Int8Linear(w, ((rng.random(m) + 0.5) * 0.002).astype(np.float32), "static", np.float32(0.05),
                           np.uint8(128), rng.standard_normal(m).astype(np.float32), "none", residual, requantize, dot=dot)
        assert layer.reads_bytes(grid)
        for n in (0, 5, 37):
            x = (rng.standard_normal((n, k)) * 3).astype(np.float32)
            r = rng.standard_normal((n, m)).astype(np.float32) if residual else None
            want = layer(x, r)
            got = layer.from_quantized(quad_bytes(x, grid).T, (n,), r)
            np.testing.assert_array_equal(got, want, err_msg=f"{n} {requantize is not None}")
            assert n == 0 or len(np.unique(want)) > 20


@pytest.mark.parametrize("dot", ["vnni", "pmaddwd", "generic"])
def test_the_4_block_int8_layer_stores_each_outputs_quantized_bytes(dot):
    """Int8Linear.bytes_for (int8_ir's `bytes_out`): each output quantized on its own grid
    as QuantizeLinear quantizes the float y the kernel gives, bit for bit, with each dot
    product this CPU runs: requantized or not, int8 and uint8 grids, tokens off 16 and
    none; from x (its scale static or dynamic) and from x's bytes handed over."""
    from sparsejit.kernels.int8 import Int8Linear, host_dots
    from sparsejit.kernels.rows import quad_bytes

    if dot not in host_dots():
        pytest.skip(f"this CPU does not run {dot}")
    rng = np.random.default_rng(12)
    k, m, w, req = _block4_layer_data(rng)
    x_grid = np.array([0.05, 128, 0, 255], np.float32)
    for requantize, signed, mode in [(req, False, "static"), (None, True, "static"), (req, True, "dynamic")]:
        static = mode == "static"
        layer = Int8Linear(w, ((rng.random(m) + 0.5) * 0.002).astype(np.float32), mode,
                           np.float32(0.05) if static else None, np.uint8(128) if static else None,
                           rng.standard_normal(m).astype(np.float32), "none", False, requantize, dot=dot)
        lo, hi = (-128, 127) if signed else (0, 255)
        grids = np.stack([rng.uniform(0.01, 0.05, m), rng.integers(lo + 20, hi - 20, m), np.full(m, lo),
                          np.full(m, hi)]).astype(np.float32)
        terms = layer.bytes_terms(grids)
        for n in (0, 5, 37, 130):
            x = (rng.standard_normal((1, n, k)) * 3).astype(np.float32)
            y = layer(x)
            want = np.clip(np.rint(y / grids[0]) + grids[1], grids[2], grids[3]).astype(np.int8 if signed else np.uint8)
            got = layer.bytes_for(x, terms)
            assert got.dtype == want.dtype and got.shape == want.shape == (1, n, m)
            np.testing.assert_array_equal(got, want, err_msg=f"{n} {mode} {signed}")
            assert n < 37 or len(np.unique(want)) > 40  # (not saturated)
            if static:
                given = quad_bytes(x, x_grid)
                np.testing.assert_array_equal(layer.bytes_for(None, terms, given), want, err_msg=f"{n} given")


def test_qoperator_layers_on_the_lanes_kernel_take_every_byte_handed_to_them(monkeypatch):
    """With every layer of the written-out QOperator BERT on the lanes kernel (LANES_WORTH
    raised), all three hand-overs run: the row groups' bytes (hand_row_bytes), Q, K and V
    as their QuantizeLinears' bytes (hand_quantized_outputs), and attention's bytes,
    dequantized on the grid its dense layer quantizes to, straight to that layer
    (hand_dequantized_bytes, through rows.bytes_rows). Outputs bit for bit those of a load
    with none of them, at several shapes with padding; every float left out, when asked
    for, the same. (VNNI's kernels forced, as above.)"""
    _lanes_cpu()
    from sparsejit import plan

    path = INT8 / "bert_op14_p90_int8_qoperator.onnx"
    monkeypatch.setattr(plan, "LANES_WORTH", 100.0)
    model = sparsejit.load(path, kernels="sparse")
    lean = [s for s in model._executor.steps if s.lean is not None]
    kinds = [s.node.op_type for s in lean]
    assert (kinds.count("RowGroup"), kinds.count("QLinearGroup"), kinds.count("DequantizeLinear")) == (6, 2, 2), kinds
    for flag in ("ROW_BYTES", "QUANTIZED_OUTPUTS", "DEQUANTIZED_BYTES"):
        monkeypatch.setattr(plan, flag, False)
    plain = sparsejit.load(path, kernels="sparse")
    assert not any(s.lean for s in plain._executor.steps)
    _same_outputs_and_floats(model, plain, [o for s in lean for o in s.lean[0]])


def test_a_4_block_qoperator_model_hands_bytes_to_its_4_block_layers(monkeypatch):
    """The QOperator BERT pruned in 4-blocks runs its requantized layers on Int8Linear,
    which reads the bytes the row groups and attention hand over, and stores Q, K and V as
their QuantizeLinears' bytes (int8_ir's `bytes_out`): outputs bit for bit those
    of a load without the hand-overs, the floats left out the same when asked for."""
    from sparsejit import plan

    path = INT8 / "bert_block4_p90_int8_qoperator.onnx"
    model = sparsejit.load(path)
    lean = [s for s in model._executor.steps if s.lean is not None]
    assert {s.node.op_type for s in lean} >= {"RowGroup", "DequantizeLinear", "QLinearGroup"}, \
        [s.node.op_type for s in lean]
    assert any(type(s.impl).__name__ == "Int8Linear" and s.optional for s in model._executor.steps)
    for flag in ("ROW_BYTES", "QUANTIZED_OUTPUTS", "DEQUANTIZED_BYTES"):
        monkeypatch.setattr(plan, flag, False)
    _same_outputs_and_floats(model, sparsejit.load(path), [o for s in lean for o in s.lean[0]])


def test_bytes_rows_moves_every_bit_pattern():
    """rows.bytes_rows moves each token's four bytes as one float through the tiled
    transpose: every pattern, NaNs with their payloads and signalling NaNs among them,
    comes out as it went in (rows.quad_bytes of the same bytes, on a grid that keeps them)."""
    from sparsejit.kernels import rows

    rng = np.random.default_rng(3)
    words = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF, 0x7F800000, 0xFFFFFFFF, 0x00000001], np.uint32)
    for shape in [(1, 128, 768), (2, 37, 64), (1, 1, 12), (3, 5, 10)]:
        b = rng.integers(0, 256, shape).astype(np.uint8)
        flat = b.reshape(-1)
        n = min(flat.size, 4 * words.size)
        flat[:n] = words.view(np.uint8)[:n]
        got = rows.bytes_rows(b)
        want = rows.quad_bytes(b.astype(np.float32), np.array([1, 0, 0, 255], np.float32))
        assert got.shape == want.shape == (*shape[:-1], -(-shape[-1] // 4))
        np.testing.assert_array_equal(np.ascontiguousarray(got), np.ascontiguousarray(want), err_msg=str(shape))
        np.testing.assert_array_equal(rows.bytes_rows(np.ascontiguousarray(b.swapaxes(0, 1)).swapaxes(0, 1)), got)


def test_written_out_layernorms_and_attention_in_qoperator_run_as_row_kernels():
    """ONNX Runtime's QOperator form of a BERT from before opset 17 writes each LayerNorm
    out, a dozen quantized ops (QLinearAdd, ReduceMean, Sub, Pow, ReduceMean, Sqrt as a
    lookup, Div, QLinearMul γ, QLinearAdd β), and its GELU as lookups around a QLinearMul.
    Each becomes one RowGroup, the GELU's ops after FFN1's bytes one Lookup of them
    (fuse.fuse_byte_functions); the kernels give bit for bit what the ops give one by one
    (lower.fuse_rows and fuse_byte_functions left out), at several shapes with padding.

    Against the oracle: within 1e-4, but where a byte of a quantized step lands on the
    neighbouring one. A mean is rounded to float32 after summing in some order (ONNX
    Runtime's own; numpy's pairwise one in the ops run one by one, sparsejit's reference
    too); one ulp apart, the quantized values after it can round to neighbouring bytes.
    The reference ops differ from ONNX Runtime so at 0.1% of the outputs at (3, 20). So
    the bound: 1e-4 at all but 1% of the elements, one step of the output's grid at
    most."""
    from sparsejit import fuse, lower

    path = INT8 / "bert_op14_p90_int8_qoperator.onnx"
    model = sparsejit.load(path)
    groups = [[m.op_type for m in n.attrs["nodes"]] for n in model.graph.nodes if n.op_type == "RowGroup"]
    layernorms = [g for g in groups if g.count("ReduceMean") == 2 and "Sqrt" not in g]  # (the root a lookup)
    assert len(layernorms) == 5, groups  # the embeddings' and two per block
    gelus = [g for g in groups if g == ["QuantizeLinear", "Lookup"]]
    assert len(gelus) == 2 and all(any("Erf" in m.attrs["ops"] and "Mul" in m.attrs["ops"] for m in n.attrs["nodes"]
                                       if m.op_type == "Lookup") for n in model.graph.nodes if n.op_type == "RowGroup"
                                   and [m.op_type for m in n.attrs["nodes"]] in gelus), groups
    kept = lower.LOWERING, fuse.PASSES
    lower.LOWERING = tuple(p for p in kept[0] if p is not lower.fuse_rows)
    fuse.PASSES = tuple(p for p in kept[1] if p is not fuse.fuse_byte_functions)
    try:
        by_op = sparsejit.load(path)
    finally:
        lower.LOWERING, fuse.PASSES = kept
    assert not any(n.op_type == "RowGroup" for n in by_op.graph.nodes)
    group, last = next((n, m) for n in model.graph.nodes if n.op_type == "RowGroup" for m in n.attrs["nodes"]
                       if m.outputs[0] == model.output_names[0])
    assert last.op_type == "FakeQuantize"
    step = float(group.attrs["consts"][last.inputs[1]])  # the output's grid
    for batch, seq in [(1, 7), (3, 20), (2, 37)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        got, plain, oracle = model.run(feeds), by_op.run(feeds), _oracle(path, feeds)
        for g, p, o, name in zip(got, plain, oracle, model.output_names):
            np.testing.assert_array_equal(g, p, err_msg=name)
            off = np.abs(g - o) > 1e-4 + 1e-4 * np.abs(o)
            assert off.mean() <= 0.01 and np.abs(g - o).max() <= 1.01 * step, (name, off.mean(), np.abs(g - o).max())


def test_row_groups_hand_their_bytes_to_the_int8_layers(monkeypatch):
    """plan.hand_row_bytes: in the written-out QOperator BERT, the GELU groups and the
    LayerNorm groups whose floats only a static int8 layer reads (FFN2, FFN1, QKV) store
    that layer's bytes instead, and the layer runs on them. Outputs bit for bit those of a load
    without it, at several shapes with padding, token-major and feature-major; where the
    floats are asked for (`Model.values`), the group makes them too, and they are the
    same."""
    from sparsejit.kernels.int8 import has_vnni

    from sparsejit import plan

    path = INT8 / "bert_op14_p90_int8_qoperator.onnx"
    model = sparsejit.load(path)
    lean = [s for s in model._executor.steps if s.lean is not None and s.node.op_type == "RowGroup"]
    if has_vnni():  # (the kernels chosen on such a CPU all read bytes: the embeddings' and each block's groups)
        assert len(lean) == 6 and all(s.node.op_type == "RowGroup" for s in lean), [s.node.name for s in lean]
    assert all(s.node.outputs[-1] == s.lean[0][0] + plan.BYTES_SUFFIX for s in lean)
    chosen = model._executor._schedule(tuple(model.graph.outputs), True)[0]
    assert sum(any(s.run is g.lean[1] for g in lean) for s in chosen) == len(lean)  # (the floats left out)
    monkeypatch.setattr(plan, "ROW_BYTES", False)
    plain = sparsejit.load(path)
    assert not any(s.lean for s in plain._executor.steps if s.node.op_type == "RowGroup")
    _same_outputs_and_floats(model, plain, [s.lean[0][0] for s in lean])


def _as_avx2(monkeypatch) -> None:
    """Row kernels built for an AVX2 CPU from here on (run on this one): no wide loops, no
    byte permutes."""
    from sparsejit.kernels import compile as compile_mod
    from sparsejit.kernels import rows

    for mod in (compile_mod, rows):
        monkeypatch.setattr(mod, "host_cpu", lambda: ("haswell", "+avx2,+fma,+f16c,+popcnt,+avx,+sse4.2"))
    assert not rows.wide_loops() and not rows.permutes()


def _row_cpu(permutes, monkeypatch) -> None:
    """The row kernels built with VBMI's byte permutes (True: skipped without them), without
    (False), or for an AVX2 CPU ("avx2")."""
    from sparsejit.kernels import rows

    if permutes is True and not rows.permutes():
        pytest.skip("no AVX-512 VBMI on this CPU")
    if permutes == "avx2":
        _as_avx2(monkeypatch)
    monkeypatch.setattr(rows, "permutes", lambda: permutes is True)


def _row_kernel_cases():
    """(group nodes, input names, outputs, constants): the groups fuse_rows makes of the
    written-out QOperator BERT (its LayerNorms, its GELU), and one of every op with a
    mean and bytes among its outputs, int8 and uint8 grids, and a vector constant."""
    from sparsejit.graph import Node

    model = sparsejit.load(INT8 / "bert_op14_p90_int8_qoperator.onnx")
    cases = [(n.attrs["nodes"], n.attrs["names"], n.attrs["outputs"], n.attrs["consts"])
             for n in model.graph.nodes if n.op_type == "RowGroup"]
    rng = np.random.default_rng(5)
    c = {"s1": np.float32(0.01), "z1": np.int8(-3), "s2": np.float32(0.05), "z2": np.uint8(120),
         "gamma": rng.uniform(0.5, 1.5, 48).astype(np.float32).reshape(1, 48), "two": np.float32(2.0)}
    table = np.cumsum(rng.uniform(0, 0.1, 256)).astype(np.float32)
    nodes = [Node("ReduceMean", "mu", ["x"], ["mu"], {"axes": [-1]}),
             Node("QuantizeLinear", "qm", ["mu", "s1", "z1"], ["qm"]),
             Node("Sub", "d", ["x", "mu"], ["d"]),
             Node("Mul", "g", ["d", "gamma"], ["g"]),
             Node("QuantizeLinear", "qg", ["g", "s2", "z2"], ["qg"]),
             Node("Lookup", "lk", ["qg"], ["lk"], {"table": table, "ops": ["Made up"], "min_rank": 1}),
             Node("DequantizeLinear", "dg", ["qg", "s2", "z2"], ["dg"]),
             Node("Add", "sum", ["lk", "y"], ["sum"]),
             Node("Sub", "out", ["sum", "dg"], ["out"]),
             Node("Pow", "p", ["d", "two"], ["p"]),
             Node("ReduceMean", "var", ["p"], ["var"], {"axes": [-1]}),
             Node("Sqrt", "sd", ["var"], ["sd"]),
             Node("Div", "z", ["d", "sd"], ["z"]),
             Node("FakeQuantize", "fz", ["z", "s2", "z2"], ["fz"])]
    cases.append((nodes, ["x", "y"], ["qm", "qg", "out", "fz"], c))
    return cases


@pytest.mark.parametrize("workers", [None, 1])
@pytest.mark.parametrize("permutes", [True, False, "avx2"])
@pytest.mark.parametrize("case", range(6))
def test_row_kernel_is_its_reference(case, permutes, workers, monkeypatch):
    """A RowKernel (kernels/rows.py) gives what its group's ops give one by one on numpy,
    bit for bit: token-major and feature-major inputs (a Linear kernel's output, rows
    padded or not) alike, each output written feature-major where an input lies so (the
    other inputs transposed), an input broadcast over the rows, inputs in reversed C order
    (run token-major); none (the ops run one by one) for no rows.

    With `quads` (plan.hand_row_bytes), a float value's bytes on an int8 layer's grid, as
    that layer's kernel reads x, are rows.quad_bytes of the reference's value: an output's
    or a Lookup's (from the table's bytes) left out of the outputs, on an int8 and a uint8
    grid; 42 features, so that the threads split a quad of features between them.

    A group with a mean to wait for and no mean among its outputs (the LayerNorms; the
    made-up group without its mean's bytes, case 5), feature-major, runs split on more
    than one thread (the parts taking features, each making every row's means from all
    parts' sums); made as for one thread (`workers`), blocked (every pass in one call,
    each row's means made in the kernel) from 65 tokens: the part taking rows.BLOCK tokens
    at a time, at 100 and 200 tokens in blocks and a remainder, and past rows.BLOCKED in
    passes over every token; token-major, blocked, the parts taking rows.

    Feature-major loops of 9 to 63 tokens run 16 floats a step, the last masked (but a
    Lookup's gather's). A Lookup whose bytes alone the group keeps (the GELU's, case 2) looks them up 64, 16,
    then 8 at a time (100 tokens: 64, 16, 16 and 4 alone; 13: 8 and 5 alone) by AVX-512
    VBMI's byte permutes where the CPU has them, and byte by byte without (`permutes`).
    Each part's rows of the call's scratch start on lines of their own (rows.PART_ROW). And all of it built for an AVX2 CPU ("avx2": LLVM's own loop
    widths, the division), run here."""
    from sparsejit.kernels import rows
    from sparsejit.kernels.compile import threads
    from sparsejit.kernels.layout import feature_major_empty

    cases = _row_kernel_cases()  # (loading a model: before the CPU is set)
    _row_cpu(permutes, monkeypatch)
    if workers:  # (the groups made as for one thread: feature-major LayerNorms blocked from 65 tokens)
        monkeypatch.setattr(rows, "threads", lambda: workers)
        threads = rows.threads
    gelu = [c for c in cases if any(m.op_type == "Lookup" and "Erf" in m.attrs["ops"] for m in c[0])]
    layernorms = [c for c in cases if [m.op_type for m in c[0]].count("ReduceMean") == 2]
    nodes, names, outputs, consts = [layernorms[0], layernorms[1], gelu[0], cases[-1], cases[-1], cases[-1]][case]
    if case == 5:
        outputs = outputs[1:]  # (not the mean's bytes: blocked)
    kernel = rows.RowKernel(nodes, names, outputs, consts)
    floats = [o for o in (*outputs, *(n.outputs[0] for n in nodes if n.op_type == "Lookup"))
              if kernel.values[o].kind == "row" and kernel._type(o) == np.float32]
    pick = floats[-1 if case != 3 else 0]  # (a LayerNorm's output, a GELU's Lookup; the made-up Sub, its Lookup)
    grid = np.array([0.05, -3, -128, 127] if case % 2 else [0.03, 120, 0, 255], np.float32)
    lean = [o for o in outputs if o != pick]
    with_bytes = rows.RowKernel(nodes, names, lean, consts, quads={pick: grid})
    n = next((c.size for c in consts.values() if c.size > 1), 42)
    rng = np.random.default_rng(case)
    def linear_output(x, padded):  # (as a Linear kernel writes y: each feature's tokens contiguous)
        t = feature_major_empty(n, x.size // n) if padded else np.empty((n, x.size // n), np.float32)
        t[:] = x.reshape(-1, n).T
        return t.T.reshape(x.shape)

    blocked = case in (0, 1, 5)
    for shape in [(2, 9, n), (1, 1, n), (3, n), (1, 5, n), (1, 13, n), (1, 100, n), (2, 100, n),
                  (1, 2 * rows.BLOCKED + 3, n)]:
        xs = [(rng.standard_normal(shape) * 3).astype(np.float32) for _ in names]
        if case == 4:
            xs[1] = xs[1][:1]  # y read broadcast over the rows
        for layout in ("feature", "token", "mixed", "padded", "reversed"):
            inputs = [linear_output(x, False) if layout == "feature" and x.shape == shape else x for x in xs]
            if layout in ("mixed", "padded"):  # (a Linear kernel's output and the residual stream in C order)
                inputs[0] = linear_output(xs[0], layout == "padded")
            if layout == "reversed":  # (C order reversed: the tokens not in C order, read token-major)
                inputs = [np.ascontiguousarray(x.T).T for x in xs]
            feature_major = np.prod(shape[:-1]) > 1 and (layout in ("feature", "mixed", "padded") or layout ==
                                                         "reversed" and sum(d > 1 for d in shape[:-1]) == 1)
            kernel._calls.clear()
            got = kernel(*inputs)
            want = rows.reference_rows(*inputs, nodes=nodes, names=names, outputs=outputs, consts=consts, opset=17)
            assert got is not None, (case, shape, layout)
            call, = kernel._calls.values()
            tokens = np.prod(shape[:-1])
            # (feature-major, a mean to wait for: split on more than one thread, or on one at up to
            # rows.SPLIT_MEANS tokens, the parts making the means in IR; else blocked up to rows.BLOCKED)
            spread = blocked and not call.token and (threads() > 1 or tokens <= rows.SPLIT_MEANS)
            assert call.blocked == (blocked and (call.token or not spread and tokens <= rows.BLOCKED * threads()))
            # (feature-major not blocked: rows.SPLIT parts a thread, which the threads claim from their ends)
            assert call.parts == threads() * (rows.SPLIT if not (call.token or call.blocked) and threads() > 1 else 1)
            assert call.split == (call.parts if spread else 0)
            parted = [sh for key, sh, _ in kernel._scratch_shapes(call.n, call.rows, call.parts, call.token,
                                                                   call.blocked, call.split)
                      if key[0] in ("temp", "quad temp") or key[0] == "sum" and not call.token]
            assert all(sh[-1] % rows.PART_ROW == 0 for sh in parted), parted
            for g, w, o in zip(got, want, outputs):
                assert g.dtype == w.dtype and g.shape == w.shape, (o, g.dtype, w.dtype, g.shape, w.shape)
                np.testing.assert_array_equal(g, w, err_msg=f"{o} {shape} {layout}")
                if g.shape[-1] > 1 and np.prod(shape[:-1]) > 1 and g.shape[:-1] == shape[:-1]:  # as the inputs lie
                    laid = np.reshape(g, (-1, n), copy=False)
                    assert (laid.strides[0] == g.itemsize) if feature_major else g.flags.c_contiguous, (o, layout)
            *others, quad = with_bytes(*inputs)
            value = rows.reference_rows(*inputs, nodes=nodes, names=names, outputs=[pick], consts=consts, opset=17)[0]
            want_bytes = rows.quad_bytes(value, grid)
            assert quad.shape == want_bytes.shape == (*shape[:-1], -(-n // 4)), (quad.shape, want_bytes.shape)
            np.testing.assert_array_equal(quad, want_bytes, err_msg=f"{pick} {shape} {layout}")
            for g, o in zip(others, lean):
                np.testing.assert_array_equal(g, want[outputs.index(o)], err_msg=o)
            assert len(np.unique(np.asarray(quad).view(np.uint8) if quad.flags.c_contiguous else
                                 np.ascontiguousarray(quad).view(np.uint8))) > 2  # (not saturated)
    # (feature-major loops of 9 to 63 tokens, 13 and 18 here, wide with their last step masked)
    assert any(key[4] for key in kernel._compiled) == rows.wide_loops()
    assert kernel(*[np.zeros((0, n), np.float32) for _ in names]) is None


def _quotient_inputs(s: float) -> np.ndarray:
    """Every float32 x with x / s in [32, 64) (one binade of them), every other one
    negated; the quotients' halfway points k + 1/2 for |k| < 300 and their neighbours;
    zeros, infinities, NaN, the largest and the subnormal floats; random bit patterns."""
    s32 = np.float32(s)
    start, stop = (np.float32(32) * s32).view(np.uint32), (np.float32(64) * s32).view(np.uint32)
    x = np.arange(start, stop, dtype=np.uint32).view(np.float32)
    x[1::2] *= -1
    half = ((np.arange(-300, 300) + 0.5) * np.float64(s32)).astype(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
                        1.1754942e-38, 1e-30, -1e-30], np.float32)
    noise = np.random.default_rng(3).integers(0, 2**32, 1 << 20, dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, half, np.nextafter(half, np.float32(np.inf)), np.nextafter(half, -np.float32(np.inf)),
                        special, noise])
    return np.concatenate([x, np.zeros(-len(x) % 256, np.float32)]).reshape(-1, 256)


@pytest.mark.parametrize("avx2", [False, True], ids=["host", "avx2"])
@pytest.mark.parametrize("s", [0.0123, 0.1, 3.0, 7.3e-5, 2.0**-70, 1e30])
def test_row_kernels_quantize_by_the_scales_inverse_bit_for_bit(s, avx2, monkeypatch):
    """A row kernel's QuantizeLinear and FakeQuantize in wide loops (rows.wide_loops:
    AVX-512, 32 floats a loop or more) divide by their scale without the divider where
    lowp_ir.inverse allows it (2^-64 <= scale <= 2^64): x times the scale's inverse,
    corrected by the exact remainder (lowp_ir.quotient_ir). Their values are those of the
    division, bit for bit, on every float of a binade of quotients, at the halfway points,
    on zeros, infinities (overflowing quotients), NaN, subnormals and random bit patterns,
    on int8 and uint8 grids, token-major and feature-major. Short rows, scales outside
    the bounds and AVX2 (code built for it, run here) divide."""
    from sparsejit.kernels import rows

    from sparsejit.graph import Node

    if avx2:
        _as_avx2(monkeypatch)

    consts = {"s": np.float32(s), "zu": np.uint8(100), "zi": np.int8(-10)}
    nodes = [Node("QuantizeLinear", "qu", ["x", "s", "zu"], ["qu"]),
             Node("QuantizeLinear", "qi", ["x", "s", "zi"], ["qi"]),
             Node("FakeQuantize", "fu", ["x", "s", "zu"], ["fu"]),
             Node("FakeQuantize", "fi", ["x", "s", "zi"], ["fi"])]
    outputs = ["qu", "qi", "fu", "fi"]
    kernel = rows.RowKernel(nodes, ["x"], outputs, consts)
    assert ((rows.INVERSE, "s") in kernel.scalars) == (2.0**-64 <= s <= 2.0**64)
    x = _quotient_inputs(s)
    with np.errstate(all="ignore"):
        want = rows.reference_rows(x, nodes=nodes, names=["x"], outputs=outputs, consts=consts, opset=17)
    for layout in ("token", "feature", "short rows"):
        given = x if layout == "token" else np.ascontiguousarray(x.T).T if layout == "feature" else x.reshape(-1, 16)
        got = kernel(given)
        assert got is not None
        wide = [key[2] for key in kernel._compiled]  # (loops of 16 floats: wide where the CPU has AVX-512)
        assert wide[-1] == (rows.wide_loops() and layout != "short rows"), (layout, wide)
        assert ("fma.f32" in kernel.source({}, layout != "feature", False, wide[-1]).split("declare")[0]) == (
            wide[-1] and 2.0**-64 <= s <= 2.0**64)  # (the quotient by the inverse)
        for g, w, o in zip(got, want, outputs):
            g, w = np.ascontiguousarray(g).reshape(x.shape), np.ascontiguousarray(w)
            bits = g.view(np.uint8 if g.itemsize == 1 else np.uint32)
            np.testing.assert_array_equal(bits, w.view(bits.dtype), err_msg=f"{o} {layout} scale {s}")


def test_a_row_kernel_called_from_several_threads_at_once_gives_each_its_own_result():
    """A RowKernel keeps one scratch per input layout (the kept values, the means' sums,
    the bytes' temporary rows), used by one call at a time: threads calling it at once
    on inputs of one layout (a blocked LayerNorm group, a GELU group storing bytes) each
    get their own input's result, bit for bit."""
    import threading

    from sparsejit.kernels import rows

    cases = _row_kernel_cases()
    layernorm = next(c for c in cases if [m.op_type for m in c[0]].count("ReduceMean") == 2)
    gelu = next(c for c in cases if any(m.op_type == "Lookup" and "Erf" in m.attrs["ops"] for m in c[0]))
    for nodes, names, outputs, consts in (layernorm, gelu):
        n = next((c.size for c in consts.values() if c.size > 1), 64)
        pick = outputs[-1] if len(outputs) else next(m.outputs[0] for m in nodes if m.op_type == "Lookup")
        kernel = rows.RowKernel(nodes, names, [o for o in outputs if o != pick], consts,
                                quads={pick: np.array([0.03, 120, 0, 255], np.float32)})
        rng = np.random.default_rng(3)
        inputs = []
        for _ in range(4):
            xs = [(rng.standard_normal((n, 100)) * 3).astype(np.float32).T for _ in names]  # (feature-major)
            inputs.append((xs, [np.array(a) for a in kernel(*xs)]))
        wrong = []

        def work(i, kernel=kernel, inputs=inputs, wrong=wrong):
            for _ in range(30):
                xs, want = inputs[i]
                got = kernel(*xs)
                wrong.extend(i for g, w in zip(got, want) if not np.array_equal(g, w))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not wrong, wrong


def test_row_kernels_on_one_thread_share_its_scratch_arena():
    """Row kernels work in their thread's scratch arena (layout.thread_arena): two kernels
    (a LayerNorm group, a GELU group storing bytes) taking turns on one thread at token
    counts up to 10000 (past BLOCKED: kept values [n, tokens]) each give the reference's
    result, bit for bit, and the arena holds at most twice the largest call's scratch (it
    doubles as it grows), not the sum over the kernels and their layouts."""
    from sparsejit.kernels import layout, rows

    cases = _row_kernel_cases()
    layernorm = next(c for c in cases if [m.op_type for m in c[0]].count("ReduceMean") == 2)
    gelu = next(c for c in cases if any(m.op_type == "Lookup" and "Erf" in m.attrs["ops"] for m in c[0]))
    kernels = []
    for nodes, names, outputs, consts in (layernorm, gelu):
        pick = outputs[-1] if len(outputs) else next(m.outputs[0] for m in nodes if m.op_type == "Lookup")
        grid = np.array([0.03, 120, 0, 255], np.float32)
        kernel = rows.RowKernel(nodes, names, [o for o in outputs if o != pick], consts, quads={pick: grid})
        n = next((c.size for c in consts.values() if c.size > 1), 64)
        kernels.append((kernel, nodes, names, [o for o in outputs if o != pick], consts, n, pick, grid))
    rng = np.random.default_rng(4)
    for tokens in (5, 10000, 6, 8000, 7, 10000, 300):
        for kernel, nodes, names, outputs, consts, n, pick, grid in kernels:
            xs = [(rng.standard_normal((n, tokens)) * 3).astype(np.float32).T for _ in names]  # (feature-major)
            got = kernel(*xs)
            want = rows.reference_rows(*xs, nodes=nodes, names=names, outputs=[*outputs, pick], consts=consts,
                                       opset=17)
            for g, w in zip(got[:len(outputs)], want):
                np.testing.assert_array_equal(g, w, err_msg=str(tokens))
            np.testing.assert_array_equal(np.ascontiguousarray(got[-1]), rows.quad_bytes(want[-1], grid))
    largest = max(c.scratch for kernel, *_ in kernels for c in kernel._calls.values())
    total = sum(c.scratch for kernel, *_ in kernels for c in kernel._calls.values())
    arena = layout.thread_arena(0)
    assert largest <= arena.nbytes <= 2 * largest and arena.nbytes < total, (largest, arena.nbytes, total)


@pytest.mark.parametrize("products", ["vnni", "vnni, its loops", "blas"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_quantized_attention_kernel_is_its_reference(dtype, products, monkeypatch):
    """QAttentionCore's kernel (kernels/elementwise.py) gives what its steps give on their
    reference ops, bit for bit: bytes of either type, in either order, masks of every
    broadcast shape, more keys than queries, values wider than keys, 300 keys; none (the reference runs) for a
    scale per axis. Its products by AVX-512 VNNI (exact in int32) where the CPU has it,
    and on BLAS in floats, exact in float32 up to 2^24, in float64 past. With VNNI, each row
    of scores' bytes by AVX-512 VBMI's byte permutes (row_bytes_ir) where the CPU has them,
    and by the kernel's own loops ("vnni, its loops"). It writes the heads merged ([b, rows,
    h, dv] in memory). A softmax over another axis than the last it leaves to the reference."""
    from sparsejit.kernels import elementwise as E
    from sparsejit.kernels.int8 import has_vnni

    from sparsejit.ops import exact_floats

    if products.startswith("vnni") and not has_vnni():
        pytest.skip("no AVX-512 VNNI on this CPU")
    if products == "vnni, its loops":
        monkeypatch.setattr(E, "row_bytes_kernel", lambda: 0)
        products = "vnni"
    monkeypatch.setattr(E, "qattention_products", lambda: products)
    assert E.qattention_products() == products

    rng = np.random.default_rng(7)
    zero = (lambda v: dtype(v if dtype == np.uint8 else v - 128))
    f32 = np.float32
    grid = [f32(0.08), zero(200)]
    # the softmax's bytes dequantized rising with them, falling (a negative scale), or all
    # one value (a zero scale): its top byte found by the bytes' order, or value by value.
    # (At ±1 the exponentials of a wrong top byte would overflow.)
    softmaxes = []
    for in_scale in (grid[0], -grid[0], f32(0), f32(1), f32(-1)):
        value, table = E.softmax_table(in_scale, grid[1])
        softmaxes.append({"in_scale": in_scale, "in_zero": grid[1], "out_scale": f32(1 / 255), "out_zero": zero(0),
                          "value": value, "table": table})
    assert [E._rising(x["in_scale"], x["in_zero"]) < 0 for x in softmaxes] == [False, False, True, False, False]
    qk = [f32(0.05), zero(131), f32(0.04), zero(120), f32(0.9), zero(125)]
    pv = [f32(1 / 255), zero(0), f32(0.03), zero(128), f32(0.02), zero(127)]
    lookup = E.dequantize(np.arange(256, dtype=np.uint8).view(dtype), qk[4], qk[5]) / f32(8)
    info = np.iinfo(dtype)
    for batch, heads, rows, d, t, dv, mask_shape in [(1, 4, 16, 8, 16, 8, (1, 1, 1, 16)), (2, 3, 5, 16, 11, 24, (2, 1, 1, 11)),
                                                      (2, 2, 7, 8, 7, 8, (2, 1, 7, 7)), (1, 2, 3, 8, 300, 8, (300,)),
                                                      (1, 2, 5, 6, 9, 5, (1, 1, 5, 9))]:
        q = rng.integers(info.min, info.max + 1, (batch, heads, rows, d)).astype(dtype)
        kt = rng.integers(info.min, info.max + 1, (batch, heads, d, t)).astype(dtype)
        v = rng.integers(info.min, info.max + 1, (batch, heads, t, dv)).astype(dtype)
        mask = np.where(rng.random(mask_shape) < 0.2, f32(-10000), f32(0)).astype(np.float32)
        # in C order, and each head's last two axes swapped in memory (a Linear kernel's
        # feature-major output, reshaped to heads, lies so)
        swapped = [np.ascontiguousarray(x.swapaxes(2, 3)).swapaxes(2, 3) for x in (q, kt, v)]
        for k, softmax in enumerate(softmaxes):
            kw = {"qk": qk, "lookup": lookup, "grid": grid, "softmax": softmax, "pv": pv}
            want = E.reference_qattention(q, kt, mask, v, **kw)
            for inputs in [(q, kt, v), swapped]:
                got = E.qattention(*inputs[:2], mask, inputs[2], **kw)
                assert got is not None and got.dtype == want.dtype == dtype
                assert got.transpose(0, 2, 1, 3).flags.c_contiguous  # (the heads merged: what reads it is a view)
                np.testing.assert_array_equal(got, want, err_msg=str((batch, heads, rows, d, t, dv, mask_shape,
                                                                      inputs[0].strides, k)))
            assert k or len(np.unique(got)) > 8  # (not saturated)
            # (a softmax over another axis than the last: the reference's, which the node then runs)
            assert E.qattention(q, kt, mask, v, **dict(kw, softmax=dict(softmax, axis=2))) is None
    # (the probabilities' bytes sum to about 255, but their grid may let them all be 255)
    assert exact_floats(600, np.empty(0, dtype), pv[1], v, pv[3]) is np.float64  # 600 · 255 · 128 > 2^24
    assert exact_floats(500, np.empty(0, dtype), pv[1], v, pv[3]) is np.float32
    kw["softmax"] = softmaxes[0]
    per_axis = {**kw, "pv": [*pv[:2], np.full(dv, pv[2]), *pv[3:]]}
    assert E.qattention(q, kt, mask, v, **per_axis) is None


ATTENTION_AT_ONCE = """
import threading
import numpy as np
from sparsejit.kernels import elementwise as E

f32 = np.float32
value, table = E.softmax_table(f32(0.08), np.uint8(200))
kw = {"qk": [f32(0.05), np.uint8(131), f32(0.04), np.uint8(120), f32(0.9), np.uint8(125)],
      "lookup": (np.arange(256, dtype=np.float32) - 125) * f32(0.9 / 8), "grid": [f32(0.08), np.uint8(200)],
      "softmax": {"in_scale": f32(0.08), "in_zero": np.uint8(200), "out_scale": f32(1 / 255),
                  "out_zero": np.uint8(0), "value": value, "table": table},
      "pv": [f32(1 / 255), np.uint8(0), f32(0.03), np.uint8(128), f32(0.02), np.uint8(127)]}
attention = E.QAttention(**kw)
rng = np.random.default_rng(5)
inputs = []
for _ in range(4):
    q, kt, v = (rng.integers(0, 256, shape).astype(np.uint8) for shape in [(2, 4, 40, 16), (2, 4, 16, 40),
                                                                           (2, 4, 40, 16)])
    mask = np.where(rng.random((2, 1, 1, 40)) < 0.2, f32(-10000), f32(0))
    want = E.reference_qattention(q, kt, mask, v, **kw)
    assert np.array_equal(attention(q, kt, mask, v), want)
    inputs.append(((q, kt, mask, v), want))
wrong = []

def work(i):
    for _ in range(40):
        args, want = inputs[i]
        if not np.array_equal(attention(*args), want):
            wrong.append(i)

threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
assert len(attention._calls) == 1
print(len(wrong))
"""


def test_quantized_attention_called_from_several_threads_at_once_gives_each_its_own_result(tmp_path):
    """QAttention keeps, per input shape and layout, its rows of slots and calls and its
    kernel's scratch, used by one call at a time: threads calling it at once on inputs of
    one shape each get their own inputs' result, bit for bit. In a subprocess: a race
    could crash."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", ATTENTION_AT_ONCE], capture_output=True, text=True, env=env,
                       check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "0", p.stdout


def test_dequantized_embedding_tables_are_the_dequantized_table_bit_for_bit():
    """fuse.dequantize_gathered_tables: a byte table's values made once per byte, then
    gathered, are the table dequantized element by element, bit for bit (int8 and uint8,
    a zero point or none); a table of wider integers is dequantized as it is."""
    from sparsejit import fuse
    from sparsejit.graph import Graph, InputSpec, Node
    from sparsejit.ops import evaluate

    rng = np.random.default_rng(4)
    for dtype, zero in [(np.int8, np.int8(-3)), (np.uint8, np.uint8(131)), (np.uint8, None), (np.int32, np.int32(7))]:
        info = np.iinfo(dtype)
        table = rng.integers(max(info.min, -300), min(info.max, 300) + 1, (50, 12)).astype(dtype)
        params = {"s": np.float32(0.0371), **({"z": zero} if zero is not None else {})}
        nodes = [Node("Gather", "g", ["table", "ids"], ["rows"], {"axis": 0}),
                 Node("DequantizeLinear", "dq", ["rows", "s", "z" if zero is not None else ""], ["y"])]
        graph = Graph(nodes, [InputSpec("ids", np.dtype(np.int64), (3,))], ["y"], {"table": table, **params}, 17)
        fused = fuse.dequantize_gathered_tables(graph)
        assert [n.op_type for n in fused.nodes] == ["Gather"]
        got = fused.constants[fused.nodes[0].inputs[0]]
        want = evaluate("DequantizeLinear", [table, params["s"], zero], {}, 17, 1)[0]
        assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want), dtype


def test_row_groups_never_read_what_they_write():
    """lower.fuse_rows: a row op that reads its group's value and, through an op outside
    the group, its group's value again (B, then Tanh(B), both into C) cannot join that
    group (run as one, it would wait on itself): C starts a group of its own, after the
    Tanh. The groups run what the graph says (float ops: bit for bit the reference)."""
    from onnx import TensorProto, helper, numpy_helper

    c = {"two": np.float32(2), "one": np.float32(1), "three": np.float32(3)}
    nodes = [helper.make_node("Mul", ["x", "two"], ["a"]), helper.make_node("Sub", ["a", "one"], ["b"]),
             helper.make_node("Tanh", ["b"], ["t"]), helper.make_node("Add", ["b", "t"], ["c"]),
             helper.make_node("Mul", ["c", "three"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 24])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in c.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    compiled, reference = sparsejit.load(model), sparsejit.load(model, mode="reference")
    ops = [n.op_type for n in compiled.graph.nodes]
    groups = [[m.outputs[0] for m in n.attrs["nodes"]] for n in compiled.graph.nodes if n.op_type == "RowGroup"]
    assert ops == ["RowGroup", "Tanh", "RowGroup"] and groups == [["a", "b"], ["c", "d"]], (ops, groups)
    x = np.random.default_rng(0).standard_normal((3, 5, 24)).astype(np.float32)
    np.testing.assert_array_equal(compiled.run({"x": x})[0], reference.run({"x": x})[0])


FUSED_AT_ONCE = """
import sys, threading
import numpy as np
from conftest import make_inputs
import sparsejit
model = sparsejit.load(sys.argv[1], num_threads=2)
ops = {n.op_type for n in model.graph.nodes}
assert "RowGroup" in ops and (sys.argv[2] not in ops) == (sys.argv[3] == "0"), ops
feeds = [make_inputs(model.input_names, b, seq, seed=seq) for b, seq in ((1, 19), (2, 37), (3, 64))]
got = {}
def worker(i):  # the first runs of each shape race to write each row kernel's IR
    for r in range(10):
        f = (i + r) % 3
        got.setdefault(f, []).append(model.run(feeds[f]))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
for t in threads: t.start()
for t in threads: t.join()
want = [model.run(f) for f in feeds]
print(sum(not all(np.array_equal(a, b) for a, b in zip(out, want[f])) for f, outs in got.items() for out in outs))
"""


@pytest.mark.parametrize("file, attention", [("bert_block4_p90_int8_qoperator.onnx", 1),
                                             ("bert_op14_p90_int8_qoperator.onnx", 0)])
def test_a_qoperator_model_runs_in_several_threads_at_once(tmp_path, file, attention):
    """Three threads running one QOperator model from its first run, on inputs of
    different shapes and layouts: its RowGroup and QAttentionCore kernels give each input
    what a lone run does, while the threads write their kernels. In a subprocess: a race
    could crash."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", FUSED_AT_ONCE, str(INT8 / file), "QAttentionCore", str(attention)],
                       capture_output=True, text=True, env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "0", p.stdout


EDGES_AND_FORK = """
import os, sys
import numpy as np
from conftest import make_inputs
import sparsejit
from sparsejit.graph import Node
from sparsejit.kernels import elementwise as E, rows

# a row group over one feature, one row, no rows
nodes = [Node("ReduceMean", "mu", ["x"], ["mu"], {"axes": [-1]}), Node("Sub", "d", ["x", "mu"], ["d"]),
         Node("FakeQuantize", "f", ["d", "s", "z"], ["f"])]
consts = {"s": np.float32(0.02), "z": np.uint8(128)}
kernel = rows.RowKernel(nodes, ["x"], ["f", "mu"], consts)
for shape in [(1, 1), (3, 1), (1, 1, 5), (2, 1, 1)]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = kernel(x)
    want = rows.reference_rows(x, nodes=nodes, names=["x"], outputs=["f", "mu"], consts=consts, opset=17)
    assert got is not None and all(np.array_equal(g, w) for g, w in zip(got, want)), shape
assert kernel(np.zeros((0, 4), np.float32)) is None and kernel(np.zeros((2, 0), np.float32)) is None
# the same group storing f's bytes (plan.hand_row_bytes), and bytes moved to 4-block rows, at the edges
grid = np.array([0.02, 128, 0, 255], np.float32)
with_bytes = rows.RowKernel(nodes, ["x"], ["mu"], consts, quads={"f": grid})
for shape in [(1, 1), (3, 1), (1, 1, 5), (2, 1, 1), (1, 300, 3)]:
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    f = rows.reference_rows(x, nodes=nodes, names=["x"], outputs=["f"], consts=consts, opset=17)[0]
    assert np.array_equal(np.ascontiguousarray(with_bytes(x)[1]), np.ascontiguousarray(rows.quad_bytes(f, grid)))
assert with_bytes(np.zeros((0, 4), np.float32)) is None
for shape in [(0, 8), (1, 0, 4), (1, 1, 1), (2, 3, 5)]:
    assert rows.bytes_rows(np.zeros(shape, np.uint8)).shape == (*shape[:-1], -(-shape[-1] // 4))
# feature-major (each feature's tokens contiguous), a group with a mean to wait for (no mean
# among its outputs): made for two threads, split (its parts making the means in IR) at any
# length; for one, split at two tokens, blocked at one block and one more, neither past
# BLOCKED a part; a Lookup kept as bytes alone (permuted 64 at a time with VBMI) at 2 to 130 tokens
lookup = [Node("QuantizeLinear", "q", ["x", "s", "z"], ["q"]),
          Node("Lookup", "l", ["q"], ["l"], {"table": np.linspace(-1, 1, 256, dtype=np.float32), "ops": ["Made up"],
                                             "min_rank": 1})]
real_threads = rows.threads
for workers, made in [(2, [(False, True)] * 4), (1, [(False, False), (False, True), (True, False), (True, False)])]:
    rows.threads = lambda: workers
    blocked = rows.RowKernel(nodes, ["x"], ["f"], consts)
    looked = rows.RowKernel(lookup, ["x"], [], consts, quads={"l": grid})
    for tokens, n in [(2, 2), (65, 3), (4 * rows.BLOCKED + 1, 2), (130, 5)]:
        x = np.ascontiguousarray(np.random.default_rng(2).standard_normal((n, tokens)).astype(np.float32)).T
        want = rows.reference_rows(x, nodes=nodes, names=["x"], outputs=["f"], consts=consts, opset=17)[0]
        assert np.array_equal(blocked(x)[0], want), (tokens, n)
        l = rows.reference_rows(x, nodes=lookup, names=["x"], outputs=["l"], consts=consts, opset=17)[0]
        assert np.array_equal(np.ascontiguousarray(looked(x)[0]), np.ascontiguousarray(rows.quad_bytes(l, grid)))
    assert sorted((c.blocked, c.split > 0) for c in blocked._calls.values()) == made, (workers, made)
rows.threads = real_threads
from sparsejit.kernels.int8 import Int8Lanes, Int8Linear, has_lanes
layers = [Int8Linear(np.ones((64, 16), np.int8), np.full(16, 0.01, np.float32), "static", np.float32(0.05),
                     np.uint8(128), None, "none", False, None)]
if has_lanes():
    layers.append(Int8Lanes(np.ones((64, 16), np.int8), np.full(16, 0.01, np.float32), "static", np.float32(0.05),
                            np.uint8(128), None, "none", False, None))
for layer in layers:  # (Q, K and V as bytes: no tokens, one)
    terms = layer.bytes_terms(np.stack([np.full(16, 0.1), np.full(16, 3), np.zeros(16), np.full(16, 255)]))
    for shape in [(0, 64), (1, 0, 64), (1, 1, 64)]:
        assert layer.bytes_for(np.zeros(shape, np.float32), terms).shape == (*shape[:-1], 16)

# attention with one query, one key, one feature
f32 = np.float32
value, table = E.softmax_table(f32(0.1), np.uint8(200))
kw = {"qk": [f32(0.05), np.uint8(128), f32(0.05), np.uint8(128), f32(0.3), np.uint8(128)],
      "lookup": np.linspace(-1, 1, 256).astype(np.float32), "grid": [f32(0.1), np.uint8(200)],
      "softmax": {"in_scale": f32(0.1), "in_zero": np.uint8(200), "out_scale": f32(1 / 255),
                  "out_zero": np.uint8(0), "value": value, "table": table},
      "pv": [f32(1 / 255), np.uint8(0), f32(0.05), np.uint8(128), f32(0.05), np.uint8(128)]}
q, kt, v = (np.full((1, 1, 1, 1), 200, np.uint8) for _ in range(3))
mask = np.zeros((1, 1, 1, 1), np.float32)
assert np.array_equal(E.qattention(q, kt, mask, v, **kw), E.reference_qattention(q, kt, mask, v, **kw))
# no keys: the reference's softmax over none refuses, and the kernel hands it over
assert E.qattention(q, kt[..., :0], mask[..., :0], v[:, :, :0], **kw) is None
# no features in q and kᵀ (sums of none), no values, no heads: the kernel, as the reference
for q, kt, v in [(q[..., :0], kt[:, :, :0], v), (q, kt, v[..., :0]), (q[:, :0], kt[:, :0], v[:, :0])]:
    assert np.array_equal(E.qattention(q, kt, mask, v, **kw), E.reference_qattention(q, kt, mask, v, **kw))

# whole models at one token, then a forked child running them at another shape
for path in sys.argv[1:]:
    model = sparsejit.load(path, num_threads=2)
    one = model.run(make_inputs(model.input_names, 1, 1))
    assert all(np.isfinite(o).all() for o in one)
    feeds = make_inputs(model.input_names, 2, 9, seed=3)
    want = model.run(feeds)
    pid = os.fork()
    if pid == 0:
        got = model.run(feeds)
        os._exit(0 if all(np.array_equal(g, w) for g, w in zip(got, want)) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
print("ok")
"""


def test_row_and_attention_kernels_at_the_edges_and_in_a_forked_child(tmp_path):
    """In a subprocess (a crash would take the test runner down): a row group over rows of
    one feature, one row or none (also storing a value's bytes), feature-major row groups
    (blocked, and a Lookup kept as bytes) at two tokens to past BLOCKED, bytes moved to
    4-block rows, Int8Linear and the lanes kernel storing bytes for no tokens or one, and
    QAttentionCore (its rows' bytes by VBMI where the CPU has it) with
    one query, key and feature or no keys, give their references' results or hand over
    (None); the two QOperator test models
    run at one token, and a child forked after they ran runs them again to the same
    outputs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    files = [str(INT8 / f) for f in ("bert_op14_p90_int8_qoperator.onnx", "bert_block4_p90_int8_qoperator.onnx")]
    p = subprocess.run([sys.executable, "-c", EDGES_AND_FORK, *files], capture_output=True, text=True, env=env,
                       check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[-1] == "ok", p.stdout


@pytest.mark.parametrize("name", ["roberta_p90_int8_sparseml", "bert_block4_p90_int8_dynamic"])
def test_quantized_files_under_bf16_stay_near_the_graph(name):
    """precision="bf16" on a quantized file: its int8 layers as they are, attention's
    products (the RoBERTa file's fused attention) and any float layer in bfloat16, so the
    outputs move from float32's, within test_bf16's bound of what the graph says: max
    |error| ≤ 2⁻⁵ of the output's largest magnitude, cosine ≥ 0.999."""
    from sparsejit.kernels.bf16 import has_bf16

    if not has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    path = INT8 / f"{name}.onnx"
    model, fp32 = sparsejit.load(path, precision="bf16"), sparsejit.load(path)
    assert model.precision == "bf16" and any(lp.kind == "int8" for lp in model.layers)
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        got = model.run(feeds)
        assert not all(np.array_equal(g, f) for g, f in zip(got, fp32.run(feeds))), "nothing ran in bf16"
        for g, w, out in zip(got, _oracle(path, feeds), model.output_names):
            g, w = g.reshape(-1).astype(np.float64), w.reshape(-1).astype(np.float64)
            assert np.abs(g - w).max() <= 2.0 ** -5 * np.abs(w).max(), (name, out, np.abs(g - w).max())
            assert g @ w >= 0.999 * np.linalg.norm(g) * np.linalg.norm(w), (name, out)
