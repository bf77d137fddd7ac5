"""Each kernel against its dense numpy reference, on shapes and edge cases the models may not hit."""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from scipy.special import erf
from sparsejit.kernels.attention import PreparedMask, float_steps, fused_attention, mask_steps, reference_attention
from sparsejit.kernels.compile import compile_ir, vector_lanes
from sparsejit.kernels.compress import analyse, balanced_bounds, compress
from sparsejit.kernels.epilogue import GELU_PIECES, GELU_STEP, gelu
from sparsejit.kernels.epilogue import erf as ir_erf
from sparsejit.kernels.epilogue import exp as ir_exp
from sparsejit.kernels.ir import Builder, Signature
from sparsejit.kernels.layernorm import layernorm, reference_layernorm
from sparsejit.kernels.layout import (
    TokenTiles,
    aligned_empty,
    contiguous,
    feature_major_empty,
    on_lines,
    token_tiles_empty,
    transposed,
    unit_token_stride,
    untiled,
)
from sparsejit.kernels.linear import DenseLinear, SparseLinear, kernel_config, reference_linear
from sparsejit.kernels.sparse_ir import SIGNATURE as SPARSE_SIGNATURE
from sparsejit.kernels.sparse_ir import ir_source

TOL = {"atol": 1e-4, "rtol": 1e-4}


def pruned(rng, k, m, sparsity, block=1):
    w = rng.standard_normal((k, m)).astype(np.float32)
    if block == 1:
        w[rng.random((k, m)) < sparsity] = 0
    else:
        keep = rng.random((k // block, m)) >= sparsity
        w *= np.repeat(keep, block, axis=0)
    return w


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("impl", [SparseLinear, DenseLinear])
def test_linear_matches_reference(block, activation, residual, impl):
    rng = np.random.default_rng(block * 10 + residual)
    k, m = 96, 40
    w = pruned(rng, k, m, 0.85, block)
    bias = rng.standard_normal(m).astype(np.float32)
    # one token, odd counts, one vector of tokens and one past (DenseLinear's two kernels), batches, full tiles, none;
    # the sparse kernel's tiles after the full ones: 1 and 2 vectors, 3 and 1 masked, 3 whole, 4 and 1 masked
    for lead in [(1,), (7,), (16,), (17,), (3, 13), (48,), (2, 100), (0,)]:
        x = rng.standard_normal(lead + (k,)).astype(np.float32)
        r = rng.standard_normal(lead + (m,)).astype(np.float32) if residual else None
        layer = impl(w, bias, activation, residual)
        if impl is SparseLinear:
            assert layer.pattern.block == block
        got = layer(x, r)
        assert got.shape == lead + (m,)
        np.testing.assert_allclose(got, reference_linear(x, w, bias, activation, r), **TOL)


@pytest.mark.parametrize("lanes", [16, 8])
def test_dense_few_tokens_run_the_gemv(lanes, monkeypatch):
    """A few tokens (a pooler's, a classifier's) take dense_ir's GEMV, whose lanes run along
    a panel's packed weights: inputs that end inside a step (1, 5, 13, 99: the masked last
    step), outputs that end inside a panel, 1 to GEMV_TOKENS tokens, x a strided view (each
    token's copied first), residual and activation; past GEMV_TOKENS, or x too large for
    its stack copy, the GEMM. At 16 lanes (6 rows a panel) and at 8 (AVX2's, 4 rows)."""
    import sparsejit.kernels.linear as linear_mod
    from sparsejit.kernels.dense_ir import GEMV_X_FLOATS

    if lanes == 16 and vector_lanes() != 16:
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(linear_mod, "vector_lanes", lambda: lanes)
    picked = []
    run = linear_mod.dense_panels
    monkeypatch.setattr(linear_mod, "dense_panels", lambda d, fn, *a: picked.append(fn) or run(d, fn, *a))
    rng = np.random.default_rng(lanes)
    for k, m in [(1, 1), (5, 7), (13, 40), (99, 13), (GEMV_X_FLOATS, 3)]:
        w = rng.standard_normal((k, m)).astype(np.float32)
        bias = rng.standard_normal(m).astype(np.float32)
        for residual, activation in [(False, "tanh"), (True, "none")]:
            layer = DenseLinear(w, bias, activation, residual)
            assert layer.config.lanes == lanes
            for tokens in [1, 2, 5, linear_mod.GEMV_TOKENS, linear_mod.GEMV_TOKENS + 1]:
                x = rng.standard_normal((2 * tokens, k)).astype(np.float32)[::2]  # (every other row: strided)
                r = rng.standard_normal((tokens, m)).astype(np.float32) if residual else None
                picked.clear()
                np.testing.assert_allclose(layer(x, r), reference_linear(x, w, bias, activation, r), **TOL)
                gemv = tokens <= linear_mod.GEMV_TOKENS and (k + lanes) * tokens <= GEMV_X_FLOATS
                assert picked == [layer._few if gemv else layer._fn], (k, m, tokens)


def test_kernels_prefetch_the_residual_and_output_rows_ahead():
    """A prefetch cannot change a result, so the tests above cannot see it: the kernel text
    must hold, in every tile width, one read prefetch per residual vector of the row
    RESIDUAL_AHEAD slots on (none without a residual), and one write prefetch per output
    vector of the row OUTPUT_AHEAD slots on. (Their effect: bench/README, eighth and
    tenth sessions.)"""
    import re

    from sparsejit.kernels.sparse_ir import OUTPUT_AHEAD, RESIDUAL_AHEAD, IRConfig, masked_widths, narrower_widths

    def prefetches(text: str, write: bool) -> int:
        return len(re.findall(rf"call void @llvm\.prefetch\.p0\(ptr %\S+, i32 {int(write)}, i32 3, i32 1\)", text))

    assert RESIDUAL_AHEAD > 0 and OUTPUT_AHEAD > 0
    for cfg in (IRConfig(residual=True), IRConfig(block=4, residual=True, activation="gelu"),
                IRConfig(residual=True, int8=True), IRConfig(residual=True, bf16=True), IRConfig(residual=False)):
        text = ir_source(cfg)
        tiles = [cfg.vectors, *narrower_widths(cfg), *masked_widths(cfg)]  # full, narrower, those masked
        assert prefetches(text, write=False) == (sum(tiles) if cfg.residual else 0)
        assert prefetches(text, write=True) == sum(tiles) and f"add i64 %s, {OUTPUT_AHEAD}" in text
        assert (f"add i64 %s, {RESIDUAL_AHEAD}" in text) == cfg.residual


def test_compressed_int8_amx_kernels_prefetch_the_next_pair_of_panels():
    """A prefetch cannot change a result, so the AMX tests cannot see it: a compressed int8
    kernel's text must prefetch, beside each K-tile it expands, the masks and nonzeros of
    the next pair of panels' same K-tile (amx_ir.PREFETCH_NEXT), into L2, only where that
    pair's first feature is under m (its offsets are read); bf16 and dense kernels none."""
    import re

    from sparsejit.kernels.amx_ir import PREFETCH_NEXT, AmxConfig, amx_ir

    def prefetches(text: str) -> list[str]:
        return re.findall(r"call void @llvm\.prefetch\.p0\(ptr (%\S+), i32 0, i32 2, i32 1\)", text)

    assert PREFETCH_NEXT == ("int8",)
    for act, overlapped in [("none", False), ("gelu", True)]:
        text = amx_ir(AmxConfig("int8", act, False, True, overlapped))
        found = prefetches(text)
        assert len(found) >= 2 * 3, found  # (each panel: its masks' two lines and a loop over its nonzeros' lines)
        assert "icmp slt i64" in text and "%offsets" in text
        assert not prefetches(amx_ir(AmxConfig("int8", act, False, False, overlapped)))
        assert not prefetches(amx_ir(AmxConfig("bf16", act, False, True, overlapped)))


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("k_chunk", [4, 24, 64, 96, 500])
def test_sparse_linear_in_k_chunks(block, activation, residual, k_chunk):
    """K-chunked kernels: partial sums carried through yᵀ, the epilogue once, on the last chunk.

    The weight has a row empty in every chunk, rows empty only in the first or last chunk,
    and 96 inputs that 24 and 64 do not divide evenly (64 leaves a short last chunk)."""
    rng = np.random.default_rng(k_chunk + block)
    k, m = 96, 40
    w = pruned(rng, k, m, 0.7, block)
    w[:, 2] = 0
    w[:k_chunk, 5] = 0
    w[-(k % k_chunk or k_chunk):, 6] = 0
    bias = rng.standard_normal(m).astype(np.float32)
    layer = SparseLinear(w, bias, activation, residual, k_chunk=k_chunk)
    assert layer.nchunks == -(-k // k_chunk)
    for lead in [(1,), (7,), (3, 13), (2, 100), (0,)]:
        x = rng.standard_normal(lead + (k,)).astype(np.float32)
        r = rng.standard_normal(lead + (m,)).astype(np.float32) if residual else None
        np.testing.assert_allclose(layer(x, r), reference_linear(x, w, bias, activation, r), **TOL)


def test_k_chunk_must_keep_blocks_whole():
    w = pruned(np.random.default_rng(0), 32, 8, 0.5, block=4)
    with pytest.raises(ValueError, match="multiple of the block size 4"):
        SparseLinear(w, None, "none", False, k_chunk=6)


def test_sparse_linear_chains_in_feature_major_layout():
    """A sparse layer's output (a transposed view) fed straight into the next, as in a model."""
    rng = np.random.default_rng(1)
    w1, w2 = pruned(rng, 64, 128, 0.9), pruned(rng, 128, 64, 0.9)
    x = rng.standard_normal((2, 9, 64)).astype(np.float32)
    a, b = SparseLinear(w1, None, "gelu", False), SparseLinear(w2, None, "none", True)
    h = a(x)
    assert not h.flags.c_contiguous  # feature-major view, no copy made
    got = b(h, x)
    want = reference_linear(reference_linear(x, w1, None, "gelu"), w2, None, "none", x)
    np.testing.assert_allclose(got, want, **TOL)
    np.testing.assert_allclose(DenseLinear(w2, None, "none", True)(h, x), want, **TOL)


def test_empty_rows_and_all_zero_weight():
    rng = np.random.default_rng(2)
    w = pruned(rng, 32, 16, 0.5)
    w[:, 3] = 0  # an output with no stored weight: bias only
    w[5, :] = 0
    x = rng.standard_normal((5, 32)).astype(np.float32)
    bias = np.arange(16, dtype=np.float32)
    np.testing.assert_allclose(SparseLinear(w, bias, "none", False)(x), reference_linear(x, w, bias), **TOL)
    zero = np.zeros((32, 16), np.float32)
    np.testing.assert_allclose(SparseLinear(zero, bias, "gelu", False)(x), reference_linear(x, zero, bias, "gelu"),
                               **TOL)


@pytest.mark.parametrize("k_chunk", [None, 4096])
def test_inputs_beyond_16_bit_indices(k_chunk):
    """Past 65536 inputs the indices are stored in 32 bits (read two at a time, like the
    16-bit ones): rows with 0 to 5 nonzeros, at inputs on both sides of 65536."""
    rng = np.random.default_rng(5)
    k, m = (1 << 16) + 40, 6
    w = np.zeros((k, m), np.float32)
    for j in range(m):
        rows = rng.choice(k, size=j, replace=False)
        rows[: j // 2] = (1 << 16) + rng.integers(0, 40, j // 2)  # some above 16 bits
        w[rows, j] = rng.standard_normal(j)
    w[k - 1, 5] = 2.0
    layer = SparseLinear(w, None, "none", False, k_chunk=k_chunk)
    assert layer.config.index_bits == 32
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(layer(x), reference_linear(x, w), **TOL)

def test_analyse_and_compress():
    rng = np.random.default_rng(3)
    w = pruned(rng, 64, 32, 0.8, block=4)
    p = analyse(w)
    assert p.block == 4 and p.nnz == int((w != 0).sum()) and abs(p.density - 0.2) < 0.08
    indptr, idx, vals = compress(w, 4)
    assert vals.shape == (indptr[-1], 4) and np.all(idx % 4 == 0)
    dense_again = np.zeros_like(w.T)
    for j in range(32):
        for p_ in range(indptr[j], indptr[j + 1]):
            dense_again[j, idx[p_]:idx[p_] + 4] = vals[p_]
    np.testing.assert_array_equal(dense_again.T, w)
    unstructured = pruned(rng, 64, 32, 0.9)
    assert analyse(unstructured).block == 1


def test_source_is_a_pure_function_of_the_config():
    cfg = kernel_config(4, "gelu", True)
    assert ir_source(cfg) == ir_source(kernel_config(4, "gelu", True))
    assert ir_source(cfg) != ir_source(kernel_config(1, "gelu", True))
    assert "define void @sparse_rows" in ir_source(cfg) and "rt[j, t]" in ir_source(cfg)
    # every intrinsic called is declared, once
    declared = [line.split("@")[1].split("(")[0] for line in ir_source(cfg).splitlines() if line.startswith("declare")]
    called = {part.split("(")[0] for part in ir_source(cfg).split("@llvm.")[1:]}
    assert len(declared) == len(set(declared)) and {"llvm." + c for c in called} == set(declared)


@pytest.mark.parametrize("lanes, cpu, features", [(8, "haswell", "+avx2,+fma"),
                                                  (16, "skylake-avx512", "+avx512f,+avx512bw,+avx512vl,+fma")],
                         ids=["avx2", "avx512"])
@pytest.mark.parametrize("block", [1, 4])
def test_the_sparse_tile_stays_in_registers(lanes, cpu, features, block):
    """The loop over stored weights keeps every accumulator in a register: compiled for an
    AVX2 and an AVX-512 target (on any x86 machine), its hot blocks, those with an FMA per
    accumulator reading xᵀ, neither spill to the stack nor reload. With 16 accumulators of 8
    lanes (the AVX-512 tile's 128 tokens) on AVX2's 16 registers, LLVM stored and reloaded
    all of them for every stored weight."""
    import re

    import llvmlite.binding as llvm
    from sparsejit.kernels.linear import SPARSE_VECTORS
    from sparsejit.kernels.sparse_ir import IRConfig

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    tm = llvm.Target.from_triple("x86_64-unknown-linux-gnu").create_target_machine(cpu=cpu, features=features, opt=3)
    vectors = SPARSE_VECTORS[lanes]
    mod = llvm.parse_assembly(ir_source(IRConfig(block, "gelu", True, lanes, vectors, 16)))
    pb = llvm.create_pass_builder(tm, llvm.PipelineTuningOptions(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    blocks = re.split(r"\n(?=\.LBB)", tm.emit_assembly(mod))
    # the loop over stored weights: an FMA per accumulator with a row of xᵀ from memory
    hot = [b for b in blocks if len(re.findall(r"\bvfmadd\w+\s+-?\d*\(%r\w+,%r\w+", b)) >= vectors]
    assert hot, "no loop block with an FMA per accumulator"
    assert all("(%rsp)" not in b for b in hot), next(b for b in hot if "(%rsp)" in b)[:2000]


def test_rows_run_in_count_order_within_each_thread():
    """In every K-chunk each thread's rows are stored in order of their count of stored
    weights, and stay that thread's; a change of thread count lays them out again, and
    every layout computes the same product."""
    rng = np.random.default_rng(4)
    k, m = 96, 50
    w = pruned(rng, k, m, 0.8)
    bias = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((37, k)).astype(np.float32)
    layer = SparseLinear(w, bias, "gelu", False, k_chunk=32)
    before = numba.get_num_threads()
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS), before}, reverse=True) + [1]:
            numba.set_num_threads(n)
            np.testing.assert_allclose(layer(x), reference_linear(x, w, bias, "gelu"), **TOL)
            bounds = layer.bounds()
            assert len(bounds) == n + 1
            counts = np.diff(layer.indptr).reshape(layer.nchunks, m)
            order = layer.order.reshape(layer.nchunks, m)
            for c in range(layer.nchunks):
                want = (w[32 * c:32 * (c + 1)] != 0).sum(axis=0)
                np.testing.assert_array_equal(counts[c], want[order[c]])
                for b0, b1 in itertools.pairwise(bounds):
                    assert sorted(order[c, b0:b1]) == list(range(b0, b1))
                    assert np.all(np.diff(counts[c, b0:b1]) >= 0)
    finally:
        numba.set_num_threads(before)


def test_balanced_bounds():
    indptr = np.concatenate([[0], np.cumsum([100, 0, 0, 0, 1, 1, 1, 1])])
    b = balanced_bounds(indptr, 2)
    assert b[0] == 0 and b[-1] == 8 and 1 <= b[1] <= 2
    assert list(balanced_bounds(np.zeros(1, np.int64), 3)) == [0, 0, 0, 0]


def _over_array(function, lanes: int):
    """`function(e, vector)` (an epilogue function) compiled alone over an array: a
    callable f(x) of float32 x, its size a multiple of `lanes`, returning f over x."""
    sig = Signature("vector_function_array", (("x", "ptr"), ("y", "ptr"), ("n", "i64")))
    e = Builder(lanes)

    def body():
        def step(i, _):
            e.vstore(function(e, e.vload(e.gep("%x", i), None)), e.gep("%y", i), None)
            return []
        e.loop("0", "%n", lanes, [], step)

    e.function(sig, body)
    fn = sig.ctypes()(compile_ir(e.module(f"; {function.__name__} over an array"), sig.name))

    def over(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.size % lanes == 0
        y = np.empty_like(x)
        fn(x.ctypes.data, y.ctypes.data, x.size)
        return y
    return over


def test_the_kernels_erf_error():
    """The erf the GELU epilogues run (epilogue.erf), compiled alone over an array,
    against the exact erf: within 1e-6 everywhere."""
    x = np.linspace(-8, 8, 200000, dtype=np.float32)
    y = _over_array(ir_erf, 16)(x)
    assert np.max(np.abs(y - erf(x.astype(np.float64)))) < 1e-6


@pytest.mark.parametrize("lanes", [16, 8])
def test_the_kernels_gelu_error(lanes):
    """The GELU the epilogues run (epilogue.gelu: from pieces at 16 lanes with AVX-512,
    through the rational erf at 8), compiled alone over an array, against the exact
    v·Φ(v): within 1e-6·max(1, |v|) over every piece, its joins and far past the clamp;
    ±inf and NaN as the formula gives them."""
    over = _over_array(gelu, lanes)
    joins = (np.arange(GELU_PIECES + 1) - 0.5) * GELU_STEP
    x = np.concatenate([np.linspace(-40, 40, 400000), joins, -joins, joins + 1e-6, -joins - 1e-6,
                        [0.0, -0.0, 6.0, -6.0, 1e30, -1e30]]).astype(np.float32)
    x = np.concatenate([x, np.zeros(-x.size % lanes, np.float32)])
    x64 = x.astype(np.float64)
    exact = x64 * (1 + erf(x64 / np.sqrt(2))) / 2
    assert np.max(np.abs(over(x) - exact) / np.maximum(1, np.abs(x64))) < 1e-6
    y = over(np.array([np.inf, np.nan] + [0.0] * (lanes - 2), np.float32))
    assert y[0] == np.inf and np.isnan(y[1])


@pytest.mark.parametrize("lanes", [16, 8])
def test_the_kernels_exp_error(lanes):
    """The exp the softmax and tanh run (epilogue.exp: by vscalefps at 16 lanes with
    AVX-512, else 2ⁿ from its exponent bits), compiled alone over an array, against the
    exact exp: within 2.5e-7 relative over [-87, 88]; saturating past the clamp at
    [-87.3, 88.3] (±inf too), NaN staying NaN."""
    over = _over_array(ir_exp, lanes)
    x = np.linspace(-87, 88, 1 << 20, dtype=np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(over(x) - exact) / exact) < 2.5e-7
    y = over(np.array([np.inf, 1e30, 88.3, -np.inf, -1e30, -87.3, np.nan] + [0.0] * (2 * lanes - 7), np.float32))
    assert y[0] == y[1] == y[2] and np.isfinite(y[0]) and y[3] == y[4] == y[5] > 0 and np.isnan(y[6])
    assert y[2] == pytest.approx(np.exp(np.float64(np.float32(88.3))), rel=2.5e-7)


def test_activation_rows_start_on_cache_lines():
    """Every row of a feature-major buffer starts on a 64-byte line (a vector load across
    two lines costs two); the rows of 1024 tokens are padded off the 4 KiB stride."""
    for features, tokens in [(1, 1), (3, 17), (768, 128), (768, 1024), (64, 200)]:
        a = feature_major_empty(features, tokens)
        assert a.shape == (features, tokens) and a.strides[1] == 4
        assert a.ctypes.data % 64 == 0 and a.strides[0] % 64 == 0
    assert feature_major_empty(768, 1024).strides[0] % 4096 != 0
    for shape, dtype in [((5,), np.float32), ((3, 7), np.float64), ((0,), np.float32)]:
        a = aligned_empty(shape, dtype)
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0 or a.size == 0  # (an empty view's pointer is numpy's choice)
    assert transposed(np.ones((130, 48), np.float32)).ctypes.data % 64 == 0


def test_transposed_hands_kernels_rows_on_lines():
    """A feature-major view is passed through only when its rows start on 64-byte lines
    (as a kernel's output does); one off the lines, as numpy's own buffers usually are,
    is copied onto them, its values unchanged."""
    aligned = feature_major_empty(48, 130)
    aligned[:] = np.arange(48 * 130, dtype=np.float32).reshape(48, 130)
    assert np.shares_memory(transposed(aligned.T), aligned)
    buf = np.zeros(48 * 144 + 16, np.float32)
    start = -buf.ctypes.data % 64 // 4 + 4  # 16 bytes past a line
    off = buf[start:start + 48 * 144].reshape(48, 144)[:, :130]
    off[:] = aligned
    out = transposed(off.T)
    assert not np.shares_memory(out, off)
    assert out.ctypes.data % 64 == 0 and out.strides[0] % 64 == 0 and out.strides[1] == 4
    np.testing.assert_array_equal(out, aligned)


def test_byte_rows_copies_bytes_onto_lines():
    """int8.byte_rows passes 4-block rows with unit token stride through, and copies the
    others (a token-major array's transpose) into rows on 64-byte lines, values unchanged:
    the kernels' tile and vector loads each read one line."""
    from sparsejit.kernels.int8 import byte_rows

    given = np.arange(37 * 12, dtype=np.int32).reshape(37, 12)  # [tokens, in/4], token-major
    rows = byte_rows(given)
    assert not np.shares_memory(rows, given) and on_lines(rows) and rows.strides[1] == 4
    np.testing.assert_array_equal(rows, given.T)
    assert np.shares_memory(byte_rows(rows.T), rows)


def test_transpose_kernel():
    """The tiled transpose, of whole arrays and of views with any strides (every other row
    or column, reversed rows, Fortran order, floats off their 4-byte alignment)."""
    rng = np.random.default_rng(4)
    for shape in [(1, 1), (33, 65), (128, 96), (0, 5)]:
        a = rng.standard_normal(shape).astype(np.float32)
        unaligned = np.frombuffer(b"\0" + a.tobytes(), np.float32, a.size, 1).reshape(shape)
        for v in (a, a[::2], a[:, ::3], a[::-1], np.asfortranarray(a), unaligned):
            np.testing.assert_array_equal(transposed(v), np.ascontiguousarray(v.T))
            np.testing.assert_array_equal(contiguous(v.T), v.T)
            assert transposed(v).strides[1] == 4 or v.shape[0] <= 1  # unit token stride, rows maybe padded


def test_small_transposes_run_on_the_calling_thread(monkeypatch):
    """A transpose under layout.SERIAL_BELOW elements (a taped run's outputs, copied to
    the caller) makes its rows on the calling thread, with no parallel region; a larger
    one still starts one, but not at one thread (launch.run: one part needs none). Both
    give numpy's transpose, at 1, 2 and 3 threads."""
    import numba
    from sparsejit.kernels import launch, layout

    rng = np.random.default_rng(6)
    small = rng.standard_normal((16, 384)).astype(np.float32)
    large = rng.standard_normal((layout.SERIAL_BELOW // 100 + 1, 100)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        for threads in (1, 2, 3):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            for a in (small, large):
                np.testing.assert_array_equal(layout.transposed_copy(a.T), a.T.copy())
    finally:
        numba.set_num_threads(before)

    def no_region():
        raise AssertionError("a parallel region started")

    monkeypatch.setattr(launch, "launcher", no_region)
    np.testing.assert_array_equal(layout.transposed_copy(small.T), small.T.copy())
    if numba.config.NUMBA_NUM_THREADS > 1:  # (one thread: one part, which needs no region either)
        numba.set_num_threads(2)
        try:
            with pytest.raises(AssertionError, match="parallel region"):
                layout.transposed_copy(large.T)
        finally:
            numba.set_num_threads(before)
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(layout.transposed_copy(large.T), large.T.copy())
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("mask_shape", [None, (2, 1, 1, 11), (2, 1, 9, 11), (1, 1, 1, 11), (11,)])
@pytest.mark.parametrize("scale_op", ["none", "div", "mul"])
def test_attention_matches_reference(mask_shape, scale_op):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    kt = rng.standard_normal((2, 3, 8, 11)).astype(np.float32)
    v = rng.standard_normal((2, 3, 11, 8)).astype(np.float32)
    mask = None if mask_shape is None else np.where(rng.random(mask_shape) < 0.3, -1e4, 0).astype(np.float32)
    scale = np.array(8.0 ** 0.5, np.float32)
    got = fused_attention(q, kt.transpose(0, 1, 2, 3), v, mask, scale, scale_op=scale_op, axis=-1, opset=14, nan_guard=False)
    want = reference_attention(q, kt, v, mask, scale, scale_op=scale_op, axis=-1, opset=14, nan_guard=False)
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("guard", [False, True])
def test_attention_fully_masked_row(guard):
    """A row with every key at -inf: NaN as Softmax gives, or 0 under the exporters' NaN guard."""
    rng = np.random.default_rng(6)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 2, 4, 8), (1, 2, 8, 5), (1, 2, 5, 8)])
    mask = np.zeros((1, 1, 4, 5), np.float32)
    mask[0, 0, 2, :] = -np.inf
    got = fused_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=guard)
    want = reference_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=guard)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), **TOL)
    assert np.isnan(got[0, :, 2]).all() != guard


@pytest.mark.parametrize("lanes", [16, 8])
@pytest.mark.parametrize("zero", [np.uint8(7), np.int8(-5)])
@pytest.mark.parametrize("guard", [False, True])
def test_attention_stores_the_bytes_of_its_merged_output(zero, guard, lanes, monkeypatch):
    """fused_attention_bytes: beside each output the float32 kernel stores the byte an int8
    layer on the grid makes of the heads' merged output [batch, query, heads·features]
    (attention_ir's quant_out; a uint8 grid by lowp_ir.unsigned_bytes), exactly
    QuantizeLinear's of the float output it returns, which is fused_attention's: several
    query tiles and a partial one, a fully masked row (NaN, or 0 under the guard), head
    sizes of 64 and 12; a head size off 4 stores none. At 16 lanes (AVX-512) and at 8
    (AVX2's kernel, which rounds by the float steps for any grid; built and run here)."""
    from sparsejit.kernels import attention
    from sparsejit.kernels.attention import fused_attention_bytes
    from sparsejit.kernels.elementwise import quantize

    if lanes == 16 and vector_lanes() != 16:
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(attention, "vector_lanes", lambda: lanes)

    rng = np.random.default_rng(abs(int(zero)) + 10 * guard)
    lo = np.iinfo(zero.dtype).min
    grid = np.array([0.02, zero, lo, lo + 255], np.float32)
    for b, h, tq, d in [(2, 3, 37, 64), (1, 2, 130, 12), (1, 2, 5, 6)]:
        q, v = (rng.standard_normal((b, h, tq, d)).astype(np.float32) for _ in range(2))
        kt = rng.standard_normal((b, h, d, tq)).astype(np.float32)
        mask = np.zeros((b, 1, tq, tq), np.float32)
        mask[0, 0, 2, :] = -np.inf
        o, xb = fused_attention_bytes(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=guard, grid=grid)
        np.testing.assert_array_equal(o, fused_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=guard))
        if d % 4:
            assert xb is None
            continue
        merged = np.ascontiguousarray(o.transpose(0, 2, 1, 3)).reshape(b, tq, h * d)
        with np.errstate(invalid="ignore"):
            want = (quantize(merged, np.float32(0.02), zero).astype(np.int16) - lo).astype(np.uint8)
        assert xb.shape == (b, tq, h * d // 4) and xb.dtype == np.int32
        np.testing.assert_array_equal(xb, want.view(np.int32), err_msg=f"{b} {h} {tq} {d}")


def _feature_major(a: np.ndarray, token_axis: int) -> np.ndarray:
    """a as a view of a padded feature-major buffer (unit stride on its token axis), the
    way a sparse Linear's output reaches the attention after Reshape and Transpose."""
    moved = np.moveaxis(a, token_axis, -1)
    buf = np.full(moved.shape[:-1] + (moved.shape[-1] + 16,), np.nan, np.float32)
    buf[..., :moved.shape[-1]] = moved
    return np.moveaxis(buf[..., :moved.shape[-1]], -1, token_axis)


@pytest.mark.parametrize("shape", [(1, 12, 128, 128, 64), (2, 2, 70, 37, 20), (3, 1, 33, 130, 13), (1, 1, 1, 1, 1)])
@pytest.mark.parametrize("layout", ["token-major", "feature-major"])
@pytest.mark.parametrize("per_query_mask", [False, True])
def test_attention_tiles_blocks_and_layouts(shape, layout, per_query_mask):
    """Several query tiles and a partial one, key and feature blocks with remainders,
    inputs as views with unit token stride (no copy) or token-major (copied)."""
    b, h, tq, tk, d = shape
    rng = np.random.default_rng(sum(shape))
    q = rng.standard_normal((b, h, tq, d)).astype(np.float32)
    kt = rng.standard_normal((b, h, d, tk)).astype(np.float32)
    v = rng.standard_normal((b, h, tk, d)).astype(np.float32)
    mask_shape = (b, 1, tq if per_query_mask else 1, tk)
    mask = np.where(rng.random(mask_shape) < 0.3, -1e4, 0).astype(np.float32)
    if layout == "feature-major":
        q, kt, v = _feature_major(q, 2), _feature_major(kt, 3), _feature_major(v, 2)
    scale = np.array(d ** 0.5, np.float32)
    got = fused_attention(q, kt, v, mask, scale, scale_op="div", axis=-1, opset=14, nan_guard=False)
    np.testing.assert_allclose(got, reference_attention(q, kt, v, mask, scale, scale_op="div", axis=-1, opset=14, nan_guard=False), **TOL)
    assert got.strides[2] == 4  # written feature-major: unit stride along the queries


def test_attention_propagates_nan_and_saturates():
    """A NaN score makes its query's output NaN, as Softmax does; huge scores stay finite."""
    rng = np.random.default_rng(9)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(1, 1, 20, 4), (1, 1, 4, 20), (1, 1, 20, 4)])
    q[0, 0, 3, 0] = np.nan
    q[0, 0, 5] *= 1e4
    got = fused_attention(q, kt, v, None, None, scale_op="none", axis=-1, opset=14, nan_guard=False)
    want = reference_attention(q, kt, v, None, None, scale_op="none", axis=-1, opset=14, nan_guard=False)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[0, 0, 3]).all() and np.isfinite(got[0, 0, 5]).all()
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), **TOL)

def test_attention_softmax_is_exact_to_float_precision_over_exps_range():
    """With kᵀ and v identities the output is the softmax itself: every probability, down to
    e⁻⁸⁰ of the largest, must match numpy's to a few float32 ulps (the kernel's own exp)."""
    n = 48
    rng = np.random.default_rng(10)
    scores = np.stack([rng.uniform(-80, 0, n), rng.uniform(-3, 3, n), rng.uniform(0, 80, n)])
    scores = scores.astype(np.float32)[None, None]                       # [1, 1, 3 queries, n keys]
    eye = np.eye(n, dtype=np.float32)[None, None]
    got = fused_attention(scores, eye, eye, None, None, scale_op="none", axis=-1, opset=14, nan_guard=False)
    want = reference_attention(scores, eye, eye, None, None, scale_op="none", axis=-1, opset=14, nan_guard=False)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_attention_falls_back_for_other_shapes():
    rng = np.random.default_rng(7)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(3, 4, 8), (3, 8, 4), (3, 4, 8)])
    np.testing.assert_allclose(fused_attention(q, kt, v, None, None, scale_op="none", axis=-1, opset=14),
                               reference_attention(q, kt, v, None, None, scale_op="none", axis=-1, opset=14), **TOL)


@pytest.mark.parametrize("layout_in", ["token-major", "feature-major"])
@pytest.mark.parametrize("layout_out", [None, False, True])
def test_layernorm_both_layouts(layout_in, layout_out):
    """Every input layout to every output layout; token counts that leave partial tiles and
    split unevenly over threads; values with a large mean (a one-pass variance loses it)."""
    rng = np.random.default_rng(8)
    for n, h in [(1, 32), (37, 48), (130, 64), (1000, 768)]:
        x = (rng.standard_normal((n, h)) * 3 + 100).astype(np.float32)
        scale = rng.standard_normal(h).astype(np.float32)
        bias = rng.standard_normal(h).astype(np.float32)
        arg = transposed(x).T if layout_in == "feature-major" else x
        got = layernorm(arg.reshape(1, n, h), scale, bias, 1e-5, feature_major=layout_out)
        np.testing.assert_allclose(got[0], reference_layernorm(x, scale, bias, epsilon=1e-5), **TOL)
        fm = layout_in == "feature-major" if layout_out is None else layout_out
        assert unit_token_stride(got[0]) == fm or n == 1


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_layernorm_split_by_features_matches_the_whole_rows(parts, monkeypatch):
    """The feature-major LayerNorm split by features (layernorm's `split`: each part's sums
    over its own features, then every token's mean and variance from all parts'),
    against float64 and against the kernel on one part: parts of SPLIT_FEATURES features and
    a shorter last one, fewer features than parts, a large mean (the parts' sums taken from
    one feature's value: about as far from float64 as one part), tokens in whole tiles,
    partial ones and none; with the bytes, the same bytes as the unsplit kernel's where its
    output is the same."""
    import sparsejit.kernels.layernorm as layernorm_mod

    splits = []
    kernel = layernorm_mod._columns_kernel
    monkeypatch.setattr(layernorm_mod, "_columns_kernel", lambda *a, **k: splits.append(a[3:] or "") or kernel(*a, **k))
    rng = np.random.default_rng(parts)
    grid = layernorm_mod.Grid.of((np.float32(0.05), np.uint8(128)))
    for h, n in [(770, 37), (100, 130), (64, 1), (40, 0), (33, 16), (20, 5)]:
        xt = feature_major_empty(h, n)
        xt[:] = rng.standard_normal((h, n)) * 3 + 1000
        scale, bias = rng.standard_normal(h).astype(np.float32), rng.standard_normal(h).astype(np.float32)
        monkeypatch.setattr(layernorm_mod, "threads", lambda: 1)
        whole = layernorm(xt.T, scale, bias, 1e-5, True)
        y1, q1 = layernorm_mod.layernorm_to_bytes(xt.T, scale, bias, 1e-5, grid)
        monkeypatch.setattr(layernorm_mod, "threads", lambda: parts)
        splits.clear()
        got = layernorm(xt.T, scale, bias, 1e-5, True)
        assert splits == ([""] if h <= 32 else [("stats",), ("outputs",)]), (h, splits)
        want = reference_layernorm(xt.T.astype(np.float64), scale, bias, epsilon=1e-5)
        np.testing.assert_allclose(got, want, **TOL)
        assert np.abs(got - want).max(initial=0) <= 1.25 * np.abs(whole - want).max(initial=0) + 1e-6
        y, q = layernorm_mod.layernorm_to_bytes(xt.T, scale, bias, 1e-5, grid)
        same = (y == y1).all(axis=1)
        assert same.sum() >= 0.9 * n and np.array_equal(q[same], q1[same])


@pytest.mark.parametrize("zero", [np.uint8(128), np.int8(-3)])
@pytest.mark.parametrize("lanes", ["native", 8])
def test_layernorm_rounding_to_a_grid_stores_what_fake_quantize_gives(zero, lanes, monkeypatch):
    """The quantizing LayerNorm (lower.quantize_layernorms) against its plain kernel then
    FakeQuantize's kernel, bit for bit: features whose LayerNorm scale is 0 output their
    bias exactly, put on ties (k + 1/2 steps, rounded to even), past both ends of the
    type and at ±inf; a token with a NaN gives NaN, which quantizes to the byte 0."""
    import sparsejit.kernels.layernorm as layernorm_mod
    from sparsejit.kernels.elementwise import fake_quantize

    if lanes == 8:
        monkeypatch.setattr(layernorm_mod, "vector_lanes", lambda: 8)
    layernorm_mod._columns_kernel.cache_clear()
    rng = np.random.default_rng(12)
    step = np.float32(1 / 16)
    h, n = 40, 37
    scale = rng.standard_normal(h).astype(np.float32)
    bias = rng.standard_normal(h).astype(np.float32) * 4
    fixed = (np.array([0.5, 1.5, -0.5, -2.5, 200.5, -300.5, 1e10, -1e10, np.inf, -np.inf]) * step).astype(np.float32)
    scale[:fixed.size], bias[:fixed.size] = 0, fixed
    x = rng.standard_normal((n, h)).astype(np.float32) * 3
    x[5, 7] = np.nan
    grid = (step, zero)
    for arg in (transposed(x).T, x):
        got = layernorm(arg, scale, bias, 1e-5, feature_major=True, grid=layernorm_mod.Grid.of(grid))
        want = fake_quantize(layernorm(arg, scale, bias, 1e-5, feature_major=True), *grid)
        assert np.array_equal(got, want), np.argwhere(got != want)[:5]
        assert not np.isnan(got).any() and np.all(got[5] == (0 - int(zero)) * step)
        lo, hi = (0, 255) if zero.dtype == np.uint8 else (-128, 127)
        on_grid = got / step + int(zero)
        assert np.array_equal(on_grid, np.rint(on_grid)) and on_grid.min() == lo and on_grid.max() == hi
        np.testing.assert_array_equal(got[0, :4] / step, [0, 2, 0, -2])  # ties to even
    token_major = layernorm(x, scale, bias, 1e-5, feature_major=False, grid=layernorm_mod.Grid.of(grid))
    assert np.array_equal(token_major, fake_quantize(layernorm(x, scale, bias, 1e-5, feature_major=False), *grid))
    layernorm_mod._columns_kernel.cache_clear()


def test_kernels_with_8_lanes(monkeypatch):
    """The IR kernels as an AVX2 machine (8 floats per vector) gets them, run here."""
    import sparsejit.kernels.attention as attention_mod
    import sparsejit.kernels.layernorm as layernorm_mod
    import sparsejit.kernels.linear as linear_mod

    built = []
    for mod in (attention_mod, layernorm_mod, linear_mod):
        monkeypatch.setattr(mod, "vector_lanes", lambda: 8)
        compile_ir = mod.compile_ir
        monkeypatch.setattr(mod, "compile_ir", lambda src, fn, c=compile_ir: built.append(src) or c(src, fn))
    # (cached per vector width, so nothing from 16 lanes is reused; on an AVX2 host, where 8 lanes
    # is native, earlier tests built them already: cleared so that they are built here, seen)
    attention_mod._kernel.cache_clear()
    attention_mod._compiled.cache_clear()
    layernorm_mod._columns_kernel.cache_clear()
    rng = np.random.default_rng(11)
    w = pruned(rng, 96, 40, 0.8)
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((2, 37, 96)).astype(np.float32)
    r = rng.standard_normal((2, 37, 40)).astype(np.float32)
    for impl in (SparseLinear(w, bias, "gelu", True, k_chunk=32), DenseLinear(w, bias, "gelu", True)):
        assert impl.config.lanes == 8
        np.testing.assert_allclose(impl(x, r), reference_linear(x, w, bias, "gelu", r), **TOL)
    for impl in (SparseLinear(w, bias, "tanh", False), DenseLinear(w, bias, "tanh", False)):  # (the pooler's)
        assert impl.config.lanes == 8
        np.testing.assert_allclose(impl(x[:, :1]), reference_linear(x[:, :1], w, bias, "tanh"), **TOL)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 21, 8), (2, 3, 8, 19), (2, 3, 19, 8)])
    mask = np.where(rng.random((2, 1, 21, 19)) < 0.3, -1e4, 0).astype(np.float32)
    np.testing.assert_allclose(fused_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14),
                               reference_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14), **TOL)
    xs = transposed(x.reshape(-1, 96)).T
    np.testing.assert_allclose(layernorm(xs, bias[:1].repeat(96), bias[:1].repeat(96), 1e-5),
                               reference_layernorm(x.reshape(-1, 96), bias[:1].repeat(96), bias[:1].repeat(96),
                                                   epsilon=1e-5),
                               **TOL)
    kinds = {src.split("kernel: ")[1].split()[0] for src in built if "lanes=8" in src}
    assert kinds >= {"attention", "LayerNorm,", "block=1"}, kinds  # 8-lane code built and run for each


def test_a_thread_given_no_rows_writes_nothing():
    """With fewer output rows than threads some thread gets the empty range [j0, j0) (a
    1-output head at 2 threads). The IR's row loops test at their end, so such a thread
    ran one slot past its range: a row of another thread, or past the arrays' end (a
    segfault). Here slot 1 is a canary: row 1, bias 5, its output row set to 7."""
    rng = np.random.default_rng(12)
    w = pruned(rng, 16, 1, 0.5)
    sparse = SparseLinear(w, None, "none", False)
    _, _, indptr, indices, values, order = sparse._arrays()
    indptr = np.append(indptr, indptr[-1])            # slot 1: no stored weights
    order = np.append(order, np.int32(1))             # ... of row 1
    bias = np.array([0.0, 5.0], np.float32)
    xt = rng.standard_normal((16, 16)).astype(np.float32)
    yt = np.full((2, 16), 7.0, np.float32)
    rt = np.zeros((1, 1), np.float32)
    kernel = SPARSE_SIGNATURE.ctypes()(sparse._fn)
    for j0 in (0, 1):
        kernel(xt.ctypes.data, 16, indptr.ctypes.data, indices.ctypes.data, values.ctypes.data, bias.ctypes.data,
               yt.ctypes.data, 16, rt.ctypes.data, 1, 1, 1, order.ctypes.data, j0, j0, 16, 16)
    assert (yt == 7.0).all()
    kernel(xt.ctypes.data, 16, indptr.ctypes.data, indices.ctypes.data, values.ctypes.data, bias.ctypes.data,
           yt.ctypes.data, 16, rt.ctypes.data, 1, 1, 1, order.ctypes.data, 0, 1, 16, 16)
    np.testing.assert_allclose(yt[0], (xt.T @ w)[:, 0], **TOL)
    assert (yt[1] == 7.0).all()


def test_embeddings_kernel_casts_int64_ids_to_int32_where_the_graph_did():
    """`wrap` (lower.fold_id_casts): a table's int64 ids taken as the graph's Cast to int32
    makes them, low 32 bits signed, then gathered: 2³² + 3 is 3, 2³² - 1 is -1 (the last
    row), 2³¹ is -2³¹ (out of range, named). The other tables' ids as they are."""
    from sparsejit.kernels.embed import EmbedLayerNorm

    from sparsejit.ops import OPS

    rng = np.random.default_rng(17)
    tables = [rng.standard_normal((50, 24)).astype(np.float32), rng.standard_normal((64, 24)).astype(np.float32)]
    names = ["word", "position"]
    kernel = EmbedLayerNorm(tables, names, 1e-12, wrap=(True, False))
    scale, bias = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    ids = [rng.integers(0, 50, (2, 21)) + rng.integers(0, 3, (2, 21)) * 2 ** 32, np.arange(21)[None, :]]
    ids[0][1, 4] = 2 ** 32 - 1
    want = OPS["EmbedLayerNorm"](*ids, scale, bias, tables=tables, gathers=names, epsilon=1e-12, wrap=(True, False))
    plain = OPS["EmbedLayerNorm"](ids[0].astype(np.int32), ids[1], scale, bias, tables=tables, gathers=names,
                                  epsilon=1e-12)
    np.testing.assert_array_equal(want, plain)  # (the reference: the Cast, then the gather)
    np.testing.assert_allclose(kernel(*ids, scale, bias), want, **TOL)
    np.testing.assert_allclose(kernel(*ids, scale, bias)[1, 4], want[1, 4], **TOL)
    with pytest.raises(IndexError, match="'word': Gather index out of range"):
        kernel(np.array([[2 ** 31]]), np.array([[0]]), scale, bias)
    with pytest.raises(IndexError, match="'position': Gather index out of range"):
        kernel(np.array([[0]]), np.array([[2 ** 32 + 1]]), scale, bias)  # (not wrapped: out of range)


@pytest.mark.parametrize("serial_below", [None, 0])
def test_embeddings_kernel_against_the_registry_reference(serial_below, monkeypatch):
    """The fused EmbedLayerNorm kernel against the registered reference: ids broadcast
    against each other (positions [1, seq]), negative ids, 1 and 0 tokens, and an id out
    of range named by its Gather. These few tokens run on the calling thread, with no
    parallel region (layout.SERIAL_BELOW); with that limit at 0, on the threads."""
    from sparsejit.kernels import launch, layout
    from sparsejit.kernels.embed import EmbedLayerNorm

    from sparsejit.ops import OPS

    if serial_below is None:
        def no_region():
            raise AssertionError("a parallel region started")
        monkeypatch.setattr(launch, "launcher", no_region)
    else:
        monkeypatch.setattr(layout, "SERIAL_BELOW", serial_below)
    rng = np.random.default_rng(13)
    tables = [rng.standard_normal((50, 24)).astype(np.float32), rng.standard_normal((64, 24)).astype(np.float32),
              rng.standard_normal((2, 24)).astype(np.float32)]
    names = ["word", "position", "type"]
    kernel = EmbedLayerNorm(tables, names, 1e-12)
    scale, bias = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    for batch, seq in [(2, 19), (1, 1), (3, 40), (0, 5)]:
        ids = [rng.integers(-50, 50, (batch, seq)), np.arange(seq)[None, :], rng.integers(0, 2, (batch, seq))]
        ids[1].flags.writeable = False  # (shape-only values reach the node read-only)
        want = OPS["EmbedLayerNorm"](*ids, scale, bias, tables=tables, gathers=names, epsilon=1e-12)
        got = kernel(*ids, scale, bias)
        assert got.shape == want.shape == (batch, seq, 24)
        np.testing.assert_allclose(got, want, **TOL)
    with pytest.raises(IndexError, match="'word': Gather index out of range"):
        kernel(np.array([[50]]), np.array([[0]]), np.array([[0]]), scale, bias)
    # the first table with an id out of range is named, wherever the token is (the last
    # part's last token, below -rows)
    ids = [rng.integers(0, 50, (3, 40)), np.arange(40)[None, :], rng.integers(0, 2, (3, 40))]
    ids[2][2, 39], ids[1] = 2, np.where(np.arange(40) == 39, 64, np.arange(40))[None, :]
    with pytest.raises(IndexError, match="'position': Gather index out of range"):
        kernel(*ids, scale, bias)
    ids[0][2, 39] = -51
    with pytest.raises(IndexError, match="'word': Gather index out of range"):
        kernel(*ids, scale, bias)
    # more tables than the kernel takes (embed.TABLES): the reference
    four = EmbedLayerNorm(tables + tables[2:], names + ["extra"], 1e-12)
    ids = [rng.integers(0, 50, (2, 19)), np.arange(19)[None, :], rng.integers(0, 2, (2, 19)), np.ones((2, 19), int)]
    want = OPS["EmbedLayerNorm"](*ids, scale, bias, tables=tables + tables[2:], gathers=names + ["extra"], epsilon=1e-12)
    np.testing.assert_allclose(four(*ids, scale, bias), want, **TOL)
    monkeypatch.undo()
    # rounding to a grid as it stores (lower.quantize_layernorms): what FakeQuantize's kernel gives after it
    from sparsejit.kernels.elementwise import fake_quantize

    for grid in [(np.float32(1 / 32), np.uint8(128)), (np.float32(0.01), np.int8(5))]:
        ids = [rng.integers(0, 50, (2, 19)), np.arange(19)[None, :], rng.integers(0, 2, (2, 19))]
        got = EmbedLayerNorm(tables, names, 1e-12, grid)(*ids, scale, bias)
        assert np.array_equal(got, fake_quantize(kernel(*ids, scale, bias), *grid))
        want = OPS["EmbedLayerNorm"](*ids, scale, bias, tables=tables, gathers=names, epsilon=1e-12, quantize=grid)
        assert np.mean(got == want) > 0.99 and np.abs(got - want).max() <= grid[0] * 1.001  # a step at most


def test_the_k_chunk_follows_clear_differences_only():
    from sparsejit.choose import pick_chunk

    assert pick_chunk({768: 1.0, 64: 0.99, 128: 1.0, 256: 0.985}) == 128  # within 5%: the default
    assert pick_chunk({768: 1.0, 64: 0.80, 128: 1.0, 256: 0.99}) == 64    # clearly faster
    assert pick_chunk({96: 1.0, 64: 0.99}) == 96                          # no 128: the nearest
    # clearly faster over 128 tokens, but slower over 16: the default
    assert pick_chunk({768: 1.0, 64: 0.80, 128: 1.0}, {768: 1.5, 64: 1.2, 128: 1.0}) == 128
    assert pick_chunk({768: 1.0, 64: 0.80, 128: 1.0}, {768: 1.5, 64: 1.04, 128: 1.0}) == 64


@pytest.mark.parametrize("nan_guard", [False, True])
def test_attention_nan_and_inf_scores_as_the_reference(nan_guard):
    """A NaN query feature, a NaN key, an inf key, fully masked rows, a NaN value: under
    the NaN guard a row whose softmax is NaN gives Σ 0·v (0, or NaN where v has one) as
    the guarded graph computes; without it, NaN. (An inf key score gave NaN under the
    guard before.)"""
    rng = np.random.default_rng(14)
    b, h, tq, tk, d = 2, 2, 37, 21, 8
    q = rng.standard_normal((b, h, tq, d)).astype(np.float32)
    kt = rng.standard_normal((b, h, d, tk)).astype(np.float32)
    v = rng.standard_normal((b, h, tk, d)).astype(np.float32)
    q[0, 0, 3, 2] = np.nan
    kt[0, 1, 0, 4] = np.nan
    kt[1, 0, 0, 5] = np.inf
    v[1, 1, 3, 4] = np.nan
    mask = np.zeros((b, 1, tq, tk), np.float32)
    mask[1, 0, 7, :] = -np.inf
    mask[1, 0, 9, :] = -1e4
    with np.errstate(invalid="ignore"):
        want = reference_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=nan_guard)
    got = fused_attention(q, kt, v, mask, None, scale_op="none", axis=-1, opset=14, nan_guard=nan_guard)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_attention_with_another_value_head_size_falls_back():
    """v's head size may differ from q's and k's (ONNX allows it); the kernel walks one
    head size for both, so such attention runs the reference (it returned garbage)."""
    rng = np.random.default_rng(15)
    q, kt, v = (rng.standard_normal(s).astype(np.float32) for s in [(2, 3, 6, 8), (2, 3, 8, 6), (2, 3, 6, 10)])
    np.testing.assert_allclose(fused_attention(q, kt, v), reference_attention(q, kt, v), **TOL)


def test_gelu_tanh_epilogue_against_numpy():
    """The tanh-approximated GELU (ORT's FastGelu, ONNX Gelu approximate="tanh") as a Linear
    epilogue, both kernels, at values from large negative through 0 to large positive."""
    rng = np.random.default_rng(16)
    w = pruned(rng, 64, 40, 0.8)
    bias = rng.standard_normal(40).astype(np.float32)
    x = (rng.standard_normal((37, 64)) * 4).astype(np.float32)
    for impl in (SparseLinear(w, bias, "gelu_tanh", False), DenseLinear(w, bias, "gelu_tanh", False)):
        np.testing.assert_allclose(impl(x), reference_linear(x, w, bias, "gelu_tanh"), **TOL)


def test_tanh_epilogue_against_numpy():
    """Tanh after the product (BERT's pooler: Gemm, then Tanh, fused into the Linear), both
    kernels, one token and many, with a residual: saturated, near 0 (where 1 - 2/(e^2x + 1)
    cancels) and between."""
    rng = np.random.default_rng(17)
    w = pruned(rng, 64, 40, 0.8)
    bias = rng.standard_normal(40).astype(np.float32)
    for tokens in (1, 37):
        x = (rng.standard_normal((tokens, 64)) * 4).astype(np.float32)
        x[0, :8] = 1e-6 * np.arange(8)
        r = rng.standard_normal((tokens, 40)).astype(np.float32)
        for impl in (SparseLinear(w, bias, "tanh", True), DenseLinear(w, bias, "tanh", True)):
            np.testing.assert_allclose(impl(x, r), reference_linear(x, w, bias, "tanh", r), **TOL)


def test_int8_input_kernels_agree_at_every_width():
    """The range and quantize kernels the int8 layers run first, built for 8 lanes (AVX2)
    and for 16 (AVX-512, here legalised for whatever this CPU is): x's range as numpy finds
    it, and the same quantized bytes and floats from both widths, over shapes with partial
    vectors and partial 4-blocks."""
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.int8_ir import (
        QUANTIZE_FLOAT_SIGNATURE,
        QUANTIZE_SIGNATURE,
        RANGE_SIGNATURE,
        quantize_float_ir,
        quantize_ir,
        range_ir,
    )
    from sparsejit.kernels.layout import feature_major_empty

    rng = np.random.default_rng(19)
    for k, ntok in [(130, 37), (384, 128), (7, 5)]:
        xt = feature_major_empty(k, ntok)
        xt[:] = rng.standard_normal((k, ntok)) * 3
        tp, k4 = -(-ntok // 16) * 16, -(-k // 4)
        got = []
        for lanes in (8, 16):
            out = np.zeros((2, lanes), np.float32)
            RANGE_SIGNATURE.ctypes()(compile_ir(range_ir(lanes), RANGE_SIGNATURE.name))(
                xt.ctypes.data, xt.strides[0] // 4, 0, k, ntok, out.ctypes.data)
            assert out[0].min() == min(0, xt.min()) and out[1].max() == max(0, xt.max())
            xq, xf = np.zeros((k4, tp), np.int32), feature_major_empty(k, ntok)
            grid = np.array([0.03, 120, 0, 255], np.float32)
            QUANTIZE_SIGNATURE.ctypes()(compile_ir(quantize_ir(lanes), QUANTIZE_SIGNATURE.name))(
                xt.ctypes.data, xt.strides[0] // 4, xq.ctypes.data, tp, k, grid.ctypes.data, 0, k4, ntok)
            QUANTIZE_FLOAT_SIGNATURE.ctypes()(compile_ir(quantize_float_ir(lanes), QUANTIZE_FLOAT_SIGNATURE.name))(
                xt.ctypes.data, xt.strides[0] // 4, xf.ctypes.data, xf.strides[0] // 4, grid.ctypes.data, 0, k, ntok)
            got.append((xq[:, :ntok].copy(), np.array(xf)))
        np.testing.assert_array_equal(got[0][0], got[1][0])
        np.testing.assert_array_equal(got[0][1], got[1][1])
        q = np.clip(np.rint(xt / np.float32(0.03)) + 120, 0, 255)  # what the graph's QuantizeLinear gives
        np.testing.assert_array_equal(got[0][1], q - 120)
        packed = np.zeros((k4 * 4, ntok), np.uint32)
        packed[:k] = q.astype(np.uint32)
        np.testing.assert_array_equal(got[0][0].view(np.uint32),
                                      (packed.reshape(k4, 4, ntok) << (8 * np.arange(4, dtype=np.uint32))[:, None]).sum(1))


def test_dynamic_grid_kernel_is_range_scale_bit_for_bit():
    """The kernel making a dynamic x's grid and the int8 epilogue's terms (int8_ir.grid_ir),
    at both widths, from the range kernel's per-part lows and highs: ops.range_scale's
    scale and zero point, and [bias | scale · weights' scales | zero point · column sums]
    as numpy computes them in float32 and int32, bit for bit. Ranges all zero (scale 1/255),
    one-sided, tiny and huge; without the correction (Int8OnFloat's terms) the kbias past
    the scales is copied as it was; a NaN or an infinity sets the flag."""
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.int8_ir import GRID_SIGNATURE, grid_ir

    from sparsejit.ops import range_scale

    rng = np.random.default_rng(23)
    m = 37
    ws = (rng.random(m) * 0.01).astype(np.float32)
    colsum = rng.integers(-40000, 40000, m).astype(np.int32)
    kbias = rng.standard_normal(3 * m + 4).astype(np.float32)
    cases = [np.zeros((2, 2)), rng.standard_normal((3, 2)) * 5, np.abs(rng.standard_normal((1, 2))) * 1e-3,
             -np.abs(rng.standard_normal((2, 2))) * 1e30, rng.standard_normal((2, 2)) * 1e-38]
    for lanes in (8, 16):
        fn = GRID_SIGNATURE.ctypes()(compile_ir(grid_ir(lanes), GRID_SIGNATURE.name))
        for case in cases:
            parts = case.shape[0]
            ranges = np.zeros((parts, 2, lanes), np.float32)
            vals = rng.standard_normal((parts, 2, lanes)).astype(np.float32) * np.float32(np.abs(case).max() + 1e-40)
            ranges[:, 0] = np.minimum(vals[:, 0], 0)
            ranges[:, 1] = np.maximum(vals[:, 1], 0)
            lo, hi = min(np.float32(0), ranges[:, 0].min()), max(np.float32(0), ranges[:, 1].max())
            scale, zero = range_scale(lo, hi)
            for corr in (1, 0):
                terms, grid, bad = np.full_like(kbias, np.nan), np.zeros(4, np.float32), np.full(1, 7, np.int64)
                fn(ranges.ctypes.data, parts, kbias.ctypes.data, kbias.size, m, ws.ctypes.data, colsum.ctypes.data,
                   corr, terms.ctypes.data, grid.ctypes.data, bad.ctypes.data)
                assert bad[0] == 0
                np.testing.assert_array_equal(grid, np.array([scale, zero, 0, 255], np.float32))
                want = kbias.copy()
                want[m:2 * m] = scale * ws
                if corr:
                    want[2 * m:3 * m].view(np.int32)[:] = np.int32(zero) * colsum
                assert want.tobytes() == terms.tobytes(), (lanes, case, corr)
        for bad_value in (np.nan, np.inf, -np.inf):
            ranges = np.zeros((2, 2, lanes), np.float32)
            ranges[1, 0 if bad_value != np.inf else 1, 3] = bad_value
            terms, grid, bad = np.zeros_like(kbias), np.zeros(4, np.float32), np.zeros(1, np.int64)
            fn(ranges.ctypes.data, 2, kbias.ctypes.data, kbias.size, m, ws.ctypes.data, colsum.ctypes.data, 1,
               terms.ctypes.data, grid.ctypes.data, bad.ctypes.data)
            assert bad[0] == 1 and np.array_equal(grid, [1, 0, 0, 255]), (lanes, bad_value)


def _beside_half_integers(scale: np.float32) -> np.ndarray:
    """float32 x whose float32 quotient x / scale lies on, or a few of its last bits either
    side of, a half-integer k + 1/2 (-130 <= k < 130), where rounding to an integer turns;
    then zeros, infinities, NaN, the extremes and subnormals."""
    near = np.array([(k + 0.5) * np.float64(scale) for k in range(-130, 130)]).astype(np.float32)
    xs = [near]
    for direction in (np.inf, -np.inf):
        x = near
        for _ in range(3):
            x = np.nextafter(x, np.float32(direction))
            xs.append(x)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.1754942e-38],
                       np.float32)
    return np.concatenate(xs + [special])


def test_int8_quantize_kernels_round_the_float32_quotient_bit_for_bit():
    """QuantizeLinear divides x by the scale in float32, then rounds half to even: the
    quantize kernels give the same bytes where the quotient is on or beside a half-integer,
    for scales whose reciprocal float32 cannot hold exactly, at both widths. (Multiplying
    by a float32 reciprocal alone, without lowp_ir.quotient's correction, fails here; 1e-30
    takes the division.)"""
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.int8_ir import QUANTIZE_FLOAT_SIGNATURE, QUANTIZE_SIGNATURE, quantize_float_ir, quantize_ir
    from sparsejit.kernels.layout import feature_major_empty

    for scale in map(np.float32, (0.0123456, 0.1, 3.0, 0.0078125, 7.7e-3, 1e-30)):
        x = _beside_half_integers(scale)
        ntok = 16 * -(-x.size // 16)
        xt = feature_major_empty(4, ntok)
        xt[:] = 0
        xt[0, :x.size] = x
        xt[3, :x.size] = -x
        with np.errstate(all="ignore"):
            want = np.clip(np.rint(xt / scale), -128, 127)  # (NaN: the kernels give 0, as a cast to a byte does)
        want[np.isnan(want)] = 0
        grid = np.array([scale, 0, -128, 127], np.float32)
        for lanes in (8, 16):
            xf = feature_major_empty(4, ntok)
            QUANTIZE_FLOAT_SIGNATURE.ctypes()(compile_ir(quantize_float_ir(lanes), QUANTIZE_FLOAT_SIGNATURE.name))(
                xt.ctypes.data, xt.strides[0] // 4, xf.ctypes.data, xf.strides[0] // 4, grid.ctypes.data, 0, 4, ntok)
            np.testing.assert_array_equal(np.array(xf), want, err_msg=f"scale {scale}, {lanes} lanes")
            xq = np.zeros((1, ntok), np.int32)
            QUANTIZE_SIGNATURE.ctypes()(compile_ir(quantize_ir(lanes), QUANTIZE_SIGNATURE.name))(
                xt.ctypes.data, xt.strides[0] // 4, xq.ctypes.data, ntok, 4, grid.ctypes.data, 0, 1, ntok)
            got = xq.view(np.uint8).reshape(ntok, 4).T.astype(np.float32) - 128
            np.testing.assert_array_equal(got, want, err_msg=f"scale {scale}, {lanes} lanes, bytes")


def test_the_quantizing_quotient_is_the_float32_division():
    """lowp_ir.quotient, which every vector quantizing epilogue divides by the scale with:
    by the scale's inverse and Markstein's correction where the scale is within its bound
    (lowp_ir.INVERTIBLE, the bound's ends too), by the divider otherwise. Each lane is
    numpy's float32 x / scale, bit for bit, for x near half-integer quotients, random x of
    every exponent, zeros, infinities, NaN and subnormals; by the inverse, a quotient
    under 2^-38 may differ in its last bits (both round to 0), and one that overflows
    keeps q's ±inf."""
    from sparsejit.kernels.compile import compile_ir
    from sparsejit.kernels.ir import Builder, Signature
    from sparsejit.kernels.lowp_ir import INVERTIBLE, quotient

    sig = Signature("quotients", (("x", "ptr"), ("y", "ptr"), ("scale", "ptr"), ("n", "i64")))
    e = Builder(16)

    def body():
        scale = e.splat(e("load float, ptr %scale, align 4"))
        e.loop("0", "%n", 16, [], lambda t, _: e.vstore(quotient(e, e.vload(e.gep("%x", t), None), scale),
                                                         e.gep("%y", t), None) or [])

    e.function(sig, body)
    fn = sig.ctypes()(compile_ir(e.module("; test: x / scale by lowp_ir.quotient"), sig.name))
    rng = np.random.default_rng(7)
    wide = (rng.standard_normal(4096) * np.exp2(rng.integers(-149, 128, 4096))).astype(np.float32)
    scales = (0.0123456, 3.0, 0.1, 7.7e-3, INVERTIBLE[0], INVERTIBLE[1], 1e-30, 2.0 ** 70, 7.7e-39, 3.4e38)
    for scale in map(np.float32, scales):
        x = np.concatenate([_beside_half_integers(scale), wide])
        x = np.concatenate([x, np.zeros(-x.size % 16, np.float32)])
        y = np.empty_like(x)
        fn(x.ctypes.data, y.ctypes.data, np.array([scale], np.float32).ctypes.data, x.size)
        with np.errstate(all="ignore"):
            want = x / scale
        same = (y.view(np.uint32) == want.view(np.uint32)) | np.isnan(y) & np.isnan(want)
        if INVERTIBLE[0] <= scale <= INVERTIBLE[1]:
            same |= (np.abs(want) < 2.0 ** -38) & (np.abs(y) < 2.0 ** -37)
        assert same.all(), (scale, x[~same][:4], y[~same][:4], want[~same][:4])


def test_int8_on_the_fp32_sparse_kernel_is_exact():
    """Int8OnFloat: x quantized into floats q - zero point, the int8 weights as floats: the
    FP32 sparse kernel's sums are MatMulInteger's exactly (integers below 2^24), so without
    an activation its output equals the reference bit for bit; with GELU and a residual,
    within the epilogue's float error. K-chunked too. A weight whose sums could pass 2^24
    is refused by exact_on_float."""
    from sparsejit.kernels.int8 import Int8OnFloat, exact_on_float, reference_qlinear

    rng = np.random.default_rng(18)
    for k, m, sparsity in [(64, 48, 0.9), (130, 7, 0.5), (1, 1, 0.0), (8, 5, 1.0), (300, 40, 0.8)]:
        w = (rng.integers(-128, 128, (k, m)) * (rng.random((k, m)) >= sparsity)).astype(np.int8)
        ws, bias = (rng.random(m) * 0.01 + 0.001).astype(np.float32), rng.standard_normal(m).astype(np.float32)
        for tokens in [0, 1, 17, 130]:
            x = (rng.standard_normal((tokens, k)) * 3).astype(np.float32)
            r = rng.standard_normal((tokens, m)).astype(np.float32)
            for mode, xs, xz in [("dynamic", None, None), ("static", np.float32(0.03), np.uint8(120)),
                                 ("static", np.float32(0.02), np.int8(-3))]:
                scale = ws if mode == "dynamic" else np.float32(xs) * ws
                for act, res in [("none", False), ("gelu", True)]:
                    impl = Int8OnFloat(w, scale, mode, xs, xz, bias, act, res)
                    if k == 300:
                        impl.inner = impl.inner.with_chunk(64)
                    want = reference_qlinear(x, r if res else None, weight=w, scale=scale, mode=mode, x_scale=xs,
                                             x_zero_point=xz, bias=bias, activation=act, residual=res)
                    got = impl(x, r if res else None)
                    np.testing.assert_array_equal(impl.dense_weight(), w)
                    if act == "none":
                        np.testing.assert_array_equal(got, want, err_msg=f"{k}x{m} {tokens} tokens {mode}")
                    else:
                        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert exact_on_float(np.full((514, 3), -128, np.int8))  # 255 * 128 * 514 < 2^24
    assert not exact_on_float(np.full((515, 3), -128, np.int8))


def test_int8_dynamic_quantization_of_nan_or_infinity_is_an_error():
    """DynamicQuantizeLinear's scale comes from x's range: with a NaN or an infinity in x
    there is none, and the kernel says so rather than computing with a NaN zero point."""
    from sparsejit.kernels.int8 import Int8Chunked, Int8Dense, Int8Linear, host_dots

    w = np.ones((8, 3), np.int8)
    kinds = [Int8Linear] + [Int8Chunked, Int8Dense] * ("vnni" in host_dots())
    for impl in (kind(w, np.full(3, 0.1, np.float32), "dynamic") for kind in kinds):
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((5, 8), np.float32)
            x[2, 3] = bad
            with pytest.raises(ValueError, match="NaN or infinity"):
                impl(x)
        np.testing.assert_allclose(impl(np.ones((5, 8), np.float32)), impl.reference(np.ones((5, 8), np.float32)))


@pytest.mark.parametrize("dot", ["vnni", "vnni-chunked", "vnni-dense", "amx", "amx-compressed", "pmaddwd", "generic"])
def test_int8_kernel_exact_against_the_integer_reference(dot):
    """The int8 kernel, with each way of making the dot products (AVX-512 VNNI, AVX2
    vpmaddwd, written out for any CPU), the K-chunked VNNI kernel (int8.Int8Chunked, in
    chunks of 64 inputs), the VNNI dense GEMM (int8.Int8Dense) and the AMX one
    (amx.Int8Amx: inputs padded to K-tiles of 64, outputs to pairs of 16-row tiles,
    tokens to 16; its weight tiles dense, or compressed and expanded per pair of panels),
    against the numpy reference: int32 sums exactly,
    then the float epilogue (AMX's with GELU run during the next block's products, across
    pairs of panels: 130 outputs); dynamic and static uint8 and int8 activation quantization;
    1 output, 1 input, all-zero, 4-block and unstructured weights, weights of ±127 and
    -128 next to activations of 255 (where AVX2's vpmaddubsw saturates); 0, 1, 17, 130
    and 200 tokens (whole tiles, every narrower tile, a masked last vector)."""
    from sparsejit.kernels.amx import Int8Amx, can_compress, has_amx
    from sparsejit.kernels.int8 import Int8Chunked, Int8Dense, Int8Linear, host_dots, reference_qlinear

    if dot.split("-")[0] not in host_dots() + ["amx"] * has_amx("int8") or dot == "amx-compressed" and not can_compress():
        pytest.skip(f"this CPU does not run the {dot} int8 kernel")
    rng = np.random.default_rng(17)
    for k, m, sparsity, block in [(64, 48, 0.9, 1), (96, 40, 0.8, 4), (130, 7, 0.5, 1), (1, 1, 0.0, 1),
                                  (256, 1, 0.9, 4), (8, 5, 1.0, 1), (12, 3, -1, 1), (40, 6, -2, 1),
                                  (600, 9, 0.8, 4), (1030, 4, 0.9, 1), (520, 3, -2, 1), (70, 130, 0.5, 1)]:
        # -1: pairs far past vpmaddubsw's int16 limit; -2: 4-blocks along the inputs with pairs
        # at it (|w0| + |w1| = 128) and just past (129), next to activations of 255
        w = rng.integers(-127, 128, (k, m)).astype(np.int8) if sparsity >= 0 else \
            np.resize(np.array([127, -128, 127, 127, -128, -128], np.int8), (k, m)) if sparsity == -1 else \
            np.resize(np.array([[127, 1, -128, 0], [64, -64, 127, 2], [-2, -127, 1, 127]], np.int8).ravel(), (m, k)).T
        keep = np.repeat(rng.random((k // 4, m)) >= sparsity, 4, axis=0) if block == 4 else rng.random((k, m)) >= sparsity
        w = (w * keep).astype(np.int8)
        ws, bias = (rng.random(m) * 0.01 + 0.001).astype(np.float32), rng.standard_normal(m).astype(np.float32)
        for tokens in [0, 1, 17, 130, 200]:
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            if sparsity == -1:  # the range's ends: uint8 0 and 255 next to the extreme weights
                x = np.resize(np.array([-1.0, 3.0, 3.0, 3.0, -1.0], np.float32), (tokens, k))
            elif sparsity == -2:  # every activation 255 (dynamic), or near it
                x = np.full((tokens, k), 3.0, np.float32)
            r = rng.standard_normal((tokens, m)).astype(np.float32)
            for mode, xs, xz in [("dynamic", None, None), ("static", np.float32(0.03), np.uint8(120)),
                                 ("static", np.float32(0.02), np.int8(-3))]:
                scale = ws if mode == "dynamic" else np.float32(xs) * ws
                for act, res in [("none", False), ("gelu", True)]:
                    args = (w, scale, mode, xs, xz, bias, act, res)
                    impl = Int8Chunked(*args, k_chunk=64) if dot == "vnni-chunked" else Int8Dense(*args) \
                        if dot == "vnni-dense" else Int8Amx(*args, compressed=dot == "amx-compressed") \
                        if dot.startswith("amx") else Int8Linear(*args, dot=dot)
                    want = reference_qlinear(x, r if res else None, weight=w, scale=scale, mode=mode, x_scale=xs,
                                             x_zero_point=xz, bias=bias, activation=act, residual=res)
                    np.testing.assert_array_equal(impl.dense_weight(), w)
                    np.testing.assert_allclose(impl(x, r if res else None), want, rtol=1e-5, atol=1e-5,
                                               err_msg=f"{k}x{m} {tokens} tokens {mode} {act}")


@pytest.mark.parametrize("zero", [np.uint8(120), np.int8(-3)])
def test_layernorm_stores_the_bytes_its_int8_reader_makes_of_its_output(zero, monkeypatch):
    """layernorm_to_bytes: the LayerNorm rounded to a grid, and in the same pass the bytes an
    int8 layer on that grid makes of that output (its quantization, less the lowest value,
    packed four inputs to an i32, zero past the last input), exactly; whole 4-blocks, a
    partial one, whole and partial vectors of tokens, none, at one and two threads; the
    rounded output FakeQuantize's of the plain LayerNorm's, bit for bit; a token of NaN too.
    The same bytes stored as TokenTiles (`tiled`), zero to the K-tile's end, by vectors
    of 16 tokens and of 8."""
    import sparsejit.kernels.layernorm as layernorm_mod
    from sparsejit.kernels.elementwise import fake_quantize, quantize
    from sparsejit.kernels.layernorm import Grid, layernorm_to_bytes

    rng = np.random.default_rng(abs(int(zero)))
    grid, lo = Grid.of((np.float32(0.02), zero)), np.iinfo(zero.dtype).min
    for h in (768, 30, 5):
        for n in (0, 1, 17, 128, 130):
            xt = feature_major_empty(h, n)
            xt[:] = rng.standard_normal((h, n)) * 3
            if n > 2:
                xt[h // 2, 2] = np.nan
            scale, bias = rng.standard_normal(h).astype(np.float32), rng.standard_normal(h).astype(np.float32)
            for threads in (1, 2):
                numba.set_num_threads(threads)
                y, xq = layernorm_to_bytes(xt.T, scale, bias, 1e-12, grid)
                assert np.array_equal(y, layernorm(xt.T, scale, bias, 1e-12, True, grid), equal_nan=True)
                plain = fake_quantize(layernorm(xt.T, scale, bias, 1e-12, True), np.float32(0.02), zero)
                np.testing.assert_array_equal(y, plain)
                want = np.zeros((n, 4 * -(-h // 4)), np.uint8)
                want[:, :h] = quantize(y, np.float32(0.02), zero).astype(np.int16) - lo
                assert xq.shape == (n, -(-h // 4)) and xq.dtype == np.int32
                np.testing.assert_array_equal(xq, want.view(np.int32))
                for lanes in {vector_lanes(), 8}:  # (as AMX layers read them; 8 lanes: half a tile a vector)
                    monkeypatch.setattr(layernorm_mod, "vector_lanes", lambda lanes=lanes: lanes)
                    y, tiles = layernorm_to_bytes(xt.T, scale, bias, 1e-12, grid, tiled=True)
                    np.testing.assert_array_equal(y, plain)
                    assert isinstance(tiles, TokenTiles) and tiles.lead == (n,)
                    assert tiles.shape == (-(-n // 16), -(-h // 64) * 16, 16)
                    np.testing.assert_array_equal(untiled(tiles, -(-h // 4)), want.view(np.int32), err_msg=f"{lanes}")
                    assert not tiles[:, -(-h // 4):].any()  # (the rows to the K-tile's end)
                monkeypatch.undo()
            if n == 17:  # a float64 input takes the reference LayerNorm, and numpy makes the bytes
                y, xq = layernorm_to_bytes(xt.T.astype(np.float64), scale, bias, 1e-12, grid)
                want[:, :h] = quantize(y.astype(np.float32), np.float32(0.02), zero).astype(np.int16) - lo
                np.testing.assert_array_equal(xq, want.view(np.int32))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_layernorm_stores_the_pair_rows_its_bf16_reader_packs_its_output_into(monkeypatch):
    """layernorm_to_pairs: the plain LayerNorm's output, and in the same pass the pair rows
    a bf16 AMX layer packs it into (bf16.packed_pairs: features 2k and 2k + 1 rounded to
    bfloat16 in pair row k, 0 in the high half past an odd last feature), as TokenTiles in
    whole K-tiles, zero to the K-tile's end, bit for bit; an even and an odd count of
    features, whole and partial vectors of tokens, none, at one and two threads (split by
    features), by vectors of 16 tokens and of 8; a token of NaN too, and a float64 input
    (the reference LayerNorm, the pairs by the pack kernel)."""
    import sparsejit.kernels.layernorm as layernorm_mod
    from sparsejit.kernels.bf16 import packed_pairs
    from sparsejit.kernels.layernorm import layernorm_to_pairs

    rng = np.random.default_rng(7)
    for h in (768, 65, 5):
        for n in (0, 1, 17, 128, 130):
            xt = feature_major_empty(h, n)
            xt[:] = rng.standard_normal((h, n)) * 3 + 1
            if n > 2:
                xt[h // 2, 2] = np.nan
            scale, bias = rng.standard_normal(h).astype(np.float32), rng.standard_normal(h).astype(np.float32)
            for threads in (1, 2):
                numba.set_num_threads(threads)
                for lanes in {vector_lanes(), 8}:
                    monkeypatch.setattr(layernorm_mod, "vector_lanes", lambda lanes=lanes: lanes)
                    want_y = layernorm(xt.T, scale, bias, 1e-12, True)
                    want = packed_pairs(transposed(np.ascontiguousarray(want_y)))  # ([ceil(h/2), n])
                    y, tiles = layernorm_to_pairs(xt.T, scale, bias, 1e-12)
                    assert np.array_equal(y, want_y, equal_nan=True)
                    assert isinstance(tiles, TokenTiles) and tiles.lead == (n,)
                    assert tiles.shape == (-(-n // 16), -(-h // 32) * 16, 16)
                    got = untiled(tiles, -(-h // 2))
                    np.testing.assert_array_equal(got.T, want.view(np.int32), err_msg=f"{h} {n} {threads} {lanes}")
                    assert not tiles[:, -(-h // 2):].any()  # (the rows to the K-tile's end)
                monkeypatch.undo()
            if n == 17:
                y, tiles = layernorm_to_pairs(xt.T.astype(np.float64), scale, bias, 1e-12)
                np.testing.assert_array_equal(untiled(tiles, -(-h // 2)).T, packed_pairs(transposed(
                    y.astype(np.float32))).view(np.int32))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_amx_int8_layer_runs_on_the_layernorms_bytes():
    """Int8Amx.from_quantized on layernorm_to_bytes's bytes gives what the layer gives for
    the LayerNorm's (rounded) output, bit for bit: inputs a multiple of 64 (the bytes read
    as tiles in place) and not (copied into whole K-tiles first), tokens off 16, none; on
    the same bytes in rows off 64-byte lines (copied onto them first), and as TokenTiles."""
    from sparsejit.kernels.amx import Int8Amx, has_amx
    from sparsejit.kernels.int8 import byte_rows
    from sparsejit.kernels.layernorm import Grid, layernorm_to_bytes

    if not has_amx("int8"):
        pytest.skip("this CPU has no AMX-INT8")
    rng = np.random.default_rng(3)
    zero = np.uint8(120)
    grid = Grid.of((np.float32(0.02), zero))
    for h, m in [(128, 48), (40, 20), (768, 33)]:
        w = rng.integers(-127, 128, (h, m)).astype(np.int8)
        layer = Int8Amx(w, (rng.random(m) * 0.01).astype(np.float32), "static", np.float32(0.02), zero,
                        rng.standard_normal(m).astype(np.float32), "gelu", True)
        assert layer.reads_bytes(grid.floats)
        for n in (0, 5, 37):
            xt = feature_major_empty(h, n)
            xt[:] = rng.standard_normal((h, n))
            y, xq = layernorm_to_bytes(xt.T, np.ones(h, np.float32), None, 1e-12, grid)
            r = rng.standard_normal((n, m)).astype(np.float32)
            want = layer(y, r)
            np.testing.assert_array_equal(layer.from_quantized(byte_rows(xq), (n,), r), want, err_msg=f"{h} {n}")
            _, tiles = layernorm_to_bytes(xt.T, np.ones(h, np.float32), None, 1e-12, grid, tiled=True)
            np.testing.assert_array_equal(layer.from_quantized(tiles, (n,), r), want, err_msg=f"tiles {h} {n}")
            rows = byte_rows(xq)
            ld = n + 5  # (rows 4·ld bytes apart, the first 16 bytes past a line)
            buf = np.zeros(rows.shape[0] * ld + 32, np.int32)
            start = -buf.ctypes.data % 64 // 4 + 4
            off = buf[start:start + rows.shape[0] * ld].reshape(rows.shape[0], ld)[:, :n]
            if n:
                off[:] = rows
            np.testing.assert_array_equal(layer.from_quantized(off, (n,), r), want, err_msg=f"off lines {h} {n}")


@pytest.mark.parametrize("compressed", [False, True])
def test_amx_layer_split_by_its_members_gives_the_same_outputs(compressed, monkeypatch):
    """Int8Amx.split_members (a QLinearGroup's weights side by side): each part takes its
    share of every member's pairs of panels, and the output is the same, bit for bit, as
    one range of pairs a part: members on pair boundaries (Q, K, V) and off them (a pair
    straddling two), more parts than a member's pairs, one part; 128 tokens and 5."""
    import sparsejit.kernels.amx as amx_mod
    from sparsejit.kernels.amx import Int8Amx, has_amx

    if not has_amx("int8"):
        pytest.skip("this CPU has no AMX-INT8")
    rng = np.random.default_rng(5)
    w = rng.integers(-127, 128, (128, 224)).astype(np.int8)
    w[rng.random(w.shape) < 0.9] = 0
    args = ((rng.random(224) * 0.01).astype(np.float32), "static", np.float32(0.02), np.uint8(120),
            rng.standard_normal(224).astype(np.float32), "none", False)
    whole, split = Int8Amx(w, *args, compressed=compressed), Int8Amx(w, *args, compressed=compressed)
    for starts, members in [([0, 64, 160], [0, 2, 5, 7]), ([0, 40, 100], [0, 1, 3, 7]), ([0, 200], [0, 6, 7])]:
        split.split_members(starts)
        assert list(split._members) == members
        for parts in (1, 2, 3):
            monkeypatch.setattr(amx_mod, "threads", lambda parts=parts: parts)
            for n in (128, 5):
                x = rng.standard_normal((n, 128)).astype(np.float32)
                np.testing.assert_array_equal(split(x), whole(x), err_msg=f"{starts} {parts} {n}")


@pytest.mark.parametrize("compressed", [False, True])
def test_amx_int8_layer_stores_the_next_layers_bytes_of_its_output(compressed):
    """Int8Amx.bytes_on: the layer's output quantized on the next layer's grid, stored by
    its epilogue as that layer's bytes (amx_ir's quant_out), is what quantizing the
    layer's float output gives, bit for bit: with GELU run during the next block's
    products and without, uint8 and int8 grids, x quantized by the layer or its bytes
    given, outputs a multiple of 32, of 4 and neither (the bytes past the last output 0),
    outputs past the grid's ends (±3e38: ±inf on it) and NaN, tokens off 16, one and none;
    at one and two threads; stored as TokenTiles too, and from x's bytes as TokenTiles.
    (uint8 grids take lowp_ir.unsigned_bytes, int8 ones `quantized`.)"""
    from sparsejit.kernels.amx import Int8Amx, can_compress, has_amx
    from sparsejit.kernels.elementwise import quantize
    from sparsejit.kernels.int8 import quantize_x

    if not has_amx("int8") or compressed and not can_compress():
        pytest.skip("this CPU has no AMX-INT8 (or no VBMI2 for compressed tiles)")
    rng = np.random.default_rng(11)
    for (k, m), act, zero in [((128, 64), "gelu", np.uint8(7)), ((70, 36), "none", np.int8(-5)),
                              ((768, 130), "gelu", np.int8(0)), ((64, 7), "gelu", np.uint8(128))]:
        w = rng.integers(-127, 128, (k, m)).astype(np.int8)
        w[rng.random((k, m)) < 0.8] = 0
        bias = rng.standard_normal(m).astype(np.float32)
        bias[:3] = 3e38, -3e38, np.nan
        layer = Int8Amx(w, (rng.random(m) * 0.01).astype(np.float32), "static", np.float32(0.03), np.uint8(120),
                        bias, act, False, compressed=compressed)
        step, lo = np.float32(0.05), np.iinfo(zero.dtype).min
        grid = np.array([step, zero, lo, lo + 255], np.float32)
        for n in (0, 1, 37, 130):
            x = (rng.standard_normal((n, k)) * 2).astype(np.float32)
            q = quantize_x(x, "static", layer.x_scale, layer.x_zero_point)[0]
            given = np.ascontiguousarray(np.pad(q.astype(np.uint8), ((0, 0), (0, -k % 4)))).view(np.int32)
            for threads in (1, 2):
                numba.set_num_threads(threads)
                with np.errstate(invalid="ignore", over="ignore"):
                    y = layer(x)
                want = np.zeros((n, 4 * -(-m // 4)), np.uint8)
                want[:, :m] = quantize(y, step, zero).astype(np.int16) - lo
                for got in (layer.bytes_on(x, grid), layer.bytes_on(None, grid, given)):
                    assert got.shape == (n, -(-m // 4)) and got.dtype == np.int32
                    np.testing.assert_array_equal(got, want.view(np.int32), err_msg=f"{k}x{m} {act} {n} {threads}")
                given_tiles = token_tiles_empty(-(-k // 64) * 16, (n,))
                given_tiles[:] = 0
                padded = np.zeros((given_tiles.shape[0] * 16, given.shape[1]), np.int32)
                padded[:n] = given
                given_tiles[:, :given.shape[1]] = padded.reshape(-1, 16, given.shape[1]).transpose(0, 2, 1)
                for got in (layer.bytes_on(x, grid, tiled=True), layer.bytes_on(None, grid, given_tiles, tiled=True)):
                    assert isinstance(got, TokenTiles) and got.shape == (-(-n // 16), -(-m // 64) * 16, 16)
                    np.testing.assert_array_equal(untiled(got, -(-m // 4)), want.view(np.int32), err_msg=f"tiled {k}x{m} {n}")
                    assert not got[:, -(-m // 4):].any()
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def test_bench_peaks_measures_the_tile_products(monkeypatch):
    """bench/peaks.py's AMX loops build and run (they import amx_ir's tile configuration:
    a rename there once broke them unseen), each product giving a rate."""
    import importlib.util
    from pathlib import Path

    from sparsejit.kernels.amx import has_amx

    if not has_amx("int8"):
        pytest.skip("this CPU has no AMX-INT8")
    spec = importlib.util.spec_from_file_location("peaks", Path(__file__).parents[1] / "bench" / "peaks.py")
    peaks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peaks)
    monkeypatch.setattr(peaks, "TILE_ITERS", 1000)
    rates = peaks.tile_peaks(1)
    assert "int8 tdpbsud" in rates and all(r > 0 for pair in rates.values() for r in pair)


def test_int8_layer_hands_its_output_to_the_next_quantized():
    """Int8Chunked.quantized_for: a static int8 layer's output stored by its kernel as the
    bytes the next static layer's kernel reads (x quantized with the next layer's scale
    and zero point, round half to even, clamped, NaN to 0), four outputs to a 4-block.
    The bytes equal numpy's quantization of the layer's float output, and the next layer
    run on them (`from_quantized`) gives what it gives on that output, bit for bit: uint8
    and int8 grids, GELU and no activation, outputs not a multiple of 4, 0, 1, 5, 37, 130
    and 300 tokens, one and two threads (rows of one 4-block on both), K-chunks."""
    from sparsejit.kernels.int8 import Int8Chunked, host_dots

    from sparsejit.threads import ThreadScope

    if "vnni" not in host_dots():
        pytest.skip("this CPU does not run the VNNI int8 kernel")
    rng = np.random.default_rng(23)

    def layer(k, m, act, residual, xs, xz):
        keep = np.repeat(rng.random((-(-k // 4), m)) >= 0.8, 4, axis=0)[:k]
        w = (rng.integers(-127, 128, (k, m)) * keep).astype(np.int8)
        return Int8Chunked(w, (rng.random(m) * 0.01 + 1e-3).astype(np.float32), "static", np.float32(xs), xz,
                           rng.standard_normal(m).astype(np.float32), act, residual, k_chunk=64)

    for threads in (1, 2):
        with ThreadScope(threads):
            for k, m, act, (xs, xz) in [(96, 130, "gelu", (0.05, np.uint8(128))), (40, 21, "none", (0.02, np.int8(-3))),
                                        (300, 64, "gelu", (0.5, np.uint8(0)))]:
                first, nxt = layer(k, m, act, False, 0.03, np.uint8(120)), layer(m, 24, "none", True, xs, xz)
                assert first.hands_to(nxt) and not nxt.hands_to(first)  # (nxt adds a residual)
                for tokens in [0, 1, 5, 37, 130, 300]:
                    x = (3 * rng.standard_normal((tokens, k))).astype(np.float32)
                    r = rng.standard_normal((tokens, 24)).astype(np.float32)
                    y = first(x)
                    lo = -128 if xz.dtype == np.int8 else 0
                    q = (np.clip(np.rint(y / np.float32(xs)) + np.float32(xz), lo, lo + 255) - lo).astype(np.uint8)
                    xq = first.quantized_for(x, nxt)
                    got = xq.view(np.uint8).reshape(xq.shape[0], -1, 4)[:, :tokens].transpose(0, 2, 1)
                    got = got.reshape(4 * xq.shape[0], tokens)[:m]
                    np.testing.assert_array_equal(got, q.T, err_msg=f"{k}x{m} {tokens} tokens")
                    np.testing.assert_array_equal(nxt.from_quantized(xq, (tokens,), r), nxt(y, r))


@pytest.mark.parametrize("dot", ["vnni", "pmaddwd", "generic"])
def test_int8_kernel_requantizes_as_qlinear_matmul(dot):
    """A QLinearMatMul's output, dequantized (the QOperator form), on the int8 kernel: equal
    to the graph's QLinearMatMul then DequantizeLinear, bit for bit, with uint8 and int8
    outputs, a multiplier of 0.5 (every odd sum a tie, rounded half to even) and outputs
    past the type's range (clamped); then the bias, as the graph's Add."""
    from sparsejit.kernels.int8 import Int8Linear, host_dots, reference_qlinear

    from sparsejit.ops import dequantize_linear, qlinear_matmul, quantize_linear

    if dot not in host_dots():
        pytest.skip(f"this CPU does not run the {dot} int8 kernel")
    rng = np.random.default_rng(5)
    ends = set()
    k, m = 96, 40
    w = (rng.integers(-127, 128, (k, m)) * np.repeat(rng.random((k // 4, m)) < 0.3, 4, axis=0)).astype(np.int8)
    xz = np.uint8(118)
    bias = rng.standard_normal(m).astype(np.float32)
    for xs, ws, ys, yz in [(0.125, np.full(m, 0.5, np.float32), 0.125, np.uint8(128)),  # a multiplier of 0.5
                           (0.05, (rng.random(m) * 0.01).astype(np.float32), 0.03, np.int8(-5)),
                           (0.05, (rng.random(m) * 0.01).astype(np.float32), 0.2, np.uint8(3))]:
        xs, ys = np.float32(xs), np.float32(ys)
        multiplier = xs * ws / ys
        assert ys != 0.125 or np.all(multiplier == 0.5)
        lo, hi = np.iinfo(yz.dtype).min, np.iinfo(yz.dtype).max
        requantize = np.array([[ys] * m, [lo - np.float32(yz)] * m, [hi - np.float32(yz)] * m], np.float32)
        for tokens in [1, 17, 130]:
            x = (rng.standard_normal((tokens, k)) * 3).astype(np.float32)
            q = quantize_linear(x, xs, xz)
            graph = dequantize_linear(qlinear_matmul(q, xs, xz, w, ws, np.zeros(m, np.int8), ys, yz), ys, yz)
            plain = reference_qlinear(x, weight=w, scale=multiplier, mode="static", x_scale=xs, x_zero_point=xz,
                                      requantize=requantize)
            np.testing.assert_array_equal(plain, graph)
            ends.update(end for end, row in (("lowest", 1), ("highest", 2)) if np.any(plain == requantize[row] * ys))
            impl = Int8Linear(w, multiplier, "static", xs, xz, bias, requantize=requantize, dot=dot)
            np.testing.assert_array_equal(impl(x), graph + bias, err_msg=f"{tokens} tokens, output {yz.dtype}")
    assert ends == {"lowest", "highest"}  # outputs clamped at both ends of their type


def test_elementwise_kernels_equal_their_references():
    """QuantizeLinear, DequantizeLinear (and the two in one pass), Lookup, Erf and QLinearMatMul
    on their kernels (what the QOperator form runs between its Linear layers): equal to the numpy references bit for bit, for
    uint8 and int8, ties (x / scale = k + 0.5), values past the type's range and past
    int32's, infinities, a transposed (feature-major) input, an empty one and one past
    layout.SERIAL_BELOW (on the threads, where the others run on the calling thread); and
    None, so the reference runs, for what they do not cover."""
    from sparsejit.kernels import elementwise

    from sparsejit.ops import dequantize_linear, erf, qlinear_matmul, quantize_linear

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((37, 300)) * 3).astype(np.float32)
    x[0, :8] = [1e10, -1e10, np.inf, -np.inf, 2.5 * 0.25, 0.5 * 0.25, -1.5 * 0.25, 0.0]
    for scale, zero in [(np.float32(0.25), np.uint8(120)), (np.float32(0.013), np.int8(-7)),
                        (np.float32(0.02), np.uint8(0))]:
        for v in (x, x.T, x[:0], np.tile(x, (8, 1))):
            q = elementwise.quantize(v, scale, zero)
            assert q.dtype == zero.dtype and q.shape == v.shape
            np.testing.assert_array_equal(q, quantize_linear(v, scale, zero))
            np.testing.assert_array_equal(elementwise.dequantize(q, scale, zero), dequantize_linear(q, scale, zero))
            np.testing.assert_array_equal(elementwise.fake_quantize(v, scale, zero),
                                          dequantize_linear(quantize_linear(v, scale, zero), scale, zero))
    assert set(np.unique(elementwise.quantize(x[0, :4], np.float32(0.25), np.uint8(120)))) == {0, 255}
    nan = np.array([np.nan, 1.0], np.float32)  # NaN quantizes to the byte 0 (numpy's cast on x86), dequantized
    np.testing.assert_array_equal(elementwise.fake_quantize(nan, np.float32(0.5), np.uint8(9)),
                                  dequantize_linear(quantize_linear(nan, np.float32(0.5), np.uint8(9)),
                                                    np.float32(0.5), np.uint8(9)))
    q = elementwise.quantize(x, np.float32(0.02), np.uint8(0))
    for dtype in (np.uint8, np.int16, np.float32, np.float64):  # Lookup: tables of 8 to 64 bits
        table = rng.integers(-100, 100, 256).astype(dtype)
        for v in (q, q.T, q[:0], np.tile(q, (8, 1))):
            np.testing.assert_array_equal(elementwise.lookup(v, table=table), table[v])
    assert elementwise.lookup(q, table=np.zeros(10, np.float32)) is None  # (not a table of every byte)
    finite = x[1:]
    np.testing.assert_array_equal(elementwise.erf(finite), erf(finite))
    np.testing.assert_array_equal(elementwise.erf(finite.T), erf(finite.T))
    # QLinearMatMul: attention's (transposed views of uint8 activations; a multiplier of
    # 2^-10, so sums ≡ 512 mod 1024 are ties) and a Linear's (int8 weights, a scale per column)
    q, k = rng.integers(0, 256, (2, 9, 48)).astype(np.uint8), rng.integers(0, 256, (2, 9, 48)).astype(np.uint8)
    heads, keys = q.reshape(2, 9, 4, 12).transpose(0, 2, 1, 3), k.reshape(2, 9, 4, 12).transpose(0, 2, 3, 1)
    w, ws = rng.integers(-127, 128, (48, 20)).astype(np.int8), (rng.random(20) * 0.01).astype(np.float32)
    for args in [(heads, np.float32(2 ** -5), np.uint8(128), keys, np.float32(2 ** -5), np.uint8(120),
                  np.float32(1.0), np.uint8(100)),
                 (q, np.float32(0.03), np.uint8(3), w, ws, np.zeros(20, np.int8), np.float32(0.2), np.int8(-4))]:
        got = elementwise.qlinear_matmul(*args)
        np.testing.assert_array_equal(got, qlinear_matmul(*args))
        assert len(np.unique(got)) > 20
    assert elementwise.quantize(x, np.full(300, 0.1, np.float32), np.zeros(300, np.uint8)) is None  # per axis
    assert elementwise.quantize(x, np.float32(0.1), np.uint16(3)) is None
    assert elementwise.dequantize(x.astype(np.int32), np.float32(0.1), np.int32(0)) is None
    assert elementwise.erf(x.astype(np.float64)) is None


def test_the_launcher_makes_every_call_with_its_arguments():
    """launch.py: a driver's `put_*` rows, run by the one parallel loop through the
    signature's `part`, call the kernel once per call put, with its pointer, integer and
    float arguments as given (the float's bits exact), whichever part holds it."""
    from sparsejit.kernels.compile import load_source
    from sparsejit.kernels.launch import IMPORTS, put_source, run

    sig = Signature("record", (("out", "ptr"), ("i", "i64"), ("x", "float")))
    fn = compile_ir("""
define void @record(ptr %out, i64 %i, float %x) {
entry:
  %at = mul i64 %i, 2
  %p = getelementptr i64, ptr %out, i64 %at
  %n = load i64, ptr %p
  %n1 = add i64 %n, 1
  store i64 %n1, ptr %p
  %q = getelementptr i64, ptr %p, i64 1
  %b = bitcast float %x to i32
  %w = sext i32 %b to i64
  store i64 %w, ptr %q
  ret void
}
""", "record")
    driver = load_source("import numpy as np\nfrom numba import njit\n" + IMPORTS + "\n\n" + put_source(sig) + """
@njit(nogil=True, cache=True)
def run_record(launch, part, calls, fn, out, xs):
    parts = calls.shape[0]
    n = xs.shape[0]
    for c in range(parts):
        for i in range(c * n // parts, (c + 1) * n // parts):
            put_record(calls, c, fn, out.ctypes.data, i, xs[i])
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
""").run_record
    xs = np.array([0.0, -0.0, 1.5, -3.25e-39, np.inf, np.nan, 7.0], np.float32)
    for parts in (1, 2, 3, 7):
        out = np.zeros((len(xs), 2), np.int64)
        run(driver, sig, parts, -(-len(xs) // parts), fn, out, xs)
        assert (out[:, 0] == 1).all()  # each call made once
        np.testing.assert_array_equal(out[:, 1].astype(np.int32), xs.view(np.int32))


def test_a_driver_putting_more_calls_than_its_rows_hold_is_refused():
    """A driver that puts more calls in a part than `run` made room for raises IndexError
    (and makes no call) rather than writing past its rows."""
    from sparsejit.kernels.compile import load_source
    from sparsejit.kernels.launch import IMPORTS, put_source, run

    sig = Signature("record2", (("out", "ptr"), ("i", "i64")))
    driver = load_source("import numpy as np\nfrom numba import njit\n" + IMPORTS + "\n\n" + put_source(sig) + """
@njit(nogil=True, cache=True)
def run_three(launch, part, calls, fn, out):
    for i in range(3):
        put_record2(calls, 0, fn, out.ctypes.data, i)
    launch_calls(launch, part, calls.ctypes.data, calls.shape[0], calls.shape[1])
""").run_three
    nop = compile_ir("define void @nop(ptr %out, i64 %i) {\nentry:\n  ret void\n}\n", "nop")
    with pytest.raises(IndexError, match="more calls"):
        run(driver, sig, 1, 2, nop, np.zeros(3, np.int64))
    run(driver, sig, 1, 3, nop, np.zeros(3, np.int64))  # (room for the three)


def test_a_put_stores_each_argument_as_its_slots_kind():
    """put_call (through a signature's `put_*`): the count, the address, then each argument
    in its slot: pointers and integers as int64 (of any integer type), floats as their
    float32 bits (of a float64, float32 or integer value); in rows of any layout."""
    from sparsejit.kernels.compile import load_source
    from sparsejit.kernels.launch import IMPORTS, put_source

    sig = Signature("kinds", (("p", "ptr"), ("i", "i64"), ("x", "float"), ("y", "float")))
    put_two = load_source("import numpy as np\nfrom numba import njit\n" + IMPORTS + "\n\n" + put_source(sig) + """
@njit(nogil=True, cache=True)
def put_two(calls, fn, p, i, x):
    put_kinds(calls, 1, fn, p, i, x, 3)
    put_kinds(calls, 1, fn + 1, p, np.int32(i), np.float64(x) / 3, x)
""").put_two

    def bits(v):
        return int(np.array(v, np.float32).view(np.int32))

    x = np.float32(-2.5)
    want = [2, 7, 1 << 40, -5, bits(x), bits(3.0), 8, 1 << 40, -5, bits(np.float64(x) / 3), bits(x)]
    for order in "CF":
        calls = np.zeros((2, 11), np.int64, order=order)
        put_two(calls, 7, 1 << 40, -5, x)
        assert calls[0].tolist() == [0] * 11
        assert calls[1].tolist() == want


MASK_CHAINS = {
    "bert": (("Cast", {"to": 1}, None, False), ("Sub", {}, np.array(1.0, np.float32), True),
             ("Mul", {}, np.array(np.finfo(np.float32).min, np.float32), False)),
    "older": (("Cast", {"to": 1}, None, False), ("Sub", {}, np.array([1.0], np.float32), True),
              ("Mul", {}, np.array(-10000.0, np.float32), False)),
    "div_add": (("Cast", {"to": 1}, None, False), ("Div", {}, np.array(3.0, np.float32), False),
                ("Add", {}, np.array(-0.5, np.float32), True), ("Div", {}, np.array(7.0, np.float32), True)),
    "float": (("Mul", {}, np.array(-1e30, np.float32), False), ("Sub", {}, np.array(0.25, np.float32), False)),
    "sdpa": (("Cast", {"to": 1}, None, False), ("Sub", {}, np.array(1.0, np.float32), True),
             ("MaskedFill", {}, np.array(np.finfo(np.float32).min, np.float32), False)),
    "select": (("Select", {}, (np.array([0.0], np.float32), np.array([-np.inf], np.float32)), False),
               ("Mul", {}, np.array(2.0, np.float32), False)),
}


@pytest.mark.parametrize("chain", list(MASK_CHAINS))
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.uint8, np.float32])
def test_the_mask_fill_kernel_makes_the_mask_and_its_layout_as_the_ops_do(chain, dtype):
    """A taped run's refill of an attention mask (PreparedMask.refill): where the steps are
    a Cast to float32 and float32 arithmetic with a constant, one kernel call makes the mask
    and its by-key layout. Bit for bit what the ops make in numpy (a new PreparedMask), on
    sources of 0/1, other values, and for a float source -0, infinities and NaN."""
    steps = MASK_CHAINS[chain]
    if chain == "float" and dtype is not np.float32 or chain == "select" and dtype is not np.bool_:
        pytest.skip("a chain without a Cast takes a float32 source, a Select a bool one")
    rng = np.random.default_rng(3)
    special = np.array([0, 1, -0.0, np.inf, -np.inf, np.nan, 3.5e38, -7, 2 ** 25 + 1]) if dtype is np.float32 else \
        np.array([0, 1, 5, 2 ** 25 + 1 if dtype in (np.int64, np.int32) else 1])
    make, fill = mask_steps(steps, 17), float_steps(steps)
    assert fill is not None
    source = np.zeros((3, 1, 1, 11), dtype)
    prepared = PreparedMask(source, make, fill)
    layout = prepared.kernel_layout(prepared.mask, 11)
    for _ in range(4):
        source[...] = rng.choice(special, source.shape).astype(dtype)
        prepared.refill()
        assert prepared._filling[1] is not None  # (the kernel made them)
        want = PreparedMask(source.copy(), make)
        np.testing.assert_array_equal(prepared.mask.view(np.int32), want.mask.view(np.int32))
        np.testing.assert_array_equal(layout.view(np.int32), want.kernel_layout(want.mask, 11).view(np.int32))


@pytest.mark.parametrize("chain", ["sdpa", "select"])
def test_an_expanded_mask_is_a_view_its_layout_and_fill_by_key(chain):
    """A mask the graph Expands to [batch, 1, queries, keys] (SDPA's exports): a broadcast
    view of the values made unexpanded; the attention reads it by key (attention.by_key),
    its layout filled by the kernel, bit for bit the expanded mask's first query row; and
    the attention's output is the reference's on the expanded mask."""
    from sparsejit.kernels.attention import by_key

    steps = MASK_CHAINS[chain]
    rng = np.random.default_rng(5)
    b, q, k = 2, 6, 9
    source = (rng.random((b, 1, 1, k)) < 0.7).astype(np.bool_ if chain == "select" else np.int64)
    expand = np.array([b, 1, q, k], np.int64)
    prepared = PreparedMask(source, mask_steps(steps, 17), float_steps(steps), expand)
    assert prepared.mask.shape == (b, 1, q, k) and prepared.mask.strides[2] == 0
    layout = prepared.kernel_layout(by_key(prepared.mask), k)
    assert layout.shape == (b, 1, k, 1)
    for _ in range(3):
        source[...] = rng.random(source.shape) < 0.7
        prepared.refill()
        assert prepared._filling[1] is not None
        want = np.broadcast_to(PreparedMask(source.copy(), mask_steps(steps, 17)).mask, (b, 1, q, k))
        np.testing.assert_array_equal(prepared.mask, want)
        np.testing.assert_array_equal(layout[:, :, :, 0], want[:, :, 0, :])
    qs, kt, v = (rng.standard_normal(sh).astype(np.float32) for sh in ((b, 3, q, 8), (b, 3, 8, k), (b, 3, k, 8)))
    np.testing.assert_allclose(fused_attention(qs, kt, v, prepared), reference_attention(qs, kt, v, np.array(want)),
                               **TOL)


def test_a_mask_the_fill_kernel_does_not_make_is_refilled_by_the_ops():
    """Steps the fill kernel does not make (integer arithmetic before the Cast, a Cast to
    another type), or a layout by query (not in the mask's order): the refill runs the ops
    and lays the mask out as before."""
    one = np.array(1, np.int64)
    assert float_steps((("Sub", {}, one, True), ("Cast", {"to": 1}, None, False))) is None
    assert float_steps((("Cast", {"to": 11}, None, False), ("Mul", {}, np.array(2.0), False))) is None
    steps = MASK_CHAINS["bert"]
    source = np.ones((2, 1, 5, 5), np.int64)  # a mask per query and key
    prepared = PreparedMask(source, mask_steps(steps, 17), float_steps(steps))
    layout = prepared.kernel_layout(prepared.mask, 5)
    source[0, 0, 1, 2] = 0
    prepared.refill()
    assert prepared._filling[1] is None
    want = PreparedMask(source.copy(), mask_steps(steps, 17))
    np.testing.assert_array_equal(layout, want.kernel_layout(want.mask, 5))
    assert layout[0, 0, 2, 1] == np.finfo(np.float32).min
