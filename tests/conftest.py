"""Shared fixtures: the committed exports, inputs with padding, and ONNX Runtime as oracle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Loads here (and in the tests' subprocesses) start no helper compiling drivers beside
# them (kernels/prebuild.py): what a test compiles and writes to a cache is its own.
# tests/test_prebuild.py turns it on where it is tested.
os.environ.setdefault("SPARSEJIT_PREBUILD", "0")

MODELS_DIR = Path(__file__).parent / "models"
MODEL_FILES = sorted(MODELS_DIR.glob("*.onnx"))
# (batch, seq): one short single sequence, one padded batch.
SHAPES = [(1, 7), (3, 20)]


def make_inputs(input_names: list[str], batch: int, seq: int, seed: int = 0, vocab: int = 256) -> dict:
    """Token ids with a padding mask: row i keeps seq - 3*i tokens (at least 1)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for i in range(batch):
        mask[i, max(1, seq - 3 * i):] = 0
    ids[mask == 0] = 1  # a pad token id
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    feeds["token_type_ids"][:, seq // 2:] = 1 if vocab > 2 else 0
    return {n: feeds[n] for n in input_names}


@pytest.fixture
def whole_batches(monkeypatch):
    """Batches run whole, never in parts (sparsejit.batching): for tests of what a run of
    many tokens does (token tiles, handovers over them, their tapes)."""
    from sparsejit import batching

    monkeypatch.setattr(batching, "SAMPLE_TOKENS", 0)


def ort_run(path, feeds: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_parity(got: list[np.ndarray], want: list[np.ndarray], names: list[str]) -> float:
    """atol 1e-4 and rtol 1e-4 on every output; returns the worst absolute error."""
    assert len(got) == len(want)
    worst = 0.0
    for g, w, n in zip(got, want, names):
        assert g.shape == w.shape, f"{n}: shape {g.shape} != {w.shape}"
        assert g.dtype == w.dtype, f"{n}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=n)
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))))
    return worst


def load_on_bf16_kernels(path, monkeypatch, plan: Path, **kwargs):
    """`path` loaded with precision="bf16", its sparse layers on bf16's own sparse kernels:
    a load times the float32 sparse kernel beside them and runs it where it is faster (on
    a CPU whose `vdpbf16ps` is slow, every layer), so this one is planned afresh, into the
    new plan file `plan`, without it."""
    import sparsejit
    from sparsejit.choose import Chooser

    real = Chooser.time_kernels
    monkeypatch.setattr(Chooser, "time_kernels", lambda self, sparse, dense, residual, fp32=None:
                        real(self, sparse, dense, residual))
    return sparsejit.load(path, precision="bf16", plan=plan, **kwargs)


def assert_handover_runs_as_plain(handing, plain, shapes, monkeypatch, inner: str | None = None,
                                  calls: list | None = None) -> None:
    """A model handing a layer's output over in the next kernel's own form (plan's hand_*
    passes) against the same model without: for each (batch, seq) of `shapes`, padded
    rows, runs untaped and then taped (executor's TAPE_AFTER, every tape kept) until one
    replays, the outputs equal bit for bit, and the value `inner` too (Model.values). The
    last run of each shape replays its tape, with no call into `calls` (a Python step)."""
    from sparsejit import executor

    monkeypatch.setattr(executor, "TAPE_SAVES", 1.0)
    monkeypatch.setattr(executor, "TAPE_KEEP", float("inf"))
    for batch, seq in shapes:
        feeds = make_inputs(handing.input_names, batch, seq, seed=seq)
        for _ in range(2 + executor.TAPE_AFTER):
            if calls is not None:
                calls.clear()
            for a, b in zip(handing.run(feeds), plain.run(feeds)):
                np.testing.assert_array_equal(a, b)
        if inner is not None:
            np.testing.assert_array_equal(handing.values(feeds, [inner])[inner], plain.values(feeds, [inner])[inner])
    tapes = handing._executor._tapes.values()
    assert tapes and all(t is not None and t.replays for t in tapes)
    assert not calls
