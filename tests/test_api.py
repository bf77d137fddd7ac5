"""The API around run(): input forms, output selection, bad input, bad files, check()."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR, assert_parity, make_inputs, ort_run
from onnx import TensorProto, helper

import sparsejit
from sparsejit import tape

BERT = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"


@pytest.fixture(scope="module")
def bert():
    return sparsejit.load(BERT)


def test_names(bert):
    assert bert.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert bert.output_names == ["last_hidden_state", "pooler_output"]


def test_list_inputs_in_graph_order_and_output_selection(bert):
    feeds = make_inputs(bert.input_names, 2, 9)
    full = bert.run(feeds)
    as_list = bert.run([feeds[n] for n in bert.input_names])
    for a, b in zip(full, as_list):
        np.testing.assert_array_equal(a, b)
    (pooled,) = bert.run(feeds, output_names=["pooler_output"])
    np.testing.assert_array_equal(pooled, full[1])
    swapped = bert.run(feeds, output_names=["pooler_output", "last_hidden_state"])
    np.testing.assert_array_equal(swapped[1], full[0])


def test_values_of_inner_tensors_and_one_layer_on_them(bert):
    """`values` gives any tensor of the compiled graph by name (what the layer-by-layer
    tools read); a layer run on its own input gives its output as the whole model does."""
    feeds = make_inputs(bert.input_names, 2, 9)
    first, last = bert.layers[0], bert.layers[-1]
    names = [first.node.inputs[0], first.node.outputs[0], "last_hidden_state"]
    got = bert.values(feeds, names + [names[0]])
    assert list(got) == names
    np.testing.assert_array_equal(got["last_hidden_state"], bert.run(feeds)[0])
    np.testing.assert_allclose(bert.run_layer(first, got[names[0]]).reshape(got[names[1]].shape), got[names[1]],
                               rtol=1e-6, atol=1e-6)
    assert bert.values(feeds, []) == {}
    with pytest.raises(ValueError, match="no tensor named .'nope'. in the compiled graph"):
        bert.values(feeds, ["nope", last.node.inputs[0]])


def test_outputs_are_plain_c_ordered_arrays(bert):
    """The kernels leave feature-major views; callers get C-ordered copies, equal to ORT's."""
    feeds = make_inputs(bert.input_names, 3, 20)
    outs = bert.run(feeds)
    assert all(o.flags.c_contiguous and o.flags.writeable and o.dtype == np.float32 for o in outs)
    assert_parity(outs, ort_run(BERT, feeds), bert.output_names)


def test_attention_mask_is_prepared_once_per_run():
    """Where every layer's Attention reads one mask (eager exports; SDPA exports compute one
    per layer), its kernel layout is built by one step, and the layers agree with ORT
    under padding that differs per row."""
    path = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"
    model = sparsejit.load(path)
    steps = model._executor.steps
    prepare = [s for s in steps if s.node.op_type == "PrepareMask"]
    attention = [s for s in steps if s.node.op_type == "AttentionCore"]
    assert len(prepare) == 1 and len(attention) > 1
    assert all(s.node.inputs[3] == prepare[0].node.outputs[0] for s in attention)
    feeds = make_inputs(model.input_names, 3, 11)
    feeds["attention_mask"][1, 6:] = 0
    feeds["attention_mask"][2, 2:] = 0
    assert_parity(model.run(feeds), ort_run(path, feeds), model.output_names)


def test_nodes_computing_the_same_op_of_the_same_values_are_made_one():
    """fold.merge_duplicates: two nodes of one op, attributes and inputs (a small constant's
    value standing for its name) become the first; another attribute, another value, a large
    constant's other name, or a graph output of its own keep a node apart."""
    from sparsejit.fold import SMALL, merge_duplicates
    from sparsejit.graph import Graph, InputSpec, Node

    big = np.zeros(SMALL + 1, np.float32)
    consts = {"c1": np.array(0.5, np.float32), "c2": np.array(0.5, np.float32), "c3": np.array(0.25, np.float32),
              "w1": big, "w2": big.copy()}
    nodes = [Node("Mul", "a", ["x", "c1"], ["a"]), Node("Mul", "b", ["x", "c2"], ["b"]),  # (same: b is a)
             Node("Mul", "c", ["x", "c3"], ["c"]),  # (another constant's value)
             Node("Add", "d", ["b", "w1"], ["d"]), Node("Add", "e", ["a", "w2"], ["e"]),  # (large: by name)
             Node("Softmax", "f", ["x"], ["f"], {"axis": -1}), Node("Softmax", "g", ["x"], ["g"], {"axis": 0}),
             Node("Add", "h", ["a", "w1"], ["h"]),  # (is d, once b is a)
             Node("Mul", "i", ["x", "c1"], ["out2"])]  # (a graph output: kept)
    inputs = [InputSpec("x", np.dtype(np.float32), ())]
    g = merge_duplicates(Graph(nodes, inputs, ["c", "d", "e", "f", "g", "out2"], consts, 17, "test"))
    assert [n.name for n in g.nodes] == ["a", "c", "d", "e", "f", "g", "i"]
    assert g.nodes[2].inputs == ["a", "w1"]  # (d reads a now; h, the same, is gone)
    g = merge_duplicates(Graph(nodes, inputs, ["d", "h"], consts, 17, "test"))
    assert "h" in [n.name for n in g.nodes]  # (h a graph output: kept)


def test_only_requested_output_after_other_shapes(bert):
    """Asking for one output first must still leave the shape cache complete for the other."""
    feeds = make_inputs(bert.input_names, 1, 13)
    (pooled,) = bert.run(feeds, output_names=["pooler_output"])
    hidden, pooled2 = bert.run(feeds)
    np.testing.assert_array_equal(pooled, pooled2)
    assert_parity([hidden], ort_run(BERT, feeds)[:1], ["last_hidden_state"])


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.pop("attention_mask"), "missing ['attention_mask']"),
    (lambda f: f.update(extra=np.zeros((1, 4), np.int64)), "unknown ['extra']"),
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "expected dtype int64, got int32"),
    (lambda f: f.update(input_ids=f["input_ids"][0]), "expected rank 2"),
    (lambda f: f.update(attention_mask=np.ones((2, 4), np.int64)), "dimension 'batch' is 2"),
])
def test_bad_inputs_are_named(bert, mutate, message):
    feeds = make_inputs(bert.input_names, 1, 4)
    mutate(feeds)
    with pytest.raises(ValueError) as e:
        bert.run(feeds)
    assert message in str(e.value)


def test_bad_input_list_and_output_name(bert):
    feeds = make_inputs(bert.input_names, 1, 4)
    with pytest.raises(ValueError, match="expected 3 inputs"):
        bert.run([feeds["input_ids"]])
    with pytest.raises(ValueError, match="unknown output name"):
        bert.run(feeds, output_names=["logits"])
    with pytest.raises(TypeError, match="dict name -> array"):
        bert.run(feeds["input_ids"])


def test_token_id_out_of_range_names_the_node(bert):
    feeds = make_inputs(bert.input_names, 1, 4)
    feeds["input_ids"][0, 0] = 100000
    with pytest.raises(RuntimeError, match=r"word_embeddings/Gather.*out of range"):
        bert.run(feeds)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        sparsejit.load(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(ValueError, match="bad.onnx"):
        sparsejit.load(bad)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(BERT.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.onnx"):
        sparsejit.load(truncated)
    with pytest.raises(IsADirectoryError):
        sparsejit.load(tmp_path)


def _tiny(op_type: str, opset: int = 17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    node = helper.make_node(op_type, ["x"], ["y"], name="my_node")
    return helper.make_model(helper.make_graph([node], "g", [x], [y]),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_is_refused_at_load():
    with pytest.raises(sparsejit.UnsupportedModelError) as e:
        sparsejit.load(_tiny("Relu"))
    msg = str(e.value)
    assert "'Relu'" in msg and "'my_node'" in msg and "MatMul" in msg


def test_a_refusal_names_every_unsupported_op_with_its_count():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2"),
             helper.make_node("Selu", ["b"], ["c"], name="s1"), helper.make_node("Add", ["c", "x"], ["y"])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(sparsejit.UnsupportedModelError) as e:
        sparsejit.load(model)
    assert "3 node(s)" in str(e.value) and "'Relu' ×2 (first: node 'r1')" in str(e.value) \
        and "'Selu' ×1 (first: node 's1')" in str(e.value)


def test_old_op_definition_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    node = helper.make_node("Reshape", ["x"], ["y"], name="old_reshape", shape=[3, 2])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 4)])
    with pytest.raises(sparsejit.UnsupportedModelError, match="'old_reshape' uses Reshape-1"):
        sparsejit.load(model)


def test_external_data(tmp_path):
    model = onnx.load(str(BERT))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1024)
    assert (tmp_path / "ext.onnx.data").exists() and path.stat().st_size < BERT.stat().st_size / 4
    feeds = make_inputs(["input_ids", "attention_mask", "token_type_ids"], 2, 6)
    assert_parity(sparsejit.load(path).run(feeds), ort_run(BERT, feeds), ["hidden", "pooled"])
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(FileNotFoundError, match="external"):
        sparsejit.load(path)


def test_bad_options():
    with pytest.raises(ValueError, match="kernels must be one of"):
        sparsejit.load(BERT, kernels="fast")
    with pytest.raises(ValueError, match="mode must be one of"):
        sparsejit.load(BERT, mode="turbo")
    with pytest.raises(ValueError, match="num_threads"):
        sparsejit.load(BERT, num_threads=0)


def test_check_reports_every_layer_and_catches_a_broken_kernel():
    model = sparsejit.load(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", kernels="sparse")
    report = model.check()
    assert report.ok and len(report) == len(model.layers) == 13
    assert any(lp.pattern.block == 4 for lp in model.layers), "4-block pattern not detected"
    assert "max |err|" in str(report)
    # Corrupt one stored weight: check() must now fail that layer, and only that one, also
    # when the layer runs inside a grouped kernel (Q, K and V share one).
    for broken in [lp for lp in model.layers if lp.kind == "sparse"][:4]:
        kernel, start, stop = getattr(broken.impl, "group", broken.impl), getattr(broken.impl, "start", 0), \
            getattr(broken.impl, "stop", broken.impl.out_features)
        # The first stored weight of a row of this layer (slots hold rows in count order).
        slot = next(s for s in range(len(kernel.order))
                    if start <= kernel.order[s] < stop and kernel.indptr[s + 1] > kernel.indptr[s])
        at = kernel.indptr[slot] * broken.pattern.block
        kernel.values.flat[at] += 1.0
        report = model.check()
        assert not report.ok and [r.layer for r in report if not r.ok] == [broken.name]
        kernel.values.flat[at] -= 1.0
    assert model.check().ok


def test_kernel_source_is_printable(bert):
    sparse = next(lp for lp in bert.layers if lp.kind == "sparse")
    src = bert.kernel_source(sparse.name)
    assert "define void @sparse_rows" in src and "prange" in src
    assert bert.kernel_source(0) == bert.layers[0].impl.source or "dense" in bert.kernel_source(0)
    with pytest.raises(KeyError, match="no Linear layer"):
        bert.kernel_source("nope")


def test_repeat_runs_call_the_generated_forward(bert):
    """After the first run of a shape, runs go through the generated forward: new values
    at that shape still match ORT (padding differs by row), and its source is printable,
    one line per step, for the outputs asked for."""
    ex = bert._executor
    first = make_inputs(bert.input_names, 3, 17, seed=11)
    assert_parity(bert.run(first), ort_run(BERT, first), bert.output_names)
    signature = ex.signature(first)
    for seed in (12, 13):
        feeds = make_inputs(bert.input_names, 3, 17, seed=seed)
        feeds["attention_mask"][0, 17 - seed:] = 0
        assert_parity(bert.run(feeds), ort_run(BERT, feeds), bert.output_names)
    assert (signature, tuple(bert.output_names)) in ex._forwards
    src = bert.forward_source(first)
    assert "def forward(feeds):" in src and "del " in src
    steps = [line for line in src.splitlines() if "= step" in line]
    # the lowering passes' nodes are what runs, by name
    for kind in ("# AttentionCore ", "# LayerNorm ", "# LinearGroup ", "# Linear "):
        assert any(kind in line for line in steps), kind
    pooled_only = bert.forward_source(first, output_names=["pooler_output"])
    hidden_only = bert.forward_source(first, output_names=["last_hidden_state"])
    assert "pooler" in pooled_only and "pooler" not in hidden_only


def test_repeat_run_failure_names_the_node(bert):
    """A step failing inside the generated forward is named like one failing in the walk."""
    feeds = make_inputs(bert.input_names, 1, 6)
    bert.run(feeds)
    assert bert._executor.knows(bert._executor.signature(feeds))
    feeds["input_ids"][0, 2] = 100000
    # (the Gather runs inside the fused embeddings node, which names it)
    with pytest.raises(RuntimeError, match=r"node '[^']*' \(EmbedLayerNorm\) failed: '[^']*word_embeddings/Gather'"
                                           r".*out of range"):
        bert.run(feeds)


def test_names_from_the_file_stay_literals_in_the_generated_forward():
    """Value and node names are the file's own: one holding a newline and code must not
    become a line of the generated forward."""
    evil = "y\nimport os; os._exit(3)  # '\\"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Tanh", ["x"], [evil], name=evil + "node"),
             helper.make_node("Tanh", [evil], ["out"], name="tanh\r\u2028x = 1")]
    model = sparsejit.load(helper.make_model(helper.make_graph(nodes, "g", [x], [out]),
                                             opset_imports=[helper.make_opsetid("", 17)]))
    feed = np.array([[1, -2, 3], [-4, 5, -6]], np.float32)
    for _ in range(2):
        np.testing.assert_allclose(model.run({"x": feed})[0], np.tanh(np.tanh(feed)), rtol=1e-6)
    src = model.forward_source({"x": feed})
    assert len([line for line in src.splitlines() if "= step" in line]) == 2, src


def test_shape_subgraphs_run_once_per_shape(bert, monkeypatch):
    """The second run with the same shapes skips every shape-only node; new shapes recompute them."""
    monkeypatch.setattr(tape, "ENABLED", False)  # (a tape made after the second run would walk the steps again)
    ex = bert._executor
    assert ex.shape_only, "no shape-only values found"
    counted = []
    originals = [step.run for step in ex.steps]
    for step in ex.steps:
        run = step.run

        def counting(*args, _run=run, _name=step.node.name):
            counted.append(_name)
            return _run(*args)

        step.run = counting
    ex._schedules.clear()
    ex._forwards.clear()
    try:
        feeds = make_inputs(bert.input_names, 2, 23)
        first = bert.run(feeds)
        n_first = len(counted)
        counted.clear()
        second = bert.run(feeds)
        assert len(counted) < n_first - 20
        assert not any(s.node.op_type == "Shape" for s in ex.steps if s.node.name in counted)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)
    finally:
        for step, run in zip(ex.steps, originals):
            step.run = run
        ex._schedules.clear()
        ex._forwards.clear()
        ex._tapes.clear()


def test_layers_reading_one_input_run_as_one_kernel(bert):
    """Q, K and V of every attention block: one step, one kernel, three outputs; each
    layer still listed, checked and printable on its own."""
    from sparsejit.kernels.linear import OutputSlice

    sliced = [lp for lp in bert.layers if isinstance(lp.impl, OutputSlice)]
    n_attention = sum(n.op_type == "AttentionCore" for n in bert.graph.nodes)
    assert n_attention and len(sliced) == 3 * n_attention
    grouped_steps = [s for s in bert._executor.steps if s.node.op_type == "LinearGroup" and len(s.node.outputs) == 3]
    assert len(grouped_steps) == n_attention
    first = sliced[0]
    assert "layers reading this input" in first.reason and first.impl.source == first.impl.group.source
    # Model.graph is what runs: the group's node computes its members' outputs, in order.
    linear_outputs = [o for n in bert.graph.nodes if n.op_type in ("Linear", "LinearGroup") for o in n.outputs]
    assert [lp.node.outputs[0] for lp in bert.layers] == linear_outputs
    assert bert.check().ok


def test_group_linears_takes_only_plain_layers_of_one_input():
    from sparsejit.graph import Graph, Node
    from sparsejit.lower import group_linears

    def linear(name, x, act="none", residual=False, k=8):
        return Node("Linear", name, [x] + (["r"] if residual else []), [name + ".out"],
                    {"weight": np.ones((k, 4), np.float32), "bias": None, "activation": act, "residual": residual})

    nodes = [linear("q", "x"), linear("o", "x", residual=True), linear("k", "x"), linear("g", "x", act="gelu"),
             linear("v", "x"), linear("alone", "y"), linear("w", "x", k=16)]
    graph = Graph(nodes, [], [], {}, 17)
    lowered = group_linears(graph)
    groups = [n for n in lowered.nodes if n.op_type == "LinearGroup"]
    assert [[m.name for m in n.attrs["members"]] for n in groups] == [["q", "k", "v"]]
    assert groups[0].outputs == ["q.out", "k.out", "v.out"]
    assert [n.name for n in lowered.nodes] == ["q", "o", "g", "alone", "w"]  # the group stands where q stood
    assert [n.op_type for n in graph.nodes] == ["Linear"] * 7  # the pass made a new graph


def test_auto_times_only_densities_near_the_crossover():
    """Above DENSE_ABOVE stored density dense is taken untimed (and no compressed copies
    are made); at or below SPARSE_BELOW sparse, with the dense kernel not timed; between,
    both are timed."""
    from sparsejit.choose import DENSE_ABOVE, SPARSE_BELOW, Chooser
    from sparsejit.graph import Node
    from sparsejit.plan import plan_linear

    rng = np.random.default_rng(3)
    for density, kind, timed in [(0.9, "dense", set()), ((DENSE_ABOVE + SPARSE_BELOW) / 2, None, {"sparse", "dense"}),
                                 (SPARSE_BELOW - 0.1, "sparse", {"sparse"})]:
        w = rng.standard_normal((64, 48)).astype(np.float32)
        w[rng.random(w.shape) >= density] = 0
        node = Node("Linear", "l", ["x"], ["y"], {"weight": w, "bias": None, "activation": "none", "residual": False})
        lp = plan_linear(node, Chooser())
        assert {k for k in ("sparse", "dense") if k in lp.timings_ms} == timed
        assert lp.decided_by == ("measured" if kind is None else "rule") and kind in (None, lp.kind)
        x = rng.standard_normal((5, 64)).astype(np.float32)
        np.testing.assert_allclose(lp.impl(x), x @ w, rtol=1e-4, atol=1e-4)


def test_a_race_compares_candidates_round_by_round(monkeypatch):
    """timing.race on a machine that slows threefold between two candidates' calls of one
    round: b takes 1.25x a's time in every round, and the race says so. (Separate medians
    put a's in the fast rounds and b's in the slow ones: 3.75x.) Each call's time is the
    one the fake clock gives it, so the test times nothing."""
    from sparsejit import timing

    calls = []

    def candidate(base: float):
        def fn() -> float:
            calls.append(base)
            return base * (3.0 if len(calls) > 9 else 1.0)  # slow from round 4's second call on
        return fn

    monkeypatch.setattr(timing, "time_calls", lambda fn, runs, warmup=1: [fn()])
    ms = timing.race({"a": candidate(0.8e-3), "b": candidate(1.0e-3)}, rounds=7)
    assert len(calls) == 2 + 2 * 7  # one warm-up call each, then a call each per round
    assert ms["b"] / ms["a"] == pytest.approx(1.25)
    assert ms["a"] == pytest.approx(0.8)  # ms: a's own median (its first four rounds were fast)


def test_the_readme_lists_the_supported_ops():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("<!-- ops -->")[1].split("<!-- /ops -->")[0]
    ops = [o.strip() for o in listed.replace("\n", " ").strip().rstrip(".").split(",")]
    assert ops == sorted(sparsejit.SUPPORTED_OPS), "README ops: " + ", ".join(sorted(sparsejit.SUPPORTED_OPS))


def test_import_leaves_what_only_some_models_need_unimported():
    # `import sparsejit` starts every process: scipy.special (for the reference Erf and
    # Gelu only) took a third of it, and is imported when one of them first runs.
    import json
    import math
    import subprocess
    import sys

    code = ("import json, sys, numpy as np, sparsejit\n"
            "assert 'scipy.special' not in sys.modules, 'imported with sparsejit'\n"
            "from sparsejit import ops\n"
            "x = np.array([-1.5, 0.0, 0.5], np.float32)\n"
            "print(json.dumps([ops.OPS['Erf'](x).tolist(), str(ops.OPS['Gelu'](x).dtype), 'scipy.special' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    erf, gelu_dtype, imported = json.loads(out.stdout)
    np.testing.assert_allclose(erf, [math.erf(v) for v in (-1.5, 0.0, 0.5)], rtol=1e-6)
    assert gelu_dtype == "float32" and imported
