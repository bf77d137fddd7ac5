"""Ordinary use that must neither kill the process nor give a wrong answer without a word:
concurrent loads, degenerate shapes, the file changing after load, forks, NaN, plans
that change from load to load, a damaged or planted kernel cache, bad models, empty
batches, per-model thread counts. Anything that could crash runs in a subprocess, so
that a crash fails its test, not the run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS_DIR, assert_parity, make_inputs, ort_run

import sparsejit

ROOT = Path(__file__).resolve().parents[1]
H128 = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"  # weights big enough to be file-mapped
SDPA = MODELS_DIR / "bert_sdpa_h64_op14_legacy_p90.onnx"             # has the softmax NaN guard


def run_python(code: str, cache: Path | None = None, env: dict | None = None, timeout: int = 300,
               check: bool = True) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (sparsejit as installed, tests/ on the path)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SPARSEJIT_", "NUMBA_THREADING"))}
    if cache is not None:
        full["SPARSEJIT_CACHE_DIR"] = str(cache)
    full.update(env or {})
    prelude = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
    p = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                       env=full, timeout=timeout, check=False)
    if check:
        assert p.returncode == 0, f"exit status {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}"
    return p


# --- crashes ------------------------------------------------------------------------------

def test_concurrent_loads_and_runs_in_threads(tmp_path):
    """Eight loads of two models in four threads at once, each thread then running what it
    loaded; every result as a lone load gives; with the kernel cache empty, then filled.
    (Raced, the IR engine cache freed code that was running: a segfault.)"""
    for _ in ("empty cache", "filled cache"):
        _concurrent_loads(tmp_path)


def _concurrent_loads(cache: Path) -> None:
    run_python(f"""
        import threading, numpy as np, sparsejit
        from conftest import make_inputs
        paths = [{str(H128)!r}, {str(SDPA)!r}]
        feeds = make_inputs(["input_ids", "attention_mask", "token_type_ids"], 2, 9)
        results, errors = [], []

        def work(i):
            try:
                for j in range(2):
                    m = sparsejit.load(paths[(i + j) % 2], num_threads=2)
                    results.append((paths[(i + j) % 2], m.run(feeds)))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        alone = {{p: sparsejit.load(p).run(feeds) for p in paths}}
        assert len(results) == 8
        for p, out in results:
            assert all(np.array_equal(a, b) for a, b in zip(out, alone[p]))
        print("ok")
    """, cache)


DEGENERATE = """
    import numba, numpy as np
    from sparsejit.kernels.linear import DenseLinear, SparseLinear, reference_linear
    from sparsejit.kernels.attention import fused_attention, reference_attention
    from sparsejit.kernels.layernorm import layernorm, reference_layernorm
    from sparsejit.choose import Chooser
    from sparsejit.kernels.layout import transposed
    from sparsejit.plan import plan_group
    from sparsejit.graph import Node
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    TOL = dict(atol=1e-4, rtol=1e-4)

    def weight(k, m, kind):
        w = rng.standard_normal((k, m)).astype(np.float32)
        if kind == "zero":
            w[:] = 0
        elif kind == "zero rows":
            w[:, ::2] = 0
            w[rng.random(w.shape) < 0.8] = 0
        elif kind == "zero chunk":
            w[: max(1, k // 2)] = 0
        elif kind == "block4" and k % 4 == 0:
            w *= np.repeat(rng.random((k // 4, m)) < 0.2, 4, axis=0)
        else:
            w[rng.random(w.shape) < 0.9] = 0
        return w

    for k, m in [(1, 1), (1, 5), (128, 1), (4, 1), (64, 3), (8, 64), (256, 2)]:
        for kind in ["p90", "zero", "zero rows", "zero chunk", "block4"]:
            w = weight(k, m, kind)
            b = rng.standard_normal(m).astype(np.float32)
            for tokens in [0, 1, 5, 17, 130]:
                x = rng.standard_normal((tokens, k)).astype(np.float32)
                r = rng.standard_normal((tokens, m)).astype(np.float32)
                for act, res in [("none", False), ("gelu", True)]:
                    want = reference_linear(x, w, b, act, r if res else None)
                    sparse = SparseLinear(w, b, act, res)
                    impls = [DenseLinear(w, b, act, res)] + [sparse.with_chunk(c) for c in (k, 64, 4)
                                                              if c % sparse.pattern.block == 0]
                    for impl in impls:
                        np.testing.assert_allclose(impl(x, r if res else None), want, **TOL,
                                                   err_msg=f"{k}x{m} {kind}, {tokens} tokens, {impl.kind}")
                        np.testing.assert_array_equal(impl.dense_weight(), w)
            # grouped: three such weights side by side, each read back through its slice
            nodes = [Node("Linear", f"l{i}", ["x"], [f"y{i}"], {"weight": weight(k, m, kind), "bias": None,
                                                               "activation": "none", "residual": False})
                     for i in range(3)]
            group = Node("LinearGroup", "l0", ["x"], [n.outputs[0] for n in nodes],
                         {"activation": "none", "members": nodes})
            _, plans = plan_group(group, Chooser())
            x = rng.standard_normal((7, k)).astype(np.float32)
            for n, lp in zip(nodes, plans):
                np.testing.assert_allclose(lp.impl(x), x @ n.attrs["weight"], **TOL)
    for b, h, tq, tk, d in [(1, 1, 1, 1, 1), (2, 3, 1, 5, 7), (1, 1, 17, 3, 64), (0, 2, 4, 4, 8), (1, 2, 33, 33, 16)]:
        q = rng.standard_normal((b, h, tq, d)).astype(np.float32)
        kt = rng.standard_normal((b, h, d, tk)).astype(np.float32)
        v = rng.standard_normal((b, h, tk, d)).astype(np.float32)
        mask = np.where(rng.random((b, 1, 1, tk)) < 0.3, -1e4, 0).astype(np.float32)
        np.testing.assert_allclose(fused_attention(q, kt, v, mask), reference_attention(q, kt, v, mask), **TOL)
    for n, h in [(0, 8), (1, 1), (1, 5), (3, 1), (17, 33)]:
        x = rng.standard_normal((n, h)).astype(np.float32)
        s = rng.standard_normal(h).astype(np.float32)
        for fm in (None, True, False):
            for arg in (x, transposed(x).T):
                np.testing.assert_allclose(layernorm(arg, s, s, 1e-5, fm), reference_layernorm(x, s, s, epsilon=1e-5),
                                           **TOL)
    print("ok")
"""


def test_degenerate_shapes_of_every_kernel_at_two_threads(tmp_path):
    """1 output (a regression or cross-encoder head: the sparse driver ran a row past the
    end for the thread with none, a segfault), 1 input, fewer rows than threads, all-zero
    weights, rows and chunks, 0 and 1 token, token counts off the vector width; sparse
    (every K-chunk), dense, grouped, attention and LayerNorm, each against numpy."""
    run_python(DEGENERATE, timeout=600)


DEGENERATE_BF16 = """
    import numba, numpy as np
    from sparsejit.kernels.attention import fused_attention, reference_bf16_attention
    from sparsejit.kernels.amx import BF16AmxLinear, can_compress, has_amx
    from sparsejit.kernels.bf16 import BF16DenseLinear, BF16ScatteredLinear, BF16SparseLinear, reference_bf16_linear
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    for k, m in [(1, 1), (1, 5), (2, 1), (3, 7), (130, 1), (129, 3)]:
        for kind in ("random", "zero"):
            w = rng.standard_normal((k, m)).astype(np.float32) * (kind == "random")
            w[rng.random(w.shape) < 0.5] = 0
            nxt = BF16ScatteredLinear(rng.standard_normal((m, 3)).astype(np.float32), None, "none", False)
            for layer in (BF16SparseLinear(w, None, "gelu", False, k_chunk=64 if k > 64 else None),
                          BF16ScatteredLinear(w, None, "gelu", False, k_chunk=64 if k > 64 else None),
                          BF16DenseLinear(w, None, "gelu", False)):
                for tokens in (0, 1, 3, 17):
                    x = rng.standard_normal((tokens, k)).astype(np.float32)
                    got, want = layer(x), reference_bf16_linear(x, w, None, "gelu")
                    assert got.shape == (tokens, m) and np.allclose(got, want, atol=1e-4, rtol=1e-4), (k, m, tokens)
                    if isinstance(layer, BF16ScatteredLinear):  # (its output handed over as nxt's rows)
                        handed = nxt.from_quantized(layer.quantized_for(x, nxt), (tokens,))
                        assert np.array_equal(handed, nxt(got)), (k, m, tokens)
            if has_amx("bf16"):  # AMX's tiles, compressed ones expanded in the first token block's K-steps
                signed = np.where(w == 0, -0.0, w).astype(np.float32)  # (pruned zeros as -0.0: held as +0)
                for compressed in (False, True) if can_compress() else (False,):
                    layer = BF16AmxLinear(signed, None, "gelu", False, compressed=compressed)
                    for tokens in (0, 1, 3, 17, 40):
                        x = rng.standard_normal((tokens, k)).astype(np.float32)
                        got, want = layer(x), reference_bf16_linear(x, w, None, "gelu")
                        assert got.shape == (tokens, m) and np.allclose(got, want, atol=1e-4, rtol=1e-4), \
                            (k, m, tokens, compressed)
    # (head sizes of 32 and 64 run on AMX's tiles where the CPU has them)
    for tq, tk, d in [(1, 1, 1), (1, 2, 3), (3, 1, 2), (17, 33, 5), (1, 1, 32), (3, 1, 64), (17, 33, 32)]:
        q = rng.standard_normal((1, 2, tq, d)).astype(np.float32)
        kt = rng.standard_normal((1, 2, d, tk)).astype(np.float32)
        v = rng.standard_normal((1, 2, tk, d)).astype(np.float32)
        got = fused_attention(q, kt, v, None, np.float32(0.5), scale_op="mul", bf16=True)
        want, bound = reference_bf16_attention(q, kt, v, None, 0.5)
        assert got.shape == want.shape and np.all(np.abs(got - want) <= bound), (tq, tk, d)
    print("ok")
"""


def test_degenerate_shapes_of_the_bf16_kernels_at_two_threads():
    """The bf16 sparse kernels (pairs of consecutive inputs, and of any two, with its output
    handed over as the next layer's rows), the dense one and bf16 attention on 1 input or
    output, odd input counts (a pair half past the end), all-zero weights, 0 and 1 token,
    one key, one head feature (and, on AMX, one key or query of a whole tile row's head,
    and the dense layer on its tiles, compressed or not, its pruned zeros -0.0), at two
    threads in a subprocess, each against its numpy meaning."""
    from sparsejit.kernels.bf16 import has_bf16

    if not has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    assert run_python(DEGENERATE_BF16, timeout=600).stdout.split()[-1] == "ok"


DEGENERATE_INT8 = """
    import numba, numpy as np
    from sparsejit.kernels import elementwise
    from sparsejit.kernels import amx
    from sparsejit.kernels.amx import Int8Amx, has_amx
    from sparsejit.kernels.int8 import Int8Chunked, Int8Dense, Int8Linear, byte_rows, host_dots, reference_qlinear
    from sparsejit.kernels.layout import untiled
    from sparsejit.ops import dequantize_linear, qlinear_matmul, quantize_linear
    numba.set_num_threads(2)
    rng = np.random.default_rng(0)
    for k, m in [(1, 1), (1, 5), (128, 1), (4, 1), (8, 3), (520, 2)]:
        for kind in ["random", "zero", "pairs past the limit"]:
            w = rng.integers(-127, 128, (k, m)).astype(np.int8)
            w[rng.random(w.shape) < 0.7] = 0
            if kind == "zero":
                w[:] = 0
            elif kind == "pairs past the limit":
                w[:] = 127
            scale = np.full(m, 0.01, np.float32)
            requantize = np.array([[0.05] * m, [-100.0] * m, [155.0] * m], np.float32)
            for dot in host_dots() + ["vnni-chunked", "vnni-dense"] * ("vnni" in host_dots()):
                for rq in (None, requantize) if not dot.startswith("vnni-") else (None,):
                    args = (w, scale, "static", np.float32(0.1), np.uint8(100))
                    impl = Int8Chunked(*args, k_chunk=4) if dot == "vnni-chunked" else Int8Dense(*args) \
                        if dot == "vnni-dense" else Int8Linear(*args, requantize=rq, dot=dot)
                    for tokens in (0, 1, 3, 17):
                        x = rng.standard_normal((tokens, k)).astype(np.float32)
                        want = reference_qlinear(x, weight=w, scale=scale, mode="static", x_scale=np.float32(0.1),
                                                 x_zero_point=np.uint8(100), requantize=rq)
                        np.testing.assert_allclose(impl(x), want, atol=1e-5, rtol=1e-5)
                        if dot == "vnni-chunked":  # its output handed to a next layer already quantized
                            nxt = Int8Chunked(rng.integers(-127, 128, (m, 3)).astype(np.int8), np.full(3, 0.01, np.float32),
                                              "static", np.float32(0.05), np.uint8(9), k_chunk=4)
                            assert np.array_equal(nxt.from_quantized(impl.quantized_for(x, nxt), (tokens,)),
                                                  nxt(impl(x)))
            if has_amx("int8"):  # AMX's tiles; each block's epilogue runs beside the next block's products
                for compressed, act, residual, overlap in [(False, "none", False, True), (False, "gelu", False, True),
                                                           (True, "gelu", False, True), (True, "none", True, True),
                                                           (True, "gelu", False, False)]:
                    amx.OVERLAPPED = overlap  # (off: the epilogue after each block's own products)
                    impl = Int8Amx(w, scale, "static", np.float32(0.1), np.uint8(100), None, act, residual, compressed)
                    assert impl.config.overlapped == overlap
                    for tokens in (0, 1, 3, 17, 40):
                        x = rng.standard_normal((tokens, k)).astype(np.float32)
                        r = rng.standard_normal((tokens, m)).astype(np.float32) if residual else None
                        want = reference_qlinear(x, r, weight=w, scale=scale, mode="static", x_scale=np.float32(0.1),
                                                 x_zero_point=np.uint8(100), activation=act, residual=residual)
                        got = impl(x, r) if residual else impl(x)
                        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
                        if not residual:  # (its output's bytes for a next AMX layer, as TokenTiles too)
                            grid = np.array([0.05, 9, 0, 255], np.float32)
                            tiles = impl.bytes_on(x, grid, tiled=True)
                            assert np.array_equal(untiled(tiles, -(-m // 4)), impl.bytes_on(x, grid))
                            nxt = Int8Amx(w.T.copy(), np.full(k, 0.01, np.float32), "static", np.float32(0.05),
                                          np.uint8(9), None, "none", False)
                            assert np.array_equal(nxt.from_quantized(tiles, (tokens,)),
                                                  nxt.from_quantized(byte_rows(untiled(tiles, -(-m // 4))), (tokens,)))
    s, z = np.float32(0.1), np.uint8(7)
    for shape in [(0,), (1,), (3,), (1, 1), (2, 0, 5), (5, 8193)]:  # fewer chunks than threads, a partial one
        x = rng.standard_normal(shape).astype(np.float32)
        q = elementwise.quantize(x, s, z)
        assert np.array_equal(q, quantize_linear(x, s, z))
        assert np.array_equal(elementwise.dequantize(q, s, z), dequantize_linear(q, s, z))
        assert np.array_equal(elementwise.fake_quantize(x, s, z), dequantize_linear(quantize_linear(x, s, z), s, z))
        table = np.arange(256, dtype=np.float32)
        assert np.array_equal(elementwise.lookup(q, table=table), table[q])
    for in_scale, in_zero in [(s, z), (np.float32(-0.1), np.int8(-7))]:  # (bytes in the type's order, reversed)
        value, table = elementwise.softmax_table(in_scale, in_zero)
        for rows in [(0, 4), (1, 1), (3, 1), (1, 7), (70, 128)]:  # (70 rows: a task of 64, then a partial one)
            q = rng.integers(-128, 128, rows).astype(in_zero.dtype)
            got = elementwise.qsoftmax(q, in_scale=in_scale, in_zero=in_zero, out_scale=np.float32(1 / 255),
                                       out_zero=np.uint8(0), value=value, table=table)
            want = elementwise.reference_qsoftmax(q, in_scale=in_scale, in_zero=in_zero,
                                                  out_scale=np.float32(1 / 255), out_zero=np.uint8(0))
            assert np.array_equal(got, want)
    from sparsejit.kernels.layernorm import Grid, layernorm, layernorm_to_bytes
    for h in (1, 5):
        for tokens in (0, 1, 3, 17):
            x = rng.standard_normal((tokens, h)).astype(np.float32)
            g, b = np.ones(h, np.float32), np.zeros(h, np.float32)
            for fm in (True, False):  # the LayerNorm rounding to a grid as it stores
                got = layernorm(x, g, b, 1e-5, fm, Grid.of((s, z)))
                assert got.shape == x.shape
                assert np.array_equal(got, elementwise.fake_quantize(layernorm(x, g, b, 1e-5, fm), s, z))
            y, xq = layernorm_to_bytes(x, g, b, 1e-5, Grid.of((s, z)))  # and storing its int8 reader's bytes
            assert np.array_equal(y, layernorm(x, g, b, 1e-5, True, Grid.of((s, z))))
            padded = np.zeros((tokens, 4 * xq.shape[-1]), np.uint8)
            padded[:, :h] = elementwise.quantize(y, s, z)
            assert xq.shape == (tokens, -(-h // 4)) and np.array_equal(xq, padded.view(np.int32))
            _, tiles = layernorm_to_bytes(x, g, b, 1e-5, Grid.of((s, z)), tiled=True)  # (as AMX layers read them)
            assert np.array_equal(untiled(tiles, -(-h // 4)), xq)
    if has_amx("bf16"):  # a bf16 AMX layer's pair rows for the next, as TokenTiles too
        from sparsejit.kernels.amx import BF16AmxLinear
        for k, m in [(1, 1), (5, 3), (40, 33)]:
            layer = BF16AmxLinear(rng.standard_normal((k, m)).astype(np.float32), None, "gelu", False)
            for tokens in (0, 1, 3, 17, 40):
                x = rng.standard_normal((tokens, k)).astype(np.float32)
                assert np.array_equal(untiled(layer.pairs_on(x, tiled=True), -(-m // 2)), layer.pairs_on(x))
        from sparsejit.kernels.bf16 import packed_pairs
        from sparsejit.kernels.layernorm import layernorm_to_pairs
        from sparsejit.kernels.layout import transposed
        for h in (1, 5):  # the LayerNorm storing its bf16 AMX readers' pair rows
            for tokens in (0, 1, 3, 17):
                x = rng.standard_normal((tokens, h)).astype(np.float32)
                y, tiles = layernorm_to_pairs(x, np.ones(h, np.float32), np.zeros(h, np.float32), 1e-5)
                assert np.array_equal(y, layernorm(x, np.ones(h, np.float32), np.zeros(h, np.float32), 1e-5, True))
                if tokens:
                    want = packed_pairs(transposed(np.ascontiguousarray(y))).view(np.int32)
                    assert np.array_equal(untiled(tiles, -(-h // 2)).T, want)
    for a_shape, b_shape in [((1, 1), (1, 1)), ((0, 4), (4, 3)), ((2, 1, 3), (2, 3, 1))]:
        a, b = rng.integers(0, 256, a_shape).astype(np.uint8), rng.integers(0, 256, b_shape).astype(np.uint8)
        args = (a, s, z, b, s, z, np.float32(0.3), np.uint8(9))
        assert np.array_equal(elementwise.qlinear_matmul(*args), qlinear_matmul(*args))
    print("ok")
"""


def test_degenerate_shapes_of_the_int8_and_per_element_kernels_at_two_threads():
    """The int8 kernel (every dot this CPU runs, output requantized or not) with 1 output,
    1 input, fewer rows than threads, all-zero weights and every block past vpmaddubsw's
    limit, over 0, 1, 3 and 17 tokens (with VNNI, also handing its output to a next layer
    quantized, 1 to 5 outputs: a partial 4-block; with AMX, its tiles, dense and compressed,
    with GELU or a residual, each block's epilogue overlapped (and once after its own
    products), also over 40 tokens: a second block waiting on the first); the per-element kernels on empty, single-element
    and chunk-boundary tensors, softmax rows of 0 and 1 (and a partial task of rows, both
    byte orders), 1 x 1 and empty matmuls, the LayerNorm rounding to a grid over 0, 1, 3
    and 17 tokens of 1 and 5 features (and storing the bytes an int8 layer reads); the
    AMX layers' and the LayerNorm's bytes, and bf16 AMX pair rows (an AMX layer's, a
    LayerNorm's), as TokenTiles too: against numpy, in a subprocess."""
    run_python(DEGENERATE_INT8, timeout=600)


def test_single_output_sparse_layer_in_a_model(tmp_path):
    run_python("""
        import numpy as np, sparsejit
        from onnx import TensorProto, helper, numpy_helper
        rng = np.random.default_rng(0)
        w = rng.standard_normal((128, 1)).astype(np.float32)
        w[rng.random(w.shape) < 0.9] = 0
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
                              [numpy_helper.from_array(w, "w")])
        model = sparsejit.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), num_threads=2)
        assert model.layers[0].kind == "sparse"
        x = rng.standard_normal((5, 128)).astype(np.float32)
        np.testing.assert_allclose(model.run([x])[0], x @ w, atol=1e-5, rtol=1e-5)
        print("ok")
    """)


def test_the_file_may_change_or_go_after_load(tmp_path):
    """Truncated after load (SIGBUS on the next run when weights stayed mapped), then
    overwritten in place (which silently changed the results), then deleted: the loaded
    model computes what it did."""
    path = tmp_path / "model.onnx"
    shutil.copy(H128, path)
    run_python(f"""
        import os, numpy as np, sparsejit
        from conftest import make_inputs
        path = {str(path)!r}
        model = sparsejit.load(path)
        feeds = make_inputs(model.input_names, 2, 11)
        before = model.run(feeds)
        size = os.path.getsize(path)
        os.truncate(path, 100)
        assert all(np.array_equal(a, b) for a, b in zip(model.run(feeds), before))
        with open(path, "r+b") as f:
            f.write(bytes(size))
        assert all(np.array_equal(a, b) for a, b in zip(model.run(feeds), before))
        assert model.check().ok
        os.remove(path)
        assert all(np.array_equal(a, b) for a, b in zip(model.run(feeds), before))
        print("ok")
    """, tmp_path / "cache")


INT8 = MODELS_DIR / "int8"


def fork_and_threads(path: Path, precision: str = "fp32", batch: int = 2, seq: int = 16, kernels: str = "auto") -> str:
    return (FORK_AND_THREADS.replace("MODEL_PATH", repr(str(path))).replace("PRECISION", repr(precision))
            .replace("BATCH", str(batch)).replace("SEQ", str(seq)).replace("KERNELS", repr(kernels)))


FORK_AND_THREADS = """
    import os, threading, numpy as np, numba, sparsejit
    from conftest import make_inputs
    model = sparsejit.load(MODEL_PATH, num_threads=2, precision=PRECISION, kernels=KERNELS)
    feeds = make_inputs(model.input_names, BATCH, SEQ)
    model.run(feeds)
    first = model.run(feeds)[0]
    pid = os.fork()
    if pid == 0:  # the child runs the model it inherited
        ok = np.array_equal(model.run(feeds)[0], first)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"forked child: status {status}"
    same, errors = [], []

    def work():
        try:
            for _ in range(25):
                same.append(np.array_equal(model.run(feeds)[0], first))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(same) == 100 and all(same)
    print(numba.threading_layer())
"""


@pytest.mark.parametrize("path", [SDPA, INT8 / "bert_block4_p90_int8_dynamic.onnx",
                                  INT8 / "bert_block4_p90_int8_qoperator.onnx", INT8 / "bert_block4_p90_int8_sparseml.onnx"],
                         ids=["fp32", "int8", "qoperator", "sparseml"])
def test_fork_after_load_and_concurrent_runs(tmp_path, path):
    """A child forked after a run can run the model (GNU OpenMP killed it); four threads
    running one model at once all get the single-thread answer. For the int8 kernels and
    the per-element kernels between them too (a QOperator file; a SparseML file, whose
    LayerNorms round to a grid as they store)."""
    out = run_python(fork_and_threads(path))
    assert out.stdout.split()[-1] == "tbb" or "tbb" not in _installed()


@pytest.mark.parametrize("path", [MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx", SDPA],
                         ids=["4-block pairs", "scattered pairs"])
def test_fork_and_concurrent_runs_in_bf16(tmp_path, path):
    """The same for a model loaded with precision="bf16" (its bf16 Linear, GEMM and attention
    kernels pack their operands into per-call buffers, or are handed them by the layer
    before: runs after a shape's first take the FFN's handover)."""
    from sparsejit.kernels.bf16 import has_bf16

    if not has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    out = run_python(fork_and_threads(path, "bf16"))
    assert out.stdout.split()[-1] == "tbb" or "tbb" not in _installed()


@pytest.mark.parametrize("which", ["int8", "bf16"])
def test_fork_and_concurrent_runs_on_amx_tiles(which):
    """Every layer on AMX's tiles (kernels="dense"): a forked child runs the model (the tile
    permission Linux granted the parent is inherited), four threads run it at once (each
    loads its own tile configuration), and a batch of one token and one of 130 run."""
    from sparsejit.kernels.amx import has_amx

    if not has_amx(which):
        pytest.skip(f"this CPU has no AMX-{which.upper()}")
    path = INT8 / "bert_block4_p90_int8_sparseml.onnx" if which == "int8" else \
        MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"
    code = fork_and_threads(path, "bf16" if which == "bf16" else "fp32", kernels="dense") + """
    for batch, seq in [(1, 1), (1, 128), (3, 5)]:
        out = model.run(make_inputs(model.input_names, batch, seq))[0]
        assert out.shape[:2] == (batch, seq) and np.isfinite(out).all()
    """
    run_python(code)  # (a SIGILL, abort or failed assert is a non-zero exit)


@pytest.mark.parametrize("which", ["fp32", "static int8"])
def test_fork_and_concurrent_runs_by_token_tiles(tmp_path, which):
    """The same over 1100 tokens, where the generated forward runs each FFN by token tiles
    (executor.TokenChain) and, in a static INT8 file made by `sparsejit quantize`, hands
    FFN1's output to FFN2 quantized."""
    path = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"
    if which == "static int8":
        pytest.importorskip("onnxruntime")
        from sparsejit.quantize import quantize_model

        path = quantize_model(path, tmp_path / "static.onnx", "static")
    code = fork_and_threads(path, batch=10, seq=110, kernels="sparse")  # (AMX's GEMM, which "auto" may take, is not chained)
    out = run_python(code.replace("first = model.run(feeds)[0]",
                                  "first = model.run(feeds)[0]\n"
                                  "    assert 'by token tiles' in model.forward_source(feeds)"))
    assert out.stdout.split()[-1] == "tbb" or "tbb" not in _installed()


@pytest.mark.parametrize("path", [SDPA, INT8 / "bert_block4_p90_int8_qoperator.onnx"], ids=["fp32", "qoperator"])
def test_workqueue_layer_serialises_concurrent_runs(tmp_path, path):
    """Forced to Numba's workqueue layer, which aborts on concurrent launches, runs from
    several threads take turns instead (the per-element kernels between int8 layers too)."""
    out = run_python(fork_and_threads(path), env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert out.stdout.split()[-1] == "workqueue"


@pytest.mark.parametrize("layer", ["tbb", "safe"])
def test_a_user_chosen_tbb_layer_loads(layer):
    """NUMBA_THREADING_LAYER=tbb (or "safe", which means tbb) set by the user: the first
    run failed with "No threading layer could be loaded", as sparsejit only loaded the tbb
    wheel's library when it chose the layer itself."""
    if "tbb" not in _installed():
        pytest.skip("the tbb wheel is not installed")
    out = run_python(fork_and_threads(SDPA), env={"NUMBA_THREADING_LAYER": layer})
    assert out.stdout.split()[-1] == "tbb"


def _installed() -> set[str]:
    from importlib import metadata

    return {d.metadata["Name"].lower() for d in metadata.distributions()}


# --- silently wrong -----------------------------------------------------------------------

def test_nan_in_a_query_weight_is_guarded_as_the_graph_says(tmp_path):
    """An SDPA export zeroes NaN probabilities (Where(IsNaN(p), 0, p)); the fused kernel
    applied that only to fully masked rows, so one NaN in a query weight made every
    output NaN, where ONNX Runtime and the reference mode give numbers."""
    model = onnx.load(SDPA)
    query = next(n for n in model.graph.node if "query" in n.name and n.op_type == "MatMul")
    t = next(t for t in model.graph.initializer if t.name == query.input[1])
    w = onnx.numpy_helper.to_array(t).copy()
    w[3, 5] = np.nan
    t.CopyFrom(onnx.numpy_helper.from_array(w, t.name))
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    feeds = make_inputs([i.name for i in model.graph.input], 2, 9)
    want = ort_run(path, feeds)
    assert not any(np.isnan(a).all() for a in want)
    for m in (sparsejit.load(path), sparsejit.load(path, mode="reference")):
        for g, w_ in zip(m.run(feeds), want):
            np.testing.assert_allclose(g, w_, atol=1e-4, rtol=1e-4, equal_nan=True)


def test_reference_mode_runs_a_native_layernorm_twice():
    """The op returns (y, mean, inv_std); the generated forward of the second run unpacked one."""
    model = sparsejit.load(H128, mode="reference")
    feeds = make_inputs(model.input_names, 2, 9)
    first, second = model.run(feeds), model.run(feeds)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert_parity(second, ort_run(H128, feeds), model.output_names)


def _mid_density_model(path: Path) -> None:
    from encoders import EncoderSpec, make_encoder

    onnx.save(make_encoder(EncoderSpec(hidden=32, heads=2, ffn=64, sparsity=0.5, seed=4)), path)


def test_plans_are_the_same_at_every_load(tmp_path, monkeypatch):
    """Weights at 50% density are decided by timing. The first load's plan is kept in the
    cache and the next loads reuse it without timing, even when every timing would now
    say otherwise; inspect's `decided_by` says where each decision came from."""
    import sparsejit.choose as choose_mod

    monkeypatch.setenv("SPARSEJIT_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "mid.onnx"
    _mid_density_model(path)
    first = sparsejit.load(path)
    assert {lp.decided_by for lp in first.layers} >= {"measured"}
    plans = list((tmp_path / "cache" / "plans").glob("*.json"))
    assert len(plans) == 1

    def upside_down(fns, rounds=7):  # the machine now says dense, whatever it said before
        return {name: 1.0 if name == "dense" else 2.0 for name in fns}

    monkeypatch.setattr(choose_mod, "race", lambda *a, **k: pytest.fail("timed a layer a saved plan decides"))
    for _ in range(3):
        again = sparsejit.load(path)
        assert again.plan == first.plan
        assert [lp.kind for lp in again.layers] == [lp.kind for lp in first.layers]
        assert {lp.decided_by for lp in again.layers if lp.kind == "sparse"} <= {"cached plan"}
    # Another thread count is another plan: timed again.
    monkeypatch.setattr(choose_mod, "race", upside_down)
    sparsejit.load(path, num_threads=1)
    assert len(list((tmp_path / "cache" / "plans").glob("*.json"))) == 2


def test_a_plan_file_is_written_then_followed(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJIT_CACHE_DIR", str(tmp_path / "cache"))
    path, plan = tmp_path / "mid.onnx", tmp_path / "mid.plan.json"
    _mid_density_model(path)
    first = sparsejit.load(path, plan=plan)
    saved = json.loads(plan.read_text())
    kernels = [n for n in first.graph.nodes if n.op_type in ("Linear", "LinearGroup")]  # one entry a kernel
    assert sorted(saved["layers"]) == sorted(n.name for n in kernels)
    # Edited by hand: every layer dense. The next load follows it, and says so.
    for entry in saved["layers"].values():
        entry.update(kernel="dense", k_chunk=None)
    plan.write_text(json.dumps(saved))
    again = sparsejit.load(path, plan=plan)
    assert {lp.kind for lp in again.layers} == {"dense"}
    assert {lp.decided_by for lp in again.layers} == {"plan file"}
    feeds = make_inputs(again.input_names, 2, 7, vocab=50)
    assert_parity(again.run(feeds), ort_run(path, feeds), again.output_names)
    plan.write_text("{not json")
    with pytest.raises(ValueError, match="mid.plan.json"):
        sparsejit.load(path, plan=plan)


def test_the_inspect_table_says_how_each_layer_was_decided(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sparsejit", "inspect", str(SDPA), "-v"], capture_output=True,
                         text=True, env={**os.environ, "SPARSEJIT_CACHE_DIR": str(tmp_path)}, cwd=ROOT,
                         check=True).stdout
    assert "who decided each kernel, and why" in out and ": rule: " in out  # -v: who decided, and why


# --- the kernel cache -----------------------------------------------------------------------

LOAD_AND_COMPARE = f"""
    import logging, numpy as np, sparsejit
    from conftest import make_inputs
    logging.basicConfig(level=logging.WARNING)
    model = sparsejit.load({str(H128)!r})
    feeds = make_inputs(model.input_names, 2, 9)
    out = model.run(feeds)
    np.save("out.npy", out[0])
    print("ok")
"""


def _load_in(tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    return run_python(f"import os; os.chdir({str(tmp_path)!r})\n" + textwrap.dedent(LOAD_AND_COMPARE), cache)


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A kernel cache filled by one load, and that load's output: compiled once, copied
    (times kept, as Numba's index records them) for each test that damages it."""
    where = tmp_path_factory.mktemp("filled")
    _load_in(where, where / "cache")
    return where / "cache", np.load(where / "out.npy")


def _copy_of(filled: Path, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(filled, cache, copy_function=shutil.copy2)
    return cache


def test_a_damaged_numba_cache_is_rebuilt_and_named(tmp_path, filled_cache):
    """Truncated index files and garbage data files: the next load logs each (naming it),
    removes it and compiles again; the one after finds a sound cache and says nothing."""
    cache, good = _copy_of(filled_cache[0], tmp_path), filled_cache[1]
    assert "kernel cache" not in _load_in(tmp_path, cache).stderr  # the copy is a sound cache
    numba_dir = cache / "kernels" / "__pycache__"
    index, data = sorted(numba_dir.glob("*.nbi")), sorted(numba_dir.glob("*.nbc"))
    assert index and data
    for p in index:
        p.write_bytes(p.read_bytes()[:10])
    for p in data:
        p.write_bytes(b"garbage" * 10)
    second = _load_in(tmp_path, cache)
    assert np.array_equal(np.load(tmp_path / "out.npy"), good)
    assert str(index[0]) in second.stderr and "is not used" in second.stderr
    third = _load_in(tmp_path, cache)
    assert "kernel cache" not in third.stderr


def test_swapped_machine_code_is_detected(tmp_path, filled_cache):
    """Two valid ir_*.o files swapped: each is sealed with the key it was built for, so
    neither runs as the other."""
    cache, good = _copy_of(filled_cache[0], tmp_path), filled_cache[1]
    objects = sorted((cache / "kernels").glob("ir_*.o"))
    assert len(objects) >= 2
    a, b = objects[0].read_bytes(), objects[1].read_bytes()
    objects[0].write_bytes(b)
    objects[1].write_bytes(a)
    second = _load_in(tmp_path, cache)
    assert np.array_equal(np.load(tmp_path / "out.npy"), good)
    assert "built for another kernel" in second.stderr


def test_cache_directory_and_files_are_private(filled_cache):
    cache = filled_cache[0]
    for d in (cache, cache / "kernels", cache / "kernels" / "__pycache__", cache / "plans"):
        assert (d.stat().st_mode & 0o777) == 0o700, d
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all((p.stat().st_mode & 0o777) == 0o600 for p in files), \
        {p.name: oct(p.stat().st_mode) for p in files if (p.stat().st_mode & 0o777) != 0o600}


def test_xdg_cache_home_is_honoured(tmp_path):
    run_python("import sparsejit; sparsejit.load(sparsejit.default_model_path())",
               env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert list((tmp_path / "xdg" / "sparsejit" / "kernels").glob("ir_*.o"))


PLANT = """
    import pickle, os
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch {marker}",))
    payload = pickle.dumps(Boom())
"""


def test_files_planted_in_the_cache_do_not_run(tmp_path, filled_cache):
    """A pickle over Numba's index files, a .pyc beside the kernels: with the cache
    writable by others they ran as the loading user. Now a file that group or others can
    write (or another user owns) is removed unread, and a .pyc is never read."""
    cache = _copy_of(filled_cache[0], tmp_path)
    marker = tmp_path / "ran"
    payload = pickle.dumps(_Boom(f"touch {marker}"))
    numba_dir = cache / "kernels" / "__pycache__"
    for p in numba_dir.glob("*.nbi"):
        p.write_bytes(payload)
        p.chmod(0o666)
    for k in (cache / "kernels").glob("k_*.py"):
        (numba_dir / f"{k.stem}.cpython-{sys.version_info.major}{sys.version_info.minor}.pyc").write_bytes(
            b"planted")
    out = _load_in(tmp_path, cache)
    assert not marker.exists()
    assert "group or others" in out.stderr or "mode 0666" in out.stderr


def test_a_cache_others_can_write_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    out = _load_in(tmp_path, cache)
    assert "not using the kernel cache" in out.stderr and "group or others can write" in out.stderr
    assert not (cache / "kernels").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file another user's needs root")
def test_a_cache_file_of_another_user_is_not_read(tmp_path, filled_cache):
    cache = _copy_of(filled_cache[0], tmp_path)
    marker = tmp_path / "ran"
    for p in (cache / "kernels" / "__pycache__").glob("*.nbi"):
        p.write_bytes(pickle.dumps(_Boom(f"touch {marker}")))
        os.chown(p, 4242, 4242)
    out = _load_in(tmp_path, cache)
    assert not marker.exists() and "belongs to user id 4242" in out.stderr


class _Boom:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


# --- bad models and inputs ----------------------------------------------------------------

def _edited(tmp_path: Path, edit) -> Path:
    model = onnx.load(H128)
    edit(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    return path


def _set(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    t = next(t for t in model.graph.initializer if t.name == name)
    t.CopyFrom(onnx.numpy_helper.from_array(value, name))


def _first(model: onnx.ModelProto, op_type: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op_type)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


def _wrong_weight(m):
    mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.input[1].startswith("onnx::"))
    _set(m, mm.input[1], np.zeros((132, 128), np.float32))


def _second_definition(m):
    m.graph.node[6].output[0] = m.graph.node[5].output[0]


def _short_raw_data(m):
    t = next(t for t in m.graph.initializer if t.name == "model.embeddings.word_embeddings.weight")
    t.raw_data = t.raw_data[:-4]


BAD_MODELS = {
    "a value defined twice": (_second_definition, r"defined twice: by node .* and by node"),
    "an unknown IR version": (lambda m: setattr(m, "ir_version", 99), "IR version 99"),
    "a MatMul weight of the wrong size": (_wrong_weight, r"query/MatMul.*Incompatible dimensions"),
    "a bias of the wrong size": (lambda m: _set(m, "model.encoder.layer.0.intermediate.dense.bias",
                                                np.zeros(500, np.float32)), r"intermediate/dense/Add"),
    "a LayerNorm scale of the wrong size": (lambda m: _set(m, "model.embeddings.LayerNorm.weight",
                                                           np.ones(100, np.float32)),
                                            r"LayerNormalization.*LayerNorm.weight.*\[100\].*\[128\]"),
    "a Gather axis out of range": (lambda m: setattr(_attr(_first(m, "Gather"), "axis"), "i", 5),
                                   r"Gather.*axis must be in"),
    "a Transpose perm out of range": (lambda m: _attr(_first(m, "Transpose"), "perm").ints.__setitem__(0, 7),
                                      r"Transpose.*perm"),
    "raw_data shorter than its dims": (_short_raw_data, r"word_embeddings.weight"),
}


@pytest.mark.parametrize("what", list(BAD_MODELS))
def test_bad_models_are_refused_at_load_naming_file_and_node(tmp_path, what):
    """What ONNX Runtime refuses at load, refused too (the second definition of a value
    used to win silently), the error naming the file and the node or tensor."""
    edit, pattern = BAD_MODELS[what]
    path = _edited(tmp_path, edit)
    with pytest.raises(sparsejit.UnsupportedModelError, match=pattern) as e:
        sparsejit.load(path)
    assert str(path) in str(e.value)


def test_empty_output_names_ask_for_every_output():
    model = sparsejit.load(SDPA)
    feeds = make_inputs(model.input_names, 1, 5)
    assert [a.shape for a in model.run(feeds, output_names=[])] == [a.shape for a in model.run(feeds)]
    assert len(model.run(feeds, [])) == len(model.output_names) == 2


def test_an_output_of_the_input_shapes_alone_runs_again(tmp_path):
    """Its forward has no steps (the shapes' values are computed once per shape): later runs
    of the shape gave a ZeroDivisionError deciding whether to tape it."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "shape.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = sparsejit.load(path)
    for n in (2, 2, 2, 5, 2, 2):
        x = np.zeros((n, 3), np.float32)
        np.testing.assert_array_equal(model.run({"x": x})[0], ort_run(path, {"x": x})[0])


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements_indices_shorter_than_the_data_on_other_axes(tmp_path, axis):
    """The output has the indices' shape (numpy's take_along_axis broadcast them to x's)."""
    from onnx import TensorProto, helper

    idx = helper.make_tensor("i", TensorProto.INT64, [2, 3], [0, 2, -1, 1, 0, 2])
    g = helper.make_graph([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=axis)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [idx])
    path = tmp_path / "ge.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    got, want = sparsejit.load(path).run({"x": x})[0], ort_run(path, {"x": x})[0]
    assert got.shape == want.shape == (2, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["bert_sdpa_h64_op18_dynamo_p90", "roberta_sdpa_h64_op18_dynamo_p90"])
def test_batch_zero_gives_empty_outputs_as_onnx_runtime(name):
    path = MODELS_DIR / f"{name}.onnx"
    model = sparsejit.load(path)
    feeds = {n: np.zeros((0, 7), np.int64) for n in model.input_names}
    got, want = model.run(feeds), ort_run(path, feeds)
    assert [(a.shape, a.dtype) for a in got] == [(a.shape, a.dtype) for a in want]


def test_thread_counts_belong_to_each_model(tmp_path):
    """A second load with another thread count used to re-split the first model's kernels
    while it still reported its own count; a model loaded for one thread ran on two when
    called from another thread; loading left BLAS single-threaded for the whole process."""
    run_python(f"""
        import threading, numba, numpy as np, sparsejit
        from sparsejit.threads import _find_blas
        from conftest import make_inputs
        blas = _find_blas()
        before = [get() for get, _ in blas]
        caller = numba.get_num_threads()
        one = sparsejit.load({str(SDPA)!r}, num_threads=1)
        two = sparsejit.load({str(SDPA)!r}, num_threads=2)
        feeds = make_inputs(one.input_names, 2, 9)
        sparse = lambda m: [lp.impl for lp in m.layers if lp.kind == "sparse" and hasattr(lp.impl, "_layout")]

        def split_for(m):  # the thread count each sparse kernel's rows are split for
            return {{impl._layout[0] for impl in sparse(m)}}

        a, b = one.run(feeds), two.run(feeds)
        assert (one.num_threads, two.num_threads) == (1, 2)
        assert split_for(one) == {{1}} and split_for(two) == {{2}}, (split_for(one), split_for(two))
        seen = []
        t = threading.Thread(target=lambda: seen.append((one.run(feeds), split_for(one))))
        t.start(); t.join()
        assert split_for(one) == {{1}} and all(np.array_equal(x, y) for x, y in zip(seen[0][0], a))
        assert numba.get_num_threads() == caller
        assert [get() for get, _ in blas] == before and before
        print("ok")
    """)


# --- generated models against ONNX Runtime ----------------------------------------------

def test_generated_encoders_match_onnx_runtime():
    """Hypothesis-generated encoders of random shapes and sparsity against ONNX Runtime
    (`fuzz_encoders.py`), in a subprocess: a case that crashes fails this test, and
    hypothesis's report of it is in the failure message."""
    pytest.importorskip("hypothesis")
    pytest.importorskip("onnxruntime")
    run_python("import fuzz_encoders; fuzz_encoders.generated_encoders_match_onnx_runtime()", timeout=900)


def test_dense_gemv_in_threads_and_a_forked_child():
    """The few-token dense kernel (dense_ir's `gemv`) copies each token's x to its stack:
    at the largest x it takes (linear.GEMV_TOKENS tokens, GEMV_X_FLOATS floats) and at
    degenerate shapes (one input, one output, no tokens) it runs in a forked child and on
    four Python threads at once, each giving the numpy reference's result."""
    run_python("""
    import os, threading, numpy as np
    from sparsejit.kernels import linear
    from sparsejit.kernels.dense_ir import GEMV_X_FLOATS
    from sparsejit.kernels.compile import vector_lanes

    rng = np.random.default_rng(0)
    tokens = linear.GEMV_TOKENS
    k = GEMV_X_FLOATS // tokens - vector_lanes()
    cases = []
    for kk, m, n in [(k, 40, tokens), (1, 1, 1), (1, 7, 3), (13, 1, 2), (k, 3, 0)]:
        w = rng.standard_normal((kk, m)).astype(np.float32)
        b = rng.standard_normal(m).astype(np.float32)
        layer = linear.DenseLinear(w, b, "tanh", False)
        assert layer._takes_few(max(n, 1))
        x = rng.standard_normal((n, kk)).astype(np.float32)
        cases.append((layer, x, linear.reference_linear(x, w, b, "tanh")))

    def check():
        for layer, x, want in cases:
            got = layer(x)
            assert got.shape == want.shape and np.allclose(got, want, atol=1e-4, rtol=1e-4)

    check()
    pid = os.fork()
    if pid == 0:
        try:
            check()
        except BaseException:
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"forked child: status {status}"
    errors = []

    def work():
        try:
            for _ in range(20):
                check()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    """)
