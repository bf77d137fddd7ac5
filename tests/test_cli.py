"""The `sparsejit` command line: every subcommand, and bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
    p = cli("run", MODEL, "--batch", 2, "--seq", 9, "--runs", 4, "-o", out)
    assert "output last_hidden_state" in p.stdout and "float32[2, 9, 64]" in p.stdout
    assert "then over 4 runs: p50" in p.stdout and "p99" in p.stdout  # steady state, not only the first run
    assert p.stderr == ""  # no progress off a terminal
    with np.load(out) as saved:
        assert saved["pooler_output"].shape == (2, 64)


def test_run_json_carries_what_the_text_shows(tmp_path):
    r = json.loads(cli("run", MODEL, "--batch", 2, "--seq", 9, "--runs", 3, "--json").stdout)
    assert r["latency"]["runs"] == 3 and r["latency"]["p50_ms"] <= r["latency"]["p99_ms"]
    assert r["first_run_ms"] > 0 and r["linear_layers"] == 13
    assert [o["shape"] for o in r["outputs"]] == [[2, 9, 64], [2, 64]]
    assert {i["name"] for i in r["inputs"]} == {"input_ids", "attention_mask", "token_type_ids"}


def test_run_inputs_file(tmp_path):
    feeds = make_inputs(["input_ids", "attention_mask", "token_type_ids"], 3, 5)
    np.savez(tmp_path / "in.npz", **feeds)
    p = cli("run", MODEL, "--inputs", tmp_path / "in.npz")
    assert "float32[3, 5, 64]" in p.stdout
    np.savez(tmp_path / "bad.npz", input_ids=feeds["input_ids"])
    bad = cli("run", MODEL, "--inputs", tmp_path / "bad.npz", check=False)
    assert bad.returncode == 2 and "missing ['attention_mask', 'token_type_ids']" in bad.stderr
    both = cli("run", MODEL, "--inputs", tmp_path / "in.npz", "--seq", 4, check=False)  # --seq would be ignored
    assert both.returncode == 2 and "--seq describes generated inputs" in both.stderr


def test_bench_against_dense():
    p = cli("bench", MODEL, "--runs", 3, "--seq", 16, "--vs", "dense", "--threads", 1)
    lines = p.stdout.splitlines()
    assert any(line.startswith("sparsejit ") for line in lines) and any(line.startswith("dense ") for line in lines)
    assert "could not run" not in p.stdout and "p99 ms" in lines[1] and "1 threads for every engine" in lines[0]
    assert "time: each engine's p50 / sparsejit's p50" in p.stdout


def test_bench_json_ratios_agree_with_the_medians():
    """The time column is the ratio of the p50s the table shows (a paired ratio that read
    4.00x beside two nearly equal medians was the complaint); --vs onnxruntime is ort."""
    r = json.loads(cli("bench", MODEL, "--runs", 4, "--seq", 8, "--vs", "onnxruntime,dense", "--json").stdout)
    assert [e["engine"] for e in r["engines"]] == ["sparsejit", "ort", "dense"]
    assert r["threads"] == os.cpu_count() and "cpu" in r  # all cores by default, as every other command
    base = r["engines"][0]["p50_ms"]
    for e in r["engines"]:
        assert e["p50_ms"] <= e["p90_ms"] <= e["p99_ms"] <= e["max_ms"] and e["std_ms"] >= 0
        assert abs(e["time_vs_sparsejit"] - e["p50_ms"] / base) < 1e-9
        assert len(e["per_round_time_vs_sparsejit"]) == r["rounds"]


def test_bench_bad_engine():
    p = cli("bench", MODEL, "--vs", "tensorrt", check=False)
    assert p.returncode == 2 and "unknown engine" in p.stderr


def test_inspect_table_and_plot(tmp_path):
    png = tmp_path / "layers.png"
    p = cli("inspect", MODEL, "--seq", 32, "--runs", 2, "--plot", png)
    rows = [line for line in p.stdout.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 13
    assert "sparse" in p.stdout and "FLOPs skipped" in p.stdout and "total:" in p.stdout
    assert "encoder/layer.1/" in p.stdout.splitlines()  # a line per encoder block heads its rows
    assert "in #0" in rows[1] and "in #0" in rows[2]  # K and V: their time is Q's grouped kernel's
    assert "dense not timed" not in p.stdout  # the why, only with -v
    assert png.exists() and png.stat().st_size > 1000
    assert "dense not timed" in cli("inspect", MODEL, "--seq", 8, "--runs", 1, "-v").stdout
    assert "tiles" not in p.stdout  # (32 tokens; from 1024 the profile says it times the FFN pair apart)
    assert "128-token tiles" in cli("inspect", MODEL, "--batch", 10, "--seq", 110, "--runs", 1).stdout


def test_inspect_json_and_the_plots_bars(tmp_path):
    from sparsejit.plots import bars

    r = json.loads(cli("inspect", MODEL, "--seq", 16, "--runs", 1, "--json").stdout)
    assert r["tokens"] == 16 and len(r["layers"]) == 13
    q, k, v = r["layers"][:3]
    assert q["ms"] > 0 and k["ms"] is None and v["time_in"] == 0 and q["why"]
    assert abs(r["linear_ms"] - sum(x["ms"] or 0 for x in r["layers"])) < 1e-9
    b = bars(r["layers"])  # one bar per kernel: Q, K, V are one
    assert len(b) == 9 and b[0].label.endswith("query+key+value") and b[0].block == "block 0"
    assert b[-1].kernel == "dense" and b[-1].block == "" and b[-1].density == 1.0


def test_check_passes():
    p = cli("check", MODEL)
    assert p.stdout.strip().endswith("OK") and "against ONNX Runtime" in p.stdout
    r = json.loads(cli("check", MODEL, "--json").stdout)
    assert r["ok"] and r["whole_model_checked"] and r["note"] is None and len(r["kernels"]) == 13
    assert {(w["batch"], w["seq"]) for w in r["whole_model"]} == {(1, 7), (2, 33)}


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
    assert cli_module.main(["check", str(MODEL), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and not r["whole_model_checked"] and "not installed" in r["note"] and r["whole_model"] == []


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


def test_check_holds_int8_models_to_their_pooled_output():
    """The whole-model check of an int8 model passes on the pooled output's cosine (>= 0.999)
    where an upstream ulp moved quantized values (an oracle off by 0.05 in places, as the
    reference ops are from themselves with one scale an ulp larger), and still fails one
    that is wrong (cosine 0.9); an FP32 model is held to 1e-4."""
    import argparse

    import sparsejit
    from sparsejit import cli as cli_module

    args = argparse.Namespace(atol=1e-4, rtol=1e-4, seq=9)
    for path, quantized in [(MODELS_DIR / "int8" / "bert_block4_p90_int8_dynamic.onnx", True), (MODEL, False)]:
        model = sparsejit.load(path)

        def moved(feeds, model=model):  # 1% of the values a twentieth of the mean magnitude off
            rng = np.random.default_rng(0)
            return [o + 0.05 * np.abs(o).mean() * (rng.random(o.shape) < 0.01) for o in model.run(feeds)]

        def wrong(feeds, model=model):
            return [o + np.abs(o).mean() * np.sin(np.arange(o.size)).reshape(o.shape) for o in model.run(feeds)]

        rows = cli_module._compare_whole(model, moved, args)
        assert all(r["max_abs_err"] > 1e-3 and r["pooled_cosine"] > 0.999 for r in rows if r["seq"] > 7)
        assert all(r["ok"] for r in rows if r["seq"] > 7) == quantized, (path, rows)
        bad = cli_module._compare_whole(model, wrong, args)
        assert not any(r["ok"] for r in bad), bad


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


def _dense_copy(tmp_path) -> Path:
    """MODEL with every pruned weight filled in again: a dense model to prune."""
    m = onnx.load(str(MODEL))
    rng = np.random.default_rng(0)
    for t in m.graph.initializer:
        w = onnx.numpy_helper.to_array(t)
        if w.ndim == 2 and w.dtype == np.float32:
            t.CopyFrom(onnx.numpy_helper.from_array(
                np.where(w == 0, rng.normal(0, 0.02, w.shape), w).astype(np.float32), t.name))
    onnx.save(m, str(tmp_path / "dense.onnx"))
    return tmp_path / "dense.onnx"


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if len(t.dims) == 2}


def test_prune_reaches_the_fraction_asked_and_leaves_the_heads(tmp_path):
    dense = _dense_copy(tmp_path)
    out = tmp_path / "p90.onnx"
    p = cli("prune", dense, "--sparsity", 0.9, "--block", 4, "-o", out)
    assert "to 90.0% zero" in p.stdout and "(0.0%) were zero already" in p.stdout
    assert "left 1 alone: /model/pooler/dense/Gemm (head)" in p.stdout and "NOTE" not in p.stdout
    assert re.search(r"WARNING: one-shot magnitude pruning costs accuracy.*cosine similarity .* is 0\.\d+",
                     p.stdout.replace("\n", " "))
    w = _weights(out)
    assert np.all(w["model.pooler.dense.weight"] != 0)  # heads are left dense by default
    pruned = [x for name, x in w.items() if name.startswith("onnx::MatMul")]
    assert len(pruned) == 12
    for x in pruned:
        blocks = x.reshape(x.shape[0] // 4, 4, -1)
        assert np.all((blocks != 0).all(axis=1) | (blocks == 0).all(axis=1))  # whole 4-blocks go
        assert round(0.9 * x.size) <= np.sum(x == 0) < round(0.9 * x.size) + 4
    model = json.loads(cli("inspect", out, "--seq", 8, "--runs", 1, "--json").stdout)
    assert [r["block"] for r in model["layers"][:12]] == [4] * 12  # the loader sees the blocks prune made
    assert cli("check", out).returncode == 0


def test_prune_counts_zeros_already_there_and_says_when_blocks_will_not_show(tmp_path):
    """On a 90%-unstructured model: 95% asked is 95% of the weights (it read 97.8% when the
    kept blocks' old zeros were not counted), and 4-blocks holding old zeros load as
    unstructured, which the summary now says instead of "block 4"."""
    out = tmp_path / "p95.onnx"
    p = cli("prune", MODEL, "--sparsity", 0.95, "--block", 4, "-o", out)
    text = p.stdout.replace("\n", " ")
    assert "to 95.0% zero" in text and "(90.0%) were zero already" in text
    assert "NOTE: 12 of the 12 pruned weights keep zeros inside their 4-blocks" in text
    for name, x in _weights(out).items():
        if name.startswith("onnx::MatMul"):
            assert round(0.95 * x.size) <= np.sum(x == 0) < round(0.95 * x.size) + 4
    less = cli("prune", MODEL, "--sparsity", 0.5, "-o", tmp_path / "p50.onnx")  # asks for fewer zeros than there are
    assert "to 90.0% zero" in less.stdout and "(90.0%) were zero already" in less.stdout


def test_prune_exclude_and_heads(tmp_path):
    from sparsejit.prune import prune_model

    dense = _dense_copy(tmp_path)
    _, report = prune_model(dense, None, 0.8, exclude=[r"layer\.1/"], heads=True)
    left = {r.node: r.excluded for r in report if r.excluded}
    assert len(left) == 6 and all(v == r"--exclude layer\.1/" for v in left.values())
    pooler = next(r for r in report if "pooler" in r.node)
    assert pooler.excluded == "" and round(pooler.sparsity_after * pooler.size) == round(0.8 * pooler.size)
    _, report = prune_model(dense, None, 0.8, scope="global")
    pruned = [r for r in report if not r.excluded]
    assert round(sum(r.sparsity_after * r.size for r in pruned)) == round(0.8 * sum(r.size for r in pruned))
    bad = cli("prune", dense, "--sparsity", 0.5, "--exclude", "(", "-o", tmp_path / "x.onnx", check=False)
    assert bad.returncode == 2 and "is not a regular expression" in bad.stderr
    everything = cli("prune", dense, "--sparsity", 0.5, "--exclude", ".", "-o", tmp_path / "x.onnx", check=False)
    assert everything.returncode == 2 and "nothing to prune" in everything.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "nope.onnx"], "model file not found"),
    (["inspect", "nope.onnx"], "model file not found"),
    (["prune", str(MODEL), "--sparsity", "1.5", "-o", "x.onnx"], "sparsity must be in [0, 1)"),
    (["prune", str(MODEL), "--sparsity", "0.5", "--block", "5", "-o", "x.onnx"], "not a multiple of block 5"),
    (["run", str(MODEL), "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["inspect", str(MODEL), "--seq", "x"], "argument --seq: expected a whole number, got 'x'"),
    (["run", str(MODEL), "--seq", "600"], "--seq 600 is longer than the model's position table (128 positions"),
    (["bench", str(MODEL), "--seq", "600"], "--seq 600 is longer than the model's position table"),
    (["run", str(MODELS_DIR)], "is a folder; these commands take an ONNX file"),
])
def test_errors_exit_2_with_a_message(args, message):
    p = cli(*args, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert message in p.stderr


def test_a_failing_run_exits_2_with_one_line(tmp_path):
    """RoBERTa's positions start after the padding id: 130 rows take 128 tokens, and the
    129th fails inside the graph, as in ONNX Runtime; one line naming the node, not a traceback."""
    ids = np.random.default_rng(0).integers(3, 99, (1, 130))
    np.savez(tmp_path / "long.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    p = cli("run", MODELS_DIR / "roberta_sdpa_h64_op14_legacy_p90.onnx", "--inputs", tmp_path / "long.npz",
            check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "GatherElements" in p.stderr and "out of bounds" in p.stderr


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
    p = cli("--verbose", "run", MODEL, "--seq", 8, "--runs", 1)
    assert "DEBUG sparsejit" in p.stderr and "density" in p.stderr
    after = cli("run", MODEL, "--seq", 8, "--runs", 1, "-v")  # after the subcommand too
    assert "DEBUG sparsejit" in after.stderr


def test_version_and_defaults_in_help():
    from importlib.metadata import version

    assert cli("--version").stdout.strip() == f"sparsejit {version('sparsejit')}"
    import sparsejit

    assert sparsejit.__version__ == version("sparsejit")  # one version, pyproject's
    helps = cli("run", "--help").stdout + cli("bench", "--help").stdout + cli("prune", "--help").stdout
    for shown in ("timed runs after the first (default: 10)", "(default: dense,ort)", "(default: layer)",
                  "threads for every engine (default: all cores)"):
        assert shown in " ".join(helps.split()), shown


def test_plot_without_matplotlib_is_refused_before_loading(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from sparsejit.cli import main\n"
            f"sys.exit(main(['inspect', {str(MODEL)!r}, '--plot', {str(tmp_path / 'x.png')!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 2 and "--plot needs matplotlib: pip install 'sparsejit[plot]'" in p.stderr
    assert "planning" not in p.stderr and not (tmp_path / "x.png").exists()


def run_in_terminal(args: list[str], columns: int = 80, block_rich: bool = False) -> tuple[int, str]:
    """Run `sparsejit ARGS` on a pseudo-terminal `columns` wide; (exit status, what it drew)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    pre = "import sys; sys.modules['rich'] = None\n" if block_rich else ""
    code = f"{pre}from sparsejit.cli import main\nraise SystemExit(main({[str(a) for a in args]!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=600)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def visible_lines(drawn: str) -> list[str]:
    """The lines a terminal shows, escape sequences dropped; a redraw after \r is a line too."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", drawn)
    return re.split(r"\r\n|\r|\n", plain)


@pytest.mark.parametrize("args", [["run", MODEL, "--seq", 16, "--runs", 2],
                                  ["inspect", MODEL, "--seq", 16, "--runs", 1],
                                  ["check", MODEL],
                                  ["bench", MODEL, "--seq", 8, "--runs", 2, "--vs", "ort"]],
                         ids=["run", "inspect", "check", "bench"])
def test_every_line_fits_an_80_column_terminal(args):
    """Progress bars and tables at 80 columns (the old bar was 93 wide and each redraw left
    a new line; tables cut names from the left)."""
    status, drawn = run_in_terminal(args)
    lines = visible_lines(drawn)
    assert status == 0, drawn[-2000:]
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide[:3]
    if args[0] != "bench":
        assert any("planning kernels" in line and "13/13" in line for line in lines)  # the bar, to the end
    if args[0] == "inspect":
        assert any("attention/self/query" in line for line in lines)  # names whole, not cut


def test_without_rich_progress_is_plain_lines():
    status, drawn = run_in_terminal(["run", MODEL, "--seq", 8, "--runs", 1], block_rich=True)
    lines = visible_lines(drawn)
    assert status == 0 and "planning kernels..." in lines  # a line per step, no bar
    assert "reading and fusing bert_sdpa_h64_op14_legacy_p90.onnx..." in lines and "timing..." in lines
    assert any(line.startswith("first run ") for line in lines)


def test_load_with_progress_true_and_the_models_repr(capfd):
    import sparsejit

    sparsejit.load(MODEL, progress=False)
    assert "planning kernels" not in capfd.readouterr().err
    model = sparsejit.load(MODEL, progress=True)  # was a TypeError
    err = capfd.readouterr().err
    assert "planning kernels" in err and "13/13" in err
    text = repr(model)
    assert str(MODEL) in text and "input_ids: int64[batch, seq]" in text and "last_hidden_state" in text
    assert "13 linear layers (1 dense, 12 sparse)" in text and f"{model.num_threads} threads" in text


def test_package_files():
    from importlib.metadata import metadata

    import sparsejit

    root = Path(sparsejit.__file__).parent
    assert (root / "py.typed").exists()
    assert "Apache License" in (root.parent / "LICENSE").read_text()
    meta = metadata("sparsejit")
    assert "License :: OSI Approved :: Apache Software License" in meta.get_all("Classifier")
    assert meta["Author"] or meta["Author-email"]


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


def test_a_failed_peer_is_named_by_its_failure_line():
    """A peer worker that dies says how, and which line of its stderr names the failure:
    DeepSparse 1.8 on a dynamically quantized file aborts with a backtrace whose last line
    is 'Please email a copy of this stack trace', which the bench used to print alone."""
    from sparsejit.benchmark import worker_failure

    deepsparse = """DeepSparse, Copyright 2021-present / Neuralmagic, Inc. version: 1.8.0
L2 cache size: 0.5Mb

Assertion at ./src/include/wand/engine/compute/planner.hpp:70

Backtrace:
 0# 0x00007f76e3881383:
    [440fb6c34c8b25920e2f026a0044]
Please email a copy of this stack trace and any additional information to: x@y.z
"""
    assert worker_failure(deepsparse, -6) == \
        "killed by SIGABRT: Assertion at ./src/include/wand/engine/compute/planner.hpp:70"
    assert worker_failure("loading\nValueError: bad model\n", 1) == "exit status 1: ValueError: bad model"
    assert worker_failure("just a last line\n", 3) == "exit status 3: just a last line"
    assert worker_failure("", 2) == "exit status 2"
