"""How far the kernels are from this CPU's limits: the vector product peaks, then the
sparse kernels' rate of vector products against them.

The peaks are measured, not taken from a data sheet: a loop of `chains` independent
vector products (float32 FMA; `vdpbf16ps` and `vpdpbusd` where the CPU has them), once
on registers only and once with each product's x loaded from a 32 KB buffer in L1, as
the sparse kernels load a row of xᵀ for every stored weight. One chain gives the
product's latency; the clock printed assumes the FMA latency is 4 cycles (Zen 3-5,
Intel since Skylake).

Then the kernels' inner loop alone: one stored slot is a row of xᵀ times a broadcast
weight, `vectors` memory-operand FMAs, its row picked at random from 64 rows of 128
tokens (32 KB, L1) or 128 (64 KB, past L1 on every CPU here). The loop is timed with its
loads added one kind at a time (xᵀ only; the weight's broadcast; a 16-bit index per slot),
which shows what bounds it: the load slots, or the FMAs.

The kernels then run on one thread, 128 tokens, feature-major input (as the model hands
it over), their best of `--calls` calls per round over `--rounds` rounds; their rate is
stored slots × vectors of tokens per second, the product instructions they issue. Last,
a kernel's time split into a cost per stored slot and one per row and K-chunk (the
partial sums' loads and stores, the loop exit), fitted over weights with exactly n slots
in every row of every chunk.

Where the CPU has AMX, the tile products too (`tdpbsud`, `tdpbf16ps`: a 16 × 16 tile of
sums per instruction), on tiles only and with the tile loads of the AMX kernel's step
(two weight and two activation tiles per four products), and the AMX dense kernels'
multiply-adds per ns against them; then the int8 kernel's walk over its blocks without
the epilogue, its tiles read where a call finds them (L1 or L2), as a ceiling for it.

    python bench/peaks.py [--out bench/results/peaks_<cpu>.md]

Not part of CI.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numba
import numpy as np
from sparsejit.kernels.compile import compile_ir, host_cpu, vector_lanes

from sparsejit.benchmark import cpu_name

ITERS = 4_000_000
CHAINS = 12  # independent sums: more than latency × products per cycle (4 × 2)
BUFFER_FLOATS = 8192  # 32 KB: in L1 on every x86-64 CPU this project runs on

# op: (accumulator type, operand type, intrinsic call or None for fma); AVX-512 only for the low-precision ones
OPS = {
    "fp32 fma": ("float", "float", None),
    "bf16 vdpbf16ps": ("float", "bfloat", "llvm.x86.avx512bf16.dpbf16ps.512"),
    "int8 vpdpbusd": ("i32", "i32", "llvm.x86.avx512.vpdpbusd.512"),
}


def _op_ir(op: str, lanes: int, chains: int, load: bool) -> str:
    """`f(x, n)`: n iterations of `chains` independent products acc = acc + x·w (w one
    vector for all; x a register, or loaded from x[(i mod 32)·256 + 16c])."""
    acc_t, arg_t, intrinsic = OPS[op]
    vt = f"<{lanes} x {acc_t}>"
    ft = f"<{lanes} x float>"
    at = f"<{2 * lanes} x bfloat>" if arg_t == "bfloat" else vt
    body = ["entry:", f"  %w = load {ft}, ptr %x, align 64", "  br label %loop", "loop:",
            "  %i = phi i64 [0, %entry], [%i1, %loop]"]
    body += [f"  %a{c} = phi {vt} [zeroinitializer, %entry], [%b{c}, %loop]" for c in range(chains)]
    body += ["  %slot = and i64 %i, 31", "  %row = mul i64 %slot, 256"]
    for c in range(chains):
        if load:
            body += [f"  %o{c} = add i64 %row, {c * lanes}", f"  %p{c} = getelementptr float, ptr %x, i64 %o{c}",
                     f"  %v{c} = load {ft}, ptr %p{c}, align 64"]
        x = f"%v{c}" if load else "%w"
        if intrinsic is None:
            body.append(f"  %b{c} = call {ft} @llvm.fma.v{lanes}f32({ft} {x}, {ft} %w, {ft} %a{c})")
        else:
            body += [f"  %xc{c} = bitcast {ft} {x} to {at}", f"  %wc{c} = bitcast {ft} %w to {at}",
                     f"  %b{c} = call {vt} @{intrinsic}({vt} %a{c}, {at} %xc{c}, {at} %wc{c})"]
    body += _loop_end(chains, "fadd" if acc_t == "float" else "add", vt, ft)
    decl = (f"declare {ft} @llvm.fma.v{lanes}f32({ft}, {ft}, {ft})" if intrinsic is None
            else f"declare {vt} @{intrinsic}({vt}, {at}, {at})")
    return "\n".join(["define void @f(ptr %x, i64 %n) {"] + body + [decl, ""])


def _loop_end(sums: int, add: str, vt: str, ft: str) -> list[str]:
    """The loop's latch, then its `sums` sums %b0.. added up and stored into x[0:lanes]
    (so that the loop's work is used), and the function's end."""
    lines = ["  %i1 = add i64 %i, 1", "  %more = icmp ult i64 %i1, %n", "  br i1 %more, label %loop, label %done",
             "done:"]
    total = "%b0"
    for c in range(1, sums):
        lines.append(f"  %s{c} = {add} {vt} {total}, %b{c}")
        total = f"%s{c}"
    return lines + [f"  %r = bitcast {vt} {total} to {ft}", f"  store {ft} %r, ptr %x, align 64", "  ret void", "}"]


def product_loop(op: str, lanes: int, chains: int, load: bool):
    """The compiled loop and the buffer it reads (on 64-byte lines)."""
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(compile_ir(_op_ir(op, lanes, chains, load), "f"))
    buf = np.empty(BUFFER_FLOATS + 64, np.float32)
    return fn, buf[-buf.ctypes.data % 64 // 4:][:BUFFER_FLOATS]


def _timed(fn, x) -> float:
    x[:] = 1e-3  # (the loop stores its sum into x[0:lanes])
    t = time.perf_counter()
    fn(x.ctypes.data, ITERS)
    return time.perf_counter() - t


def peaks(lanes: int, rounds: int) -> tuple[dict, float]:
    """{op: (registers only, with a load from L1)} in products per ns, and the clock in
    GHz: each loop's best of `rounds` rounds, the loops taking turns in every round."""
    features = host_cpu()[1]
    ops = ["fp32 fma"]
    if lanes == 16:
        ops += ["bf16 vdpbf16ps"] * ("+avx512bf16" in features) + ["int8 vpdpbusd"] * ("+avx512vnni" in features)
    loops = {("latency", False): product_loop("fp32 fma", lanes, 1, False)}
    loops.update({(op, load): product_loop(op, lanes, CHAINS, load) for op in ops for load in (False, True)})
    best = dict.fromkeys(loops, np.inf)
    for _ in range(rounds):
        for key, (fn, x) in loops.items():
            best[key] = min(best[key], _timed(fn, x))
    rate = {key: ITERS * (1 if key[0] == "latency" else CHAINS) / t / 1e9 for key, t in best.items()}
    return {op: (rate[op, False], rate[op, True]) for op in ops}, 4 * rate["latency", False]


SLOT_LOOPS = {  # name: (index load, weight broadcast load, rows of xᵀ)
    "xᵀ rows only, in L1": (False, False, 64),
    "+ the weight's broadcast": (False, True, 64),
    "+ a 16-bit index (the kernel's loop)": (True, True, 64),
    "the kernel's loop, xᵀ 64 KB (past L1)": (True, True, 128),
}
SLOT_TOKENS = 128


def _slot_ir(lanes: int, vectors: int, index: bool, weight: bool, rows: int) -> str:
    """`f(x, idx, w, n)`: n stored slots, each `vectors` FMAs of a broadcast weight with
    one row of xᵀ (row stride 128 floats); the row is idx[i mod 4096] (a 16-bit load) or,
    without `index`, i mod rows; the weight w[i mod 4096] (a load) or a constant."""
    ft = f"<{lanes} x float>"
    b = ["define void @f(ptr %x, ptr %idx, ptr %w, i64 %n) {", "entry:", "  br label %loop", "loop:",
         "  %i = phi i64 [0, %entry], [%i1, %loop]"]
    b += [f"  %a{u} = phi {ft} [zeroinitializer, %entry], [%b{u}, %loop]" for u in range(vectors)]
    b += ["  %s = and i64 %i, 4095"]
    if index:
        b += ["  %ip = getelementptr i16, ptr %idx, i64 %s", "  %k16 = load i16, ptr %ip, align 2",
              "  %k = zext i16 %k16 to i64"]
    else:
        b += [f"  %k = and i64 %i, {rows - 1}"]
    b += [f"  %row = mul i64 %k, {SLOT_TOKENS}"]
    if weight:
        b += ["  %wp = getelementptr float, ptr %w, i64 %s", "  %ws = load float, ptr %wp, align 4"]
    else:
        b += ["  %ws = bitcast i32 981668463 to float"]  # 0.001
    b += [f"  %wi = insertelement {ft} poison, float %ws, i64 0",
          f"  %wv = shufflevector {ft} %wi, {ft} poison, <{lanes} x i32> zeroinitializer"]
    for u in range(vectors):
        b += [f"  %o{u} = add i64 %row, {lanes * u}", f"  %p{u} = getelementptr float, ptr %x, i64 %o{u}",
              f"  %v{u} = load {ft}, ptr %p{u}, align 64",
              f"  %b{u} = call {ft} @llvm.fma.v{lanes}f32({ft} %wv, {ft} %v{u}, {ft} %a{u})"]
    b += _loop_end(vectors, "fadd", ft, ft) + [f"declare {ft} @llvm.fma.v{lanes}f32({ft}, {ft}, {ft})", ""]
    return "\n".join(b)


def slot_loops(lanes: int, rounds: int) -> list[tuple[str, int, float]]:
    """[(loop, loads per slot, ns per slot)]: each loop's best of `rounds` rounds, taking turns."""
    from sparsejit.kernels.linear import SPARSE_VECTORS

    vectors = SPARSE_VECTORS[lanes]
    sig = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    rng = np.random.default_rng(0)
    w = np.full(4096, 1e-3, np.float32)
    loops = []
    for name, (index, weight, rows) in SLOT_LOOPS.items():
        fn = sig(compile_ir(_slot_ir(lanes, vectors, index, weight, rows), "f"))
        buf = np.empty(rows * SLOT_TOKENS + 64, np.float32)
        x = buf[-buf.ctypes.data % 64 // 4:][:rows * SLOT_TOKENS]
        loads = vectors + weight + index
        loops.append((name, fn, x, rng.integers(0, rows, 4096).astype(np.uint16), loads))
    best = [np.inf] * len(loops)
    n = ITERS // 2
    for _ in range(rounds):
        for i, (_, fn, x, idx, _) in enumerate(loops):
            x[:] = 1e-3
            t = time.perf_counter()
            fn(x.ctypes.data, idx.ctypes.data, w.ctypes.data, n)
            best[i] = min(best[i], time.perf_counter() - t)
    return [(name, loads, t / n * 1e9) for (name, *_, loads), t in zip(loops, best)]


def _exact_weight(rng, k: int, m: int, n: int, block: int, chunk: int) -> np.ndarray:
    """[k, m] with exactly n stored slots (of `block` inputs) per output in every K-chunk."""
    per_chunk = chunk // block
    w = np.zeros((k, m), np.float32)
    for c in range(k // chunk):
        pick = np.argsort(rng.random((m, per_chunk)), axis=1)[:, :n]
        for b in range(block):
            w[c * chunk + pick.T * block + b, np.arange(m)] = rng.uniform(1.0, 3.0, (n, m))  # (whole numbers as int8: 1 or 2)
    return w


def slot_and_row_costs(lanes: int, rounds: int) -> list[tuple[str, float, float, float]]:
    """[(kernel, ns per stored slot, ns per row and K-chunk, µs per call)], one thread, 128
    tokens: time = a·slots + b·(rows × chunks) + c, least squares over weights with 4, 8,
    16 and 24 slots per row and chunk and 1536 or 3072 outputs (768 inputs)."""
    from sparsejit.kernels.layout import feature_major_empty
    from sparsejit.kernels.linear import SparseLinear

    rng = np.random.default_rng(1)
    k, tokens = 768, 128
    xt = feature_major_empty(k, tokens)
    xt[:] = rng.standard_normal((k, tokens))
    kinds = [("fp32 sparse, K-chunks of 128", 1, 128), ("fp32 sparse, K-chunks of 64", 1, 64)]
    if lanes == 16 and "+avx512vnni" in host_cpu()[1]:
        kinds.append(("int8 sparse VNNI 4-blocks, K-chunks of 256, x given quantized", 4, 256))
    numba.set_num_threads(1)
    out = []
    for name, block, chunk in kinds:
        cases = []
        for m in (1536, 3072):
            for n in (4, 8, 16, 24):
                w = _exact_weight(rng, k, m, n, block, chunk)
                if block == 1:
                    layer = SparseLinear(w, None, "none", False, k_chunk=chunk)
                    call = (lambda layer=layer: layer(xt.T))
                else:
                    from sparsejit.kernels.int8 import Int8Chunked
                    grid = {"x_scale": np.float32(0.03), "x_zero_point": np.uint8(128)}
                    layer = Int8Chunked(w.astype(np.int8), np.ones(m, np.float32), "static", k_chunk=chunk, **grid)
                    xq = Int8Chunked(np.eye(k, dtype=np.int8), np.ones(k, np.float32), "static",
                                     **grid).quantized_for(xt.T, layer)
                    call = (lambda layer=layer, xq=xq: layer.from_quantized(xq, (tokens,)))
                cases.append((n * m * (k // chunk), m * (k // chunk), call))
        best = [np.inf] * len(cases)
        for _ in range(rounds):
            for i, (*_, call) in enumerate(cases):
                for _ in range(4):
                    t = time.perf_counter()
                    call()
                    best[i] = min(best[i], time.perf_counter() - t)
        a = np.array([[s, r, 1.0] for s, r, _ in cases])
        per_slot, per_row, per_call = np.linalg.lstsq(a, np.array(best), rcond=None)[0]
        out.append((name, per_slot * 1e9, per_row * 1e9, per_call * 1e6))
    return out


def _weight(rng, k: int, m: int, sparsity: float, block: int) -> np.ndarray:
    keep = rng.random((k // block, m)) >= sparsity
    return (rng.standard_normal((k, m)) * np.repeat(keep, block, axis=0)).astype(np.float32)


def _best_calls(cases: list, rng, k: int, tokens: int, rounds: int, calls: int) -> dict:
    """{name: seconds} the best call of each (name, layer) on one thread over `tokens`
    random inputs, `calls` calls per round, the layers taking turns for `rounds` rounds."""
    from sparsejit.kernels.layout import feature_major_empty

    xt = feature_major_empty(k, tokens)  # feature-major and on 64-byte lines, as the model hands x over
    xt[:] = rng.standard_normal((k, tokens))
    best = {name: np.inf for name, _ in cases}
    numba.set_num_threads(1)
    for _ in range(rounds):
        for name, layer in cases:
            for _ in range(calls):
                t = time.perf_counter()
                layer(xt.T)
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def kernels(lanes: int, rounds: int, calls: int) -> list[tuple[str, float]]:
    """[(kernel on a weight, vector products per ns)] on one thread, 128 tokens."""
    from sparsejit.kernels.linear import SparseLinear

    rng = np.random.default_rng(0)
    k, m, tokens = 768, 3072, 128
    cases = []
    for name, sparsity, block in [("90% unstructured", 0.9, 1), ("80% in 4-blocks", 0.8, 4)]:
        w = _weight(rng, k, m, sparsity, block)
        cases.append((f"fp32 sparse, {name}", SparseLinear(w, None, "none", False, k_chunk=128)))
        if lanes == 16 and "+avx512bf16" in host_cpu()[1]:
            from sparsejit.kernels.bf16 import BF16ScatteredLinear, BF16SparseLinear
            if block == 4:
                cases.append((f"bf16 sparse, {name}", BF16SparseLinear(w, None, "none", False, k_chunk=128)))
            else:  # (as the model runs it: pairs of any two inputs of a row)
                cases.append((f"bf16 sparse, scattered pairs, {name}",
                              BF16ScatteredLinear(w, None, "none", False, k_chunk=128)))
        if lanes == 16 and "+avx512vnni" in host_cpu()[1]:
            from sparsejit.kernels.int8 import Int8Chunked
            scale = np.abs(w).max(axis=0) / 127 + 1e-6
            wq = np.round(w / scale).astype(np.int8)
            cases.append((f"int8 sparse VNNI, {name}", Int8Chunked(wq, scale, "dynamic")))
            from sparsejit.kernels.int8 import Int8Lanes, has_lanes
            if has_lanes() and block == 1:
                cases.append((f"int8 sparse VNNI, outputs in the lanes, {name}", Int8Lanes(wq, scale, "dynamic")))
    best = _best_calls(cases, rng, k, tokens, rounds, calls)
    vectors = -(-tokens // lanes)

    def products(layer) -> int:  # vector products per call: per stored slot and vector of tokens (lanes: and token)
        if hasattr(layer, "idx"):
            return len(layer.idx) * tokens
        return int(layer.indptr[-1]) * (layer.pattern.block if layer.kind == 'sparse' else 1) * vectors

    return [(name, products(layer) / best[name] / 1e9, best[name]) for name, layer in cases]


# AMX: (intrinsic, multiply-adds per tile product: 16 x 16 sums of 64 int8 or 32 bf16 products)
TILE_OPS = {"int8 tdpbsud": ("llvm.x86.tdpbsud", 16 * 16 * 64), "bf16 tdpbf16ps": ("llvm.x86.tdpbf16ps", 16 * 16 * 32)}
TILE_ITERS = 200_000


def _tile_ir(intrinsic: str, loads: bool) -> str:
    """`f(buf, n)`: n iterations of the AMX kernel's step, 4 independent tile products
    (C tiles 0-3 += A tiles 4-5 · B tiles 6-7); with `loads`, the step's 4 tile loads from
    a 4 KB buffer (in L1) first, as the kernel loads two weight and two activation tiles."""
    from sparsejit.kernels.amx_ir import tile_config

    step = [f"  call void @llvm.x86.tileloadd64(i8 {t}, ptr %buf, i64 64)" for t in (4, 5, 6, 7)] if loads else []
    step += [f"  call void @{intrinsic}(i8 {c}, i8 {4 + c // 2}, i8 {6 + c % 2})" for c in range(4)]
    setup = [f"  call void @llvm.x86.tilezero(i8 {t})" for t in range(4)]
    setup += [f"  call void @llvm.x86.tileloadd64(i8 {t}, ptr %buf, i64 64)" for t in (4, 5, 6, 7)]
    return "\n".join([
        "declare void @llvm.x86.ldtilecfg(ptr)", "declare void @llvm.x86.tilerelease()",
        "declare void @llvm.x86.tileloadd64(i8, ptr, i64)", "declare void @llvm.x86.tilezero(i8)",
        f"declare void @{intrinsic}(i8, i8, i8)",
        f'@cfg = private unnamed_addr constant [64 x i8] c"{tile_config()}", align 64',
        "define void @f(ptr %buf, i64 %n) {", "entry:", "  call void @llvm.x86.ldtilecfg(ptr @cfg)", *setup,
        "  br label %loop", "loop:", "  %i = phi i64 [0, %entry], [%i1, %loop]", *step, "  %i1 = add i64 %i, 1",
        "  %c = icmp slt i64 %i1, %n", "  br i1 %c, label %loop, label %done", "done:",
        "  call void @llvm.x86.tilerelease()", "  ret void", "}"])


def tile_peaks(rounds: int) -> dict:
    """{AMX product: (registers only, with the kernel's tile loads)} in multiply-adds per
    ns, one thread, each loop's best of `rounds` rounds; {} without AMX."""
    from sparsejit.kernels.amx import has_amx

    ops = [op for op in TILE_OPS if has_amx(op.split()[0])]
    buf = np.zeros(8192, np.uint8)
    at = buf[-buf.ctypes.data % 64:][:4096]
    loops = {(op, loads): ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(
        compile_ir(_tile_ir(TILE_OPS[op][0], loads), "f")) for op in ops for loads in (False, True)}
    best = dict.fromkeys(loops, np.inf)
    for _ in range(rounds):
        for key, fn in loops.items():
            t = time.perf_counter()
            fn(at.ctypes.data, TILE_ITERS)
            best[key] = min(best[key], time.perf_counter() - t)
    return {op: tuple(4 * TILE_ITERS * TILE_OPS[op][1] / best[op, loads] / 1e9 for loads in (False, True))
            for op in ops}


def _tile_walk_ir(intrinsic: str) -> str:
    """`f(a, b, ldb, ktiles, n, blocks, pairs)`: the AMX kernel's walk without its epilogue,
    n blocks of 32 features × 32 tokens: block i is token block i % blocks of pair
    (i / blocks) % pairs, `ktiles` K-steps of two weight tiles (the pair's, 2 KB a step,
    contiguous as the kernel packs them) and two activation tiles (16 rows of 64 bytes,
    row stride ldb, as xq's rows), four products, then the four sums stored."""
    from sparsejit.kernels.amx_ir import tile_config

    loads = ["  call void @llvm.x86.tileloadd64(i8 4, ptr %ap, i64 64)",
             "  call void @llvm.x86.tileloadd64(i8 5, ptr %ap2, i64 64)",
             "  call void @llvm.x86.tileloadd64(i8 6, ptr %bp, i64 %ldb)",
             "  call void @llvm.x86.tileloadd64(i8 7, ptr %bp2, i64 %ldb)"]
    return "\n".join([
        "declare void @llvm.x86.ldtilecfg(ptr)", "declare void @llvm.x86.tilerelease()",
        "declare void @llvm.x86.tileloadd64(i8, ptr, i64)", "declare void @llvm.x86.tilezero(i8)",
        "declare void @llvm.x86.tilestored64(i8, ptr, i64)", f"declare void @{intrinsic}(i8, i8, i8)",
        f'@cfg = private unnamed_addr constant [64 x i8] c"{tile_config()}", align 64',
        "define void @f(ptr %a, ptr %b, i64 %ldb, i64 %kt, i64 %n, i64 %blocks, i64 %pairs, ptr %c) {", "entry:",
        "  call void @llvm.x86.ldtilecfg(ptr @cfg)", "  br label %block", "block:",
        "  %i = phi i64 [0, %entry], [%i1, %stored]", "  %tb = urem i64 %i, %blocks", "  %pq = udiv i64 %i, %blocks",
        "  %p = urem i64 %pq, %pairs", "  %pk = mul i64 %p, %kt", "  %pa = mul i64 %pk, 2048",
        "  %abase = getelementptr i8, ptr %a, i64 %pa", "  %bo = mul i64 %tb, 128",
        "  %bbase = getelementptr i8, ptr %b, i64 %bo",
        *[f"  call void @llvm.x86.tilezero(i8 {t})" for t in range(4)], "  br label %step", "step:",
        "  %k = phi i64 [0, %block], [%k1, %step]", "  %ao = mul i64 %k, 2048",
        "  %ap = getelementptr i8, ptr %abase, i64 %ao", "  %ap2 = getelementptr i8, ptr %ap, i64 1024",
        "  %br = mul i64 %k, 16", "  %bro = mul i64 %br, %ldb", "  %bp = getelementptr i8, ptr %bbase, i64 %bro",
        "  %bp2 = getelementptr i8, ptr %bp, i64 64", *loads,
        *[f"  call void @{intrinsic}(i8 {c}, i8 {4 + c // 2}, i8 {6 + c % 2})" for c in range(4)],
        "  %k1 = add i64 %k, 1", "  %more = icmp slt i64 %k1, %kt", "  br i1 %more, label %step, label %stored",
        "stored:", *[f"  call void @llvm.x86.tilestored64(i8 {t}, ptr %c, i64 64)" for t in range(4)],
        "  %i1 = add i64 %i, 1", "  %go = icmp slt i64 %i1, %n", "  br i1 %go, label %block, label %done", "done:",
        "  call void @llvm.x86.tilerelease()", "  ret void", "}"])


# The walks timed (tile_walks): (label, K-steps a block, tokens of a token tile, pairs of panels)
TILE_WALKS = [("768 inputs, 128 tokens (batch 1)", 12, 128, 48), ("768 inputs, 512 tokens (a batch 8 step)", 12, 512, 48),
              ("3072 inputs, 128 tokens", 48, 128, 12), ("3072 inputs, 256 tokens (a batch 8 step)", 48, 256, 12)]


def tile_walks(rounds: int) -> list[tuple[str, float]]:
    """[(walk, ns per K-step)]: the int8 kernel's block walk (_tile_walk_ir) on one thread,
    each pair's weight tiles read across its token blocks and the token tile's rows of xq
    across the pairs, where a call finds them; [] without AMX-INT8."""
    from sparsejit.kernels.amx import has_amx
    from sparsejit.kernels.layout import aligned_empty

    if not has_amx("int8"):
        return []
    fn = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 2, *[ctypes.c_int64] * 5, ctypes.c_void_p)(
        compile_ir(_tile_walk_ir(TILE_OPS["int8 tdpbsud"][0]), "f"))
    out = []
    for label, kt, tokens, pairs in TILE_WALKS:
        a = aligned_empty((pairs * kt * 2048,), np.uint8)
        b = aligned_empty((kt * 16 * tokens * 4,), np.uint8)
        a[:], b[:] = 1, 1
        c = aligned_empty((4096,), np.uint8)
        blocks = tokens // 32
        n = blocks * pairs * max(1, 200_000 // (blocks * pairs * kt))
        best = np.inf
        for r in range(rounds + 1):  # (the first untimed: the first tile products after a pause are slower)
            t = time.perf_counter()
            fn(a.ctypes.data, b.ctypes.data, tokens * 4, kt, n, blocks, pairs, c.ctypes.data)
            if r == 0:
                continue
            best = min(best, time.perf_counter() - t)
        out.append((label, best * 1e9 / (n * kt)))
    return out


def tile_kernels(rounds: int, calls: int) -> list[tuple[str, float, float]]:
    """[(AMX kernel, multiply-adds per ns, seconds per call)] on 768→3072, 128 tokens, one
    thread, the best of `calls` calls per round; x quantized or packed in the time."""
    from sparsejit.kernels.amx import BF16AmxLinear, Int8Amx, has_amx

    rng = np.random.default_rng(0)
    k, m, tokens = 768, 3072, 128
    cases = []
    if has_amx("int8"):
        cases.append(("int8 AMX dense", Int8Amx(rng.integers(-127, 128, (k, m)).astype(np.int8), 0.01, "dynamic")))
    if has_amx("bf16"):
        cases.append(("bf16 AMX dense", BF16AmxLinear(_weight(rng, k, m, 0.0, 1), None, "none", False)))
    best = _best_calls(cases, rng, k, tokens, rounds, calls)
    return [(name, k * m * tokens / best[name] / 1e9, best[name]) for name, _ in cases]


def tile_lines(rounds: int, calls: int, clock: float, vector_peaks: dict) -> list[str]:
    """The AMX tables' markdown: the tile products' peaks beside the vector ones', and the
    AMX kernels' rate against them."""
    table = tile_peaks(rounds)
    if not table:
        return ["", "No AMX on this CPU (or Linux did not grant its tile data): no tile products measured."]
    lines = ["", "AMX tile products, one thread, multiply-adds per ns (below them the vector products', 16 lanes of",
             "4, 2 or 1 products each, for comparison):", "",
             "| product | registers only, per ns | per cycle | with the kernel's tile loads from L1, per ns | per cycle |",
             "|---|---|---|---|---|"]
    for op, (reg, mem) in table.items():
        lines.append(f"| {op} | {reg:.0f} | {reg / clock:.0f} | {mem:.0f} | {mem / clock:.0f} |")
    for op, per in (("int8 vpdpbusd", 64), ("bf16 vdpbf16ps", 32), ("fp32 fma", 16)):
        if op in vector_peaks:
            reg, mem = vector_peaks[op]
            lines.append(f"| {op} | {reg * per:.0f} | {reg * per / clock:.0f} | {mem * per:.0f} | {mem * per / clock:.0f} |")
    lines += ["", "The AMX kernels on 768→3072 (dense), 128 tokens, one thread (x quantized or packed in the time):", "",
              "| kernel | µs per call | multiply-adds per ns | of the tile peak with loads |", "|---|---|---|---|"]
    for name, rate, seconds in tile_kernels(rounds, calls):
        peak = table[next(op for op in table if op.split()[0] == name.split()[0])][1]
        lines.append(f"| {name} | {seconds * 1e6:.0f} | {rate:.0f} | {rate / peak:.0%} |")
    walks = tile_walks(rounds)
    if walks:
        step = 4 * TILE_OPS["int8 tdpbsud"][1] / table["int8 tdpbsud"][1]  # (ns a step at the peak with loads)
        lines += ["", "The int8 kernel's walk without its epilogue, one thread: blocks of 32 features × 32 tokens, each",
                  "pair's weight tiles read by its token blocks, the token tile's rows of x by every pair, a K-step two",
                  f"weight and two activation tiles and four products ({step:.1f} ns at the peak with loads from L1):", "",
                  "| walk | ns per K-step | cycles | of the peak with loads |", "|---|---|---|---|"]
        for label, ns in walks:
            lines.append(f"| {label} | {ns:.1f} | {ns * clock:.0f} | {step / ns:.0%} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the tables to this markdown file too")
    args = ap.parse_args()
    lanes = vector_lanes()
    from sparsejit.kernels.linear import SPARSE_VECTORS

    vectors = SPARSE_VECTORS[lanes]
    table, clock = peaks(lanes, 3 * args.rounds)
    lines = [f"# Vector product peaks and the sparse kernels' rate, one thread ({cpu_name()}, {lanes}-lane vectors)",
             "",
             f"Clock from the FMA latency chain (4 cycles assumed): {clock:.2f} GHz.", "",
             "| product | registers only, per ns | per cycle | with x loaded from L1, per ns | per cycle |",
             "|---|---|---|---|---|"]
    for op, (reg, mem) in table.items():
        lines.append(f"| {op} | {reg:.2f} | {reg / clock:.2f} | {mem:.2f} | {mem / clock:.2f} |")
    lines += ["", f"768→3072, {128} tokens, one thread; rate = stored slots × vectors of tokens per second;",
              "the fraction is of the same product's peak with x loaded from L1. The bf16 time includes packing x",
              "into pairs (scattered pairs: rounding x to bfloat16 rows), the int8 time quantizing x (its range, then",
              "uint8 in 4-blocks), as in a model. The kernel with the outputs in the lanes issues a `vpermi2b` beside",
              "each `vpdpbusd` counted; the scattered pairs kernel a `vpunpck[lh]wd` beside each `vdpbf16ps`.", "",
              "| kernel, weight | µs per call | products per ns | of the peak with loads |", "|---|---|---|---|"]
    for name, rate, seconds in kernels(lanes, args.rounds, args.calls):
        peak = table[next(op for op in table if op.split()[0] == name.split()[0])][1]
        lines.append(f"| {name} | {seconds * 1e6:.0f} | {rate:.2f} | {rate / peak:.0%} |")
    lines += ["", f"The stored-slot loop alone (one row of xᵀ × a broadcast weight: {vectors} memory-operand FMAs), one",
              "thread; loads per cycle at the clock above:", "",
              "| loop | loads per slot | ns per slot | cycles per slot | loads per cycle |", "|---|---|---|---|---|"]
    for name, loads, ns in slot_loops(lanes, 3 * args.rounds):
        lines.append(f"| {name} | {loads} | {ns:.2f} | {ns * clock:.2f} | {loads / (ns * clock):.2f} |")
    lines += ["", "The kernels' time per stored slot and per row and K-chunk, one thread, 128 tokens (fitted, see above):",
              "", "| kernel | ns per slot | cycles | ns per row and chunk | cycles | µs per call |", "|---|---|---|---|---|---|"]
    for name, slot, row, call in slot_and_row_costs(lanes, args.rounds):
        lines.append(f"| {name} | {slot:.2f} | {slot * clock:.1f} | {row:.1f} | {row * clock:.0f} | {call:.0f} |")
    lines += tile_lines(3 * args.rounds, args.calls, clock, table)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
