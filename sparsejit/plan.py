"""Planning: pick an implementation for every node of the fused graph.

`Linear` nodes get a generated sparse kernel or the dense GEMM kernel. The choice is measured,
not guessed: both are timed over a representative token count on the first layer of
each kind of layer (`LayerTimings`), and the faster one is kept (`kernels="sparse"` or
`"dense"` forces one).
`Attention` gets its fused implementation; everything else runs the numpy reference op.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from .benchmark import time_calls
from .graph import Graph, Node
from .kernels.attention import PreparedMask, fused_attention
from .kernels.layernorm import layernorm
from .kernels.layout import feature_major_empty
from .kernels.linear import DenseLinear, OutputSlice, Pattern, SparseLinear, analyse, reference_linear
from .onnx_file import release
from .ops import NEEDS_OPSET, OPS

log = logging.getLogger("sparsejit")

KERNEL_CHOICES = ("auto", "sparse", "dense")
# Tokens the sparse/dense race is run over: one sequence of 128, BERT's common case.
PROBE_TOKENS = 128
# Stored-weight density above which "auto" takes the dense kernel without timing: the
# sparse kernel's rate per nonzero is at most about half the dense GEMM's (250 against
# 430-500 GFLOP/s at 80% sparsity here), so it cannot win there, and timing it on a
# nearly dense weight held several compressed copies of it (50 MB more peak memory for
# BERT-base with a few exact zeros).
DENSE_ABOVE = 0.75


@dataclass
class LayerPlan:
    """One Linear node's weight, what was learned about it and the kernel chosen."""

    name: str
    node: Node
    pattern: Pattern
    impl: SparseLinear | DenseLinear | OutputSlice
    reason: str
    timings_ms: dict = field(default_factory=dict)
    timing_reused: bool = False  # the sparse/dense decision reused an earlier layer's times

    @property
    def kind(self) -> str:
        return self.impl.kind

    @property
    def pattern_shape(self) -> tuple[int, int]:
        return self.pattern.in_features, self.pattern.out_features

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        a = self.node.attrs
        return reference_linear(x, a["weight"], a["bias"], a["activation"], residual)


@dataclass
class Step:
    node: Node
    run: Callable[..., tuple]


class LayerTimings:
    """Sparse and dense times per kind of layer: the cost model the planner decides by.

    A kind is (shape, block size, density to 1%, epilogue, threads); the first layer of a
    kind is timed, the others reuse its times (BERT-base's 73 layers are 4 kinds at one
    sparsity: 0.12 s of timing, every chunk size included). Nothing is kept across
    loads: a time measured while the machine was busy would otherwise decide every
    later load.
    """

    def __init__(self):
        self.table: dict[tuple, dict] = {}
        self.rng = np.random.default_rng(0)

    def lookup(self, pattern: Pattern, act: str, residual: bool, policy: str) -> tuple[tuple, dict | None]:
        key = (policy, pattern.in_features, pattern.out_features, pattern.block, round(pattern.density, 2), act, residual,
               numba.get_num_threads())
        return key, self.table.get(key)

    def measure(self, key: tuple, sparse: SparseLinear, dense: DenseLinear | None, residual: bool) -> dict:
        """Times the dense kernel (when given) and the sparse one at each K-chunk size."""
        shape = (sparse.in_features, sparse.out_features)
        # Feature-major and line-aligned, as the kernels read activations in a model: no
        # transposes in the timings, and no vector loads split across cache lines.
        x = self._probe(shape[0])
        r = self._probe(shape[1]) if residual else None
        fns = {variant.k_chunk: (lambda v=variant: v(x, r))
               for variant in (sparse.with_chunk(c) for c in chunk_candidates(sparse))}
        if dense is not None:
            fns["dense"] = lambda: dense(x, r)
        best = _race(fns)
        t = {"chunks": {c: ms for c, ms in best.items() if c != "dense"}}
        t["k_chunk"] = min(t["chunks"], key=t["chunks"].get)
        t["sparse"] = t["chunks"][t["k_chunk"]]
        if dense is not None:
            t["dense"] = best["dense"]
        self.table[key] = t
        return t

    def _probe(self, features: int) -> np.ndarray:
        xt = feature_major_empty(features, PROBE_TOKENS)
        xt[:] = self.rng.standard_normal(xt.shape, dtype=np.float32)
        return xt.T


def chunk_candidates(sparse: SparseLinear) -> list[int]:
    """K-chunk sizes worth timing: all inputs at once, and chunks of 64 to 512 inputs when
    smaller (64 inputs × 128 tokens of xᵀ fill 32 KB of L1; larger chunks suit sparser
    weights, whose rows have few nonzeros in a small chunk)."""
    k, block = sparse.in_features, sparse.pattern.block
    return [k] + [c for c in (64, 128, 256, 512) if c < k and c % block == 0]


def _race(fns: dict, rounds: int = 7) -> dict:
    """Fastest ms of each candidate over `rounds` rounds that call every candidate once,
    after one warm-up call each (a fresh kernel's compile). Interleaving spreads the
    machine's slow moments over all candidates instead of one."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], time_calls(fn, 1, warmup=0)[0] * 1e3)
    return best


def plan_linear(node: Node, policy: str, timings: LayerTimings) -> LayerPlan:
    a = node.attrs
    w, bias, act, residual = a["weight"], a["bias"], a["activation"], a["residual"]
    pattern = analyse(w)
    try:
        if policy == "dense" or pattern.nnz == w.size:
            why = "forced dense" if policy == "dense" else "no zeros to skip"
            return LayerPlan(node.name, node, pattern, DenseLinear(w, bias, act, residual), why)
        if policy == "auto" and pattern.stored > DENSE_ABOVE * w.size:
            why = (f"density {pattern.density:.3f}: above {DENSE_ABOVE} the dense kernel is faster "
                   "(the sparse one runs at most about half its FLOP rate), not timed")
            return LayerPlan(node.name, node, pattern, DenseLinear(w, bias, act, residual), why)
        sparse = SparseLinear(w, bias, act, residual, pattern)
        key, t = timings.lookup(pattern, act, residual, policy)
        reused = t is not None
        dense = None
        if t is None:
            dense = DenseLinear(w, bias, act, residual) if policy == "auto" else None
            t = timings.measure(key, sparse, dense, residual)
        chunked = f" in K-chunks of {t['k_chunk']}" if t["k_chunk"] < pattern.in_features else ""
        if policy == "sparse" or t["sparse"] < t["dense"]:
            impl = sparse.with_chunk(t["k_chunk"])
            impl.drop_csr()
            if policy == "sparse":
                return LayerPlan(node.name, node, pattern, impl, f"forced sparse{chunked}", t, reused)
        else:
            impl = dense or DenseLinear(w, bias, act, residual)  # built once, timed or not
        source = "measured on an earlier layer like it" if reused else "measured on this layer"
        why = (f"{source} over {PROBE_TOKENS} tokens: sparse {t['sparse']:.3f} ms{chunked}, "
               f"dense {t['dense']:.3f} ms")
        return LayerPlan(node.name, node, pattern, impl, why, t, reused)
    finally:
        release(w)  # the kernel holds its own (compressed) copy; the file-mapped pages can go


def _copy_released(value: np.ndarray, chunk_bytes: int = 8 << 20) -> np.ndarray:
    """An aligned copy of a file-mapped array, made a slice at a time with the mapped pages
    given back after each: copied whole, the copy and the pages read for it (94 MB each
    for BERT's word embeddings) were both resident at the load's peak."""
    out = np.empty(value.shape, value.dtype)
    if value.ndim == 0 or value.size == 0:
        out[...] = value
        return out
    step = max(1, chunk_bytes // max(1, value[:1].nbytes))
    for i in range(0, value.shape[0], step):
        out[i:i + step] = value[i:i + step]
        release(value)
    return out


def shared_input_groups(nodes: list[Node]) -> dict[str, list[Node]]:
    """Linear nodes that read the same input with the same epilogue and no residual (Q, K
    and V of every attention block), keyed by the first one's name, in graph order."""
    by_input: dict[tuple, list[Node]] = {}
    for n in nodes:
        if n.op_type == "Linear" and not n.attrs["residual"]:
            w = n.attrs["weight"]
            by_input.setdefault((n.inputs[0], n.attrs["activation"], w.shape[0], w.dtype.str), []).append(n)
    return {ms[0].name: ms for ms in by_input.values() if len(ms) > 1}


def plan_group(members: list[Node], policy: str, timings: LayerTimings) -> tuple[Node, list[LayerPlan]]:
    """One kernel for `members` over their weights side by side, planned (sparse or dense,
    K-chunks) like any Linear; a node producing every member's output; and a LayerPlan per
    member whose impl is its slice of the group's output."""
    ws = [m.attrs["weight"] for m in members]
    biases = [np.zeros(w.shape[1], np.float32) if m.attrs["bias"] is None else m.attrs["bias"]
              for m, w in zip(members, ws)]
    first = members[0]
    attrs = dict(first.attrs, weight=np.concatenate(ws, axis=1), bias=np.concatenate(biases).astype(np.float32))
    node = Node("Linear", first.name, list(first.inputs), [m.outputs[0] for m in members], attrs)
    group = plan_linear(node, policy, timings)
    # The step's node keeps no weights: the kernel has its own, the members' nodes theirs
    # (a dense copy here would be 7 MB per BERT-base attention block).
    node.attrs = {k: v for k, v in attrs.items() if k not in ("weight", "bias")}
    why = (f"one {group.kind} kernel for the {len(members)} layers reading this input (its time shows on the "
           f"first): {group.reason}")
    plans, start = [], 0
    for m, w in zip(members, ws):
        stop = start + w.shape[1]
        plans.append(LayerPlan(m.name, m, analyse(w), OutputSlice(group.impl, start, stop), why,
                               group.timings_ms, group.timing_reused))
        release(w)
        start = stop
    return node, plans


def _group_step(plans: list[LayerPlan]) -> Callable[..., tuple]:
    group = plans[0].impl.group
    cuts = [(p.impl.start, p.impl.stop) for p in plans]

    def run(x):
        y = group(x)
        return tuple(y[..., a:b] for a, b in cuts)

    return run


def _linear_step(layer: LayerPlan) -> Callable[..., tuple]:
    impl = layer.impl

    def run(x, residual=None):
        return (impl(x, residual),)

    return run


def _attention_step(node: Node) -> Callable[..., tuple]:
    a = node.attrs

    def run(q, kt, v, mask=None, scale=None):
        return (fused_attention(q, kt, v, mask, scale, a["scale_op"], a["axis"], a["opset"], a["nan_guard"]),)

    return run


def _prepare_mask_step(mask):
    return (PreparedMask(mask),)


def _layernorm_step(node: Node, feature_major: bool | None) -> Callable[..., tuple]:
    eps = node.attrs.get("epsilon", 1e-5)

    def run(x, scale, bias=None):
        return (layernorm(x, scale, bias, eps, feature_major),)

    return run


def _is_last_axis_layernorm(node: Node) -> bool:
    outs = [o for o in node.outputs if o]
    return node.op_type == "LayerNormalization" and node.attrs.get("axis", -1) == -1 and outs == node.outputs[:1]


def reference_step(node: Node, opset: int) -> Callable[..., tuple]:
    # evaluate()'s lookups, done once here rather than on every run
    fn = OPS[node.op_type]
    kwargs = dict(node.attrs, opset=opset) if node.op_type in NEEDS_OPSET else node.attrs

    def run(*args):
        out = fn(*args, **kwargs)
        return out if isinstance(out, tuple) else (out,)

    return run


def plan(graph: Graph, kernels: str = "auto",
         progress: Callable[[int, int, LayerPlan], None] | None = None) -> tuple[list[Step], list[LayerPlan]]:
    """A step per node; `progress(done, total, layer)` is called as each Linear is planned."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    timings = LayerTimings()
    steps, layers = [], []
    total = sum(n.op_type == "Linear" for n in graph.nodes)
    linear_inputs: set[str] = set()  # values a Linear reads (x or residual)
    groups = shared_input_groups(graph.nodes)
    in_group = {m.name for ms in groups.values() for m in ms}
    readers = Counter(n.inputs[3] for n in graph.nodes if n.op_type == "Attention" and len(n.inputs) > 3)
    shared_masks = {name for name, count in readers.items() if name and count > 1}
    prepared: dict[str, str] = {}
    for n in graph.nodes:
        if n.op_type == "Linear":
            if n.name in in_group:  # the group's step, at its first member, computes them all
                if n.name in groups:
                    node, new = plan_group(groups[n.name], kernels, timings)
                    steps.append(Step(node, _group_step(new)))
                else:
                    continue
            else:
                new = [plan_linear(n, kernels, timings)]
                steps.append(Step(n, _linear_step(new[0])))
            for layer in new:
                layers.append(layer)
                log.debug("%s: %s %dx%d density %.3f block %d: %s", layer.name, layer.kind, *layer.pattern_shape,
                          layer.pattern.density, layer.pattern.block, layer.reason)
                if progress is not None:
                    progress(len(layers), total, layer)
            linear_inputs.update(n.inputs)
        elif n.op_type == "Attention":
            mask = n.inputs[3] if len(n.inputs) > 3 else ""
            if mask in shared_masks:
                if mask not in prepared:  # before the first Attention that reads it
                    prepared[mask] = f"{mask}::prepared"
                    steps.append(Step(Node("PrepareMask", f"{mask}::prepare", [mask], [prepared[mask]]),
                                      _prepare_mask_step))
                n = Node(n.op_type, n.name, n.inputs[:3] + [prepared[mask]] + n.inputs[4:], n.outputs, n.attrs)
            steps.append(Step(n, _attention_step(n)))
        elif _is_last_axis_layernorm(n):
            steps.append(Step(n, None))  # its layout is settled below, once its readers are planned
        else:
            steps.append(Step(n, reference_step(n, graph.opset)))
    # A LayerNorm whose output a Linear reads writes it feature-major (both Linear kernels
    # work so), even from a token-major input (the embeddings): one transpose there
    # rather than one per reader.
    for i, step in enumerate(steps):
        if step.run is None:
            fm = True if step.node.outputs[0] in linear_inputs else None
            steps[i] = Step(step.node, _layernorm_step(step.node, fm))
    # Constants the reference ops read stay mapped from the file only where aligned:
    # numpy copies a whole unaligned array on every np.take (10 ms for BERT's embeddings).
    for name, value in graph.constants.items():
        if not value.flags.aligned:
            graph.constants[name] = _copy_released(value)
    return steps, layers
