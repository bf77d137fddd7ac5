"""`sparsejit.InferenceSession` against `onnxruntime.InferenceSession` on the same files:
what it says of the model, and what it returns."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MODELS_DIR, assert_parity, make_inputs

import sparsejit

ort = pytest.importorskip("onnxruntime")

FILES = [MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx", MODELS_DIR / "arch" / "bert_qa_op18_dynamo_p90.onnx",
         MODELS_DIR / "distilbert_eager_h64_op11_legacy_p90.onnx"]


def _ort(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _args(args):
    return [(a.name, list(a.shape), a.type) for a in args]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_session_describes_and_runs_like_onnxruntime(path):
    theirs = _ort(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    ours = sparsejit.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    assert ours.model.num_threads == 1  # intra_op_num_threads is the thread count
    assert _args(ours.get_inputs()) == _args(theirs.get_inputs())
    assert _args(ours.get_outputs()) == _args(theirs.get_outputs())
    ours_meta, their_meta = ours.get_modelmeta(), theirs.get_modelmeta()
    for field in ("producer_name", "graph_name", "domain", "description", "version", "custom_metadata_map"):
        assert getattr(ours_meta, field) == getattr(their_meta, field), field
    assert ours.get_providers() == ["SparsejitExecutionProvider"]
    names = [i.name for i in ours.get_inputs()]
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(names, batch, seq, seed=seq)
        outputs = [o.name for o in theirs.get_outputs()]
        assert_parity(ours.run(None, feeds), theirs.run(None, feeds), outputs)
        last = outputs[-1:]
        assert_parity(ours.run(last, feeds, None), theirs.run(last, feeds), last)


def test_session_from_bytes_and_its_errors(tmp_path):
    path = FILES[0]
    ours = sparsejit.InferenceSession(path.read_bytes())
    feeds = make_inputs([i.name for i in ours.get_inputs()], 2, 9)
    assert_parity(ours.run(None, feeds), _ort(path).run(None, feeds), [o.name for o in ours.get_outputs()])
    assert "<bytes>" in repr(ours)
    with pytest.raises(ValueError, match="the 11 bytes given are not a readable ONNX model"):
        sparsejit.InferenceSession(b"not a model")
    with pytest.raises(TypeError, match="input_feed must be a dict"):
        ours.run(None, [feeds["input_ids"]])
    with pytest.raises(ValueError, match="unknown output name"):
        ours.run(["nope"], feeds)
    with pytest.raises(NotImplementedError, match="I/O binding"):
        ours.io_binding()
    with pytest.warns(UserWarning, match=r"providers \['CUDAExecutionProvider'\] are ignored"):
        sparsejit.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    with pytest.raises(FileNotFoundError, match="not found"):
        sparsejit.InferenceSession(str(tmp_path / "missing.onnx"))


def test_load_takes_bytes():
    path = FILES[0]
    model = sparsejit.load(path.read_bytes())
    feeds = make_inputs(model.input_names, 1, 5)
    np.testing.assert_array_equal(model.run(feeds)[0], sparsejit.load(path).run(feeds)[0])
