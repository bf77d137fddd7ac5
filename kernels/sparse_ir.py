"""The sparse Linear kernel as LLVM IR: accumulators held in vector registers.

Numba cannot be made to keep a tile of outputs in registers across a row's nonzeros
(scalar accumulators in generated source did not vectorise; an accumulator array
lives in memory, costing a load and a store per multiply-add). Written as LLVM IR,
one output row's tile of `lanes × vectors` tokens (16 × 8 = 128 with AVX-512) stays in
`vectors` registers while every nonzero adds weight × x-row: one load per fma.

Layout, feature-major as in SparseDNN and XNNPACK: xᵀ [in, tokens] and yᵀ [out, tokens],
token stride 1, row strides `ldx`/`ldy`/`ldr` (in floats). The kernel computes rows
[j0, j1) for all tokens: full tiles, then single vectors, then one masked vector.
Tiles are the outer loop, so a thread's share of xᵀ stays in cache across its rows.

Inside a tile the input features come in `nchunks` K-chunks (the weights are stored
chunk-major, see linear.chunk_rows): every row takes chunk 0's nonzeros, then every row
chunk 1's, and so on, so only one chunk of xᵀ (128 inputs × 128 tokens = 64 KB) is
read at a time and it stays in L1 across the rows instead of streaming from L2 for each
nonzero. Partial sums go through yᵀ between chunks; the epilogue runs on the last.
On BERT-base at 90% this took the 3072→768 layer from 0.73 to 0.52 ms.

Within a chunk the rows come in the order `order` lists them (slot s of chunk c is row
order[c·m + s], with its nonzeros at slot s of the CSR): linear.order_rows sorts each
thread's rows by their count in that chunk, so the loop exits are predictable.

How close this is to the machine (measured on the 2-core AMD EPYC here, clock about
4.15 GHz; 768→3072 at 90%, 128 tokens, one core, about 520 µs):
- Each nonzero is 8 fmas, each with a 64-byte load of xᵀ. A bare LLVM loop of exactly
  that, reading L1, takes 1.07 ns per nonzero (4.4 cycles). It takes 1.35 ns when the
  row it reads comes from a loaded index, as here (the extra load, not the dependent
  address: indices loaded four at a time took it to 1.20 ns, hence the pairs below).
- Fitted over patterns with 1 to 24 nonzeros in every row of every chunk: 1.35 ns per
  nonzero and 6.0 ns per row and K-chunk with chunks of 64 inputs (32 KB of xᵀ, in
  L1); 1.65 ns and 6.1 ns with chunks of 128 (64 KB, more than L1 holds).
- Of those 6 ns, about 4 are yᵀ's partial sums, through L2: without the loads and
  stores (wrong results) 2.6 ns were left. Served from L1 instead (a 16-row ring, wrong
  results) the kernel was 4-10% faster. No help: prefetching yᵀ rows 2, 4 or 8 slots
  ahead; adding the loaded partial sum after the row's fmas, off their chain; two
  accumulator sets, to halve the chains.
- In BERT-base the weights (about 60 MB) stream from DRAM every run. With every layer
  of a shape given the same weights, so that they stayed in L3, a run was 0.4 to 0.9 ms
  faster out of 14 (three comparisons). Software prefetches of the weight stream
  (non-temporal or not) changed nothing.
- Also slower: 64-token tiles at 2 threads (about 10%), and splitting tokens rather
  than rows across the 2 threads (1.9-2.2× slower, best K-chunk of each).

The text is a pure function of `IRConfig`: a table of fragments and one emitter.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ir import Emitter

ARGS = ("ptr noalias %xt, i64 %ldx, ptr noalias %indptr, ptr noalias %indices, ptr noalias %values, "
        "ptr noalias %bias, ptr noalias %yt, i64 %ldy, ptr noalias %rt, i64 %ldr, i64 %m, i64 %nchunks, "
        "ptr noalias %order")
ARG_NAMES = ("ptr %xt, i64 %ldx, ptr %indptr, ptr %indices, ptr %values, ptr %bias, ptr %yt, i64 %ldy, "
             "ptr %rt, i64 %ldr, i64 %m, i64 %nchunks, ptr %order")

# Eigen's and XLA's float32 erf: x·P(x²)/Q(x²) on x clamped to [-4, 4] (see gelu.py).
ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
         -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)


@dataclass(frozen=True)
class IRConfig:
    block: int = 1            # consecutive input weights per stored index (1 or 4)
    activation: str = "none"  # "none" or "gelu"
    residual: bool = False
    lanes: int = 16           # floats per vector register
    vectors: int = 8          # registers per output tile
    index_bits: int = 32      # stored input index width: 16 (unsigned) when the inputs fit, else 32


def _gelu(e: Emitter, v: str) -> str:
    vt = e.vt
    x = e(f"fmul {vt} {v}, {e.const(0.7071067811865476)}")
    x = e(f"call {vt} @llvm.maxnum.v{e.lanes}f32({vt} {x}, {vt} {e.const(-4.0)})")
    x = e(f"call {vt} @llvm.minnum.v{e.lanes}f32({vt} {x}, {vt} {e.const(4.0)})")
    x2 = e(f"fmul {vt} {x}, {x}")
    p = e.fma(x2, e.const(ERF_P[0]), e.const(ERF_P[1]))
    for c in ERF_P[2:]:
        p = e.fma(x2, p, e.const(c))
    p = e(f"fmul {vt} {x}, {p}")
    q = e.fma(x2, e.const(ERF_Q[0]), e.const(ERF_Q[1]))
    for c in ERF_Q[2:]:
        q = e.fma(x2, q, e.const(c))
    erf = e(f"fdiv {vt} {p}, {q}")
    one_plus = e(f"fadd {vt} {erf}, {e.const(1.0)}")
    half_v = e(f"fmul {vt} {v}, {e.const(0.5)}")
    return e(f"fmul {vt} {half_v}, {one_plus}")


def _tile_function(cfg: IRConfig, name: str, vectors: int, masked: bool) -> str:
    """Slot s of K-chunk c, tokens [t, t + lanes·vectors), in registers: the nonzeros of
    output row j = order[c·m + s] in that chunk.

    Chunk 0 starts from the bias; later chunks reload the partial sums from yᵀ. The last
    chunk applies the epilogue. A middle chunk with no nonzeros in row j is skipped."""
    e = Emitter(cfg.lanes)
    vt, L = e.vt, cfg.lanes
    mask_arg = f", <{L} x i1> %mask" if masked else ""
    mask = "%mask" if masked else None
    e.raw(f"define internal void @{name}({ARG_NAMES}, i64 %s, i64 %t, i64 %c{mask_arg}) alwaysinline {{")
    e.raw("entry:")
    at = e.offset("%c", "%m", "%s")
    j_stored = e(f"load i32, ptr {e.gep('%order', at, 'i32')}, align 4")
    e(f"sext i32 {j_stored} to i64", "%j")
    p0 = e(f"load i64, ptr {e.gep('%indptr', at, 'i64')}, align 8")
    at1 = e(f"add i64 {at}, 1")
    p1 = e(f"load i64, ptr {e.gep('%indptr', at1, 'i64')}, align 8")
    empty = e(f"icmp sge i64 {p0}, {p1}")
    last_c = e("add i64 %nchunks, -1")
    last = e(f"icmp eq i64 %c, {last_c}")
    first = e("icmp eq i64 %c, 0")
    ystart = e.offset("%j", "%ldy", "%t")
    yptrs = [e.vptr("%yt", ystart, u) for u in range(vectors)]
    e.raw(f"  br i1 {first}, label %from.bias, label %from.y")
    e.raw("from.bias:")
    bias = e(f"load float, ptr {e.gep('%bias', '%j')}, align 4")
    binit = e.splat(bias)
    e.raw("  br label %start")
    e.raw("from.y:")
    skip = e(f"icmp ugt i1 {empty}, {last}")  # empty and not last
    e.raw(f"  br i1 {skip}, label %skip, label %from.y.load")
    e.raw("skip:")
    e.raw("  ret void")
    e.raw("from.y.load:")
    yinit = [e.vload(ptr, mask) for ptr in yptrs]
    e.raw("  br label %start")
    e.raw("start:")
    init = [e(f"phi {vt} [ {binit}, %from.bias ], [ {yinit[u]}, %from.y.load ]") for u in range(vectors)]
    ity = f"i{cfg.index_bits}"
    group = 2 if cfg.block == 1 else 1  # stored indices per load (a block's index serves 4 weights already)
    gty = f"i{group * cfg.index_bits}"

    def add_nonzero(at: str, k_stored: str, accs: list[str], names: list[str | None]) -> list[str]:
        """accs + the weights stored from slot `at` (one, or a block) × their rows of xᵀ."""
        k = e(f"{'zext' if cfg.index_bits == 16 else 'sext'} {ity} {k_stored} to i64")
        wbase = e(f"mul i64 {at}, {cfg.block}")
        for b in range(cfg.block):
            widx = e(f"add i64 {wbase}, {b}") if b else wbase
            w = e.splat(e(f"load float, ptr {e.gep('%values', widx)}, align 4"))
            kb = e(f"add i64 {k}, {b}") if b else k
            start = e.offset(kb, "%ldx", "%t")
            for u in range(vectors):
                x = e.vload(e.vptr("%xt", start, u), mask)
                # The last block's fma names the value the loop's phi carries back.
                accs[u] = e.fma(w, x, accs[u], names[u] if b == cfg.block - 1 else None)
        return accs

    # Two nonzeros at a time, their indices from one load, then the last one alone. Loads,
    # not fmas, bound this loop (about two a cycle, 64-byte or scalar), and with a load
    # per index they were ten per nonzero. One core, 128 tokens: a bare loop of 4-index
    # groups took 1.20 ns per nonzero against 1.36; in the kernel, pairs gained 2-4%
    # from 80% to 95% sparsity and nothing lost at 97%, where quadruples lost 5%.
    if group > 1:
        count = e(f"sub i64 {p1}, {p0}")
        g_end = e(f"sub i64 {p1}, {e(f'and i64 {count}, {group - 1}')}")
        any_group = e(f"icmp slt i64 {p0}, {g_end}")
        e.raw(f"  br i1 {any_group}, label %group, label %ones")
        e.raw("group:")
        pg = e(f"phi i64 [ {p0}, %start ], [ %pg.next, %group ]")
        gaccs = [e(f"phi {vt} [ {init[u]}, %start ], [ %gacc{u}.next, %group ]") for u in range(vectors)]
        packed = e(f"load {gty}, ptr {e.gep('%indices', pg, ity)}, align {cfg.index_bits // 8}")
        for i in range(group):
            shifted = e(f"lshr {gty} {packed}, {i * cfg.index_bits}") if i else packed
            at = e(f"add i64 {pg}, {i}") if i else pg
            last_one = i == group - 1
            gaccs = add_nonzero(at, e(f"trunc {gty} {shifted} to {ity}"), gaccs,
                                [f"%gacc{u}.next" if last_one else None for u in range(vectors)])
        e.raw(f"  %pg.next = add i64 {pg}, {group}")
        e.raw(f"  br i1 {e(f'icmp slt i64 %pg.next, {g_end}')}, label %group, label %ones")
        e.raw("ones:")
        p_ones = e(f"phi i64 [ {p0}, %start ], [ {g_end}, %group ]")
        init = [e(f"phi {vt} [ {init[u]}, %start ], [ %gacc{u}.next, %group ]") for u in range(vectors)]
        before = "%ones"
        e.raw(f"  br i1 {e(f'icmp slt i64 {p_ones}, {p1}')}, label %loop, label %done")
    else:
        p_ones, before = p0, "%start"
        e.raw(f"  br i1 {empty}, label %done, label %loop")
    e.raw("loop:")
    # Phis first; their back-edge values are filled in once the body has named them.
    p = e(f"phi i64 [ {p_ones}, {before} ], [ %p.next, %loop ]")
    accs = [e(f"phi {vt} [ {init[u]}, {before} ], [ %acc{u}.next, %loop ]") for u in range(vectors)]
    k_stored = e(f"load {ity}, ptr {e.gep('%indices', p, ity)}, align {cfg.index_bits // 8}")
    add_nonzero(p, k_stored, accs, [f"%acc{u}.next" for u in range(vectors)])
    e.raw(f"  %p.next = add i64 {p}, 1")
    more = e(f"icmp slt i64 %p.next, {p1}")
    e.raw(f"  br i1 {more}, label %loop, label %done")
    e.raw("done:")
    finals = [e(f"phi {vt} [ {init[u]}, {before} ], [ %acc{u}.next, %loop ]") for u in range(vectors)]
    e.raw(f"  br i1 {last}, label %epilogue, label %partial")
    e.raw("partial:")
    for v, ptr in zip(finals, yptrs):
        e.vstore(v, ptr, mask)
    e.raw("  ret void")
    e.raw("epilogue:")
    rstart = None
    if cfg.residual:
        rstart = e.offset("%j", "%ldr", "%t")
    for u, (v, ptr) in enumerate(zip(finals, yptrs)):
        if cfg.activation == "gelu":
            v = _gelu(e, v)
        if cfg.residual:
            v = e(f"fadd {vt} {v}, {e.vload(e.vptr('%rt', rstart, u), mask)}")
        e.vstore(v, ptr, mask)
    e.raw("  ret void")
    e.raw("}")
    return "\n".join(e.lines)


# One loop over token tiles of `step` tokens starting where the previous loop stopped;
# in each tile the K-chunks in order, and in each chunk rows [j0, j1). Used for full
# tiles, then single vectors.
_TILE_LOOP = """\
{tag}.check:
  %t.{tag} = phi i64 [ {start}, %{prev} ], [ %t.{tag}.next, %{tag}.chunks.end ]
  %t.{tag}.end = add i64 %t.{tag}, {step}
  %{tag}.ok = icmp sle i64 %t.{tag}.end, %ntok
  br i1 %{tag}.ok, label %{tag}.chunks, label %{after}
{tag}.chunks:
  %c.{tag} = phi i64 [ 0, %{tag}.check ], [ %c.{tag}.next, %{tag}.rows.end ]
  br label %{tag}.rows
{tag}.rows:
  %j.{tag} = phi i64 [ %j0, %{tag}.chunks ], [ %j.{tag}.next, %{tag}.rows ]
  call void @tile_{tag}({names}, i64 %j.{tag}, i64 %t.{tag}, i64 %c.{tag})
  %j.{tag}.next = add i64 %j.{tag}, 1
  %j.{tag}.more = icmp slt i64 %j.{tag}.next, %j1
  br i1 %j.{tag}.more, label %{tag}.rows, label %{tag}.rows.end
{tag}.rows.end:
  %c.{tag}.next = add i64 %c.{tag}, 1
  %c.{tag}.more = icmp slt i64 %c.{tag}.next, %nchunks
  br i1 %c.{tag}.more, label %{tag}.chunks, label %{tag}.chunks.end
{tag}.chunks.end:
  %t.{tag}.next = add i64 %t.{tag}, {step}
  br label %{tag}.check
"""

# The last partial vector, under a lane mask.
_TAIL = """\
tail.check:
  %rem = sub i64 %ntok, %t.one
  %tail.ok = icmp sgt i64 %rem, 0
  br i1 %tail.ok, label %tail.rows.pre, label %exit
tail.rows.pre:
  %rem.splat0 = insertelement <{lanes} x i64> poison, i64 %rem, i32 0
  %rem.splat = shufflevector <{lanes} x i64> %rem.splat0, <{lanes} x i64> poison, <{lanes} x i32> zeroinitializer
  %mask = icmp ult <{lanes} x i64> <{iota}>, %rem.splat
  br label %tail.chunks
tail.chunks:
  %ct = phi i64 [ 0, %tail.rows.pre ], [ %ct.next, %tail.rows.end ]
  br label %tail.rows
tail.rows:
  %jt = phi i64 [ %j0, %tail.chunks ], [ %jt.next, %tail.rows ]
  call void @tile_tail({names}, i64 %jt, i64 %t.one, i64 %ct, <{lanes} x i1> %mask)
  %jt.next = add i64 %jt, 1
  %jt.more = icmp slt i64 %jt.next, %j1
  br i1 %jt.more, label %tail.rows, label %tail.rows.end
tail.rows.end:
  %ct.next = add i64 %ct, 1
  %ct.more = icmp slt i64 %ct.next, %nchunks
  br i1 %ct.more, label %tail.chunks, label %exit
exit:
  ret void
}}
"""


def _driver(cfg: IRConfig, names: str) -> str:
    """@sparse_rows: rows [j0, j1) for all ntok tokens: full tiles, single vectors, the tail."""
    lanes = cfg.lanes
    return "".join([
        # The row loops test at their end: a thread with no rows (fewer rows than threads)
        # must not enter them.
        (f"define void @sparse_rows({ARGS}, i64 %j0, i64 %j1, i64 %ntok) {{\nentry:\n"
         "  %any.rows = icmp slt i64 %j0, %j1\n  br i1 %any.rows, label %full.check, label %exit\n"),
        _TILE_LOOP.format(tag="full", start="0", prev="entry", step=lanes * cfg.vectors, after="one.check",
                          names=names),
        _TILE_LOOP.format(tag="one", start="%t.full", prev="full.check", step=lanes, after="tail.check",
                          names=names),
        _TAIL.format(lanes=lanes, names=names, iota=", ".join(f"i64 {i}" for i in range(lanes))),
    ])


_DECLARES = """\
declare <{L} x float> @llvm.fma.v{L}f32(<{L} x float>, <{L} x float>, <{L} x float>)
declare <{L} x float> @llvm.maxnum.v{L}f32(<{L} x float>, <{L} x float>)
declare <{L} x float> @llvm.minnum.v{L}f32(<{L} x float>, <{L} x float>)
declare <{L} x float> @llvm.masked.load.v{L}f32.p0(ptr, i32, <{L} x i1>, <{L} x float>)
declare void @llvm.masked.store.v{L}f32.p0(<{L} x float>, ptr, i32, <{L} x i1>)
"""


def ir_source(cfg: IRConfig) -> str:
    """The whole module's LLVM IR for one kernel configuration."""
    if cfg.block not in (1, 4) or cfg.activation not in ("none", "gelu") or cfg.index_bits not in (16, 32):
        raise ValueError(f"no sparse kernel for {cfg}")
    names = ARG_NAMES
    header = (f"; sparsejit generated kernel: block={cfg.block} activation={cfg.activation} "
              f"residual={cfg.residual} lanes={cfg.lanes} vectors={cfg.vectors} index_bits={cfg.index_bits}\n"
              f"; yt[j, t] = act(bias[j] + sum over row j's stored (k, w): w * xt[k, t])"
              f"{' + rt[j, t]' if cfg.residual else ''}\n")
    parts = [
        header,
        _DECLARES.format(L=cfg.lanes),
        _tile_function(cfg, "tile_full", cfg.vectors, masked=False),
        _tile_function(cfg, "tile_one", 1, masked=False),
        _tile_function(cfg, "tile_tail", 1, masked=True),
        _driver(cfg, names),
    ]
    return "\n".join(parts)
