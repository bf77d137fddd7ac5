"""Taped runs (sparsejit.tape): the outputs of untaped runs, bit for bit, on every committed
export, with inputs and padding that change from run to run; a step that works outside
its kernels is never skipped; a taped run's outputs are the caller's own."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from conftest import MODELS_DIR, make_inputs

import sparsejit
from sparsejit import tape

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


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(MODELS_DIR)))
def test_taped_runs_give_the_untaped_outputs(path):
    model = sparsejit.load(path)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    model.run(inputs[0])
    model.run(inputs[1])  # (the first run through the forward: the tape made after it)
    t = tape_of(model, inputs[0])
    assert t is not None, "no tape"
    assert t.launches and t.kinds.count("launch")
    taped = [model.run(f) for f in inputs]
    assert t.replays == len(inputs)
    untaped(model, inputs[0])
    for f, got in zip(inputs, taped):
        assert_same(got, model.run(f))


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
    inputs = [varied(model.input_names, seed) for seed in range(3)]
    want = [model.run(f) for f in inputs]  # (the first two: before any tape)
    assert tape_of(model, inputs[0]) is None and (model._executor.signature(inputs[0]), tuple(model.output_names)) \
        in ex._tapes
    for f, w in zip(inputs, want):
        assert_same(model.run(f), w)
    ex.steps[i] = step
    ex._schedules.clear()
    ex._forwards.clear()
    ex._tapes.clear()
    plain = sparsejit.load(FP32)
    assert not all(np.array_equal(a, b) for a, b in zip(want[2], plain.run(inputs[2])))  # (the change shows)


def test_a_kernel_step_whose_output_is_made_in_numpy_runs_as_python():
    """A Linear step whose output is a numpy copy (not the kernel's buffer) is run, not
    replayed: the tape keeps it as Python, and outputs follow the inputs."""
    model = sparsejit.load(FP32)
    ex = model._executor
    i = next(k for k, s in enumerate(ex.steps) if s.node.op_type == "Linear")
    step = ex.steps[i]
    ex.steps[i] = dataclasses.replace(step, run=lambda *a: (step.run(*a)[0] * np.float32(1.0),))
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    model.run(inputs[0])
    model.run(inputs[1])
    t = tape_of(model, inputs[0])
    assert t is not None and t.kinds[[g.steps[0].node.name for g in t._groups].index(step.node.name)] == "host"
    taped = [model.run(f) for f in inputs]
    assert t.replays == len(inputs)
    untaped(model, inputs[0])
    for f, got in zip(inputs, taped):
        assert_same(got, model.run(f))


def test_taped_outputs_are_the_callers():
    """A taped run hands back arrays of its own, which the next run leaves alone."""
    model = sparsejit.load(FP32)
    inputs = [varied(model.input_names, seed) for seed in range(4)]
    for f in inputs[:2]:
        model.run(f)
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
    for f in inputs[:2]:
        model.run(f)
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


def test_no_tape_when_turned_off(monkeypatch):
    monkeypatch.setattr(tape, "ENABLED", False)
    model = sparsejit.load(FP32)
    feeds = varied(model.input_names, 0)
    for _ in range(3):
        model.run(feeds)
    assert tape_of(model, feeds) is None
