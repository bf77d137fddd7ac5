"""Planning: a step (what runs) for every node of the lowered graph, from a table.

`STEPS` maps a node kind to the function that plans it; any other node runs its numpy
reference op from the registry (`ops.bind`). Linear layers get their kernel from a
`Chooser` (choose.py): sparse or dense, by rule, saved plan or measurement.

Planning does not change the graph it is given: a Linear step's node is a new node
that holds no dense weight (the kernel holds its own copy, compressed), and the
weights' owner is told when a weight is done with (`Planning.done_with`, which lets the
loader give file-mapped pages back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .choose import AMX_CLEARLY, DENSE_ABOVE, MANY_TOKENS, PROBE_TOKENS, SPARSE_KINDS, Chooser
from .graph import Graph, Node
from .kernels import elementwise, rows
from .kernels.amx import BF16AmxLinear, Int8Amx, has_amx
from .kernels.attention import PreparedMask, float_steps, fused_attention, fused_attention_bytes, mask_steps
from .kernels.bf16 import BF16DenseLinear, BF16ScatteredLinear, BF16SparseLinear, packed_pairs, reference_bf16_linear
from .kernels.embed import EmbedLayerNorm
from .kernels.int8 import (
    DOT_NAMES,
    Int8Chunked,
    Int8Dense,
    Int8Lanes,
    Int8Linear,
    Int8OnFloat,
    byte_rows,
    exact_on_float,
    has_lanes,
    host_dots,
    lane_slot_count,
    quantize_x,
)
from .kernels.layernorm import Grid, layernorm, layernorm_to_bytes, layernorm_to_pairs
from .kernels.layout import TokenTiles, transposed, untiled
from .kernels.linear import (
    ByTokens,
    DenseLinear,
    OutputSlice,
    Pattern,
    SparseLinear,
    analyse,
    linear_epilogue,
    reference_linear,
)
from .ops import bind, integer_product_with, integer_weight

log = logging.getLogger("sparsejit")


@dataclass
class LayerPlan:
    """One Linear layer: what was learned about its weight and the kernel chosen."""

    name: str
    node: Node
    pattern: Pattern
    impl: SparseLinear | DenseLinear | OutputSlice | Int8Linear | Int8Chunked | Int8Dense | Int8OnFloat | Int8Amx \
        | ByTokens
    reason: str
    timings_ms: dict = field(default_factory=dict)
    timing_reused: bool = False  # measured on an earlier layer of the same kind
    decided_by: str = "rule"     # one of choose.DECIDERS
    probe: np.ndarray | None = None  # weight_probe of the weight as loaded

    @property
    def kind(self) -> str:
        return self.impl.kind

    @property
    def pattern_shape(self) -> tuple[int, int]:
        return self.pattern.in_features, self.pattern.out_features

    @property
    def weight(self) -> np.ndarray:
        """The dense weight [in, out], rebuilt from what the kernel holds."""
        return self.impl.dense_weight()

    @property
    def int8(self) -> bool:
        return self.kind == "int8"

    @property
    def bf16(self) -> bool:
        return self.kind.endswith("-bf16")

    @property
    def sparse(self) -> bool:
        """A float sparse kernel (float32 or bfloat16) that skips the weight's zeros."""
        return self.kind in ("sparse", "sparse-bf16")

    @property
    def skipped(self) -> float:
        """The fraction of a dense product's multiply-adds the kernel does not do: the zeros
        the sparse kernel skips; for int8, what its kernel says."""
        if self.int8:
            impl = getattr(self.impl, "group", self.impl)
            return impl.skipped(self.impl.start, self.impl.stop) if impl is not self.impl else impl.skipped()
        return 1 - self.pattern.density if self.sparse else 0.0

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if isinstance(self.impl, OutputSlice) and self.int8:
            return self.impl.group.reference(x)[..., self.impl.start:self.impl.stop]
        if self.int8:
            return self.impl.reference(x, residual)
        a = self.node.attrs
        linear = reference_bf16_linear if self.bf16 else reference_linear
        return linear(x, self.weight, a["bias"], a["activation"], residual)

    def probe_check(self) -> tuple[np.ndarray, np.ndarray]:
        """(the kernel's output, the loaded weight's) for the probe input: they differ when
        the weights the kernel holds are not the ones loaded. (int8: the exact integer
        products of the weights held and of those loaded. bf16: they differ by rounding,
        within `bf16_bound`.)"""
        a = self.node.attrs
        if self.int8:
            held = int_weight_probe(self.impl.dense_weight())
            return held.astype(np.float64), self.probe.astype(np.float64)
        r = np.zeros((1, self.pattern.out_features), np.float32) if a["residual"] else None
        got = self.impl(probe_input(self.pattern.in_features), r)
        return got, linear_epilogue(self.probe, a["bias"], a["activation"], r)

    def bf16_bound(self) -> np.ndarray:
        """Per output, how far a bf16 kernel's result at the probe input may be from the
        float32 weights': x and w rounded to bfloat16's 8 significant bits (relative error
        at most u = 2⁻⁸ each), each product is within (2u + u²)·|x·w| of the exact one;
        |w| loaded is at most |w| held · (1 + 2u); the float32 sums add a little, and the
        activation (GELU's slope is at most 1.13) scales it by at most 1.13."""
        x = np.abs(probe_input(self.pattern.in_features).astype(np.float64))
        total = x @ np.abs(self.impl.dense_weight().astype(np.float64)) * (1 + 2.0 ** -7)
        return 1.13 * (2.0 ** -7 + 2.0 ** -16) * total + 1e-5


def probe_input(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).standard_normal((1, in_features), dtype=np.float32)


def int_probe_input(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).integers(0, 256, (1, in_features))


def int_weight_probe(weight: np.ndarray) -> np.ndarray:
    """x₀·W in int64 for an int8 weight and int_probe_input's uint8 x₀. Summed by BLAS in
    float32 (numpy's integer product has none, and this runs for every int8 layer at
    load) over PROBE_ROWS inputs at a time, whose sums are exact in float32: each term's
    magnitude is at most 255 · 128, and PROBE_ROWS of them stay within 2²⁴. Another
    integer weight is summed in float64, exact while the sums stay below 2⁵³."""
    x0 = int_probe_input(weight.shape[0])
    if weight.dtype != np.int8:
        return (x0.astype(np.float64) @ weight.astype(np.float64)).astype(np.int64)
    x0 = x0.astype(np.float32)
    out = np.zeros((1, weight.shape[1]), np.int64)
    for k0 in range(0, weight.shape[0], PROBE_ROWS):
        out += (x0[:, k0:k0 + PROBE_ROWS] @ weight[k0:k0 + PROBE_ROWS].astype(np.float32)).astype(np.int64)
    return out


PROBE_ROWS = (1 << 24) // (255 * 128)  # 514


def weight_probe(weight: np.ndarray) -> np.ndarray:
    """x₀·W for a fixed random x₀: kept at load (one value per output), it lets `check`
    tell whether a kernel computes with the weights the file gave without keeping them."""
    return probe_input(weight.shape[0]) @ weight


@dataclass
class Step:
    node: Node
    run: Callable[..., tuple]
    impl: object = None  # a Linear layer's kernel (what run calls), for the executor's TokenChain
    # (outputs' names, a run that gives None for them): taken where no later step needs
    # those values but those that run without them (`optional`) (hand_row_bytes,
    # hand_quantized_outputs, hand_dequantized_bytes)
    lean: tuple[tuple[str, ...], Callable[..., tuple]] | None = None
    optional: frozenset[str] = frozenset()  # inputs this step runs without, given None


@dataclass
class Planning:
    """What the planning functions share: the graph's opset, the kernel chooser, the
    layers planned so far, and who to tell about progress and finished weights."""

    opset: int
    chooser: Chooser
    total: int = 0
    layers: list[LayerPlan] = field(default_factory=list)
    progress: Callable[[int, int, LayerPlan], None] | None = None
    done_with: Callable[[np.ndarray], None] = lambda weight: None

    def add(self, layer: LayerPlan) -> None:
        self.layers.append(layer)
        log.debug("%s: %s %dx%d density %.3f block %d: %s", layer.name, layer.kind, *layer.pattern_shape,
                  layer.pattern.density, layer.pattern.block, layer.reason)
        if self.progress is not None:
            self.progress(len(self.layers), self.total, layer)


def _without_weight(node: Node) -> Node:
    return Node(node.op_type, node.name, list(node.inputs), list(node.outputs),
                {k: v for k, v in node.attrs.items() if k != "weight"})


# bf16: a weight runs on the bfloat16 kernel of consecutive pairs when the pairs of inputs
# it stores are at most this fraction of its nonzeros (4-block and dense weights store half
# as many). Scattered weights store about one such pair per nonzero (90% unstructured:
# 0.95), so they pair any two of a row's inputs instead (BF16ScatteredLinear).
PAIRS_WORTH = 0.75


def pairs_worth(weight: np.ndarray) -> bool:
    """Whether the bf16 kernel's stored pairs are few enough to be worth its rounding."""
    k, m = weight.shape
    nz = weight != 0
    pairs = int(np.count_nonzero(np.pad(nz, ((0, k % 2), (0, 0))).reshape(-1, 2, m).any(axis=1)))
    return pairs <= PAIRS_WORTH * max(int(np.count_nonzero(nz)), 1)


def plan_linear(node: Node, chooser: Chooser) -> LayerPlan:
    """The kernel for one Linear node's weight (`node.attrs["weight"]`)."""
    a = node.attrs
    w, bias, act, residual = a["weight"], a["bias"], a["activation"], a["residual"]
    pattern = analyse(w)
    built: dict[str, SparseLinear | DenseLinear] = {}

    def sparse() -> SparseLinear:
        if "sparse" not in built:
            kernel = SparseLinear
            if chooser.precision == "bf16":
                kernel = BF16SparseLinear if pairs_worth(w) else BF16ScatteredLinear if w.shape[0] <= 1 << 16 \
                    else SparseLinear
            built["sparse"] = kernel(w, bias, act, residual, pattern)
        return built["sparse"]

    def fp32() -> SparseLinear:  # (under bf16: timed beside bf16's sparse kernel)
        if "sparse-fp32" not in built:
            built["sparse-fp32"] = SparseLinear(w, bias, act, residual, pattern)
        return built["sparse-fp32"]

    def dense() -> DenseLinear:
        if "dense" not in built:
            bf16 = BF16AmxLinear if has_amx("bf16") else BF16DenseLinear
            built["dense"] = (bf16 if chooser.precision == "bf16" else DenseLinear)(w, bias, act, residual)
        return built["dense"]

    c = chooser.decide(node.name, pattern, act, residual, sparse, dense, fp32)
    if c.kernel in SPARSE_KINDS:
        impl = (sparse() if c.kernel == "sparse" else fp32()).with_chunk(c.k_chunk)
        impl.drop_csr()
        if c.at is not None:  # (AMX's dense kernel from that many tokens on)
            impl = ByTokens(impl, dense(), c.at)
    else:
        impl = dense()
    return LayerPlan(node.name, _without_weight(node), pattern, impl, c.why, c.timings_ms, c.reused, c.decided_by,
                     weight_probe(w))


def plan_group(node: Node, chooser: Chooser) -> tuple[LayerPlan, list[LayerPlan]]:
    """One kernel over a LinearGroup's weights side by side, chosen like any Linear's, and
    a LayerPlan per member whose impl is its slice of the group's output."""
    members = node.attrs["members"]
    ws = [m.attrs["weight"] for m in members]
    biases = [np.zeros(w.shape[1], np.float32) if m.attrs["bias"] is None else m.attrs["bias"]
              for m, w in zip(members, ws)]
    attrs = dict(members[0].attrs, weight=np.concatenate(ws, axis=1), bias=np.concatenate(biases).astype(np.float32))
    group = plan_linear(Node("Linear", node.name, list(node.inputs), list(node.outputs), attrs), chooser)
    why = (f"one {group.kind} kernel for the {len(members)} layers reading this input (its time shows on the "
           f"first): {group.reason}")
    plans, start = [], 0
    for m, w in zip(members, ws):
        stop = start + w.shape[1]
        plans.append(LayerPlan(m.name, _without_weight(m), analyse(w), OutputSlice(group.impl, start, stop), why,
                               group.timings_ms, group.timing_reused, group.decided_by, weight_probe(w)))
        start = stop
    return group, plans


# --- the table: node kind → its step -------------------------------------------------------

def linear_step(node: Node, p: Planning) -> Step:
    layer = plan_linear(node, p.chooser)
    p.done_with(node.attrs["weight"])
    p.add(layer)
    impl = layer.impl
    return Step(layer.node, lambda x, residual=None: (impl(x, residual),), impl)


def group_step(node: Node, p: Planning) -> Step:
    group, members = plan_group(node, p.chooser)
    for m in node.attrs["members"]:
        p.done_with(m.attrs["weight"])
    for layer in members:
        p.add(layer)
    kernel, cuts = group.impl, [(m.impl.start, m.impl.stop) for m in members]
    attrs = {"activation": node.attrs["activation"], "members": [m.node for m in members]}
    if isinstance(kernel, BF16AmxLinear):
        kernel.split_members([a for a, _ in cuts])

    def run(x, xp=None):  # (xp: x's pair rows, for a bf16 AMX kernel: hand_layernorm_pairs)
        y = kernel(x) if xp is None else kernel.from_quantized(xp, xp.lead)
        return tuple(y[..., a:b] for a, b in cuts)

    return Step(Node(node.op_type, node.name, list(node.inputs), list(node.outputs), attrs), run, kernel)


def attention_step(node: Node, p: Planning) -> Step:
    a = dict(node.attrs, bf16=p.chooser.precision == "bf16")
    return Step(node, lambda q, kt, v, mask=None, scale=None, q_scale=None, k_scale=None: (
        fused_attention(q, kt, v, mask, scale, q_scale, k_scale, **a),))


PADDING_WORTH = 2.0  # without VNNI, 4-blocks storing this many times the nonzeros lose to skipping each zero
# Inputs per K-chunk of the VNNI int8 kernel (int8.Int8Chunked): 256 inputs of 128 tokens of
# xq are 32 KB, in L1 (bench/README, "Measured and tried", for the sizes compared).
INT8_CHUNK = 256
# With AVX-512 VBMI, a weight runs on the kernel with 16 outputs in the lanes (Int8Lanes)
# where its two instructions per slot (a `vpermi2b`, a `vpdpbusd`; 4 nonzeros × 16 outputs,
# one token) are fewer than this times the 4-block kernel's one per stored block and 16
# tokens: unstructured pruning to 95% falls below it, 97% and 4-block pruning above, as the
# two kernels' timings at 80-97% sparsity put the line (bench/README.md, seventeenth session).
LANES_WORTH = 1.15


def _int8(a: dict, facts: dict) -> tuple[type, Callable[[], Int8Linear | Int8Chunked | Int8Lanes | Int8Dense
                                                         | Int8OnFloat], str]:
    """The int8 kernel for a QLinear node's attributes (and its weight's `_int8_weight_facts`):
    its class, what builds it, and why. With VNNI and VBMI, a weight whose nonzeros are
    scattered (LANES_WORTH) runs on the kernel with the outputs in the lanes, its output
    requantized or not. Else, with VNNI (and an output not requantized): the dense GEMM
    where over DENSE_ABOVE of the 4-blocks hold a nonzero, else the K-chunked sparse
    kernel. Without VNNI, a weight whose nonzeros are scattered (4-blocks would
    store over PADDING_WORTH times as many multiply-adds) runs on the FP32 sparse kernel,
    exactly, where its sums stay below 2^24."""
    w = a["weight"]
    k, m = w.shape
    args = (w, a["scale"], a["mode"], a["x_scale"], a["x_zero_point"], a["bias"], a["activation"], a["residual"])
    requantize = a.get("requantize")
    nnz, blocks = facts["nnz"], facts["blocks4"]
    if "vnni" not in host_dots() and 4 * blocks > PADDING_WORTH * nnz and exact_on_float(w) and requantize is None:
        return Int8OnFloat, lambda: Int8OnFloat(*args), (
            f"int8 ({a['mode']} activation scale) on the FP32 sparse kernel, exact (integer sums below 2^24): "
            f"4-blocks would store {4 * blocks / max(nnz, 1):.1f}x the nonzeros, and this CPU has no VNNI")
    if "vnni" in host_dots() and requantize is None and blocks > DENSE_ABOVE * -(-k // 4) * m:
        return Int8Dense, lambda: Int8Dense(*args), (
            f"int8 ({a['mode']} activation scale, {DOT_NAMES['vnni']}) dense GEMM: {blocks} of {-(-k // 4) * m} "
            f"4-blocks hold a nonzero, over {DENSE_ABOVE} of them")
    slots = lane_slot_count(w) if "vnni" in host_dots() and has_lanes() and m % 16 == 0 else None
    if slots is not None and 2 * slots < LANES_WORTH * blocks / 16:
        return Int8Lanes, lambda: Int8Lanes(*args, requantize), (
            f"int8 ({a['mode']} activation scale, {DOT_NAMES['vnni']}) with 16 outputs in the lanes: {slots} slots "
            f"of 4 nonzeros × 16 outputs, where {blocks} of {-(-k // 4) * m} 4-blocks hold a nonzero"
            f"{', output requantized' if requantize is not None else ''}")
    if "vnni" in host_dots() and requantize is None:
        return Int8Chunked, lambda: Int8Chunked(*args, k_chunk=INT8_CHUNK), (
            f"int8 ({a['mode']} activation scale, {DOT_NAMES['vnni']}, in K-chunks of {INT8_CHUNK})"
            f", {blocks} of {-(-k // 4) * m} 4-blocks stored")
    impl = Int8Linear(*args, requantize)
    return Int8Linear, lambda: impl, (f"int8 ({a['mode']} activation scale, {DOT_NAMES[impl.config.dot]}"
                                      f"{', output requantized' if requantize is not None else ''})"
                                      f", {blocks} of {-(-k // 4) * m} 4-blocks stored")


class _OnBytes:
    """A static int8 layer timed as a model runs it: on x's bytes (what a LayerNorm or the
    layer before hands over), quantized once per probe, not in the timed call."""

    def __init__(self, layer):
        self.layer, self.made = layer, None

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if self.made is None or self.made[0] is not x:
            lay = self.layer
            q = quantize_x(x, "static", lay.x_scale, lay.x_zero_point)[0].astype(np.int16) - lay._lo
            q = np.pad(q.astype(np.uint8).reshape(-1, x.shape[-1]), ((0, 0), (0, -x.shape[-1] % 4)))
            self.made = x, byte_rows(np.ascontiguousarray(q).view(np.int32))
        return self.layer.from_quantized(self.made[1], x.shape[:-1], residual)


# The kernels a saved plan may name for an int8 layer on a CPU with AMX: _int8's VNNI
# kernel, AMX's, or both by token count (ByTokens, from the entry's "at" tokens on).
INT8_PLANNED = ("int8-vnni", "int8-amx", "int8-by-tokens")


def _int8_weight_facts(w: np.ndarray) -> dict:
    """What a saved int8 decision was made for: the weight's shape, nonzeros and 4-blocks."""
    blocks = np.pad(w != 0, ((0, -w.shape[0] % 4), (0, 0))).reshape(-1, 4, w.shape[1]).any(axis=1)
    return {"in": w.shape[0], "out": w.shape[1], "nnz": int(np.count_nonzero(w)), "blocks4": int(blocks.sum())}


def _int8_saved(chooser: Chooser, name: str, facts: dict) -> dict | None:
    """The saved plan's entry for this int8 layer, if it was made for this weight and names
    an int8 kernel (else, as for float layers, it is decided afresh)."""
    entry = chooser.saved.get(name)
    try:
        fits = entry is not None and entry["kernel"] in INT8_PLANNED and all(entry[k] == v for k, v in facts.items()) \
            and (entry["kernel"] != "int8-by-tokens" or (type(entry["at"]) is int and entry["at"] > 0))
    except (KeyError, TypeError):
        fits = False
    if entry is not None and not fits:
        (log.warning if chooser.saved_by == "plan file" else log.debug)(
            "%s: the %s's entry was made for another weight or kernel; deciding afresh", name, chooser.saved_by)
    return entry if fits else None


def _int8_choice(a: dict, chooser: Chooser, name: str) -> tuple:
    """(the int8 kernel, why, decided_by, timings in ms) for a QLinear node's attributes:
    _int8's VNNI kernel, or, where the CPU has AMX, the dense AMX kernel (Int8Amx) where
    it is clearly faster (AMX_CLEARLY). Timed on the first layer of each kind over
    PROBE_TOKENS tokens, then, while the VNNI kernel still wins, over MANY_TOKENS; a layer
    AMX wins only with many tokens runs both (ByTokens). `kernels="dense"` takes AMX,
    `"sparse"` the VNNI kernel, untimed. The decision is kept in the plan under `name`
    and taken from a saved plan made for the same weight, untimed."""
    w = a["weight"]
    facts = _int8_weight_facts(w)
    cls, make, why = _int8(a, facts)
    if cls not in (Int8Chunked, Int8Lanes, Int8Dense) or chooser.kernels == "sparse" or not has_amx("int8"):
        return make(), why, "rule", {}
    args = (w, a["scale"], a["mode"], a["x_scale"], a["x_zero_point"], a["bias"], a["activation"], a["residual"])
    requantize = a.get("requantize")
    built: dict = {}  # each kernel built once, and only when needed (a saved plan may name one)

    def vnni():
        if "vnni" not in built:
            built["vnni"] = make()
        return built["vnni"]

    def amx():
        if "amx" not in built:
            built["amx"] = Int8Amx(*args, requantize=requantize)
        return built["amx"]

    tiles = "int8 ({} activation scale) dense GEMM on AMX tiles".format(a["mode"])
    if chooser.kernels == "dense":
        return amx(), f"{tiles}, forced dense", "forced", {}
    entry = _int8_saved(chooser, name, facts)
    if entry is not None:  # kept as it was saved, with how it was first decided
        chooser.decisions[name] = entry
        said = f"{chooser.saved_by}, first {entry.get('decided_by')}: {entry.get('why', '')}"
        made = {"int8-vnni": vnni, "int8-amx": amx, "int8-by-tokens": lambda: ByTokens(vnni(), amx(), entry["at"])}
        return made[entry["kernel"]](), said, chooser.saved_by, {}
    impl, why, ms, kernel, at = _int8_raced(a, chooser, vnni, why, amx, tiles, facts)
    chooser.decisions[name] = dict(facts, kernel=kernel, at=at, decided_by="measured", why=why)
    return impl, why, "measured", ms


def _int8_raced(a: dict, chooser: Chooser, vnni: Callable, why: str, amx: Callable, tiles: str, facts: dict) -> tuple:
    """_int8_choice's timing: (kernel, why, timings, the plan's kernel name, ByTokens' `at`)."""
    w = a["weight"]
    blocks = facts["blocks4"] / (-(-w.shape[0] // 4) * w.shape[1])
    kind = ("int8", a["mode"], *w.shape, round(float(blocks), 2), a["activation"], a["residual"])
    wrapped: dict = {}  # static: timed on x's bytes where the kernel reads them, as the model runs it (_OnBytes)

    def candidate(name: str, make: Callable):
        def get():
            if name not in wrapped:
                layer = make()  # (Int8Dense quantizes x itself: it has no from_quantized, see _int8_run)
                wrapped[name] = _OnBytes(layer) if a["mode"] == "static" and hasattr(layer, "from_quantized") else layer
            return wrapped[name]
        return get

    timed = {"vnni": candidate("vnni", vnni), "amx": candidate("amx", amx)}
    timings, at, reused = {}, None, False
    for n in (PROBE_TOKENS, *MANY_TOKENS):
        _, ms, reused = chooser.race_layers(kind, timed, *w.shape, a["residual"], n)
        timings[n] = ms
        if ms["amx"] < AMX_CLEARLY * ms["vnni"]:
            at = n
            break
    said = (f"measured on {'an earlier layer like it' if reused else 'this layer'}: "
            + ", ".join(f"{n} tokens VNNI {ms['vnni']:.3f} ms, AMX {ms['amx']:.3f} ms" for n, ms in timings.items()))
    if at is None:
        return vnni(), f"{why}; {said}", timings, "int8-vnni", None
    if at == PROBE_TOKENS:
        return amx(), f"{tiles}; {said}", timings, "int8-amx", None
    return ByTokens(vnni(), amx(), at), f"{why} under {at} tokens, {tiles} from {at}; {said}", timings, "int8-by-tokens", at


def qlinear_step(node: Node, p: Planning) -> Step:
    """A quantized Linear on the int8 kernel (AVX-512 VNNI where the CPU has it, else AVX2)."""
    a = node.attrs
    impl, why, by, ms = _int8_choice(a, p.chooser, node.name)
    probe = int_weight_probe(a["weight"])
    p.done_with(a["weight"])
    p.add(LayerPlan(node.name, _without_weight(node), analyse(a["weight"]), impl, why, ms, decided_by=by,
                    probe=probe))
    return Step(p.layers[-1].node, lambda x, residual=None, xq=None: (_int8_run(impl, x, residual, xq),), impl)


def _int8_run(impl, x: np.ndarray | None, residual: np.ndarray | None, xq: np.ndarray | None) -> np.ndarray:
    """An int8 layer's (or group's) output for x, or, given xq (x's bytes from the
    LayerNorm or row group that made x: hand_layernorm_bytes, hand_row_bytes), for those
    bytes where its kernel for x reads them (x None: there are only the bytes)."""
    if isinstance(xq, TokenTiles):  # (an AMX layer's, for AMX layers: hand_amx_bytes)
        if isinstance(impl, Int8Amx):
            return impl.from_quantized(xq, xq.lead, residual)
        xq = untiled(xq, -(-impl.in_features // 4))
    kernel = impl.pick(x if x is not None else xq) if isinstance(impl, ByTokens) else impl  # (by the token count)
    if xq is None or not hasattr(kernel, "from_quantized"):
        return kernel(x, residual)
    return kernel.from_quantized(byte_rows(xq), xq.shape[:-1], residual)


def qlinear_group_step(node: Node, p: Planning) -> Step:
    """A QLinearGroup: one int8 kernel over its members' weights side by side, x quantized
    once; a LayerPlan per member whose impl is its slice of the output."""
    members = node.attrs["members"]
    ws = [m.attrs["weight"] for m in members]
    m0 = members[0].attrs
    scales = [np.broadcast_to(np.asarray(m.attrs["scale"], np.float32), (w.shape[1],)) for m, w in zip(members, ws)]
    biases = [np.zeros(w.shape[1], np.float32) if m.attrs["bias"] is None else m.attrs["bias"]
              for m, w in zip(members, ws)]
    requantize = None if m0.get("requantize") is None else np.concatenate([m.attrs["requantize"] for m in members],
                                                                           axis=1)
    impl, why, by, ms = _int8_choice(dict(m0, weight=np.concatenate(ws, axis=1), scale=np.concatenate(scales),
                                          bias=np.concatenate(biases).astype(np.float32), requantize=requantize),
                                     p.chooser, node.name)
    why = f"one int8 kernel for the {len(members)} layers reading this input (its time shows on the first): {why}"
    start, cuts = 0, []
    for m, w in zip(members, ws):
        cuts.append((start, start + w.shape[1]))
        probe = int_weight_probe(w)
        p.done_with(w)
        p.add(LayerPlan(m.name, _without_weight(m), analyse(w), OutputSlice(impl, *cuts[-1]), why, ms,
                        decided_by=by, probe=probe))
        start = cuts[-1][1]
    attrs = {"activation": node.attrs["activation"], "members": [lp.node for lp in p.layers[-len(members):]],
             "cuts": cuts}
    if isinstance(impl, Int8Amx):
        impl.split_members([a for a, _ in cuts])

    def run(x, xq=None):
        y = _int8_run(impl, x, None, xq)
        return tuple(y[..., a:b] for a, b in cuts)

    return Step(Node(node.op_type, node.name, list(node.inputs), list(node.outputs), attrs), run, impl)


def onnx_attention_step(node: Node, p: Planning) -> Step:
    """ONNX's Attention op on the fused kernel when it is plain scaled dot-product attention
    over 4-D heads (no cache, causal or window limits, softcap or extra outputs, and no
    fully masked row, which the op zeroes): else its reference."""
    reference = bind(node.op_type, node.attrs, p.opset, len(node.outputs))
    a = node.attrs
    plain = not any(node.outputs[1:]) and not a.get("is_causal") and not a.get("softcap") \
        and not a.get("qk_matmul_output_mode") and a.get("left_window_size", -1) == -1 \
        and a.get("right_window_size", -1) == -1 and a.get("q_num_heads") is None and not a.get("softmax_precision")

    def run(q, k, v, mask=None, *cache):
        if not plain or any(c is not None for c in cache) or q.ndim != 4 or q.shape[1] != k.shape[1] \
                or q.dtype != np.float32 or (mask is not None and np.isneginf(mask if mask.dtype != bool else
                                                                           np.where(mask, 0, -np.inf)).all(-1).any()):
            return reference(q, k, v, mask, *cache)
        if mask is not None and mask.dtype == np.bool_:
            mask = np.where(mask, np.float32(0), np.float32(-np.inf))
        scale = np.float32(a["scale"] if a.get("scale") is not None else 1 / np.sqrt(q.shape[3]))
        y = fused_attention(q, np.swapaxes(k, 2, 3), v, mask, scale, scale_op="mul", axis=-1, opset=p.opset,
                            bf16=p.chooser.precision == "bf16")
        return (y,) + (None,) * (len(node.outputs) - 1)

    return Step(node, run)


def layernorm_step(node: Node, p: Planning) -> Step:
    eps, layout, grid = node.attrs["epsilon"], node.attrs["feature_major"], Grid.of(node.attrs.get("quantize"))
    return Step(node, lambda x, scale, bias=None: (layernorm(x, scale, bias, eps, layout, grid),))


def prepare_mask_step(node: Node, p: Planning) -> Step:
    steps = node.attrs.get("steps", ())
    make, fill = mask_steps(steps, p.opset), float_steps(steps)
    return Step(node, lambda source, expand=None: (PreparedMask(source, make, fill, expand),))


def embed_step(node: Node, p: Planning) -> Step:
    kernel = EmbedLayerNorm(node.attrs["tables"], node.attrs["gathers"], node.attrs["epsilon"], node.attrs.get("quantize"),
                            node.attrs.get("wrap", ()))
    for table in node.attrs["tables"]:
        p.done_with(table)
    attrs = {k: v for k, v in node.attrs.items() if k != "tables"}  # the kernel holds them, in one array
    return Step(Node(node.op_type, node.name, list(node.inputs), list(node.outputs), attrs),
                lambda *ids_scale_bias: (kernel(*ids_scale_bias),))


def reference_step(node: Node, p: Planning) -> Step:
    return Step(node, bind(node.op_type, node.attrs, p.opset, len(node.outputs)))


ELEMENTWISE = {"QuantizeLinear": elementwise.quantize, "DequantizeLinear": elementwise.dequantize,
               "Erf": elementwise.erf, "QLinearMatMul": elementwise.qlinear_matmul, "Lookup": elementwise.lookup,
               "FakeQuantize": elementwise.fake_quantize, "QSoftmax": elementwise.qsoftmax,
               "QAttentionCore": elementwise.qattention}


PREPARED = {"QAttentionCore": elementwise.QAttention}  # kernels made per node, of its attributes


def elementwise_step(node: Node, p: Planning) -> Step:
    """A per-element op on its Numba kernel where the kernel covers the inputs (one scale
    and zero point, 8-bit types, float32), else on its reference."""
    reference, attrs = bind(node.op_type, node.attrs, p.opset, 1), node.attrs
    if node.op_type in PREPARED:  # (its constants checked and laid out once)
        kernel, attrs = PREPARED[node.op_type](**attrs), {}
    else:
        kernel = ELEMENTWISE[node.op_type]

    def run(*inputs):
        y = kernel(*inputs, **attrs)
        return reference(*inputs) if y is None else (y,)

    return Step(node, run)


def row_group_step(node: Node, p: Planning) -> Step:
    """A RowGroup on its kernel where the kernel covers the inputs, else op by op: each on
    its own kernel where it has one, which computes what the group's reference does."""
    a = node.attrs
    kernel = rows.RowKernel(a["nodes"], a["names"], a["outputs"], a["consts"], p.opset)
    own = {id(m): elementwise_step(m, p).run for m in a["nodes"] if m.op_type in ELEMENTWISE}

    def one(m: Node, args: list) -> np.ndarray:
        return own[id(m)](*args)[0] if id(m) in own else rows.reference_op(m, args, p.opset)

    def run(*inputs):
        y = kernel(*inputs)
        return y if y is not None else rows.run_members(inputs, a["nodes"], a["names"], a["outputs"], a["consts"], one)

    return Step(node, run)


def integer_weight_step(node: Node, p: Planning) -> Step:
    """MatMulIntegerB (lower.integer_weights): its constant B's floats made once."""
    floats = integer_weight(node.attrs["b"], node.attrs["b_zero_point"])
    return Step(node, lambda a, a_zero_point=None: (integer_product_with(a, a_zero_point, floats),))


STEPS: dict[str, Callable[[Node, Planning], Step]] = {
    "RowGroup": row_group_step,
    "MatMulIntegerB": integer_weight_step,
    "Linear": linear_step,
    "LinearGroup": group_step,
    "QLinearGroup": qlinear_group_step,
    "AttentionCore": attention_step,
    "Attention": onnx_attention_step,
    "LayerNorm": layernorm_step,
    "PrepareMask": prepare_mask_step,
    "EmbedLayerNorm": embed_step,
    "QLinear": qlinear_step,
    **dict.fromkeys(ELEMENTWISE, elementwise_step),
}


def plan(graph: Graph, chooser: Chooser | None = None, progress: Callable[[int, int, LayerPlan], None] | None = None,
         done_with: Callable[[np.ndarray], None] | None = None) -> tuple[list[Step], list[LayerPlan]]:
    """A step per node of the lowered graph, and every Linear layer's plan. `progress(done,
    total, layer)` is called as each Linear gets its kernel, `done_with(weight)` after."""
    total = sum(1 if n.op_type in ("Linear", "QLinear") else len(n.attrs["members"])
                if n.op_type in ("LinearGroup", "QLinearGroup") else 0 for n in graph.nodes)
    p = Planning(graph.opset, chooser or Chooser(), total, progress=progress)
    if done_with is not None:
        p.done_with = done_with
    steps = [STEPS.get(n.op_type, reference_step)(n, p) for n in graph.nodes]
    steps = hand_layernorm_bytes(steps) if LAYERNORM_BYTES else steps
    steps = hand_layernorm_pairs(steps) if LAYERNORM_PAIRS else steps
    steps = hand_amx_bytes(steps, graph.outputs) if AMX_BYTES else steps
    steps = hand_amx_pairs(steps, graph.outputs) if AMX_PAIRS else steps
    steps = hand_attention_bytes(steps, graph.outputs, p.chooser.precision == "bf16") if ATTENTION_BYTES else steps
    steps = hand_row_bytes(steps, p.opset, graph.outputs) if ROW_BYTES else steps
    steps = hand_quantized_outputs(steps, graph) if QUANTIZED_OUTPUTS else steps
    return (hand_dequantized_bytes(steps, graph) if DEQUANTIZED_BYTES else steps), p.layers


# A LayerNorm rounding its output to the grid a static int8 layer reading it quantizes x
# to (lower.quantize_layernorms) also stores that layer's bytes, so the layer skips its
# own pass over x; see hand_layernorm_bytes.
LAYERNORM_BYTES = True
BYTES_SUFFIX = "#int8"  # the bytes' value name: the LayerNorm's output's, and this


def _reads_bytes(impl, grid: Grid) -> bool:
    """Whether an int8 layer's kernels (both, for ByTokens) can run on x's bytes on `grid`."""
    kernels = (impl.few, impl.many) if isinstance(impl, ByTokens) else (impl,)
    return all(isinstance(k, (Int8Chunked, Int8Lanes, Int8Amx, Int8Linear)) and k.reads_bytes(grid.floats)
               for k in kernels)


ROW_BYTES = True  # see hand_row_bytes


def _byte_grid(impl) -> np.ndarray | None:
    """The grid a static int8 layer (or group) quantizes x to ([scale, zero point, lowest,
    highest], float32, as layernorm.Grid's floats) where its kernels can run on x's bytes
    on it (_reads_bytes); None otherwise."""
    kernel = impl.few if isinstance(impl, ByTokens) else impl
    if getattr(kernel, "mode", None) != "static":
        return None
    scale, zero, lo = kernel._x_quantization()
    grid = np.array([scale, zero, lo, lo + 255], np.float32)
    return grid if _reads_bytes(impl, Grid(None, grid)) else None


def _readers(steps: list[Step]) -> dict[str, list[int]]:
    """Each value's readers: the indices of the steps taking it as an input."""
    readers: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        for i in s.node.inputs:
            if i:
                readers.setdefault(i, []).append(k)
    return readers


def hand_row_bytes(steps: list[Step], opset: int, graph_outputs=()) -> list[Step]:
    """Steps where each row group (lower.fuse_rows) whose float output only static int8
    layers (or groups) read, as x, also stores the bytes their kernels would quantize x
    to, in the 4-block rows they read (rows.RowKernel's `quads`), as a second output
    `<output>#int8`, which those layers take as their last input (as after
    hand_layernorm_bytes) and run on (`from_quantized`) instead of quantizing x: for a
    quantized GELU, the next Linear layer's bytes come from one more table lookup. The
    group's `lean` run leaves the floats out; the executor takes it where no step and no
    caller asks for them (Executor._schedule), so `Model.values` still gives them."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "RowGroup":
            continue
        a = n.attrs
        probe = rows.RowKernel(a["nodes"], a["names"], a["outputs"], a["consts"], opset)
        for o in a["outputs"]:
            if probe.values[o].kind != "row" or probe.types[o] != np.float32:
                continue
            takers = [k for k in readers.get(o, []) if steps[k].node.op_type in ("QLinear", "QLinearGroup")
                      and steps[k].node.inputs[0] == o and o not in steps[k].node.inputs[1:]]
            grids = [_byte_grid(steps[k].impl) for k in takers]
            takers = [k for k, g in zip(takers, grids) if g is not None and np.array_equal(g, grids[0])]
            if not takers or o in graph_outputs or any(k not in takers for k in readers.get(o, [])):
                continue  # (another step reads the floats too: both would be stored, which was not measured)
            grid, q = grids[0], o + BYTES_SUFFIX
            out[i] = _row_step_with_bytes(out[i], o, grid, opset)
            log.debug("%s: stores the bytes its int8 readers' kernels read (they skip quantizing x): %s", n.name,
                      ", ".join(steps[k].node.name for k in takers))
            for k in takers:
                out[k] = _taking_bytes(out[k], q, o)
            break  # (one output's bytes per group)
    return out


AMX_BYTES = True  # see hand_amx_bytes
# Bytes a LayerNorm or an AMX layer hands to AMX layers only, and a bf16 AMX layer's pair
# rows for the next, are stored as layout.TokenTiles, whose B tiles are each 1 KB in one
# piece (bench/README.md, thirty-ninth session).
TOKEN_TILES = True


def _byte_takers(steps: list[Step], readers: dict, x: str) -> tuple[list[int], np.ndarray | None]:
    """The steps reading value x, and the grid they quantize it to where every one is a
    static int8 layer (or group) reading x as its x only, all on one grid whose bytes
    their kernels run on (_byte_grid); else ([], None)."""
    takers = readers.get(x, [])
    grids = [_byte_grid(steps[k].impl) if steps[k].node.op_type in ("QLinear", "QLinearGroup")
             and steps[k].node.inputs[0] == x and x not in steps[k].node.inputs[1:] else None for k in takers]
    if not takers or any(g is None or not np.array_equal(g, grids[0]) for g in grids):
        return [], None
    return takers, grids[0]


def hand_amx_bytes(steps: list[Step], graph_outputs=()) -> list[Step]:
    """Steps where an int8 layer on AMX's kernel (a block's FFN1, its GELU fused) whose
    output only static int8 layers (or groups) read, as x on one grid, stores that output
    as the bytes their kernels would quantize it to (Int8Amx.bytes_on: in its epilogue,
    the same bytes), as a second output `<output>#int8`, which those
    layers take as their last input (as after hand_layernorm_bytes) and run on instead of
    quantizing x. Its `lean` run leaves the floats out (the executor takes it where no
    step and no caller asks for them); the full run makes both, the bytes by numpy."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "QLinear" or not isinstance(s.impl, Int8Amx) or s.impl.residual or \
                s.impl.requantize is not None or len(n.outputs) != 1:
            continue
        o = n.outputs[0]
        takers, grid = _byte_takers(steps, readers, o)
        if not takers or o in graph_outputs:
            continue
        out[i] = _amx_step_with_bytes(s, grid, TOKEN_TILES and all(isinstance(steps[k].impl, Int8Amx) for k in takers))
        for k in takers:
            out[k] = _taking_bytes(out[k], o + BYTES_SUFFIX, o)
        log.debug("%s: stores the bytes its int8 readers' kernels read (they skip quantizing x): %s", n.name,
                  ", ".join(steps[k].node.name for k in takers))
    return out


def _amx_step_with_bytes(step: Step, grid: np.ndarray, tiled: bool) -> Step:
    """An AMX int8 layer's step also giving its output's bytes on `grid` (see hand_amx_bytes);
    `tiled`, where only AMX layers read them, as TokenTiles (the lean run's)."""
    node, layer = step.node, step.impl

    def run(*inputs):
        (y,) = step.run(*inputs)
        return y, rows.quad_bytes(y, grid)

    def run_lean(x, residual=None, xq=None):
        return None, layer.bytes_on(None if xq is not None else x, grid, xq, tiled)

    o = node.outputs[0]
    return replace(step, node=Node(node.op_type, node.name, list(node.inputs), [o, o + BYTES_SUFFIX], node.attrs),
                   run=run, lean=((o,), run_lean))


AMX_PAIRS = True  # see hand_amx_pairs
PAIRS_SUFFIX = "#bf16"  # the pair rows' value name: the layer's output's, and this


def hand_amx_pairs(steps: list[Step], graph_outputs=()) -> list[Step]:
    """Steps where a bf16 layer on AMX's tiles (`precision="bf16"`: a block's FFN1, its GELU
    fused) whose output only bf16 AMX layers read, as x, stores that output as the pair
    rows their kernels would pack x into (BF16AmxLinear.pairs_on: in its epilogue, the
    same bfloat16 values), as a second output `<output>#bf16`, which those layers take as
    their last input and run on (`from_quantized`) instead of packing x. Its `lean` run
    leaves the floats out (the executor takes it where no step and no caller asks for
    them); the full run makes both, the pair rows by the pack kernel."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "Linear" or type(s.impl) is not BF16AmxLinear or s.impl.residual or len(n.outputs) != 1:
            continue
        o = n.outputs[0]
        takers = readers.get(o, [])
        if not takers or o in graph_outputs or not all(_takes_pairs(steps[k], o, ("Linear",)) for k in takers):
            continue
        out[i] = _amx_step_with_pairs(out[i])
        for k in takers:
            out[k] = _taking_pairs(out[k], o + PAIRS_SUFFIX, o)
        log.debug("%s: stores the pair rows its bf16 readers' kernels read: %s", n.name,
                  ", ".join(steps[k].node.name for k in takers))
    return out


def _takes_pairs(step: Step, x: str, ops: tuple[str, ...]) -> bool:
    """Whether a step is a bf16 layer on AMX's tiles (of `ops`) reading x as its x only,
    which could run on x's pair rows instead."""
    n = step.node
    return n.op_type in ops and type(step.impl) is BF16AmxLinear and n.inputs[0] == x and x not in n.inputs[1:]


def _amx_step_with_pairs(step: Step) -> Step:
    """A bf16 AMX layer's step also giving its output's pair rows (see hand_amx_pairs)."""
    node, layer = step.node, step.impl

    def run(*inputs):
        (y,) = step.run(*inputs)
        return y, packed_pairs(transposed(y.reshape(-1, y.shape[-1]))).view(np.int32).T.reshape(
            y.shape[:-1] + (-(-y.shape[-1] // 2),))

    def run_lean(x, residual=None, xp=None):
        return None, layer.pairs_on(None if xp is not None else x, xp, TOKEN_TILES)

    o = node.outputs[0]
    return replace(step, node=Node(node.op_type, node.name, list(node.inputs), [o, o + PAIRS_SUFFIX], node.attrs),
                   run=run, lean=((o,), run_lean))


def _taking_pairs(step: Step, q: str, without: str) -> Step:
    """A bf16 AMX layer's step that takes x's pair rows `q` as its last input (its run's
    `xp`), and runs without x itself (given None)."""
    r, layer = step.node, step.impl
    inputs = list(r.inputs) + [""] * (len(r.inputs) < 2) + [q]

    def run(x, residual=None, xp=None):
        if xp is None:
            return step.run(x, residual)
        if isinstance(xp, TokenTiles):
            return (layer.from_quantized(xp, xp.lead, residual),)
        return (layer.from_quantized(byte_rows(xp), xp.shape[:-1], residual),)

    return replace(step, node=Node(r.op_type, r.name, inputs, list(r.outputs), r.attrs), run=run,
                   optional=step.optional | {without})


LAYERNORM_PAIRS = True  # see hand_layernorm_pairs


def hand_layernorm_pairs(steps: list[Step]) -> list[Step]:
    """Steps where a feature-major LayerNorm (no grid) whose output bf16 layers on AMX's
    tiles (`precision="bf16"`: Linear layers and groups) read as x also stores the pair rows
    their kernels would pack x into (layernorm.layernorm_to_pairs: beside each float
    output, the same bfloat16 values), as a second output `<output>#bf16`; those layers
    take it as their last input and run on it instead of packing x, one launch fewer
    each. Other readers, the residual adds among them, read the floats as before."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "LayerNorm" or not n.attrs.get("feature_major") or n.attrs.get("quantize") is not None \
                or len(n.outputs) != 1:
            continue
        o = n.outputs[0]
        takers = [k for k in readers.get(o, []) if _takes_pairs(steps[k], o, ("Linear", "LinearGroup"))]
        if not takers:
            continue
        q, eps = o + PAIRS_SUFFIX, n.attrs["epsilon"]
        out[i] = Step(Node(n.op_type, n.name, list(n.inputs), [o, q], n.attrs),
                      lambda x, scale, bias=None, eps=eps: layernorm_to_pairs(x, scale, bias, eps))
        for k in takers:
            r = steps[k].node
            out[k] = _taking_pairs(steps[k], q, o) if r.op_type == "Linear" else replace(
                steps[k], node=Node(r.op_type, r.name, list(r.inputs) + [q], list(r.outputs), r.attrs))
        log.debug("%s: stores the pair rows its bf16 readers' kernels read: %s", n.name,
                  ", ".join(steps[k].node.name for k in takers))
    return out


ATTENTION_BYTES = True  # see hand_attention_bytes


def _merged_heads(steps: list[Step], readers: dict, o: str) -> str | None:
    """The value an attention output o [batch, head, query, feature] becomes as the heads
    merged: Transpose (0, 2, 1, 3) then Reshape, which alone read it (Shape ops aside); or
    None."""
    first = readers.get(o, [])
    if len(first) != 1 or steps[first[0]].node.op_type != "Transpose" or \
            list(steps[first[0]].node.attrs.get("perm") or ()) != [0, 2, 1, 3]:
        return None
    t = steps[first[0]].node.outputs[0]
    then = [steps[k].node for k in readers.get(t, [])]
    reshapes = [n for n in then if n.op_type == "Reshape" and n.inputs[0] == t]
    if len(reshapes) != 1 or any(n.op_type not in ("Shape", "Reshape") for n in then):
        return None
    return reshapes[0].outputs[0]


def hand_attention_bytes(steps: list[Step], graph_outputs=(), bf16: bool = False) -> list[Step]:
    """Steps where an attention (float32 products) whose output, its heads merged (a
    Transpose and a Reshape: [batch, query, heads·features]), only static int8 layers (or
    groups) read, as x on one grid, also stores the bytes their kernels would quantize that
    x to (attention.fused_attention_bytes: beside each float output), as `<merged>#int8`,
    which those layers take as their last input and run on instead of quantizing x. The
    floats are still made (the views between read them). Under ATTENTION_BYTES_FROM tokens,
    or where no kernel stored the bytes (the reference attention), the bytes value is None
    and the layers quantize x themselves (plan's _int8_run)."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "AttentionCore" or bf16 or len(n.outputs) != 1:
            continue
        r = _merged_heads(steps, readers, n.outputs[0])
        takers, grid = _byte_takers(steps, readers, r) if r else ([], None)
        if not takers or {n.outputs[0], r} & set(graph_outputs):
            continue
        out[i] = _attention_step_with_bytes(s, r + BYTES_SUFFIX, grid)
        for k in takers:
            out[k] = _taking_bytes(out[k], r + BYTES_SUFFIX)
        log.debug("%s: stores the bytes its int8 readers' kernels read (they skip quantizing x): %s", n.name,
                  ", ".join(steps[k].node.name for k in takers))
    return out


# Tokens from which the attention stores its output's bytes: under them the bytes cost the
# attention's epilogue more than the next layer's quantizing launch takes (bench/README.md,
# twenty-ninth and thirty-fifth sessions).
ATTENTION_BYTES_FROM = 128


def _attention_step_with_bytes(step: Step, q: str, grid: np.ndarray) -> Step:
    """An attention's step also giving the bytes of its merged heads on `grid` as `q`."""
    node = step.node
    a = dict(node.attrs)

    def run(qs, kt, v, mask=None, scale=None, q_scale=None, k_scale=None):
        many = qs.ndim == 4 and qs.shape[0] * qs.shape[2] >= ATTENTION_BYTES_FROM
        return fused_attention_bytes(qs, kt, v, mask, scale, q_scale, k_scale, **a, grid=grid if many else None)

    return replace(step, node=Node(node.op_type, node.name, list(node.inputs), [node.outputs[0], q], node.attrs),
                   run=run)


QUANTIZED_OUTPUTS = True  # see hand_quantized_outputs
DEQUANTIZED_BYTES = True  # see hand_dequantized_bytes


def hand_dequantized_bytes(steps: list[Step], graph: Graph) -> list[Step]:
    """Steps where a per-tensor DequantizeLinear of uint8 bytes whose floats only static
    int8 layers (or groups) read as x, quantizing x on the same grid (QOperator's
    attention output before its dense layer), also gives those bytes in the 4-block rows
    the layers' kernels read (rows.bytes_rows), which they take as their last input and run
    on: the bytes are what the layers would make of the floats, exactly ((b - z)·s / s is
    b - z within far less than half a step). Its `lean` run leaves the floats out (the
    executor takes it where no step and no caller asks for them)."""
    readers = _readers(steps)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type != "DequantizeLinear" or len(n.outputs) != 1 or n.outputs[0] in graph.outputs:
            continue
        grid = _quantize_grid(n, graph.constants)
        x = n.outputs[0]
        takers = readers.get(x, [])
        if grid is None or grid[2] != 0 or not takers or any(
                steps[k].node.op_type not in ("QLinear", "QLinearGroup") or steps[k].node.inputs[0] != x
                or x in steps[k].node.inputs[1:] or not np.array_equal(_byte_grid(steps[k].impl), grid)
                for k in takers):
            continue
        q = x + BYTES_SUFFIX
        out[i] = Step(Node(n.op_type, n.name, list(n.inputs), [x, q], n.attrs),
                      lambda b, *rest, run=s.run: (*run(b, *rest), rows.bytes_rows(b)),
                      lean=((x,), lambda b, *rest: (None, rows.bytes_rows(b))))
        for k in takers:
            out[k] = _taking_bytes(out[k], q, x)
        log.debug("%s: gives its bytes to %s", n.name, ", ".join(steps[k].node.name for k in takers))
    return out


def hand_quantized_outputs(steps: list[Step], graph: Graph) -> list[Step]:
    """Steps where an int8 layer (or group) on the lanes kernel or Int8Linear whose every
    output only a per-tensor QuantizeLinear reads (QOperator's Q, K and V before
    attention) makes those bytes itself: its step also gives the QuantizeLinears' outputs,
    which are no longer steps of their own, and its `lean` run has the kernel store each
    output's bytes on its QuantizeLinear's grid instead of the floats (`bytes_for`); the
    executor takes it where no step and no caller asks for the floats. Bit for bit the QuantizeLinears'
    bytes: the same float y, quantized in the same float steps."""
    readers = _readers(steps)
    out: list[Step | None] = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        if n.op_type not in ("QLinear", "QLinearGroup") or not isinstance(s.impl, (Int8Lanes, Int8Linear)) or \
                s.impl.residual:
            continue
        quants = [readers.get(o, []) for o in n.outputs]
        if not all(len(r) == 1 and steps[r[0]].node.op_type == "QuantizeLinear" and steps[r[0]].node.inputs[0] == o
                   and o not in graph.outputs for r, o in zip(quants, n.outputs)):
            continue
        grids = [_quantize_grid(steps[r[0]].node, graph.constants) for r in quants]
        if any(g is None for g in grids) or len({g[2] for g in grids}) != 1:
            continue
        cuts = n.attrs.get("cuts", [(0, s.impl.out_features)])
        grid = np.concatenate([np.repeat(g[:, None], b - a, axis=1) for g, (a, b) in zip(grids, cuts)], axis=1)
        qsteps = [steps[r[0]] for r in quants]
        constants = [[graph.constants.get(c) if c else None for c in q.node.inputs[1:]] for q in qsteps]
        out[i] = _step_with_bytes(s, qsteps, constants, grid, cuts)
        for r in quants:
            out[r[0]] = None
        log.debug("%s: stores the bytes its QuantizeLinears make", n.name)
    return [s for s in out if s is not None]


def _quantize_grid(node: Node, constants: dict) -> np.ndarray | None:
    """A QuantizeLinear's [scale, zero point, lowest, highest] as float32 where one float32
    scale and an 8-bit zero point, constants, quantize the whole tensor; else None."""
    if len(node.inputs) < 3 or any(node.attrs.get(a) for a in ("block_size", "precision", "output_dtype")):
        return None
    s, z = (elementwise.scalar(constants.get(name)) for name in node.inputs[1:3])
    if s is None or z is None or s.dtype != np.float32 or z.dtype not in elementwise.RANGES:
        return None
    return np.array([s, z, *elementwise.RANGES[z.dtype]], np.float32)


def _step_with_bytes(step: Step, qsteps: list[Step], constants: list, grid: np.ndarray, cuts: list) -> Step:
    """An int8 layer's (or group's) step that also gives its QuantizeLinears' outputs (see
    hand_quantized_outputs; `constants`: each one's scale and zero point)."""
    node, layer = step.node, step.impl
    floats, terms = tuple(node.outputs), step.impl.bytes_terms(grid)

    def run(*inputs):  # (the floats, then each QuantizeLinear on its own kernel)
        ys = step.run(*inputs)
        return (*ys, *(q.run(y, *c)[0] for q, y, c in zip(qsteps, ys, constants)))

    def run_lean(x, *rest):
        xq = rest[-1] if rest else None  # (the bytes a row group or LayerNorm hands over: plan's _int8_run)
        b = layer.bytes_for(x, terms, xq)
        return (*[None] * len(floats), *(b[..., a:c] for a, c in cuts))

    outputs = [*floats, *(q.node.outputs[0] for q in qsteps)]
    return Step(Node(node.op_type, node.name, list(node.inputs), outputs, node.attrs), run, step.impl, lean=(floats, run_lean),
                optional=step.optional)


def _row_step_with_bytes(step: Step, o: str, grid: np.ndarray, opset: int) -> Step:
    """A RowGroup's step storing value o's bytes on `grid` as one more output (see
    hand_row_bytes); its lean run gives None for o's floats."""
    node, a = step.node, step.node.attrs
    outputs = a["outputs"]
    at = outputs.index(o)
    full = rows.RowKernel(a["nodes"], a["names"], outputs, a["consts"], opset, quads={o: grid})
    lean = rows.RowKernel(a["nodes"], a["names"], [x for x in outputs if x != o], a["consts"], opset, quads={o: grid})

    def by_ops(inputs) -> tuple:  # (what the kernel does not cover: the step's own run, the bytes by numpy)
        ys = step.run(*inputs)
        return (*ys, rows.quad_bytes(ys[at], grid))

    def run(*inputs):
        y = full(*inputs)
        return y if y is not None else by_ops(inputs)

    def run_lean(*inputs):
        y = lean(*inputs)
        if y is None:
            ys = by_ops(inputs)
            return (*ys[:at], None, *ys[at + 1:])
        return (*y[:at], None, *y[at:])

    return Step(Node(node.op_type, node.name, list(node.inputs), [*outputs, o + BYTES_SUFFIX], a), run,
                lean=((o,), run_lean))


def hand_layernorm_bytes(steps: list[Step]) -> list[Step]:
    """Steps where each LayerNorm with a grid whose output a static K-chunked or AMX int8
    layer (or group) reads as x, quantized to that same grid, also stores the bytes that layer's
    kernel reads (layernorm.layernorm_to_bytes: one pass, the byte beside the rounded
    float), as a second output `<output>#int8`; those layers take it as their last input
    and run on it (Int8Chunked.from_quantized) instead of quantizing x. Other readers,
    the residual adds among them, read the floats as before. The graph is unchanged:
    `Model.forward_source` shows the bytes."""
    readers: dict[str, list[int]] = {}
    for k, s in enumerate(steps):
        if s.node.inputs:
            readers.setdefault(s.node.inputs[0], []).append(k)
    out = list(steps)
    for i, s in enumerate(steps):
        n = s.node
        grid = Grid.of(n.attrs.get("quantize")) if n.op_type == "LayerNorm" and n.attrs.get("feature_major") else None
        if grid is None or grid.floats is None or len(n.outputs) != 1:
            continue
        takers = [k for k in readers.get(n.outputs[0], [])
                  if steps[k].node.op_type in ("QLinear", "QLinearGroup") and _reads_bytes(steps[k].impl, grid)]
        if not takers:
            continue
        q, eps = n.outputs[0] + BYTES_SUFFIX, n.attrs["epsilon"]
        tiled = TOKEN_TILES and all(isinstance(steps[k].impl, Int8Amx) for k in takers)
        out[i] = Step(Node(n.op_type, n.name, list(n.inputs), [n.outputs[0], q], n.attrs),
                      lambda x, scale, bias=None, eps=eps, grid=grid, tiled=tiled: layernorm_to_bytes(
                          x, scale, bias, eps, grid, tiled))
        log.debug("%s: stores the bytes its int8 readers' kernels read (they skip quantizing x): %s", n.name,
                  ", ".join(steps[k].node.name for k in takers))
        for k in takers:
            out[k] = _taking_bytes(steps[k], q)
    return out


def _taking_bytes(step: Step, q: str, without: str | None = None) -> Step:
    """An int8 layer's (or group's) step that takes x's bytes `q` as its last input (its run's
    `xq`); and runs without x itself (`without`, given None) where that is so."""
    r = step.node
    inputs = list(r.inputs) + [""] * (r.op_type == "QLinear" and len(r.inputs) < 2) + [q]
    return replace(step, node=Node(r.op_type, r.name, inputs, list(r.outputs), r.attrs),
                   optional=step.optional | ({without} if without else set()))
