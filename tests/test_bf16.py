"""precision="bf16": the sparse Linear layers in bfloat16 on AVX512-BF16 (kernels/bf16.py).

The kernel is held to its own meaning (x and W rounded to bfloat16, products and sums
exact in float64), within the float32 sums' worst-case error: at most one rounding of
2⁻²⁴ per addition, over at most `in` additions, of the sum of |products|. The rounding
itself is checked bit for bit against ml_dtypes' bfloat16 (the conversion kernel
through an identity weight, whose products are exact).

Whole models are held to ONNX Runtime's float32 outputs by the pooled cosine (≥ 0.999,
issue 16's target) and to max |error| ≤ 2⁻⁵ of the output's largest magnitude: each
layer's inputs and weights carry up to 2⁻⁸ relative rounding (bfloat16 keeps 8
significant bits), and the outputs of these encoders sit near 2⁻¹² of their scale
(measured 1e-3 of 4 on the default model), with room for deeper models.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS_DIR, load_on_bf16_kernels, make_inputs, ort_run
from sparsejit.kernels import amx
from sparsejit.kernels.amx import BF16AmxLinear, can_compress, has_amx
from sparsejit.kernels.bf16 import (
    BF16DenseLinear,
    BF16ScatteredLinear,
    BF16SparseLinear,
    from_bf16,
    has_bf16,
    reference_bf16_linear,
    rounded,
    to_bf16,
)

import sparsejit

needs_bf16 = pytest.mark.skipif(not has_bf16(), reason="this CPU has no AVX512-BF16")
DEFAULT = Path(sparsejit.default_model_path())
BLOCK4 = MODELS_DIR / "bert_eager_h128_op17_legacy_block4_p90.onnx"


def _weight(rng, k, m, density, block=1):
    w = rng.standard_normal((k, m)).astype(np.float32)
    keep = rng.random((-(-k // block), m)) < density
    return w * np.repeat(keep, block, axis=0)[:k]


def test_rounding_to_bf16_is_numpys_round_to_nearest_even():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32)
    ties = (rng.integers(0, 1 << 16, 1000, dtype=np.uint32) << 16) | 0x8000  # exactly halfway
    x = np.concatenate([bits, ties]).view(np.float32)
    x = np.concatenate([x, np.float32([0, -0.0, np.inf, -np.inf, np.nan, 3.3895314e38, -3.3895314e38])])
    want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    got = to_bf16(x)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(from_bf16(got[~finite])).all()


KERNELS = {"sparse": lambda w, b, act, res, chunk=None: BF16SparseLinear(w, b, act, res, k_chunk=chunk),
           "scattered": lambda w, b, act, res, chunk=None: BF16ScatteredLinear(w, b, act, res, k_chunk=chunk),
           "dense": lambda w, b, act, res, chunk=None: BF16DenseLinear(w, b, act, res),
           "amx": lambda w, b, act, res, chunk=None: BF16AmxLinear(w, b, act, res, compressed=False),
           "amx-compressed": lambda w, b, act, res, chunk=None: BF16AmxLinear(w, b, act, res, compressed=True),
           "amx-after": lambda w, b, act, res, chunk=None: _after_products(lambda: BF16AmxLinear(w, b, act, res))}


def _after_products(make):
    """The AMX layer `make` builds, with each block's epilogue after its own products
    (amx.OVERLAPPED off): the kernel's other form, which no layer takes by default."""
    saved, amx.OVERLAPPED = amx.OVERLAPPED, False
    try:
        layer = make()
    finally:
        amx.OVERLAPPED = saved
    assert not layer.config.overlapped
    return layer


def _runs(kernel: str) -> None:
    if kernel.startswith("amx") and not has_amx("bf16"):
        pytest.skip("this CPU has no AMX-BF16 (or Linux did not grant its tiles)")
    if kernel in ("amx-compressed", "amx-after") and not can_compress():
        pytest.skip("this CPU has no AVX512-VBMI2 to expand compressed tiles")


@needs_bf16
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("k", [1, 2, 7, 64, 300])
def test_the_kernel_reads_x_rounded_to_bf16_bit_for_bit(k, kernel):
    """An identity weight: each output is one input times 1 (and its pair partner times
    0), exact, so the output is the packed bfloat16 of x itself. Ties, odd input counts,
    token counts off the vector width; no subnormals (vdpbf16ps and AMX flush them to 0)."""
    _runs(kernel)
    rng = np.random.default_rng(k)
    for ntok in (1, 15, 17, 53, 130):
        x = (rng.standard_normal((ntok, k)) * 10.0 ** rng.integers(-30, 30, (ntok, k))).astype(np.float32)
        x.view(np.uint32)[::3] = (x.view(np.uint32)[::3] & 0xFFFF0000) | 0x8000  # ties
        layer = KERNELS[kernel](np.eye(k, dtype=np.float32), None, "none", False)
        got = layer(x)
        assert np.array_equal(got.view(np.uint32), rounded(x).view(np.uint32)), (k, ntok)
    x = np.full((3, k), 1e-39, np.float32)  # subnormal: read as zero (README, Guarantees)
    assert not KERNELS[kernel](np.eye(k, dtype=np.float32), None, "none", False)(x).any()


@needs_bf16
@pytest.mark.parametrize("k,m,chunk,block", [(7, 5, None, 1), (33, 17, None, 1), (768, 96, 128, 1),
                                             (768, 64, 128, 4), (3072, 40, 128, 1), (130, 20, 64, 1)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_kernel_is_its_numpy_meaning(k, m, chunk, block, kernel):
    _runs(kernel)
    rng = np.random.default_rng(k + m)
    w = _weight(rng, k, m, 0.1 if block == 1 else 0.2, block)
    w[:, 0] = 0  # an empty row
    bias = rng.standard_normal(m).astype(np.float32)
    for ntok in (0, 1, 17, 53, 128, 131, 224):
        x = rng.standard_normal((ntok, k)).astype(np.float32)
        r = rng.standard_normal((ntok, m)).astype(np.float32)
        total = np.abs(rounded(x)).astype(np.float64) @ np.abs(rounded(w)).astype(np.float64)
        bound = 1.13 * (k + 2) * 2.0 ** -24 * total + 2.0 ** -22 * (np.abs(bias) + np.abs(r) + 1)
        for act, res in [("none", None), ("gelu", None), ("none", r)]:
            layer = KERNELS[kernel](w, bias, act, res is not None, chunk)
            got, want = layer(x, res), reference_bf16_linear(x, w, bias, act, res)
            assert got.shape == (ntok, m)
            assert np.all(np.abs(got - want) <= bound), (act, res is not None, ntok, np.abs(got - want).max())
    assert np.array_equal(layer.dense_weight(), rounded(w))


@needs_bf16
@pytest.mark.parametrize("kernels", ["auto", "dense"])
@pytest.mark.parametrize("path", [BLOCK4, DEFAULT], ids=lambda p: p.stem)
def test_bf16_models_stay_near_onnx_runtimes_float32(path, kernels):
    """Sparse layers run in bf16: 4-block ones in pairs of consecutive inputs, scattered
    ones (90% unstructured) in pairs of any two of a row's inputs; dense ones are timed.
    With AMX, the dense kernel multiplies bfloat16 tiles and is timed at every density;
    kernels="dense" puts every layer on it (or on the AVX512-BF16 GEMM without AMX)."""
    if kernels == "dense" and not has_amx("bf16"):
        pytest.skip("kernels='dense' is the AMX case here")
    model = sparsejit.load(path, precision="bf16", kernels=kernels)
    assert model.precision == "bf16"
    if kernels == "dense":
        assert all(isinstance(getattr(lp.impl, "group", lp.impl), BF16AmxLinear) for lp in model.layers)
    else:
        sparse = [lp for lp in model.layers if lp.pattern.density < 0.25]
        tiles = ("dense-bf16",) * has_amx("bf16")  # (timed against them: either may win)
        # (the float32 sparse kernel, timed beside bf16's, where it was faster)
        fp32 = [lp for lp in model.layers if lp.kind == "sparse"]
        assert all("its sparse-bf16" in lp.reason for lp in fp32)
        assert sparse and all(lp.kind in ("sparse-bf16", "sparse") + tiles for lp in sparse)
        kernels = {type(getattr(lp.impl, "group", lp.impl)) for lp in sparse if lp.kind == "sparse-bf16"}
        assert kernels <= {BF16SparseLinear if path == BLOCK4 else BF16ScatteredLinear}, kernels
        assert all("AMX" in lp.reason for lp in sparse if has_amx("bf16"))
        dense = [lp for lp in model.layers if lp.pattern.density == 1]
        assert all("measured" in lp.reason and lp.kind in ("dense-bf16", "sparse-bf16", "sparse") for lp in dense)
    report = model.check()
    assert report.ok, str(report)
    assert all(r.fp32_err is not None and r.fp32_err > 0 for r in report if r.kind.endswith("-bf16"))
    for batch, seq in [(1, 7), (3, 20)]:
        feeds = make_inputs(model.input_names, batch, seq, seed=seq)
        mask = feeds.get("attention_mask", np.ones((batch, seq)))[..., None]
        for g, f, name in zip(model.run(feeds), ort_run(path, feeds), model.output_names):
            assert g.dtype == f.dtype and g.shape == f.shape, name
            assert np.abs(g - f).max() <= 2.0 ** -5 * np.abs(f).max(), (name, np.abs(g - f).max())
            if g.ndim == 3:
                pg, pf = ((a * mask).sum(1) for a in (g.astype(np.float64), f.astype(np.float64)))
                cosine = (pg * pf).sum(-1) / np.linalg.norm(pg, axis=-1) / np.linalg.norm(pf, axis=-1)
                assert cosine.min() >= 0.999, (name, cosine)


@needs_bf16
def test_check_catches_a_bf16_kernel_that_computes_something_else(monkeypatch, tmp_path):
    # (AMX may win every layer under "auto", and the float32 sparse kernel under "sparse")
    model = load_on_bf16_kernels(BLOCK4, monkeypatch, tmp_path / "plan.json", kernels="sparse")
    real = BF16SparseLinear.__call__
    monkeypatch.setattr(BF16SparseLinear, "__call__", lambda self, x, r=None: real(self, x, r) * 1.01)
    report = model.check()
    assert not any(r.ok for r in report if r.kind == "sparse-bf16") and any(r.kind == "sparse-bf16" for r in report)


def test_without_avx512_bf16_it_warns_and_loads_in_fp32(monkeypatch):
    from sparsejit import api

    monkeypatch.setattr(api, "has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="AVX512-BF16"):
        model = sparsejit.load(BLOCK4, precision="bf16")
    assert model.precision == "fp32" and not any(lp.bf16 for lp in model.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsejit.load(DEFAULT)  # fp32 asks nothing of the CPU


@needs_bf16
def test_pruned_negative_zeros_compress_on_amx_tiles():
    """A weight pruned as w · mask holds -0.0 where w was negative. The AMX layer holds
    those as +0, the same products, so they count as the zeros its tiles compress: the
    layer is compressed, and its outputs are bit for bit those of the +0 weight's."""
    _runs("amx-compressed")
    rng = np.random.default_rng(11)
    w = _weight(rng, 300, 70, 0.1)
    signed = w.copy()
    signed[(w == 0) & (rng.random(w.shape) < 0.5)] = -0.0
    assert np.signbit(signed[signed == 0]).any()
    layer, plain = BF16AmxLinear(signed, None, "none", False), BF16AmxLinear(w, None, "none", False)
    assert layer.config.compressed and np.array_equal(layer.tiles, plain.tiles)
    x = rng.standard_normal((37, 300)).astype(np.float32)
    assert np.array_equal(layer(x), plain(x))


def test_amx_dense_tiles_start_on_a_cache_line():
    """A dense weight's AMX tiles are one buffer whose rows the tile loads read 64 bytes at a
    time: it starts on a 64-byte line (numpy's own buffers may start 16 bytes past one, and
    then every tile row straddles two lines), int8's and bf16's, whatever the shape."""
    from sparsejit.kernels.amx import Int8Amx

    rng = np.random.default_rng(17)
    made = []
    for k, m in ((64, 32), (300, 70), (768, 96)):
        if has_amx("bf16"):
            made.append(BF16AmxLinear(rng.standard_normal((k, m)).astype(np.float32), None, "none", False))
        if has_amx("int8"):
            made.append(Int8Amx(rng.integers(-127, 128, (k, m)).astype(np.int8), 0.01, "dynamic"))
    if not made:
        pytest.skip("this CPU has no AMX (or Linux did not grant its tiles)")
    for layer in made:
        assert not layer.config.compressed and layer._arrays[0].ctypes.data % 64 == 0, (type(layer), layer._shape)
        assert np.array_equal(layer.tiles.reshape(-1).view(np.uint8), layer._arrays[0])


@needs_bf16
def test_amx_layers_give_the_same_outputs_whatever_the_token_steps(monkeypatch):
    """The AMX driver steps over the tokens by amx.token_tile (fewer the more inputs): the
    outputs are bit for bit the same at any step, a last step of a few tokens included."""
    _runs("amx-compressed")
    from sparsejit.kernels import amx

    rng = np.random.default_rng(13)
    layer = BF16AmxLinear(_weight(rng, 3072, 40, 0.1), None, "gelu", False)
    x = rng.standard_normal((300, 3072)).astype(np.float32)
    assert amx.token_tile(3072 // 2) == 128 and amx.token_tile(768 // 2) == 512
    outputs = []
    for step in (32, 128, 512):
        monkeypatch.setattr(amx, "token_tile", lambda rows, step=step: step)
        outputs.append(layer(x))
    assert all(np.array_equal(o, outputs[0]) for o in outputs[1:])


@needs_bf16
def test_a_scattered_weight_past_16_bit_indices_stays_float32():
    """The scattered kernel holds each pair's inputs in 16 bits: a weight of more inputs
    is refused by name there and planned on the float32 sparse kernel instead."""
    from sparsejit.kernels.linear import SparseLinear

    from sparsejit.choose import Chooser
    from sparsejit.graph import Node
    from sparsejit.plan import plan_linear

    w = np.zeros(((1 << 16) + 1, 2), np.float32)
    w[::97, 0], w[-1, 1] = 1.0, 2.0  # scattered: one nonzero per pair of consecutive inputs
    with pytest.raises(ValueError, match="65537 inputs"):
        BF16ScatteredLinear(w, None, "none", False)
    attrs = {"weight": w, "bias": None, "activation": "none", "residual": False}
    layer = plan_linear(Node("Linear", "tall", ["x"], ["y"], attrs), Chooser("sparse", precision="bf16"))
    assert type(layer.impl) is SparseLinear
    x = np.random.default_rng(0).standard_normal((3, w.shape[0])).astype(np.float32)
    assert np.allclose(layer.impl(x), x @ w, rtol=1e-5, atol=1e-5)


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of .*'fp16'"):
        sparsejit.load(DEFAULT, precision="fp16")


@needs_bf16
@pytest.mark.parametrize("kernels", ["auto", "sparse"])
@pytest.mark.parametrize("faster", ["sparse-fp32", "sparse"])
def test_bf16_times_the_float32_sparse_kernel_beside_its_own(faster, kernels, monkeypatch):
    """A sparse layer under bf16 runs the faster of bf16's sparse kernel and the float32
    one, as timed side by side (AVX512-BF16's dot product is slower than the FMA on some
    CPUs); the plan keeps which, and a load from it, forced sparse or not, follows it
    without timing."""
    from sparsejit.kernels.linear import SparseLinear

    from sparsejit import choose
    from sparsejit.graph import Node
    from sparsejit.plan import plan_linear

    def race(fns, rounds):  # (the faster kind 1 ms at every chunk, the other 2, dense 5)
        return {name: 5.0 if name == "dense" else 1.0 if name[0] == faster else 2.0 for name in fns}

    monkeypatch.setattr(choose, "race", race)
    rng = np.random.default_rng(7)
    w = _weight(rng, 256, 40, 0.1)
    node = Node("Linear", "l", ["x"], ["y"], {"weight": w, "bias": None, "activation": "none", "residual": False})
    chooser = choose.Chooser(kernels, precision="bf16")
    first = plan_linear(node, chooser)
    want = SparseLinear if faster == "sparse-fp32" else BF16ScatteredLinear
    assert type(first.impl) is want and chooser.decisions["l"]["kernel"] == faster
    assert ("its sparse-bf16 2.000 ms" in first.reason) == (faster == "sparse-fp32"), first.reason
    x = rng.standard_normal((9, 256)).astype(np.float32)
    meaning = x @ w if faster == "sparse-fp32" else reference_bf16_linear(x, w, None, "none", None)
    np.testing.assert_allclose(first.impl(x), meaning, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(choose, "race", lambda fns, rounds: pytest.fail("a saved decision was timed again"))
    for policy in ("auto", "sparse"):
        again = plan_linear(node, choose.Chooser(policy, saved=chooser.decisions, precision="bf16"))
        assert type(again.impl) is want and again.decided_by == "cached plan", (policy, again.reason)


@needs_bf16
@pytest.mark.parametrize("dense_ms,amx", [(1.5, True), (2.5, False)])  # (TILES_CLEARLY 0.5)
def test_a_bf16_layer_takes_amx_tiles_unless_its_sparse_kernel_is_clearly_faster(dense_ms, amx, monkeypatch):
    """With AMX tiles, timed alone over PROBE_TOKENS, a layer takes its sparse kernel only
    where that took under TILES_CLEARLY of AMX's time (alone, AMX's layer pays for two
    launches and packing x, which a taped model mostly does not); the reason says so."""
    from sparsejit.kernels.linear import ByTokens

    from sparsejit import choose
    from sparsejit.graph import Node
    from sparsejit.plan import plan_linear

    if not has_amx("bf16"):
        pytest.skip("this CPU has no AMX-BF16 (or Linux did not grant its tiles)")
    monkeypatch.setattr(choose, "race", lambda fns, rounds: {n: dense_ms if n == "dense" else 1.0 for n in fns})
    monkeypatch.setattr(choose.Chooser, "race_layers", lambda *a: ("sparse", {"sparse": 1.0, "dense": 2.0}, False))
    node = Node("Linear", "l", ["x"], ["y"], {"weight": _weight(np.random.default_rng(6), 256, 40, 0.1),
                                              "bias": None, "activation": "none", "residual": False,
                                              "source_op": "MatMul"})
    lp = plan_linear(node, choose.Chooser(precision="bf16"))
    assert isinstance(lp.impl, BF16AmxLinear) == amx and not isinstance(lp.impl, ByTokens)
    assert f"a sparse kernel under {choose.TILES_CLEARLY} of its time taken" in lp.reason


@needs_bf16
@pytest.mark.parametrize("amx_wins_at", [1024, None])
def test_a_bf16_sparse_layer_takes_amx_tiles_from_many_tokens(amx_wins_at, monkeypatch):
    """With AMX tiles, a layer whose sparse kernel beat AMX's dense one clearly over
    PROBE_TOKENS (choose.TILES_CLEARLY) is timed against it over MANY_TOKENS too; where AMX's is clearly faster there, the
    layer runs both (ByTokens): the sparse kernel under that token count, AMX's from it.
    The plan keeps the count, and a load from it follows it without timing."""
    from types import SimpleNamespace

    from sparsejit.kernels.linear import ByTokens

    from sparsejit import choose
    from sparsejit.cli import layer_rows
    from sparsejit.graph import Node
    from sparsejit.plan import plan_linear

    if not has_amx("bf16"):
        pytest.skip("this CPU has no AMX-BF16 (or Linux did not grant its tiles)")
    monkeypatch.setattr(choose, "race", lambda fns, rounds: {n: 3.0 if n == "dense" else 1.0 for n in fns})

    def race_layers(self, kind, layers, k, m, residual, tokens):  # (AMX 0.5 of the sparse time from amx_wins_at)
        ms = {"sparse": 1.0, "dense": 0.5 if amx_wins_at and tokens >= amx_wins_at else 0.95}
        return min(ms, key=ms.get), ms, False

    monkeypatch.setattr(choose.Chooser, "race_layers", race_layers)
    rng = np.random.default_rng(5)
    w = _weight(rng, 256, 40, 0.1)
    node = Node("Linear", "l", ["x"], ["y"], {"weight": w, "bias": None, "activation": "none", "residual": False,
                                              "source_op": "MatMul"})
    chooser = choose.Chooser(precision="bf16")
    lp = plan_linear(node, chooser)
    if amx_wins_at is None:
        assert not isinstance(lp.impl, ByTokens) and "also at 384 tokens" in lp.reason and "at" not in \
            chooser.decisions["l"]
        return
    assert isinstance(lp.impl, ByTokens) and lp.impl.at == amx_wins_at == chooser.decisions["l"]["at"]
    assert isinstance(lp.impl.many, BF16AmxLinear) and "from 1024 tokens dense-bf16 (AMX)" in lp.reason
    for ntok, kernel in [(9, lp.impl.few), (amx_wins_at - 1, lp.impl.few), (amx_wins_at, lp.impl.many)]:
        x = rng.standard_normal((ntok, 256)).astype(np.float32)
        assert lp.impl.pick(x) is kernel
        np.testing.assert_allclose(lp.impl(x), kernel(x), rtol=0, atol=0)
        # (inspect's row: the kernel that runs at this many tokens, and the multiply-adds it skips)
        row = layer_rows(SimpleNamespace(layers=[lp]), {}, ntok)[0]
        assert row["kernel"] == kernel.kind and (row["flops_skipped"] > 0) == (kernel is lp.impl.few), (ntok, row)
    monkeypatch.setattr(choose, "race", lambda fns, rounds: pytest.fail("a saved decision was timed again"))
    monkeypatch.setattr(choose.Chooser, "race_layers", lambda *a: pytest.fail("a saved decision was timed again"))
    again = plan_linear(node, choose.Chooser(saved=chooser.decisions, precision="bf16"))
    assert isinstance(again.impl, ByTokens) and again.impl.at == amx_wins_at and again.decided_by == "cached plan"


@needs_bf16
@pytest.mark.parametrize("unit", ["vdpbf16ps", "amx"])
@pytest.mark.parametrize("nan_guard", [False, True])
def test_bf16_attention_is_its_numpy_meaning(nan_guard, unit, monkeypatch):
    """The attention kernel with bfloat16 products against reference_bf16_attention, within
    its bound; odd head sizes and key counts (pairs padded with zeros), queries off the
    vector width, masks per key and per query, a query with every key masked (NaN, or 0
    under the guard, where the float32 kernel gives them). On AMX's tiles (`unit` "amx")
    for the head sizes of whole tile rows (32, 64, 96), with key counts off the 16-key
    tiles and the 32-key steps; the other head sizes run vdpbf16ps there too."""
    from sparsejit.kernels import attention
    from sparsejit.kernels.attention import amx_fits, fused_attention, reference_bf16_attention

    if unit == "amx" and not amx_fits(32):
        pytest.skip("this CPU has no AMX-BF16")
    ran = []  # whether each call's kernel was the AMX one
    kernel = attention._kernel
    monkeypatch.setattr(attention, "_kernel", lambda *a: ran.append(a[4]) or kernel(*a))
    rng = np.random.default_rng(5)
    for b, h, tq, tk, d, per_query in [(1, 1, 1, 1, 1, False), (1, 2, 7, 7, 8, False), (2, 3, 20, 21, 64, True),
                                       (1, 2, 33, 17, 5, True), (2, 1, 130, 129, 63, True), (1, 1, 1, 1, 32, False),
                                       (1, 2, 33, 17, 32, True), (2, 1, 130, 129, 96, True), (1, 3, 16, 48, 64, False)]:
        q = rng.standard_normal((b, h, tq, d)).astype(np.float32)
        kt = rng.standard_normal((b, h, d, tk)).astype(np.float32)
        v = rng.standard_normal((b, h, tk, d)).astype(np.float32)
        mask = np.zeros((b, 1, tq if per_query else 1, tk), np.float32)
        mask[..., -1] = -1e4
        if per_query and tq > 2:
            mask[0, 0, 1, :] = -np.inf  # a query with every key masked
        scale = np.float32(1 / np.sqrt(d))
        got = fused_attention(q, kt, v, mask, scale, scale_op="mul", nan_guard=nan_guard, bf16=True, amx=unit == "amx")
        assert ran.pop() == (unit == "amx" and d % 32 == 0)
        f32 = fused_attention(q, kt, v, mask, scale, scale_op="mul", nan_guard=nan_guard)
        assert np.array_equal(np.isnan(got), np.isnan(f32)) and got.shape == f32.shape
        want, bound = reference_bf16_attention(q, kt, v, mask, scale)
        live = ~np.isnan(f32) & ~np.isnan(want)
        assert np.all(np.abs(got - want)[live] <= bound[live]), (tq, tk, d)
        assert np.abs(got - f32)[live].max() > 0 or tk == 1  # it did round
        if nan_guard and per_query and tq > 2:
            assert not got[0, :, 1].any()  # Σ 0·v, as the guarded graph


@needs_bf16
@pytest.mark.parametrize("unit", ["vdpbf16ps", "amx"])
@pytest.mark.parametrize("nan_guard", [False, True])
def test_bf16_attention_nan_and_inf_scores_as_float32(nan_guard, unit):
    """A NaN query feature (a query's every score NaN), a NaN key feature (one score NaN
    among finite ones, past the first key), an inf key score: NaN where the float32 kernel
    (itself checked against the reference) gives NaN, and under the guard the same Σ 0·v
    for those queries, on AMX's tiles and on vdpbf16ps."""
    from sparsejit.kernels.attention import amx_fits, fused_attention

    if unit == "amx" and not amx_fits(32):
        pytest.skip("this CPU has no AMX-BF16")
    rng = np.random.default_rng(9)
    b, h, tq, tk, d = 2, 2, 37, 45, 64
    q = rng.standard_normal((b, h, tq, d)).astype(np.float32)
    kt = rng.standard_normal((b, h, d, tk)).astype(np.float32)
    v = rng.standard_normal((b, h, tk, d)).astype(np.float32)
    q[0, 0, 3, 2] = np.nan
    kt[0, 1, 5, 20] = np.nan
    kt[1, 0, 7, 9] = np.inf
    v[1, 1, 3, 4] = np.nan
    mask = np.zeros((b, 1, 1, tk), np.float32)
    scale = np.float32(1 / 8)
    got = fused_attention(q, kt, v, mask, scale, scale_op="mul", nan_guard=nan_guard, bf16=True, amx=unit == "amx")
    f32 = fused_attention(q, kt, v, mask, scale, scale_op="mul", nan_guard=nan_guard)
    assert np.isnan(f32[0, 1]).all() != nan_guard  # (the NaN key: every query of that head)
    assert np.array_equal(np.isnan(got), np.isnan(f32))
    dead = np.isnan(fused_attention(q, kt, v, mask, scale, scale_op="mul"))
    if nan_guard:
        assert np.array_equal(got[dead & ~np.isnan(f32)], f32[dead & ~np.isnan(f32)])


@needs_bf16
@pytest.mark.parametrize("chunk", [None, 64])
def test_the_scattered_handover_is_the_rows_of_the_float_output(chunk):
    """BF16ScatteredLinear.quantized_for stores a layer's output as the next layer's
    bfloat16 rows in its epilogue: the same rows bf16_rows makes of the float output,
    bit for bit (the tokens past the last as zeros), and the next layer on them gives
    what it gives on that output; token counts that end in either half of a group of 32."""
    from sparsejit.kernels.bf16 import bf16_rows
    from sparsejit.kernels.layout import transposed

    rng = np.random.default_rng(7)
    first = BF16ScatteredLinear(_weight(rng, 130, 96, 0.1), rng.standard_normal(96).astype(np.float32), "gelu", False,
                                k_chunk=chunk)
    nxt = BF16ScatteredLinear(_weight(rng, 96, 40, 0.1), None, "none", True, k_chunk=chunk)
    assert first.hands_to(nxt) and not nxt.hands_to(first)  # (nxt adds a residual)
    for ntok in (0, 1, 15, 16, 17, 31, 33, 48, 53, 128, 131, 224):
        x = rng.standard_normal((ntok, 130)).astype(np.float32)
        r = rng.standard_normal((ntok, 40)).astype(np.float32)
        y = first(x)
        rows = first.quantized_for(x, nxt)
        want = bf16_rows(transposed(y))
        half = -(-ntok // 32) * 16  # (a row's groups' 16-bit values, as pairs in float32s: past `ntok` at times)
        got_rows, want_rows = (np.lib.stride_tricks.as_strided(a, (a.shape[0], half), a.strides).view(np.uint32)
                               for a in (rows, want))
        assert np.array_equal(got_rows, want_rows), ntok
        assert np.array_equal(nxt.from_quantized(rows, (ntok,), r), nxt(y, r)), ntok


@needs_bf16
@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("m", [96, 41])
def test_the_pairs_handover_is_the_pair_rows_of_the_float_output(chunk, m):
    """BF16SparseLinear.quantized_for stores a layer's output as the next layer's pair
    rows in its epilogue: what packed_pairs makes of the float output, bit for bit (an odd
    output count's last high halves 0), and the next layer on them gives what it gives on
    that output."""
    from sparsejit.kernels.bf16 import packed_pairs
    from sparsejit.kernels.layout import transposed

    rng = np.random.default_rng(m)
    first = BF16SparseLinear(_weight(rng, 128, m, 0.2, 4), rng.standard_normal(m).astype(np.float32), "gelu", False,
                             k_chunk=chunk)
    nxt = BF16SparseLinear(_weight(rng, m, 40, 0.3), None, "none", True, k_chunk=chunk)
    assert first.hands_to(nxt) and not nxt.hands_to(first)  # (nxt adds a residual)
    for ntok in (0, 1, 15, 17, 53, 128, 131):
        x = rng.standard_normal((ntok, 128)).astype(np.float32)
        r = rng.standard_normal((ntok, 40)).astype(np.float32)
        y = first(x)
        xp = first.quantized_for(x, nxt)
        assert np.array_equal(xp.view(np.uint32), packed_pairs(transposed(y)).view(np.uint32)), ntok
        assert np.array_equal(nxt.from_quantized(xp, (ntok,), r), nxt(y, r)), ntok


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("m", [96, 41])
def test_the_amx_pairs_handover_is_the_pair_rows_of_the_float_output(compressed, m):
    """BF16AmxLinear.pairs_on stores a layer's output as the next AMX layer's pair rows in
    its epilogue (amx_ir's `pairs_out`): what packed_pairs makes of the float output, bit
    for bit (an odd output count's last high halves 0; tokens off 16, the second tile of a
    last block past them), with GELU run during the next block's products; given x's own
    pair rows, the same; and the next layer on them (copied into whole K-tiles where its
    inputs are not a multiple of 32) gives what it gives on that output. The same stored
    as TokenTiles (`tiled`), from x or from x's pair rows as TokenTiles."""
    from sparsejit.kernels.bf16 import packed_pairs
    from sparsejit.kernels.layout import TokenTiles, transposed, untiled

    if not has_amx("bf16") or compressed and not can_compress():
        pytest.skip("this CPU has no AMX-BF16 (or no VBMI2 for compressed tiles)")
    rng = np.random.default_rng(m)
    first = BF16AmxLinear(_weight(rng, 128, m, 0.2), rng.standard_normal(m).astype(np.float32), "gelu", False,
                          compressed=compressed)
    nxt = BF16AmxLinear(_weight(rng, m, 40, 0.3), None, "none", True, compressed=compressed)
    for ntok in (0, 1, 15, 17, 53, 128, 131):
        x = rng.standard_normal((ntok, 128)).astype(np.float32)
        r = rng.standard_normal((ntok, 40)).astype(np.float32)
        y = first(x)
        xp = first.pairs_on(x)
        want = packed_pairs(transposed(y)).view(np.uint32)
        assert xp.shape == (ntok, -(-m // 2)) and np.array_equal(xp.view(np.uint32), want.T), ntok
        given = packed_pairs(transposed(x)).view(np.int32).T  # (x's pair rows, as a step hands them over)
        assert np.array_equal(first.pairs_on(None, given).view(np.uint32), want.T), ntok
        assert np.array_equal(nxt.from_quantized(xp.T, (ntok,), r), nxt(y, r)), ntok
        for tiles in (first.pairs_on(x, tiled=True), first.pairs_on(None, first._packed(transposed(x)), tiled=True)):
            assert isinstance(tiles, TokenTiles) and tiles.shape == (-(-ntok // 16), -(-m // 32) * 16, 16)
            assert np.array_equal(untiled(tiles, -(-m // 2)).view(np.uint32), want.T), ntok
            assert not tiles[:, -(-m // 2):].any()  # (the rows to the K-tile's end)
            assert np.array_equal(nxt.from_quantized(tiles, (ntok,), r), nxt(y, r)), ntok


def test_amx_ffn1_hands_its_pair_rows_to_ffn2(monkeypatch):
    """With precision="bf16" on AMX's tiles, each block's FFN1 (GELU fused) stores its
    output as the pair rows FFN2 packs x into (plan.hand_amx_pairs), and FFN2 runs on them:
    the outputs are those without the handover, bit for bit (the test above holds those to
    ONNX Runtime), over padded rows and several shapes, untaped and taped; FFN1's floats,
    where asked for (Model.values), are its float output still."""
    from conftest import assert_handover_runs_as_plain
    from sparsejit.kernels.layout import TokenTiles

    from sparsejit import plan

    if not has_amx("bf16"):
        pytest.skip("this CPU has no AMX-BF16")
    calls, pairs_on = [], BF16AmxLinear.pairs_on
    monkeypatch.setattr(BF16AmxLinear, "pairs_on", lambda *a: calls.append(1) or pairs_on(*a))
    handing = sparsejit.load(DEFAULT, precision="bf16", kernels="dense")
    handed = [s for s in handing._executor.steps if s.node.op_type == "Linear" and len(s.node.outputs) == 2]
    assert handed and all("intermediate" in s.node.name for s in handed), [s.node.name for s in handed]
    monkeypatch.setattr(plan, "AMX_PAIRS", False)
    plain = sparsejit.load(DEFAULT, precision="bf16", kernels="dense")
    assert_handover_runs_as_plain(handing, plain, [(1, 16), (2, 37), (3, 20)], monkeypatch,
                                  handed[0].node.outputs[0], calls)
    made = []  # (the pair rows as TokenTiles)
    monkeypatch.setattr(BF16AmxLinear, "pairs_on", lambda *a: made.append(pairs_on(*a)) or made[-1])
    handing.run(make_inputs(handing.input_names, 1, 45, seed=1))  # (a shape not taped above)
    assert made and all(isinstance(p, TokenTiles) and p.lead == (1, 45) for p in made)


def test_a_layernorm_hands_its_pair_rows_to_the_amx_layers_reading_it(monkeypatch):
    """With precision="bf16" on AMX's tiles, a LayerNorm whose output AMX layers read as x
    (a block's Q/K/V group, its FFN1) also stores the pair rows they pack x into
    (plan.hand_layernorm_pairs), and they run on them: the outputs are those without the
    handover, bit for bit, over padded rows and several shapes, untaped and taped; the
    LayerNorm's floats, which the residual adds read, are its output still."""
    from conftest import assert_handover_runs_as_plain

    from sparsejit import plan

    if not has_amx("bf16"):
        pytest.skip("this CPU has no AMX-BF16")
    calls, to_pairs = [], plan.layernorm_to_pairs
    monkeypatch.setattr(plan, "layernorm_to_pairs", lambda *a: calls.append(1) or to_pairs(*a))
    handing = sparsejit.load(DEFAULT, precision="bf16", kernels="dense")
    steps = handing._executor.steps
    handed = [s for s in steps if s.node.op_type == "LayerNorm" and len(s.node.outputs) == 2]
    takers = [s for s in steps if any(i in (h.node.outputs[1] for h in handed) for i in s.node.inputs)]
    assert handed and {s.node.op_type for s in takers} == {"Linear", "LinearGroup"}, [s.node.name for s in takers]
    monkeypatch.setattr(plan, "LAYERNORM_PAIRS", False)
    plain = sparsejit.load(DEFAULT, precision="bf16", kernels="dense")
    assert not any(s.node.op_type == "LayerNorm" and len(s.node.outputs) == 2 for s in plain._executor.steps)
    assert_handover_runs_as_plain(handing, plain, [(1, 16), (2, 37), (3, 20)], monkeypatch, None, calls)
    feeds, floats = make_inputs(handing.input_names, 2, 37, seed=37), handed[0].node.outputs[0]
    np.testing.assert_array_equal(handing.values(feeds, [floats])[floats], plain.values(feeds, [floats])[floats])
