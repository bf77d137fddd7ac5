"""Taped runs (sparsejit.tape): the outputs of untaped runs, bit for bit, on every committed
export, with inputs and padding that change from run to run; a step that works outside
its kernels is never skipped; a taped run's outputs are the caller's own."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
from conftest import MODEL_FILES, MODELS_DIR, assert_parity, make_inputs, ort_run

import sparsejit
from sparsejit import executor, tape

ALL_FILES = sorted(MODELS_DIR.rglob("*.onnx"))
FP32 = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"


def varied(names: list[str], seed: int, batch: int = 2, seq: int = 9) -> dict:
    """Inputs of one shape: other token ids, and each row padded to a length of its own."""
    feeds = make_inputs(names, batch, seq, seed=seed)
    rng = np.random.default_rng(seed)
    if "attention_mask" in feeds:
        for row, keep in enumerate(rng.integers(1, seq + 1, size=batch)):
            feeds["attention_mask"][row] = np.arange(seq) < keep
    return feeds


@pytest.fixture(autouse=True)
def _tape_soon(monkeypatch):
    """Tapes after executor.TAPE_AFTER runs through the forward, however long a run takes
    on this machine, and kept however fast their replays (the rules that wait longer for
    long runs and drop a tape no faster than the forward: their own tests)."""
    monkeypatch.setattr(executor, "TAPE_SAVES", 1.0)
    monkeypatch.setattr(executor, "TAPE_KEEP", math.inf)


def warm(model, inputs: list[dict]) -> None:
    """Runs of these inputs' shapes until the model tapes them (the first walks the
    steps, then executor.TAPE_AFTER through the forward)."""
    for k in range(1 + executor.TAPE_AFTER):
        model.run(inputs[k % len(inputs)])


def tape_of(model, feeds: dict):
    """The model's tape for these inputs' shapes (every output), or None."""
    key = (model._executor.signature(feeds), tuple(model.output_names))
    return model._executor._tapes.get(key)


def untaped(model, feeds: dict) -> None:
    """No tape, from now on, for these inputs' shapes."""
    model._executor._tapes[(model._executor.signature(feeds), tuple(model.output_names))] = None


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def assert_replays_run_as_before(model, t, inputs: list[dict]) -> None:
    """Each input run on tape `t` (a replay each), then untaped: the same outputs."""
    taped = [model.run(f) for f in inputs]
    assert t.replays == len(inputs)
    untaped(model, inputs[0])
    for f, got in zip(inputs, taped):
        assert_same(got, model.run(f))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(MODELS_DIR)))
def test_taped_runs_give_the_untaped_outputs(path):
    model = sparsejit.load(path)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None, "no tape"
    assert t.launches and t.kinds.count("launch")
    assert_replays_run_as_before(model, t, inputs)


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("shape", [(1, 7), (3, 20)])
def test_taped_runs_match_onnxruntime(path, shape):
    """The committed float32 exports (BERT, DistilBERT, RoBERTa; eager, SDPA, dynamo),
    taped at a short sequence and a padded batch, each taped run within ONNX Runtime's
    tolerance on its own inputs."""
    model = sparsejit.load(path)
    inputs = [varied(model.input_names, seed, *shape) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None
    for f in inputs:
        assert_parity(model.run(f), ort_run(path, f), model.output_names)
    assert t.replays == len(inputs)


DEGENERATE = """
    import numba, numpy as np, sparsejit
    from sparsejit import executor
    from test_tape import tape_of, varied
    executor.TAPE_SAVES, executor.TAPE_KEEP = 1.0, float("inf")
    numba.set_num_threads(2)
    for path in PATHS:
        model = sparsejit.load(path, num_threads=2)
        for batch, seq in [(0, 7), (1, 1), (3, 1), (1, 2), (2, 17)]:
            inputs = [varied(model.input_names, seed, batch, seq) for seed in range(1 + executor.TAPE_AFTER)]
            want = [model.run(f) for f in inputs]  # (before any tape: made after the last)
            again = [model.run(f) for f in inputs]
            t = tape_of(model, inputs[0])
            assert t is None or t.replays == len(inputs), (path, batch, seq)
            assert all(np.array_equal(a, b) for w, g in zip(want, again) for a, b in zip(w, g)), (path, batch, seq)
            print(path.split("/")[-1], batch, seq, "taped" if t is not None else "no tape")
"""


def test_degenerate_shapes_taped_at_two_threads():
    """No batch, one token, fewer tokens than threads: taped (or refused) and replayed
    at two threads, float32 and static INT8, dynamic INT8 (its grid launches), and QDQ and
    QOperator files (their row groups, QOperator attention, the lanes kernel), every run as
    before the tape (in a fresh interpreter: a crash fails this test, not the run)."""
    from test_robustness import run_python

    paths = [str(FP32)] + [str(MODELS_DIR / "int8" / f"{name}.onnx") for name in (
        "bert_block4_p90_int8_sparseml", "bert_block4_p90_int8_dynamic", "bert_block4_p90_int8_qdq",
        "bert_op14_p90_int8_qoperator")]
    out = run_python(DEGENERATE.replace("PATHS", repr(paths))).stdout
    lines = [line for line in out.splitlines() if line.endswith(("taped", "no tape"))]
    assert len(lines) == 5 * len(paths) and all(line.endswith(" taped") for line in lines if " 0 7 " not in line), out
    # (the empty batch: taped or not, as its steps allow; its runs as before either way)


def _gather_model(tmp_path, index_is_input: bool):
    """x [2, 5, 8] → Linear → Gather of one position on axis 1 (a constant, or the input
    `idx`) → Linear: a pooler's shape. Returns the model and its two weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    inits = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])]
    if index_is_input:
        inputs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, []))
    else:
        inits.append(numpy_helper.from_array(np.array(0, np.int64), "idx"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Gather", ["h", "idx"], ["g"], axis=1),
             helper.make_node("MatMul", ["g", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              initializer=inits)
    path = tmp_path / f"gather_{index_is_input}.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return sparsejit.load(path), w1, w2


def _fake_quantize_model(tmp_path, scale_is_input: bool):
    """x [2, 5, 8] → Linear → Gather of position 0 on axis 1 → QuantizeLinear then
    DequantizeLinear (a FakeQuantize, its scale a constant or the input `s`) → Linear: the
    static INT8 pooler's shape."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w1, w2 = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (np.array(0, np.int64), "idx"),
                                                         (np.array(3, np.uint8), "z"))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])]
    if scale_is_input:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    else:
        inits.append(numpy_helper.from_array(np.array(0.05, np.float32), "s"))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Gather", ["h", "idx"], ["g"], axis=1),
             helper.make_node("QuantizeLinear", ["g", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]), helper.make_node("MatMul", ["d", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              initializer=inits)
    path = tmp_path / f"fake_quantize_{scale_is_input}.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return sparsejit.load(path), w1, w2


def test_a_fake_quantize_of_fixed_scales_is_taped_and_of_an_input_scale_is_not(tmp_path):
    """The pooler's FakeQuantize of its token (a strided view, copied by the transpose
    kernel) is a launch of a taped run, in the stretch with the layers around it, where
    its scale and zero point are the model's. Where the scale is a model input, which may
    change between runs, no FakeQuantize is made, and the QuantizeLinear and
    DequantizeLinear run in Python (a FakeQuantize of such a scale would too: tape._static).
    Both give each run's own result."""
    from sparsejit import tape
    from sparsejit.graph import Node

    rng = np.random.default_rng(6)
    xs = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(6)]

    def want(x, w1, w2, s):
        g = (x @ w1)[:, 0]
        return ((np.clip(np.rint(g / s) + 3, 0, 255) - 3) * s) @ w2

    model, w1, w2 = _fake_quantize_model(tmp_path, scale_is_input=False)
    warm(model, [{"x": x} for x in xs])
    t = tape_of(model, {"x": xs[0]})
    names = [g.steps[0].node.op_type for g in t._groups]
    assert t is not None and t.kinds[names.index("FakeQuantize")] == "launch" and "host" not in t.kinds, t.kinds
    assert_replays_run_as_before(model, t, [{"x": x} for x in xs])
    for x in xs:
        np.testing.assert_allclose(model.run({"x": x})[0], want(x, w1, w2, np.float32(0.05)), rtol=1e-4, atol=1e-4)

    model, w1, w2 = _fake_quantize_model(tmp_path, scale_is_input=True)
    inputs = [{"x": x, "s": np.array(0.02 * (k + 1), np.float32)} for k, x in enumerate(xs)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    names = [g.steps[0].node.op_type for g in t._groups]
    assert t is not None and "FakeQuantize" not in names and t.kinds[names.index("QuantizeLinear")] == "host", names
    assert not tape._static(Node("FakeQuantize", "f", ["g", "s", "z"], ["d"]), {"z": np.uint8(3)})
    assert_replays_run_as_before(model, t, inputs)
    for f in inputs:
        np.testing.assert_allclose(model.run(f)[0], want(f["x"], w1, w2, f["s"]), rtol=1e-4, atol=1e-4)


def test_a_taped_run_copies_its_outputs_to_c_order_in_its_last_stretch(monkeypatch):
    """The outputs' copies from the kernels' feature-major layout to C order are launches
    at the end of the tape's last stretch, into the tape's buffers, which each run copies
    once more (no transpose after the replay): each run's outputs are its own arrays,
    unchanged by the next run, and those of the untaped run."""
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None and set(t._outs) == set(model.output_names), set(t._outs)

    def no_transpose(*a):
        raise AssertionError("an output transposed after the replay")

    monkeypatch.setattr(executor, "transposed_copy", no_transpose)
    replays = t.replays
    first = model.run(inputs[0])
    kept = [a.copy() for a in first]
    second = model.run(inputs[1])
    assert t.replays == replays + 2
    for a, k, b in zip(first, kept, second):
        assert a.flags.c_contiguous and not np.shares_memory(a, b)
        np.testing.assert_array_equal(a, k)
    monkeypatch.undo()
    untaped(model, inputs[0])
    for got, f in ((first, inputs[0]), (second, inputs[1])):
        assert_same(got, model.run(f))


def test_a_taped_run_checks_the_token_ids_as_the_embeddings_step_does():
    """The embeddings are a launch of a taped run, their ids checked in the kernel
    (launch.checked): a taped run on an id out of range raises naming the Gather, as an
    untaped one does, and the runs after it give their own outputs, on tape."""
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    names = [g.steps[0].node.op_type for g in t._groups]
    assert t is not None and t.kinds[names.index("EmbedLayerNorm")] == "launch", t.kinds
    bad = {k: v.copy() for k, v in inputs[1].items()}
    bad["input_ids"][0, -1] = 100000
    replays = t.replays
    with pytest.raises(RuntimeError, match=r"word_embeddings/Gather.*out of range"):
        model.run(bad)
    bad["input_ids"][0, -1] = -100000
    with pytest.raises(RuntimeError, match=r"word_embeddings/Gather.*out of range"):
        model.run(bad)
    assert tape_of(model, inputs[0]) is t and t.replays == replays  # (the failed replays gave nothing)
    assert_replays_run_as_before(model, t, inputs)


def test_a_gather_of_a_constant_index_is_a_view_and_of_an_input_index_is_not(tmp_path):
    """A Gather of one position (the pooler's token 0) is a view of its input, the same
    memory on every run of a shape: a taped run skips it. One whose index is a model input
    may point elsewhere on the next run: it runs in Python, and each taped run takes the
    position its own input names."""
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((2, 5, 8)).astype(np.float32) for _ in range(6)]
    model, _, _ = _gather_model(tmp_path, index_is_input=False)
    warm(model, [{"x": x} for x in xs])
    t = tape_of(model, {"x": xs[0]})
    assert t is not None and "view" in t.kinds and "host" not in t.kinds, t.kinds
    assert_replays_run_as_before(model, t, [{"x": x} for x in xs])

    model, w1, w2 = _gather_model(tmp_path, index_is_input=True)
    inputs = [{"x": x, "idx": np.array(k % 5, np.int64)} for k, x in enumerate(xs)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None and "host" in t.kinds and "view" not in t.kinds, t.kinds
    assert_replays_run_as_before(model, t, inputs)
    for f in inputs:
        np.testing.assert_allclose(model.run(f)[0], (f["x"] @ w1)[:, int(f["idx"])] @ w2, rtol=1e-5, atol=1e-5)


def _with_mask_chain(tmp_path, name: str, constants: dict, chain: list):
    """The eager export (one mask, many readers) with its additive mask made by `chain`
    (ONNX nodes, the last one's output `name`) from attention_mask instead, `constants` beside
    them; saved under tmp_path, its path."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx")
    old = next(i for n in m.graph.node if n.op_type == "Where" for i in n.output if any(
        i in u.input for u in m.graph.node if u.op_type == "Add"))
    for n in m.graph.node:
        n.input[:] = [name if i == old else i for i in n.input]
    m.graph.initializer.extend([numpy_helper.from_array(v, k) for k, v in constants.items()])
    for k, n in enumerate(chain):  # (first: the graph stays in order)
        m.graph.node.insert(k, n)
    path = tmp_path / f"{name}.onnx"
    onnx.save(m, path)
    return path


def assert_taped_as_untaped_and_ort(model, path, check=lambda t: None) -> None:
    """At two shapes, padded inputs: the model tapes them (`check(tape)` after), every
    taped run gives what the untaped run gives, and both are within ONNX Runtime's
    tolerance of its outputs on the same file."""
    for shape in [(1, 7), (3, 20)]:
        inputs = [varied(model.input_names, seed, *shape) for seed in range(4)]
        warm(model, inputs)
        t = tape_of(model, inputs[0])
        assert t is not None, shape
        check(t)
        taped = [model.run(f) for f in inputs]
        assert t.replays == len(inputs)
        untaped(model, inputs[0])
        for f, got in zip(inputs, taped):
            assert_same(got, model.run(f))
            assert_parity(got, ort_run(path, f), model.output_names)


def _filled(t) -> tape.PreparedMask:
    """The tape's one prepared mask, refilled by the fill kernel (PreparedMask.refill)."""
    (prepared,) = [p for seg in t._segments if seg[0] == "mask" for p in seg[2]]
    assert prepared._filling[1] is not None
    return prepared


def test_a_mask_made_by_cast_sub_and_mul_is_made_by_its_prepare_step(tmp_path):
    """An export whose additive mask is (1 - float(attention_mask)) · -10000 (the form older
    exports have): the Cast, Sub and Mul go into the PrepareMask step (lower.prepare_masks),
    which makes the mask as those ops would, on every run, taped or not (a taped run's
    refill by one kernel call): within ONNX Runtime's tolerance on padded inputs, and each
    taped run as the untaped one."""
    import onnx
    from onnx import helper

    chain = [helper.make_node("Unsqueeze", ["attention_mask", "chain_axes"], ["chain_u"]),
             helper.make_node("Cast", ["chain_u"], ["chain_f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Sub", ["chain_one", "chain_f"], ["chain_s"]),
             helper.make_node("Mul", ["chain_s", "chain_big"], ["chain_mask"])]
    path = _with_mask_chain(tmp_path, "chain_mask", {"chain_axes": np.array([1, 2], np.int64), "chain_one": np.array(
        1.0, np.float32), "chain_big": np.array(-10000.0, np.float32)}, chain)
    model = sparsejit.load(path)
    (prepare,) = [n for n in model.graph.nodes if n.op_type == "PrepareMask"]
    assert [s[0] for s in prepare.attrs["steps"]] == ["Cast", "Sub", "Mul"]
    assert not {"Cast", "Sub", "Mul"} & {n.op_type for n in model.graph.nodes if "chain" in "".join(n.outputs)}
    assert_taped_as_untaped_and_ort(model, path, lambda t: _filled(t))


def test_sdpa_masks_expanded_and_filled_are_made_by_their_prepare_step(tmp_path):
    """transformers' SDPA masks, as its exports make them: the [batch, seq] mask unsqueezed,
    Expanded to [batch, 1, seq, seq] (the shape from Shape ops), Cast to float, 1 - x, then
    Where(Cast(Cast(x, bool), bool), lowest float32, x). All of it goes into the PrepareMask
    step (the Expand as a broadcast view, which the kernel reads by key), its refill one
    kernel call on a taped run: within ONNX Runtime's tolerance on padded inputs, each taped
    run as the untaped one."""
    import onnx
    from onnx import helper

    constants = {"sdpa_axes": np.array([1, 2], np.int64), "sdpa_0": np.array([0], np.int64),
                 "sdpa_1": np.array([1], np.int64), "sdpa_one": np.array(1.0, np.float32),
                 "sdpa_min": np.array(np.finfo(np.float32).min, np.float32)}
    chain = [helper.make_node("Unsqueeze", ["attention_mask", "sdpa_axes"], ["sdpa_u"]),
             helper.make_node("Shape", ["attention_mask"], ["sdpa_shape"]),
             helper.make_node("Gather", ["sdpa_shape", "sdpa_0"], ["sdpa_b"], axis=0),
             helper.make_node("Gather", ["sdpa_shape", "sdpa_1"], ["sdpa_s"], axis=0),
             helper.make_node("Concat", ["sdpa_b", "sdpa_1", "sdpa_s", "sdpa_s"], ["sdpa_to"], axis=0),
             helper.make_node("Expand", ["sdpa_u", "sdpa_to"], ["sdpa_e"]),
             helper.make_node("Cast", ["sdpa_e"], ["sdpa_f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Sub", ["sdpa_one", "sdpa_f"], ["sdpa_inv"]),
             helper.make_node("Cast", ["sdpa_inv"], ["sdpa_b1"], to=onnx.TensorProto.BOOL),
             helper.make_node("Cast", ["sdpa_b1"], ["sdpa_b2"], to=onnx.TensorProto.BOOL),
             helper.make_node("Where", ["sdpa_b2", "sdpa_min", "sdpa_inv"], ["sdpa_mask"])]
    path = _with_mask_chain(tmp_path, "sdpa_mask", constants, chain)
    model = sparsejit.load(path)
    (prepare,) = [n for n in model.graph.nodes if n.op_type == "PrepareMask"]
    assert [s[0] for s in prepare.attrs["steps"]] == ["Cast", "Sub", "MaskedFill"] and len(prepare.inputs) == 2
    assert not {"Expand", "Cast", "Sub", "Where"} & {n.op_type for n in model.graph.nodes
                                                     if any(o.startswith("sdpa_") for o in n.outputs)}

    def check(t):
        assert "mask" in t.kinds and "host" not in t.kinds, t.kinds
        assert _filled(t).mask.strides[2] == 0  # (a view)
    assert_taped_as_untaped_and_ort(model, path, check)


@pytest.mark.parametrize("scales", ["constant", "from the shapes"])
def test_sdpa_exports_scaling_q_and_k_run_them_in_the_attention_kernel(tmp_path, scales):
    """SDPA's exports scale q and kᵀ each by √scale (Mul) before their product, the scale a
    constant, or computed from the head size by Shape ops where the export kept them: the
    Muls go into the AttentionCore node (fuse._prescaled), whose kernel takes both scales
    with the scores', so that a taped run has no Python step in its layers. Within ONNX
    Runtime's tolerance on padded inputs, each taped run as the untaped one."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(FP32)
    muls = [n for n in m.graph.node if n.op_type == "Mul" and "attention/self/Mul" in n.name]
    assert len(muls) == 4  # (q and kᵀ, two layers)
    path = FP32
    if scales == "from the shapes":  # head_size^(-1/4), from q's shape, for the constant 0.5 (head size 16)
        consts = {i.name for i in m.graph.initializer} | {o for n in m.graph.node if n.op_type == "Constant"
                                                          for o in n.output}
        m.graph.initializer.extend([numpy_helper.from_array(np.array([3], np.int64), "hs_axis"),
                                    numpy_helper.from_array(np.array(1.0, np.float32), "hs_one")])
        for k, mul in enumerate(muls):
            x = mul.input[0] if mul.input[1] in consts else mul.input[1]
            chain = [helper.make_node("Shape", [x], [f"hs{k}_shape"]),
                     helper.make_node("Gather", [f"hs{k}_shape", "hs_axis"], [f"hs{k}_d"], axis=0),
                     helper.make_node("Cast", [f"hs{k}_d"], [f"hs{k}_f"], to=onnx.TensorProto.FLOAT),
                     helper.make_node("Sqrt", [f"hs{k}_f"], [f"hs{k}_r"]),
                     helper.make_node("Sqrt", [f"hs{k}_r"], [f"hs{k}_rr"]),
                     helper.make_node("Div", ["hs_one", f"hs{k}_rr"], [f"hs{k}_s"])]
            at = list(m.graph.node).index(mul)
            for j, n in enumerate(chain):
                m.graph.node.insert(at + j, n)
            mul.input[:] = [x, f"hs{k}_s"]
        path = tmp_path / "sdpa_scaled_by_shapes.onnx"
        onnx.save(m, path)
    model = sparsejit.load(path)
    cores = [n for n in model.graph.nodes if n.op_type == "AttentionCore"]
    assert len(cores) == 2 and all(len(n.inputs) == 7 and n.inputs[5] and n.inputs[6] for n in cores)
    assert not [n for n in model.graph.nodes if n.op_type == "Mul" and "attention/self/Mul" in n.name]
    (prepare,) = [n for n in model.graph.nodes if n.op_type == "PrepareMask"]  # (its layers' Wheres merged)
    assert [s[0] for s in prepare.attrs["steps"]] == ["Select"] and len(prepare.inputs) == 2  # (and the Expand)
    fixed = model.graph.constants if scales == "constant" else model._executor.shape_only
    assert all(n.inputs[5] in fixed and n.inputs[6] in fixed for n in cores)

    def check(t):
        assert "host" not in t.kinds[t.kinds.index("mask"):], t.kinds
    assert_taped_as_untaped_and_ort(model, path, check)


def test_a_step_writing_outside_its_kernels_gets_no_tape():
    """A kernel step that changes its output in numpy after its kernel: replaying its kernel
    alone would leave the change out, and the tape's check (its buffers filled with NaN,
    replayed) finds that: no tape, and runs stay right."""
    model = sparsejit.load(FP32)
    ex = model._executor
    i = next(k for k, s in enumerate(ex.steps) if s.node.op_type == "LayerNorm")
    step = ex.steps[i]

    def shifted(*args):
        (y,) = step.run(*args)
        y += np.float32(0.5)  # (in place: the buffer is the kernel's)
        return (y,)

    ex.steps[i] = dataclasses.replace(step, run=shifted)
    inputs = [varied(model.input_names, seed) for seed in range(1 + executor.TAPE_AFTER)]
    want = [model.run(f) for f in inputs]  # (before any tape)
    assert tape_of(model, inputs[0]) is None and (model._executor.signature(inputs[0]), tuple(model.output_names)) \
        in ex._tapes
    for f, w in zip(inputs, want):
        assert_same(model.run(f), w)
    ex.steps[i] = step
    ex._schedules.clear()
    ex._forwards.clear()
    ex._tapes.clear()
    plain = sparsejit.load(FP32)
    assert not all(np.array_equal(a, b) for a, b in zip(want[-1], plain.run(inputs[-1])))  # (the change shows)


def test_a_kernel_step_whose_output_is_made_in_numpy_runs_as_python():
    """A Linear step whose output is a numpy copy (not the kernel's buffer) is run, not
    replayed: the tape keeps it as Python, and outputs follow the inputs."""
    model = sparsejit.load(FP32)
    ex = model._executor
    i = next(k for k, s in enumerate(ex.steps) if s.node.op_type == "Linear")
    step = ex.steps[i]
    ex.steps[i] = dataclasses.replace(step, run=lambda *a: (step.run(*a)[0] * np.float32(1.0),))
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None and t.kinds[[g.steps[0].node.name for g in t._groups].index(step.node.name)] == "host"
    assert_replays_run_as_before(model, t, inputs)


def test_dynamic_int8_layers_are_replayed_on_each_runs_own_scale():
    """A dynamic int8 layer's scale comes from x's range on every run, and its kernels make
    it (x's range, then the grid and the epilogue's terms, then the bytes: no Python
    between): its steps are launches of the tape, as static ones are. Each taped run, on
    inputs of its own range, gives the untaped run's outputs bit for bit, within ONNX
    Runtime's tolerance; an x holding NaN or infinity raises on a taped run as on an
    untaped one, naming the layer, and the runs after it are right."""
    from sparsejit.kernels.embed import EmbedLayerNorm

    path = MODELS_DIR / "int8" / "bert_block4_p90_int8_dynamic.onnx"
    model = sparsejit.load(path)

    def check(t):
        groups = [g for g in t._groups if g.steps[0].node.op_type.startswith("QLinear")]
        assert groups and all(g.kind == "launch" and g.checks for g in groups), t.kinds
        assert "host" not in t.kinds[t.kinds.index("mask"):], t.kinds  # (only the mask's first steps)

    assert_taped_as_untaped_and_ort(model, path, check)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    step = next(s for s in model._executor.steps if s.node.op_type == "EmbedLayerNorm")
    kernel = next(c.cell_contents for c in step.run.__closure__ if isinstance(c.cell_contents, EmbedLayerNorm))
    row = kernel.table[int(inputs[1]["input_ids"][0, 0])]  # (a row of the kernel's own table, read where it is)
    kept = row.copy()
    replays = t.replays
    try:
        for value in (np.inf, np.nan):
            row[5] = value
            with pytest.raises(RuntimeError, match=r"layer\.0/attention/self/query.*NaN or infinity"):
                model.run(inputs[1])
        assert t.replays == replays  # (the failed replays gave nothing)
        row[:] = kept
        assert_replays_run_as_before(model, t, inputs)
        row[5] = np.inf
        with pytest.raises(RuntimeError, match=r"layer\.0/attention/self/query.*NaN or infinity"):
            model.run(inputs[1])  # (untaped now)
    finally:
        row[:] = kept


@pytest.mark.parametrize("name", ["bert_block4_p90_int8_qdq", "bert_block4_p90_int8_qoperator",
                                  "bert_block4_p90_int8_sparseml", "bert_op14_p90_int8_qoperator"])
@pytest.mark.usefixtures("whole_batches")
def test_quantized_files_replay_the_steps_between_their_int8_layers(name):
    """Row groups (a LayerNorm written out in quantized steps, GELU as lookups, bias Adds),
    QOperator attention (a QDQ file's too) and DequantizeLinear run between the int8
    layers of QDQ, QOperator and SparseML files (the unstructured opset-14 file's on the
    kernel with outputs in the lanes, its scratch per thread): each is a launch of the
    tape (its scratch the tape's; the embeddings' LayerNorm, token-major, blocked; the
    pooler's at one token, feature-major), but on one thread a row group that sums its
    means in numpy (feature-major past rows.BLOCKED tokens, neither blocked nor split: a
    LayerNorm written out, as the opset-14 file has them) runs in Python; on more, split by
    features, it is a launch a pass at any length.
    Each taped run gives the untaped run's outputs bit for bit, at three shapes with
    padding."""
    from sparsejit.kernels import rows
    from sparsejit.kernels.compile import threads

    model = sparsejit.load(MODELS_DIR / "int8" / f"{name}.onnx")
    for shape in [(1, 7), (3, 20), (5, 120)]:
        inputs = [varied(model.input_names, seed, *shape) for seed in range(4)]
        warm(model, inputs)
        t = tape_of(model, inputs[0])
        kinds: dict[str, set] = {}
        for g in t._groups:
            kinds.setdefault(g.steps[0].node.op_type, set()).add(g.kind)
        assert kinds.get("QAttentionCore", {"launch"}) == {"launch"} and "launch" in kinds["RowGroup"], kinds
        assert kinds["QLinear"] == {"launch"} and kinds.get("QLinearGroup", {"launch"}) == {"launch"}, kinds
        for g in t._groups:
            node = g.steps[0].node
            if node.op_type != "RowGroup":
                continue
            if "embeddings" in node.name or "pooler" in node.name:  # (token-major blocked; one token)
                assert g.kind == "launch", (node.name, shape)
            elif any(m.op_type == "ReduceMean" for m in node.attrs["nodes"]):
                assert (g.kind == "host") == (threads() == 1 and math.prod(shape) > rows.BLOCKED), (node.name, shape)
            elif "op14" not in name:  # (its attention's row groups read QLinearMatMul's numpy outputs)
                assert g.kind == "launch", node.name
        assert_replays_run_as_before(model, t, inputs)


def test_the_bench_warms_sparsejit_up_until_its_shape_is_settled(monkeypatch):
    """Executor.settled: not before a shape's tape is made, nor during its trial replays
    (kept or dropped after them); where no tape is made (tapes off), once the runs that
    would have made one are done. `sparsejit
    bench`'s worker warms sparsejit up until then (benchmark's `settle`), so that its
    timed runs are those of the shape's steady state."""
    from sparsejit import benchmark

    run, specs = benchmark._load("sparsejit", str(FP32), 2, 9, 2)
    model = next(c.cell_contents for c in run.__closure__ if isinstance(c.cell_contents, sparsejit.Model))
    xs = benchmark.make_inputs(specs, 2, 9)
    feeds, outs = dict(zip((n for n, _ in specs), xs)), tuple(model.output_names)
    assert not model._executor.settled(feeds, outs)
    run.settle(xs)
    t = tape_of(model, feeds)
    assert model._executor.settled(feeds, outs) and t is not None and t.replays == executor.TAPE_TRIAL
    monkeypatch.setattr(tape, "ENABLED", False)
    other = benchmark.make_inputs(specs, 1, 5)
    model.run(other)  # (its shape-only values first; then the tape refused at once)
    for _ in range(executor.TAPE_AFTER):
        model.run(other)
    assert model._executor.settled(dict(zip((n for n, _ in specs), other)), outs)


@pytest.mark.usefixtures("whole_batches")
def test_ffn_layers_over_token_tiles_run_as_python():
    """From executor.TILE_FROM tokens a block's FFN pair runs over token tiles, copying
    each tile's output in numpy: such a chain stays Python, the rest is replayed."""
    model = sparsejit.load(FP32, kernels="sparse")
    inputs = [varied(model.input_names, seed, batch=10, seq=110) for seed in range(3)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    chains = [g for g in t._groups if isinstance(g.run, executor.TokenChain)]
    assert chains and all(g.kind == "host" for g in chains) and t.kinds.count("launch")
    assert_replays_run_as_before(model, t, inputs)


def test_taped_outputs_are_the_callers():
    """A taped run hands back arrays of its own, which the next run leaves alone."""
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    warm(model, inputs)
    first = model.run(inputs[2])
    kept = [a.copy() for a in first]
    model.run(inputs[3])
    assert tape_of(model, inputs[0]).replays == 2
    assert_same(first, kept)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in first)


def test_threads_take_the_tape_in_turn():
    """Threads running one shape at once: one replays the tape, the others run the forward;
    every output is its input's."""
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(6)]
    warm(model, inputs)
    want = [model.run(f) for f in inputs]
    errors, done = [], []

    def work(k):
        try:
            for n in range(20):
                j = (k + n) % len(inputs)
                assert_same(model.run(inputs[j]), want[j])
                done.append(j)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(done) == 80
    assert tape_of(model, inputs[0]).replays >= len(inputs)


def test_a_long_run_waits_for_more_runs(monkeypatch):
    """A tape saves about TAPE_SAVES a step: where that is a sliver of a run, the shape
    must recur many times (three runs' worth of the saving) before it gets a tape."""
    monkeypatch.setattr(executor, "TAPE_SAVES", 1e-9)
    model = sparsejit.load(FP32)
    feeds = varied(model.input_names, 0)
    for _ in range(20):
        model.run(feeds)
    assert not model._executor._tapes
    monkeypatch.setattr(executor, "TAPE_SAVES", 1.0)
    model.run(feeds)
    assert tape_of(model, feeds) is not None


def test_a_tape_no_faster_than_the_forward_is_dropped(monkeypatch):
    """After executor.TAPE_TRIAL replays, a tape whose fastest is not under TAPE_KEEP of the
    forward's fastest run goes (here every tape: TAPE_KEEP 0); runs go on right."""
    monkeypatch.setattr(executor, "TAPE_KEEP", 0.0)
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(3)]
    warm(model, inputs)
    t = tape_of(model, inputs[0])
    assert t is not None
    got = [model.run(inputs[k % 3]) for k in range(executor.TAPE_TRIAL + 2)]
    assert t.replays == executor.TAPE_TRIAL and tape_of(model, inputs[0]) is None
    assert (model._executor.signature(inputs[0]), tuple(model.output_names)) in model._executor._tapes
    for k, g in enumerate(got):
        assert_same(g, model.run(inputs[k % 3]))


def test_no_tape_when_turned_off(monkeypatch):
    monkeypatch.setattr(tape, "ENABLED", False)
    model = sparsejit.load(FP32)
    feeds = varied(model.input_names, 0)
    warm(model, [feeds])
    model.run(feeds)
    assert tape_of(model, feeds) is None and model._executor._tapes


@pytest.mark.parametrize("path", [FP32, MODELS_DIR / "int8" / "bert_block4_p90_int8_sparseml.onnx"],
                         ids=lambda p: p.stem)
def test_fork_and_threads_on_a_tape(path):
    """A child forked after the model taped a shape runs that tape; then four threads share
    it (in a fresh interpreter: a crash there fails this test, not the run)."""
    from test_robustness import fork_and_threads, run_python

    code = fork_and_threads(path)
    warmed = ("    for _ in range(1 + executor.TAPE_AFTER):\n        model.run(feeds)\n"
              "    assert model._executor._tapes and all(model._executor._tapes.values())\n    first")
    assert "    model.run(feeds)\n    first" in code
    code = code.replace("    model.run(feeds)\n    first", warmed).replace(
        "import os,", "from sparsejit import executor\n    executor.TAPE_SAVES = 1.0\n    import os,")
    out = run_python(code)
    assert out.returncode == 0


@pytest.mark.parametrize("case", ["int8-amx", "bf16-amx", "dynamic", "qdq", "qoperator-op14"])
def test_fork_and_threads_on_the_handovers(case, tmp_path):
    """The kernels' handovers (AMX FFN1's bytes and the attention's from 512 tokens on a
    static file as `sparsejit quantize` makes it; bf16 AMX FFN1's and the LayerNorms' pair rows) and a quantized
    file's launches (dynamic INT8's grid; QDQ's and QOperator's row groups, attention and
    lanes kernel) on a tape: a forked child runs it, four threads share it, and one token
    per row (a degenerate shape) runs too, in a fresh interpreter, where a crash fails this
    test, not the run."""
    from sparsejit.kernels.amx import has_amx
    from test_robustness import fork_and_threads, run_python

    files = {"dynamic": "bert_block4_p90_int8_dynamic", "qdq": "bert_block4_p90_int8_qdq",
             "qoperator-op14": "bert_op14_p90_int8_qoperator"}
    if case in files:
        code = fork_and_threads(MODELS_DIR / "int8" / f"{files[case]}.onnx", batch=2, seq=20)
    elif not has_amx("int8" if case == "int8-amx" else "bf16"):
        pytest.skip("this CPU has no AMX")
    elif case == "int8-amx":
        from sparsejit.quantize import quantize_model

        path = quantize_model(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", tmp_path / "s.onnx", "static")
        code = fork_and_threads(path, batch=8, seq=70, kernels="dense")
    else:
        code = fork_and_threads(MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", "bf16", kernels="dense")
    handover = "" if case in files else (
        "    assert any(len(s.node.outputs) == 2 and s.node.op_type in ('QLinear', 'Linear', 'AttentionCore')"
        " for s in model._executor.steps)\n")
    if case == "bf16-amx":  # (and the LayerNorms' pair rows for Q/K/V and FFN1: plan.hand_layernorm_pairs)
        handover += ("    assert any(len(s.node.outputs) == 2 and s.node.op_type == 'LayerNorm'"
                     " for s in model._executor.steps)\n")
    warmed = ("    for _ in range(2 + executor.TAPE_AFTER):\n        model.run(feeds)\n"
              "    assert model._executor._tapes and all(model._executor._tapes.values())\n" + handover + "    first")
    code = code.replace("    model.run(feeds)\n    first", warmed).replace(
        "import os,", "from sparsejit import executor\n    executor.TAPE_SAVES = 1.0\n    import os,")
    code += "    for b in (1, 3):\n        model.run(make_inputs(model.input_names, b, 1))\n"
    assert run_python(code).returncode == 0


# A kernel for the replay's own test: out[dst] += out[a] + out[b] + 1 (launch.replay).
_CHAIN_SIG = None


def _chain_launches(launches: int, rows: int):
    """A table of `launches` launches of `rows` rows each, every row one call of a kernel
    adding out[L - 1, r] + out[L - 1, (r + 1) % rows] + 1 to out[L, r] (0 before): each
    launch reads what the one before it wrote, so out comes out right only if every row
    runs once and each launch after the last finished. (out, table, its rows of calls, the expected out)"""
    from sparsejit.kernels import launch
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.ir import Signature

    global _CHAIN_SIG
    _CHAIN_SIG = _CHAIN_SIG or Signature("chain_step", (("out", "ptr"), ("dst", "i64"), ("a", "i64"), ("b", "i64")))
    fn = compile_ir("define void @chain_step(ptr %out, i64 %dst, i64 %a, i64 %b) {\nentry:\n"
                    "  %pa = getelementptr i64, ptr %out, i64 %a\n  %va = load i64, ptr %pa\n"
                    "  %pb = getelementptr i64, ptr %out, i64 %b\n  %vb = load i64, ptr %pb\n"
                    "  %s = add i64 %va, %vb\n  %s1 = add i64 %s, 1\n  %pd = getelementptr i64, ptr %out, i64 %dst\n"
                    "  %vd = load i64, ptr %pd\n  %s2 = add i64 %s1, %vd\n  store i64 %s2, ptr %pd\n  ret void\n}\n",
                    "chain_step")
    out = np.zeros((launches + 1, rows), np.int64)
    keep, table = [], []
    for n in range(1, launches + 1):
        calls = launch.new_calls(rows, 1, _CHAIN_SIG)
        for r in range(rows):
            calls[r, :6] = (1, fn, out.ctypes.data, n * rows + r, (n - 1) * rows + r, (n - 1) * rows + (r + 1) % rows)
        keep.append(calls)
        table.append((launch.part(_CHAIN_SIG), launch.address(calls), rows, calls.shape[1]))
    want = np.zeros_like(out)
    for n in range(1, launches + 1):
        want[n] = want[n - 1] + np.roll(want[n - 1], -1) + 1
    return out, np.array(table, np.int64), keep, want


@pytest.mark.parametrize("threads", [1, 2])
def test_a_replayed_stretch_runs_each_row_once_in_launch_order(threads):
    """launch.replay: the rows of each launch claimed and run by whichever thread comes
    first, the next launch begun only once every row of this one is done; the same counts
    again on a second replay, and on a stretch in the middle of the table."""
    import numba
    from sparsejit.kernels import launch

    out, table, _keep, want = _chain_launches(400, 2)
    claims = launch.new_claims(len(table))
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        for _ in range(2):
            out[1:] = 0
            launch.replay(table, 0, len(table), claims)
            assert np.array_equal(out, want)
        out[201:] = 0
        launch.replay(table, 200, len(table), claims)
        assert np.array_equal(out, want)
    finally:
        numba.set_num_threads(before)


def test_a_replay_region_of_more_walkers_than_threads_finishes():
    """More walkers than threads: TBB runs the later iterations of the region after the
    first ones, on the same threads; they find every row claimed and done, and return
    (no walker waits for a row nobody has claimed)."""
    from sparsejit.kernels import launch

    out, table, _keep, want = _chain_launches(300, 3)
    counts = launch.new_claims(len(table))
    launch._claimed()(launch._walk(), launch.address(table), 0, len(table), launch.address(counts), 8)
    assert np.array_equal(out, want)
    claimed = counts[::launch.CLAIM_SLOTS]
    assert ((claimed & (launch.BACK - 1)) + (claimed >> 32) >= 3).all() and (counts[8::launch.CLAIM_SLOTS] == 3).all()


def test_a_walk_claims_rows_from_its_end():
    """claim_walk: the first walker into a stretch claims each launch's rows from the first
    on, the second from the last back, the third from the first again (so that a thread
    keeps its end of launches split alike); one end's claims never take a row the other's
    took. A kernel logs the rows in the order they ran, one walker at a time on this
    thread, its turn set in the claims."""
    from sparsejit.kernels import launch
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.ir import Signature

    sig = Signature("log_row", (("log", "ptr"), ("row", "i64")))
    fn = compile_ir("define void @log_row(ptr %log, i64 %row) {\nentry:\n  %n = load i64, ptr %log\n"
                    "  %n1 = add i64 %n, 1\n  %at = getelementptr i64, ptr %log, i64 %n1\n  store i64 %row, ptr %at\n"
                    "  store i64 %n1, ptr %log\n  ret void\n}\n", "log_row")
    log = np.zeros(16, np.int64)
    calls = launch.new_calls(5, 1, sig)
    for r in range(5):
        calls[r, :4] = (1, fn, log.ctypes.data, r)
    table = np.array([(launch.part(sig), launch.address(calls), 5, calls.shape[1])], np.int64)
    for turn, front, want in [(0, 0, [0, 1, 2, 3, 4]), (1, 0, [4, 3, 2, 1, 0]), (2, 0, [0, 1, 2, 3, 4]),
                              (1, 2, [4, 3, 2]), (0, 3 * launch.BACK, [0, 1])]:
        claims = launch.new_claims(1)
        claims[0] = front  # (rows another walker claimed from either end, and finished)
        claims[8] = (front & (launch.BACK - 1)) + (front >> 32)
        claims[1] = turn
        log[:] = 0
        launch._serial_walk()(launch.address(table), 0, 1, launch.address(claims))
        assert list(log[1:1 + log[0]]) == want, (turn, front)
        assert claims[8] == 5
