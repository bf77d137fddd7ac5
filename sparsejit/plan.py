"""Planning: pick an implementation for every node of the fused graph.

`Linear` nodes get a generated sparse kernel or the dense GEMM kernel (`Planner`):
- by rule where the answer is clear from the density: dense with no zeros or above
  `DENSE_ABOVE` stored density, sparse at or below `SPARSE_BELOW`;
- from a saved plan (the cache's for this model and machine, or the user's plan file)
  for a layer whose pattern is the one the plan was made for;
- by measurement in between: both timed over a representative token count, in
  interleaved rounds, on the first layer of each kind (`race`).
The sparse kernel's K-chunk is measured (or taken from the saved plan). `kernels="sparse"`
or `"dense"` forces one. `Attention` gets its fused implementation; everything else
runs the numpy reference op.

Planning does not change the graph it is given: each step has a node of its own, and a
Linear step's node holds no dense weight (the kernel holds its own copy, compressed).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from .graph import Graph, Node
from .kernels.attention import PreparedMask, fused_attention
from .kernels.layernorm import layernorm
from .kernels.layout import feature_major_empty
from .kernels.linear import DenseLinear, OutputSlice, Pattern, SparseLinear, analyse, linear_epilogue, reference_linear
from .onnx_file import release
from .ops import NEEDS_OPSET, OPS
from .timing import race

log = logging.getLogger("sparsejit")

KERNEL_CHOICES = ("auto", "sparse", "dense")
# Tokens the kernels are timed over: one sequence of 128, BERT's common case.
PROBE_TOKENS = 128
# Stored-weight density above which "auto" takes the dense kernel without timing: the
# sparse kernel's rate per nonzero is at most about half the dense GEMM's, so it cannot
# win there (and timing it on a nearly dense weight held several compressed copies).
DENSE_ABOVE = 0.75
# ... and at or below which it takes the sparse kernel without timing the dense one: at
# a quarter of the weights the sparse kernel does about a quarter of the work at half
# the rate, clearly faster. Only densities in between are decided by timing.
SPARSE_BELOW = 0.25

# How a layer's kernel was decided, as `LayerPlan.decided_by` says it.
DECIDERS = ("rule", "measured", "forced", "plan file", "cached plan")


@dataclass
class LayerPlan:
    """One Linear node's weight, what was learned about it and the kernel chosen."""

    name: str
    node: Node
    pattern: Pattern
    impl: SparseLinear | DenseLinear | OutputSlice
    reason: str
    timings_ms: dict = field(default_factory=dict)
    timing_reused: bool = False  # measured on an earlier layer of the same kind
    decided_by: str = "rule"     # one of DECIDERS
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

    def reference(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        a = self.node.attrs
        return reference_linear(x, self.weight, a["bias"], a["activation"], residual)

    def probe_check(self) -> tuple[np.ndarray, np.ndarray]:
        """(the kernel's output, the loaded weight's) for the probe input: they differ when
        the weights the kernel holds are not the ones loaded."""
        a = self.node.attrs
        r = np.zeros((1, self.pattern.out_features), np.float32) if a["residual"] else None
        got = self.impl(probe_input(self.pattern.in_features), r)
        return got, linear_epilogue(self.probe, a["bias"], a["activation"], r)


def probe_input(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).standard_normal((1, in_features), dtype=np.float32)


def weight_probe(weight: np.ndarray) -> np.ndarray:
    """x₀·W for a fixed random x₀: kept at load (one value per output), it lets `check`
    tell whether a kernel computes with the weights the file gave without keeping them."""
    return probe_input(weight.shape[0]) @ weight


@dataclass
class Step:
    node: Node
    run: Callable[..., tuple]


@dataclass(frozen=True)
class Decision:
    """A Linear layer's kernel and K-chunk (None: all inputs at once), and how and why."""

    kernel: str
    k_chunk: int | None
    decided_by: str
    why: str
    timings_ms: dict = field(default_factory=dict)
    reused: bool = False

    def saved(self, pattern: Pattern) -> dict:
        """The plan entry: the decision and the pattern it was made for."""
        return {"kernel": self.kernel, "k_chunk": self.k_chunk, "decided_by": self.decided_by, "why": self.why,
                "in": pattern.in_features, "out": pattern.out_features, "block": pattern.block,
                "stored": pattern.stored, "nnz": pattern.nnz}


def _fits(entry: dict, pattern: Pattern) -> bool:
    """Whether a saved entry was made for this pattern, and names a kernel that can run it."""
    try:
        same = (entry["in"], entry["out"], entry["block"], entry["stored"], entry["nnz"]) == \
            (pattern.in_features, pattern.out_features, pattern.block, pattern.stored, pattern.nnz)
        chunk = entry["k_chunk"]
        runnable = entry["kernel"] == "dense" or (entry["kernel"] == "sparse" and (
            chunk is None or (isinstance(chunk, int) and 0 < chunk and chunk % pattern.block == 0)))
        return same and runnable
    except (KeyError, TypeError):
        return False


class Planner:
    """Decides every Linear layer's kernel (see the module docstring), and collects the
    decisions as a plan to save.

    `saved` is a plan's layers (`saved_plans.read_plan`) and `saved_by` what to call
    decisions taken from it. Measurements are kept per kind of layer (shape, block,
    density to 1%, epilogue, threads) for the rest of this load: BERT-base's 73 layers
    are 4 kinds at one sparsity."""

    def __init__(self, kernels: str = "auto", saved: dict | None = None, saved_by: str = "cached plan"):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.kernels = kernels
        self.saved = saved or {}
        self.saved_by = saved_by
        self.kinds: dict[tuple, dict] = {}
        self.decisions: dict[str, dict] = {}  # the plan to save, by layer name
        self.rng = np.random.default_rng(0)

    def rule(self, pattern: Pattern) -> tuple[str | None, str, str]:
        """(kernel or None to measure, decided_by, why) from the policy and the density alone."""
        size = pattern.in_features * pattern.out_features
        if self.kernels == "dense":
            return "dense", "forced", "forced dense"
        if pattern.nnz == size:
            return "dense", "rule", "no zeros to skip"
        if self.kernels == "sparse":
            return "sparse", "forced", "forced sparse"
        density = pattern.stored / size
        if density > DENSE_ABOVE:
            return "dense", "rule", (f"stored density {density:.3f} > {DENSE_ABOVE}: the dense kernel is faster "
                                     "(the sparse one runs at most about half its FLOP rate), not timed")
        if density <= SPARSE_BELOW:
            return "sparse", "rule", f"stored density {density:.3f} <= {SPARSE_BELOW}: sparse, dense not timed"
        return None, "measured", ""

    def decide(self, name: str, pattern: Pattern, act: str, residual: bool,
               sparse: Callable[[], SparseLinear], dense: Callable[[], DenseLinear]) -> Decision:
        """The decision for one layer; `sparse()` and `dense()` build its kernels when a
        measurement needs them."""
        kernel, by, why = self.rule(pattern)
        entry = self.saved.get(name)
        if entry is not None and kernel != "dense" and not _fits(entry, pattern):
            (log.warning if self.saved_by == "plan file" else log.debug)(
                "%s: the %s's entry for layer %r was made for another weight pattern; deciding afresh",
                name, self.saved_by, name)
        if kernel == "dense" or (entry is not None and not _fits(entry, pattern)) or \
                (by == "forced" and entry is not None and entry["kernel"] != kernel):
            entry = None
        if entry is not None:  # kept as it was saved, with how it was first decided
            self.decisions[name] = entry
            return Decision(entry["kernel"], entry["k_chunk"], self.saved_by,
                            f"{self.saved_by}, first {entry.get('decided_by')}: {entry.get('why', '')}")
        if kernel == "dense":
            d = Decision("dense", None, by, why)
        else:
            d = self.measure(pattern, act, residual, kernel is None, sparse, dense, by, why)
        self.decisions[name] = d.saved(pattern)
        return d

    def measure(self, pattern: Pattern, act: str, residual: bool, against_dense: bool,
                sparse: Callable[[], SparseLinear], dense: Callable[[], DenseLinear], by: str, why: str) -> Decision:
        key = (self.kernels, pattern.in_features, pattern.out_features, pattern.block, round(pattern.density, 2),
               act, residual, against_dense, numba.get_num_threads())
        t, reused = self.kinds.get(key), key in self.kinds
        if t is None:
            t = self.kinds[key] = self.time_kernels(sparse(), dense() if against_dense else None, residual)
        chunk = t["k_chunk"] if t["k_chunk"] < pattern.in_features else None
        chunked = f" in K-chunks of {chunk}" if chunk else ""
        source = "an earlier layer like it" if reused else "this layer"
        timed = f"measured on {source} over {PROBE_TOKENS} tokens: sparse {t['sparse']:.3f} ms{chunked}"
        if against_dense:
            kernel = "sparse" if t["sparse"] < t["dense"] else "dense"
            return Decision(kernel, chunk, "measured", f"{timed}, dense {t['dense']:.3f} ms", t, reused)
        return Decision("sparse", chunk, by, f"{why}; K-chunk {timed}", t, reused)

    def time_kernels(self, sparse: SparseLinear, dense: DenseLinear | None, residual: bool) -> dict:
        """Times the dense kernel (when given) and the sparse one at each K-chunk size."""
        # Feature-major and line-aligned, as the kernels read activations in a model: no
        # transposes in the timings, and no vector loads split across cache lines.
        x = self._probe(sparse.in_features)
        r = self._probe(sparse.out_features) if residual else None
        fns = {variant.k_chunk: (lambda v=variant: v(x, r))
               for variant in (sparse.with_chunk(c) for c in chunk_candidates(sparse))}
        if dense is not None:
            fns["dense"] = lambda: dense(x, r)
        ms = race(fns)
        t = {"chunks": {c: v for c, v in ms.items() if c != "dense"}}
        t["k_chunk"] = min(t["chunks"], key=t["chunks"].get)
        t["sparse"] = t["chunks"][t["k_chunk"]]
        if dense is not None:
            t["dense"] = ms["dense"]
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


def _without_weight(node: Node) -> Node:
    """The node a planned Linear step carries: its kernel holds the weight."""
    return Node(node.op_type, node.name, list(node.inputs), list(node.outputs),
                {k: v for k, v in node.attrs.items() if k != "weight"})


def plan_linear(node: Node, planner: Planner) -> LayerPlan:
    a = node.attrs
    w, bias, act, residual = a["weight"], a["bias"], a["activation"], a["residual"]
    pattern = analyse(w)
    built: dict[str, SparseLinear | DenseLinear] = {}

    def sparse() -> SparseLinear:
        if "sparse" not in built:
            built["sparse"] = SparseLinear(w, bias, act, residual, pattern)
        return built["sparse"]

    def dense() -> DenseLinear:
        if "dense" not in built:
            built["dense"] = DenseLinear(w, bias, act, residual)
        return built["dense"]

    try:
        d = planner.decide(node.name, pattern, act, residual, sparse, dense)
        if d.kernel == "sparse":
            impl = sparse().with_chunk(d.k_chunk)
            impl.drop_csr()
        else:
            impl = dense()
        return LayerPlan(node.name, _without_weight(node), pattern, impl, d.why, d.timings_ms, d.reused, d.decided_by,
                         weight_probe(w))
    finally:
        release(w)  # the kernel holds its own (compressed) copy; the file-mapped pages can go


def shared_input_groups(nodes: list[Node]) -> dict[str, list[Node]]:
    """Linear nodes that read the same input with the same epilogue and no residual (Q, K
    and V of every attention block), keyed by the first one's name, in graph order."""
    by_input: dict[tuple, list[Node]] = {}
    for n in nodes:
        if n.op_type == "Linear" and not n.attrs["residual"]:
            w = n.attrs["weight"]
            by_input.setdefault((n.inputs[0], n.attrs["activation"], w.shape[0], w.dtype.str), []).append(n)
    return {ms[0].name: ms for ms in by_input.values() if len(ms) > 1}


def plan_group(members: list[Node], planner: Planner) -> tuple[Node, list[LayerPlan]]:
    """One kernel for `members` over their weights side by side, planned (sparse or dense,
    K-chunks) like any Linear; a node producing every member's output; and a LayerPlan per
    member whose impl is its slice of the group's output."""
    ws = [m.attrs["weight"] for m in members]
    biases = [np.zeros(w.shape[1], np.float32) if m.attrs["bias"] is None else m.attrs["bias"]
              for m, w in zip(members, ws)]
    first = members[0]
    attrs = dict(first.attrs, weight=np.concatenate(ws, axis=1), bias=np.concatenate(biases).astype(np.float32))
    group = plan_linear(Node("Linear", first.name, list(first.inputs), [m.outputs[0] for m in members], attrs),
                        planner)
    # The step's node keeps no weights: the kernel has its own (a dense copy here would
    # be 7 MB per BERT-base attention block).
    node = Node("Linear", first.name, group.node.inputs, group.node.outputs,
                {k: v for k, v in attrs.items() if k not in ("weight", "bias")})
    why = (f"one {group.kind} kernel for the {len(members)} layers reading this input (its time shows on the "
           f"first): {group.reason}")
    plans, start = [], 0
    for m, w in zip(members, ws):
        stop = start + w.shape[1]
        plans.append(LayerPlan(m.name, _without_weight(m), analyse(w), OutputSlice(group.impl, start, stop), why,
                               group.timings_ms, group.timing_reused, group.decided_by, weight_probe(w)))
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

    wanted = len(node.outputs)

    def run(*args):
        out = fn(*args, **kwargs)
        # As many values as the node names: an op's optional outputs (LayerNormalization's
        # mean and inverse std) are dropped when the node does not ask for them.
        return out[:wanted] if isinstance(out, tuple) else (out,)

    return run


def plan(graph: Graph, planner: Planner | None = None,
         progress: Callable[[int, int, LayerPlan], None] | None = None) -> tuple[list[Step], list[LayerPlan]]:
    """A step per node; `progress(done, total, layer)` is called as each Linear is planned.
    The decisions are left in `planner.decisions`."""
    planner = planner or Planner()
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
                    node, new = plan_group(groups[n.name], planner)
                    steps.append(Step(node, _group_step(new)))
                else:
                    continue
            else:
                new = [plan_linear(n, planner)]
                steps.append(Step(new[0].node, _linear_step(new[0])))
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
    return steps, layers
