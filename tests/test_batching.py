"""A batch of many short samples runs as parts of a few (sparsejit.batching): on every
committed export where each sample's outputs come from its inputs alone, the same outputs
as the whole batch, bit for bit; where a graph mixes its samples, the whole batch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from conftest import MODEL_FILES, MODELS_DIR, assert_parity, make_inputs, ort_run
from encoders import EncoderSpec, make_encoder, padded_inputs
from onnx import TensorProto, helper

import sparsejit
from sparsejit import batching

EXPORTS = MODEL_FILES + [p for d in ("arch", "int8", "ortopt") for p in sorted((MODELS_DIR / d).glob("*.onnx"))]


def _count_runs(m, monkeypatch) -> list[int]:
    """The batch size of each executor run `m` makes from now on."""
    sizes, run = [], m._executor.run

    def counted(feeds, outputs, **kw):
        sizes.append(next(iter(feeds.values())).shape[0])
        return run(feeds, outputs, **kw)

    monkeypatch.setattr(m._executor, "run", counted)
    return sizes


@pytest.mark.parametrize("path", EXPORTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_parts_give_the_whole_batch_outputs_bit_for_bit(path, monkeypatch):
    monkeypatch.setattr(batching, "SAMPLE_TOKENS", 6)  # (parts of 2 samples of 3 tokens: 2, 2 and 1 of 5)
    m = sparsejit.load(path, num_threads=2)
    feeds = make_inputs(m.input_names, 5, 3)
    first = m.run(feeds)  # (the whole batch, and its signature's verdict)
    verdict = m._parts.verdicts[m._executor.signature(feeds)]
    sizes = _count_runs(m, monkeypatch)
    parts = m.run(feeds)
    whole = m._executor.run(feeds, tuple(m.output_names))
    if "dynamic" in path.stem:  # (its scale of x comes from every token of the batch)
        assert verdict is not None and "QLinear" in verdict
        assert sizes[:1] == [5]
    else:
        assert verdict is None
        assert sizes[:3] == [2, 2, 1]
    for a, b, c in zip(parts, whole, first):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, b)
    if path.parent.name != "int8":
        assert_parity(parts, ort_run(path, feeds), m.output_names)


def test_parts_of_a_real_export_at_bench_sizes_match_onnx_runtime(monkeypatch):
    """At the default part size: 12 samples of 24 tokens in parts of 5, 5 and 2, and named outputs."""
    path = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"
    m = sparsejit.load(path, num_threads=2)
    feeds = make_inputs(m.input_names, 12, 24, seed=3)
    m.run(feeds)
    sizes = _count_runs(m, monkeypatch)
    out = m.run(feeds, list(reversed(m.output_names)))
    assert sizes == [5, 5, 2]
    assert_parity(out, ort_run(path, feeds)[::-1], m.output_names[::-1])


def test_every_run_of_a_split_shape_gives_the_same_outputs(tmp_path):
    """53 samples of 5 tokens in parts of 25, 25 and 3: the last part's 15 tokens take the
    dense layers' GEMV, whose sums round otherwise than the GEMM's over the batch's 265. The
    run that decides, which runs the batch whole, returns the parts' outputs too."""
    spec = EncoderSpec(hidden=45, heads=3, ffn=46, layers=2, sparsity=0.0, seed=6968)
    path = tmp_path / "dense.onnx"
    onnx.save(make_encoder(spec), path)
    m = sparsejit.load(path, num_threads=2)
    feeds = padded_inputs(np.random.default_rng(0), 53, 5, spec.vocab)
    runs = [m.run(feeds) for _ in range(3)]
    assert m._parts.verdicts[m._executor.signature(feeds)] is None
    whole = m._executor.run(feeds, tuple(m.output_names))
    assert any(not np.array_equal(a, b) for a, b in zip(runs[0], whole))  # (what this test is about)
    for later in runs[1:]:
        for a, b in zip(later, runs[0]):
            np.testing.assert_array_equal(a, b)
    assert_parity(runs[0], ort_run(path, feeds), m.output_names)


def _graph(nodes, inits=(), width=4) -> onnx.ModelProto:
    """x [batch, width] float → y, through `nodes`."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _const(name, values, dtype=TensorProto.INT64):
    return helper.make_tensor(name, dtype, [len(values)], values)


MIXING = {  # graphs whose samples' outputs depend on the other samples: what the verdict names
    "mean over the batch": ("ReduceMean", _graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[0]),
                                                  helper.make_node("Add", ["x", "m"], ["y"])])),
    "the first sample": ("Gather", _graph([helper.make_node("Gather", ["x", "i"], ["g"], axis=0),
                                           helper.make_node("Add", ["x", "g"], ["y"])], [_const("i", [0])])),
    "rows picked by its values": ("Gather", _graph([
        helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Cast", ["z"], ["i"], to=TensorProto.INT64),
        helper.make_node("Gather", ["x", "i"], ["y"], axis=0)], [helper.make_tensor("zero", TensorProto.FLOAT, [], [0])])),
    "softmax across the batch": ("Transpose", _graph([
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]), helper.make_node("Softmax", ["t"], ["s"], axis=1),
        helper.make_node("Transpose", ["s"], ["y"], perm=[1, 0])])),
    "the sample's number": ("samples' blocks", _graph([
        helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Range", ["zero", "b", "one"], ["r"]), helper.make_node("Cast", ["r"], ["f"], to=1),
        helper.make_node("Unsqueeze", ["f", "one1"], ["u"]), helper.make_node("Add", ["x", "u"], ["y"])],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1]),
         _const("one1", [1])])),
    "the last sample marked": ("output", _graph([
        helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Range", ["zero", "b", "one"], ["r"]), helper.make_node("Sub", ["b", "one"], ["last"]),
        helper.make_node("Equal", ["r", "last"], ["e"]), helper.make_node("Cast", ["e"], ["y"], to=1)],
        [helper.make_tensor("zero", TensorProto.INT64, [], [0]), helper.make_tensor("one", TensorProto.INT64, [], [1])])),
    "rows of a table by position": ("GatherElements", _graph([
        helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Cast", ["z"], ["i"], to=TensorProto.INT64),
        helper.make_node("GatherElements", ["table", "i"], ["y"], axis=1)],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0]),
         helper.make_tensor("table", TensorProto.FLOAT, [6, 4], np.arange(24, dtype=np.float32))])),
    "the batch twice": ("Concat", _graph([helper.make_node("Concat", ["x", "x"], ["c"], axis=0),
                                          helper.make_node("Slice", ["c", "s", "e"], ["y"])],
                                         [_const("s", [1]), _const("e", [10**9])])),
    "running sum": ("CumSum", _graph([helper.make_node("CumSum", ["x", "a"], ["y"])],
                                     [helper.make_tensor("a", TensorProto.INT64, [], [0])])),
    "gram of the batch": ("", _graph([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                                      helper.make_node("MatMul", ["t", "x"], ["g"]),
                                      helper.make_node("MatMul", ["x", "g"], ["y"])])),
}


@pytest.mark.parametrize("what", MIXING)
def test_a_graph_that_mixes_its_samples_runs_the_batch_whole(what, tmp_path, monkeypatch):
    monkeypatch.setattr(batching, "SAMPLE_TOKENS", 4)  # (a sample: 4 values, so parts of 1 of 6)
    op, model = MIXING[what]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    want = ort_run(path, {"x": x})[0]
    apart = np.concatenate([ort_run(path, {"x": x[i:i + 1]})[0] for i in range(6)])
    assert want.shape != apart.shape or not np.allclose(want, apart)  # (so parts would be wrong)
    m = sparsejit.load(path, num_threads=2)
    for _ in range(3):
        np.testing.assert_allclose(m.run({"x": x})[0], want, rtol=1e-5, atol=1e-6)
    verdict = m._parts.verdicts[m._executor.signature({"x": x})]
    assert verdict is not None and op in verdict


def test_a_graph_that_keeps_its_samples_apart_runs_in_parts(tmp_path, monkeypatch):
    """Row-wise ops, views that keep axis 0 in front, and the batch size as a shape only."""
    monkeypatch.setattr(batching, "SAMPLE_TOKENS", 4)
    model = _graph([
        helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Reshape", ["x", "flat"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["m"]), helper.make_node("Reshape", ["m", "shape"], ["b"]),
        helper.make_node("Softmax", ["b"], ["s"], axis=-1), helper.make_node("ReduceSum", ["s", "one"], ["sum"]),
        helper.make_node("Add", ["s", "sum"], ["y"])],
        [_const("flat", [-1]), helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]), _const("one", [1])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)
    m = sparsejit.load(path, num_threads=2)
    m.run({"x": x})
    assert m._parts.verdicts[m._executor.signature({"x": x})] is None
    sizes = _count_runs(m, monkeypatch)
    np.testing.assert_allclose(m.run({"x": x})[0], ort_run(path, {"x": x})[0], rtol=1e-5, atol=1e-6)
    assert sizes == [1] * 6


def test_a_value_that_is_not_an_array_keeps_the_batch_whole():
    """Recorded in either run without raising (the user's run goes on), then refused by the walk."""
    m = sparsejit.load(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx")
    for first, then in [(object(), np.zeros((4, 2))), (np.zeros((1, 2)), object()), (object(), object())]:
        one = batching.Seen()
        one("v", first)
        whole = batching.Seen(like=one, batch=4)
        whole("v", then)
        with pytest.raises(batching._Mixed, match="not an array"):
            batching._Walk(m.graph, 4, whole, one).kind("v")


def test_part_sizes():
    ids = np.zeros((8, 128), np.int64)
    assert batching.part_samples({"a": ids, "b": ids}) == 1
    assert batching.part_samples({"a": ids[:2]}) == 0  # (two parts' worth runs whole)
    assert batching.part_samples({"a": np.zeros((16, 32))}) == 4
    assert batching.part_samples({"a": np.zeros((16, 129))}) == 0  # (a sample longer than a part)
    assert batching.part_samples({"a": ids, "b": ids[:4]}) == 0  # (inputs of other batch sizes)
    assert batching.part_samples({"a": np.zeros(())}) == 0
    assert batching.part_samples({"a": np.zeros((0, 5))}) == 0


def test_threads_deciding_and_running_parts_at_once_in_a_subprocess():
    """Four threads each run their own batch of a new signature at once (each deciding, then
    in parts), then a forked child does: every result is its batch's whole run."""
    code = textwrap.dedent(f"""
        import os, sys, threading
        import numpy as np
        sys.path.insert(0, {str(MODELS_DIR.parent)!r})
        import sparsejit
        from sparsejit import batching
        from conftest import make_inputs
        batching.SAMPLE_TOKENS = 8
        m = sparsejit.load({str(MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx")!r}, num_threads=2)
        batches = [make_inputs(m.input_names, 9, 4, seed=s) for s in range(4)]
        wants = [m._executor.run(f, tuple(m.output_names)) for f in batches]
        bad = []
        def work(i):
            for _ in range(6):
                got = m.run(batches[i])
                if not all(np.array_equal(g, w) for g, w in zip(got, wants[i])):
                    bad.append(i)
        ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        assert not bad, bad
        pid = os.fork()
        if pid == 0:
            ok = all(np.array_equal(g, w) for g, w in zip(m.run(batches[1]), wants[1]))
            os._exit(0 if ok else 3)
        assert os.waitpid(pid, 0)[1] == 0
        print("ok", list(m._parts.verdicts.values()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok [None]" in r.stdout


def test_a_graph_one_sample_cannot_run_alone_runs_the_batch_whole(tmp_path, monkeypatch):
    """Sample 3 added to every sample: one sample alone has no sample 3, and fails."""
    monkeypatch.setattr(batching, "SAMPLE_TOKENS", 4)
    model = _graph([helper.make_node("Gather", ["x", "i"], ["g"], axis=0), helper.make_node("Add", ["x", "g"], ["y"])],
                   [_const("i", [3])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    m = sparsejit.load(path, num_threads=2)
    for _ in range(2):
        np.testing.assert_allclose(m.run({"x": x})[0], ort_run(path, {"x": x})[0], rtol=1e-6)
    assert "alone fails" in m._parts.verdicts[m._executor.signature({"x": x})]
