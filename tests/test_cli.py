"""The `sparsejit` command line: every subcommand, and bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR, make_inputs

MODEL = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "sparsejit", *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_run_generated_inputs_and_save(tmp_path):
    out = tmp_path / "out.npz"
    p = cli("run", MODEL, "--batch", 2, "--seq", 9, "-o", out)
    assert "output last_hidden_state" in p.stdout and "float32[2, 9, 64]" in p.stdout
    assert "compiling" not in p.stdout  # no progress bar off a terminal
    with np.load(out) as saved:
        assert saved["pooler_output"].shape == (2, 64)


def test_run_inputs_file(tmp_path):
    feeds = make_inputs(["input_ids", "attention_mask", "token_type_ids"], 3, 5)
    np.savez(tmp_path / "in.npz", **feeds)
    p = cli("run", MODEL, "--inputs", tmp_path / "in.npz")
    assert "float32[3, 5, 64]" in p.stdout
    np.savez(tmp_path / "bad.npz", input_ids=feeds["input_ids"])
    bad = cli("run", MODEL, "--inputs", tmp_path / "bad.npz", check=False)
    assert bad.returncode == 2 and "missing ['attention_mask', 'token_type_ids']" in bad.stderr


def test_bench_against_dense():
    p = cli("bench", MODEL, "--runs", 3, "--seq", 16, "--vs", "dense")
    lines = p.stdout.splitlines()
    assert any(line.startswith("sparsejit ") for line in lines) and any(line.startswith("dense ") for line in lines)
    assert "error" not in p.stdout


def test_bench_bad_engine():
    p = cli("bench", MODEL, "--vs", "tensorrt", check=False)
    assert p.returncode == 2 and "unknown engine" in p.stderr


def test_inspect_table_and_plot(tmp_path):
    png = tmp_path / "layers.png"
    p = cli("inspect", MODEL, "--seq", 32, "--runs", 2, "--plot", png)
    rows = [line for line in p.stdout.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 13
    assert "sparse" in p.stdout and "FLOPs skipped" in p.stdout and "total:" in p.stdout
    assert png.exists() and png.stat().st_size > 1000


def test_check_passes():
    p = cli("check", MODEL)
    assert p.stdout.strip().endswith("OK") and "against ONNX Runtime" in p.stdout


def test_check_fails_on_a_mismatch(monkeypatch, capsys):
    """A kernel that computes something else: both the per-layer and the whole-model
    comparisons catch it, and the exit status says so (run in-process to plant the bug)."""
    from sparsejit.kernels.linear import SparseLinear

    from sparsejit import cli as cli_module

    real = SparseLinear.__call__
    monkeypatch.setattr(SparseLinear, "__call__", lambda self, x, r=None: real(self, x, r) * 1.01)
    status = cli_module.main(["check", str(MODEL), "--kernels", "sparse"])
    out = capsys.readouterr().out
    assert status == 1 and out.strip().endswith("MISMATCH") and " NO" in out


def test_check_says_when_the_whole_model_was_not_compared(monkeypatch, capsys):
    """Without ONNX Runtime only the kernels are checked: said first, and no bare OK."""
    from sparsejit import cli as cli_module

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    status = cli_module.main(["check", str(MODEL)])
    out = capsys.readouterr().out
    assert status == 0 and out.startswith("NOTE: ONNX Runtime is not installed")
    assert out.strip().endswith("the whole model was NOT checked (see the note above)")


def test_check_on_an_int8_model_uses_an_exact_oracle():
    """An int8 model is compared with ONNX Runtime where its uint8 x int8 products are exact,
    and with the reference ops where they are not (a CPU without VNNI)."""
    from sparsejit.quantize import ort_u8s8_exact

    p = cli("check", MODELS_DIR / "int8" / "bert_block4_p90_int8_dynamic.onnx")
    assert p.stdout.strip().endswith("OK")
    if ort_u8s8_exact():
        assert "against ONNX Runtime" in p.stdout and "NOTE" not in p.stdout
    else:
        assert p.stdout.startswith("NOTE: ONNX Runtime's uint8 x int8 products are not exact on this CPU")
        assert "whole model against the graph on sparsejit's reference ops" in p.stdout


def test_kernel_source_by_index_and_name():
    p = cli("kernel", MODEL, "0")
    assert "define void @sparse_rows" in p.stdout or "dense" in p.stdout
    name = "/model/encoder/layer.0/intermediate/dense/MatMul"
    p = cli("kernel", MODEL, name, "--kernels", "sparse")
    assert "activation=gelu" in p.stdout
    bad = cli("kernel", MODEL, "99", check=False)
    assert bad.returncode == 2 and "out of range" in bad.stderr
    p = cli("kernel", MODEL, "attention")
    assert "define void @attention_head" in p.stdout and "run_heads" in p.stdout


def test_prune(tmp_path):
    out = tmp_path / "p97.onnx"
    p = cli("prune", MODEL, "--sparsity", 0.97, "--block", 4, "-o", out)
    assert "wrote" in p.stdout
    w = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
         if t.name.startswith("onnx::MatMul")]
    assert len(w) == 12
    for x in w:
        blocks = x.reshape(x.shape[0] // 4, 4, -1)
        zero_blocks = ~(blocks != 0).any(axis=1)  # 4 consecutive inputs of one output, all zero
        assert zero_blocks.sum() == round(0.97 * zero_blocks.size)
        assert np.mean(x == 0) >= 0.97
    assert cli("check", out).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["run", "nope.onnx"], "model file not found"),
    (["inspect", "nope.onnx"], "model file not found"),
    (["prune", str(MODEL), "--sparsity", "1.5", "-o", "x.onnx"], "sparsity must be in [0, 1)"),
    (["prune", str(MODEL), "--sparsity", "0.5", "--block", "5", "-o", "x.onnx"], "not a multiple of block 5"),
    (["run", str(MODEL), "--batch", "0"], "--batch and --seq must be >= 1"),
])
def test_errors_exit_2_with_a_message(args, message):
    p = cli(*args, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr


def test_unsupported_op_exits_2(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "relu.onnx"))
    p = cli("run", tmp_path / "relu.onnx", check=False)
    assert p.returncode == 2 and "'Relu'" in p.stderr


def test_bad_arguments_and_help():
    assert cli("--help").stdout.count("run") >= 1
    p = cli("bench", check=False)
    assert p.returncode == 2 and "required" in p.stderr
    p = cli("frobnicate", check=False)
    assert p.returncode == 2


def test_verbose_logs_decisions():
    p = cli("--verbose", "run", MODEL, "--seq", 8)
    assert "DEBUG sparsejit" in p.stderr and "density" in p.stderr


def test_measure_runs_other_engines_under_this_python():
    """The DeepSparse interpreter is for DeepSparse alone (a regression: every sparsejit
    row of a bench run failed in DeepSparse's venv, which has no scipy)."""
    from sparsejit.benchmark import measure

    r = measure("sparsejit", str(MODEL), 1, 8, 2, 1, python="/nonexistent/python")
    assert "error" not in r and r["runs"] == 2 and r["median_ms"] > 0
    r = measure("deepsparse", str(MODEL), 1, 8, 2, 1, python="/nonexistent/python")
    assert "no DeepSparse Python" in r["error"]


def test_paired_ratio_compares_within_rounds():
    """A slow spell that hits both engines in one round does not move the ratio."""
    from sparsejit.benchmark import paired_ratio

    base = {"rounds_s": [[1.0, 1.0], [3.0, 3.0], [1.0, 1.1]]}
    other = {"rounds_s": [[2.0, 2.0], [6.0, 6.0], [2.1, 2.0]]}
    assert abs(paired_ratio(base, other) - 2.0) < 0.05
    assert paired_ratio(base, {"rounds_s": [[1.0]]}) is None  # rounds that do not pair up


def test_deepsparse_gets_a_copy_that_is_deleted_after_compiling(tmp_path, monkeypatch):
    """DeepSparse rewrites the file it compiles, so it gets a copy in a temporary
    directory; the copy is gone once the engine is built (each one left behind was a
    BERT-base file in /tmp)."""
    import tempfile
    import types

    from sparsejit import benchmark

    seen = {}

    def compile_model(path, batch_size, num_cores, input_shapes):
        seen["path"], seen["existed"] = path, os.path.exists(path)
        return types.SimpleNamespace(run=lambda xs: xs)

    monkeypatch.setitem(sys.modules, "deepsparse", types.SimpleNamespace(compile_model=compile_model))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"
    _, specs = benchmark._load("deepsparse", str(model), 1, 8, 1)
    assert seen["existed"] and seen["path"] != str(model) and str(tmp_path) in seen["path"]
    assert not os.path.exists(seen["path"]) and list(tmp_path.iterdir()) == []
    assert [name for name, _ in specs] == ["input_ids", "attention_mask", "token_type_ids"]
