"""The public API: `load(path).run(inputs)`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from . import saved_plans
from .batching import Parts
from .choose import KERNEL_CHOICES, PRECISIONS, Chooser
from .executor import Executor
from .fold import fold_constants, quantized_weight
from .fuse import fuse
from .graph import Graph, InputSpec, ModelIO, import_onnx
from .heap import keep_buffers_mapped
from .kernels import prebuild
from .kernels.bf16 import has_bf16
from .kernels.compile import host_cpu
from .lower import lower
from .onnx_file import detach, release
from .ops import bind
from .plan import LayerPlan, Step
from .plan import plan as plan_steps
from .threads import ThreadScope, resolve_threads

MODES = ("compiled", "reference")
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                           "QLinearMatMul"})


def _prebuild_kinds(graph: Graph, precision: str) -> tuple[str, ...]:
    """What the first load's helper builds for this graph (kernels/prebuild.py, BUILDS):
    "float" always; "int8" with quantized ops, and "qoperator" with QLinearMatMul or a
    MatMul of two dequantized activations (quantized attention, which runs on QOperator
    attention's kernel: fuse.qdq_products); "fp32" (float32 Linear kernels) without, or
    with two or more float MatMul or Gemm of a constant weight (more than a float head);
    "bf16" for precision="bf16"."""
    quantized = any(n.op_type in QUANTIZED_OPS for n in graph.nodes)
    dequantized = {o for n in graph.nodes if n.op_type == "DequantizeLinear" and n.inputs[0] not in graph.constants
                   for o in n.outputs}
    qoperator = any(n.op_type == "QLinearMatMul" or n.op_type == "MatMul" and set(n.inputs[:2]) <= dequantized
                    for n in graph.nodes)
    float_linears = sum(n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1 and n.inputs[1] in graph.constants
                        for n in graph.nodes)
    return (("float",) + ("int8",) * quantized + ("qoperator",) * qoperator
            + ("fp32",) * (not quantized or float_linears >= 2) + ("bf16",) * (precision == "bf16"))


@dataclass
class LayerCheck:
    layer: str
    kind: str
    shape: tuple[int, int]
    density: float
    max_abs_err: float
    max_ref: float
    ok: bool
    fp32_err: float | None = None  # bf16 layers: max |error| at the probe against the float32 weights loaded


class CheckReport(list):
    """Rows of `LayerCheck`; `str()` is a table, `.ok` is whether every row passed."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self)

    def __str__(self) -> str:
        head = f"{'layer':<48} {'kernel':<11} {'in x out':>11} {'density':>8} {'max |err|':>10} {'max |ref|':>10}  ok"
        lines = [head, "-" * len(head)]
        for r in self:
            lines.append(f"{r.layer[-48:]:<48} {r.kind:<11} {f'{r.shape[0]}x{r.shape[1]}':>11} "
                         f"{r.density:>8.3f} {r.max_abs_err:>10.2e} {r.max_ref:>10.2e}  {'yes' if r.ok else 'NO'}")
        for r in self:
            if r.fp32_err is not None:
                lines.append(f"{r.layer[-48:]:<48} bf16 against its float32 weights: max |err| {r.fp32_err:.2e}")
        return "\n".join(lines)


class Model:
    """A loaded ONNX model, compiled for this machine. Build it with `sparsejit.load`.

    >>> import sparsejit, numpy as np
    >>> m = sparsejit.load(sparsejit.default_model_path())
    >>> ids = np.ones((1, 8), np.int64)
    >>> out = m.run({"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids})
    >>> out[0].shape
    (1, 8, 256)
    """

    def __init__(self, graph: Graph, steps: list[Step], layers: list[LayerPlan], mode: str, num_threads: int,
                 plan: dict | None = None, io: ModelIO | None = None, precision: str = "fp32"):
        self.graph = graph
        self.io = io  # the file's declared inputs, outputs and metadata (`InferenceSession` reports them)
        self.layers = layers
        self.mode = mode
        self.num_threads = num_threads
        self.precision = precision  # "fp32", or "bf16" (see load): what the model was loaded to compute in
        self.plan = plan or {}  # the kernel decisions by layer name, as `save_plan` writes them
        self._threads = ThreadScope(num_threads)
        self._executor = Executor(graph, steps)
        self._parts = Parts(graph)  # (a batch of many tokens run as parts of a few samples: sparsejit.batching)

    def __repr__(self) -> str:
        inputs = ", ".join(s.describe() for s in self.graph.inputs)
        kinds: dict[str, int] = {}
        for lp in self.layers:
            kinds[lp.kind] = kinds.get(lp.kind, 0) + 1
        layers = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none compiled"
        return (f"<sparsejit.Model {self.graph.origin} ({self.mode}): inputs {inputs}; outputs "
                f"{', '.join(self.output_names)}; {len(self.layers)} linear layers ({layers}); "
                f"{self.num_threads} threads>")

    @property
    def inputs(self) -> list[InputSpec]:
        return list(self.graph.inputs)

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.inputs]

    @property
    def output_names(self) -> list[str]:
        return list(self.graph.outputs)

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
            output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run on numpy inputs (a dict by name, or a list in `input_names` order).

        Returns the outputs in graph-output order, like ONNX Runtime's `run(None, feed)`,
        or only `output_names`, in that order (None or an empty list: all of them).
        """
        feeds, wanted = self._validate(inputs), self._wanted(output_names)
        with self._threads:
            return self._parts.run(self._executor, feeds, wanted)

    def forward_source(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                       output_names: Sequence[str] | None = None) -> str:
        """The generated Python that `run` calls for inputs of these shapes (after the
        first run of a shape, which also computes its shape-only values): one line per
        step, naming the node. Runs the model once on `inputs` if their shapes are new."""
        feeds, wanted = self._validate(inputs), self._wanted(output_names)
        signature = self._executor.signature(feeds)
        if not self._executor.knows(signature):
            with self._threads:
                self._executor.run(feeds, wanted)
        return self._executor.forward(signature, wanted).source

    def values(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray],
               names: Sequence[str]) -> dict[str, np.ndarray]:
        """The tensors `names` of the compiled graph (a node's output, such as a layer's
        input `layer.node.inputs[0]`, or a graph input or output) computed on `inputs`, by
        name. An unknown name is a ValueError naming it."""
        feeds = self._validate(inputs)
        known = set(self.graph.producers()) | {s.name for s in self.graph.inputs} | set(self.graph.constants)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no tensor named {unknown} in the compiled graph of {self.graph.origin}")
        names = list(dict.fromkeys(names))
        if not names:
            return {}
        with self._threads:
            return dict(zip(names, self._executor.run(feeds, tuple(names))))

    def run_layer(self, layer: LayerPlan, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """One of `layers`' chosen kernel on x [..., in] (plus `residual` [..., out] where
        the layer adds one), with the model's threads."""
        with self._threads:
            return layer.impl(x, residual)

    def _wanted(self, output_names) -> tuple[str, ...]:
        wanted = tuple([output_names] if isinstance(output_names, str) else output_names or ())
        if not wanted:  # as ONNX Runtime: None or [] asks for every output
            return tuple(self.graph.outputs)
        unknown = [o for o in wanted if o not in self.graph.outputs]
        if unknown:
            raise ValueError(f"unknown output name(s) {unknown}; the model's outputs are {self.output_names}")
        return wanted

    def profile(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], runs: int = 5) -> dict[str, float]:
        """Median seconds per node over `runs` runs (after one warm-up), by node name."""
        feeds = self._validate(inputs)
        outputs = tuple(self.graph.outputs)
        samples: list[dict[str, float]] = []
        with self._threads:
            self._executor.run(feeds, outputs)
            for _ in range(runs):
                p: dict[str, float] = {}
                self._executor.run(feeds, outputs, profile=p)
                samples.append(p)
        names = {n for s in samples for n in s}
        return {n: float(np.median([s.get(n, 0.0) for s in samples])) for n in names}

    def _validate(self, inputs) -> dict[str, np.ndarray]:
        specs = self.graph.inputs
        expected = [s.name for s in specs]
        if isinstance(inputs, Mapping):
            missing = [n for n in expected if n not in inputs]
            extra = [n for n in inputs if n not in expected]
            if missing or extra:
                raise ValueError(f"input names do not match: expected {expected}, got {list(inputs)}"
                                 + (f"; missing {missing}" if missing else "")
                                 + (f"; unknown {extra}" if extra else ""))
            arrays = [inputs[n] for n in expected]
        elif isinstance(inputs, (list, tuple)):
            if len(inputs) != len(specs):
                raise ValueError(f"expected {len(specs)} inputs ({', '.join(expected)}), got {len(inputs)}")
            arrays = list(inputs)
        else:
            raise TypeError(f"inputs must be a dict name -> array or a list of arrays, got {type(inputs).__name__}")
        feeds, sizes = {}, {}
        for spec, a in zip(specs, arrays):
            a = np.asarray(a)
            if a.dtype != spec.dtype:
                raise ValueError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {a.dtype} "
                                 f"(expected {spec.describe()})")
            if spec.dims and a.ndim != len(spec.dims):
                raise ValueError(f"input {spec.name!r}: expected rank {len(spec.dims)} ({spec.describe()}), "
                                 f"got shape {a.shape}")
            for axis, (d, n) in enumerate(zip(spec.dims, a.shape)):
                if isinstance(d, int) and d > 0 and d != n:
                    raise ValueError(f"input {spec.name!r}: expected size {d} on axis {axis} "
                                     f"({spec.describe()}), got shape {a.shape}")
                if isinstance(d, str):
                    prev = sizes.setdefault(d, (n, spec.name))
                    if prev[0] != n:
                        raise ValueError(f"input {spec.name!r}: dimension {d!r} is {n} on axis {axis}, "
                                         f"but {prev[0]} in input {prev[1]!r}")
            feeds[spec.name] = a
        return feeds

    def check(self, tokens: int = 37, seed: int = 0) -> CheckReport:
        """Run every Linear layer's chosen kernel against the dense numpy product of
        the same weights, on random inputs; one row per layer with the max error."""
        rng = np.random.default_rng(seed)
        report = CheckReport()
        for layer in self.layers:
            k, m = layer.pattern_shape
            x = rng.standard_normal((tokens, k), dtype=np.float32)
            r = rng.standard_normal((tokens, m), dtype=np.float32) if layer.node.attrs["residual"] else None
            with self._threads:
                # The kernel against the weights it holds, at `tokens`; and against the
                # weights as loaded, at the probe input kept then.
                got_probe, want_probe = layer.probe_check()
                got, want = layer.impl(x, r).ravel(), layer.reference(x, r).ravel()
            fp32_err = None
            if layer.bf16:  # rounded to bfloat16: the probe is compared with the float32 weights apart
                fp32_err = float(np.max(np.abs(got_probe - want_probe), initial=0))
                ok = bool(np.all(np.abs(got_probe - want_probe) <= layer.bf16_bound()))
            else:
                got, want = np.concatenate([got, got_probe.ravel()]), np.concatenate([want, want_probe.ravel()])
                ok = True
            err = float(np.max(np.abs(got - want))) if want.size else 0.0
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            ok = ok and bool(np.allclose(got, want, atol=1e-4, rtol=1e-4))
            report.append(LayerCheck(layer.name, layer.kind, (k, m), layer.pattern.density, err, scale, ok,
                                     fp32_err))
        return report

    def save_plan(self, path: str | os.PathLike) -> None:
        """Write this model's kernel decisions as a plan file for `load(..., plan=path)`."""
        saved_plans.write_plan(Path(path), self.plan, "", private=False)

    def kernel_source(self, layer: str | int) -> str:
        """The generated source of one layer's kernel (by index or node name), or of the
        attention kernel for `layer="attention"`."""
        if layer == "attention":
            from .kernels.attention import amx_fits
            from .kernels.attention import kernel_source as attention_source

            node = next((n for n in self.graph.nodes if n.op_type == "AttentionCore"), None)
            if node is None:
                raise KeyError("the model has no fused AttentionCore node")
            # The variant for a mask that varies by query, as exported BERT masks do
            # ([batch, 1, seq, seq]); a [batch, 1, 1, seq] mask runs the per-key variant.
            bf16 = self.precision == "bf16"
            amx = bf16 and amx_fits(64)
            note = "# bf16 on AMX tiles for head sizes of whole tile rows (32 bfloat16), else vdpbf16ps\n" if amx else ""
            return note + attention_source(mask_per_query=True, nan_guard=node.attrs["nan_guard"], bf16=bf16, amx=amx)
        found = self.layers[layer] if isinstance(layer, int) else next(
            (lp for lp in self.layers if lp.name == layer), None)
        if found is None:
            raise KeyError(f"no Linear layer named {layer!r}; layers: {[lp.name for lp in self.layers]}")
        return f"# layer {found.name}: {found.kind} kernel, {found.reason}\n" + found.impl.source


def load(model: str | os.PathLike | bytes | onnx.ModelProto, *, num_threads: int | None = None,
         kernels: str = "auto", mode: str = "compiled", plan: str | os.PathLike | None = None,
         progress: Callable[[int, int, LayerPlan], None] | bool | None = None, precision: str = "fp32") -> Model:
    """Load an ONNX model (a file, its bytes, or a ModelProto) and compile it for this machine.

    - `num_threads`: threads for this model's kernels (default: all cores), set around
      each of its runs; BLAS runs single-threaded inside them.
    - `kernels`: "auto" (sparse or dense per layer, by rule or measurement), "sparse" or "dense".
    - `precision`: "fp32" (the default: results match ONNX Runtime's float32), or "bf16":
      Linear layers and attention's products round their operands to bfloat16 and sum in
      float32 (AVX512-BF16's `vdpbf16ps`, kernels/bf16.py: sparse weights stored as pairs
      of consecutive inputs where they pair well, as 4-block ones do, else as pairs of
      any two of a row's inputs); LayerNorm and the rest stay float32. On a CPU
      without AVX512-BF16, "bf16" warns and loads in fp32. `check()` reports each bf16
      layer's error against its float32 weights.
    - `mode`: "compiled", or "reference" to run the unfused graph on the numpy reference
      ops only (the whole-graph oracle).
    - `plan`: a JSON file of kernel decisions: used when it exists, written when it does
      not. Without it the plan is kept in the kernel cache, so that the same model on
      the same machine and threads gets the same plan at every load.
    - `progress`: True for a progress display on stderr (a rich bar with the time left
      where rich is installed, plain lines otherwise), or a callable `progress(done,
      total, layer)` called as each Linear layer gets its kernel.

    The loaded model holds its own copy of everything it reads from the file (the file
    may change or go). Loading changes two process-wide settings, once: Numba's threading
    layer (tbb where installed) and glibc malloc's thresholds (README, Guarantees). On an
    empty kernel cache it starts a helper process compiling beside it (kernels/prebuild.py;
    `SPARSEJIT_PREBUILD=0` for none).

    >>> import sparsejit
    >>> m = sparsejit.load(sparsejit.default_model_path())
    >>> m.input_names
    ['input_ids', 'attention_mask', 'token_type_ids']
    """
    if progress is True:
        from .console import Steps

        name = Path(model).name if isinstance(model, (str, os.PathLike)) else "the model"
        with Steps(enabled=True) as steps:
            steps.start(f"reading and fusing {name}")
            return load(model, num_threads=num_threads, kernels=kernels, mode=mode, plan=plan,
                        progress=steps.layer_callback(), precision=precision)
    progress = progress or None  # False: none
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    precision = _usable_precision(precision)
    threads = resolve_threads(num_threads)
    keep_buffers_mapped()
    with ThreadScope(threads):
        graph = import_onnx(model)
        if mode == "compiled":
            prebuild.start(_prebuild_kinds(graph, precision))
        io = graph.io
        graph = fold_constants(graph, keep=quantized_weight if mode == "compiled" else None)
        if mode == "reference":
            graph = Graph(graph.nodes, graph.inputs, graph.outputs, detach(graph.constants), graph.opset, graph.origin)
            steps = [Step(n, bind(n.op_type, n.attrs, graph.opset, len(n.outputs))) for n in graph.nodes]
            return Model(graph, steps, [], mode, threads, io=io)
        graph = lower(fuse(graph))
        chooser, save = _chooser(graph, threads, kernels, plan, precision)
        steps, layers = plan_steps(graph, chooser, progress, done_with=release)
        save(chooser.decisions)
    planned = Graph([s.node for s in steps], graph.inputs, graph.outputs, detach(graph.constants), graph.opset,
                    graph.origin)
    return Model(planned, steps, layers, mode, threads, chooser.decisions, io, precision)


def _usable_precision(precision: str) -> str:
    """`precision` if this CPU runs it, else "fp32" with a warning."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and not has_bf16():
        warnings.warn("precision='bf16' needs AVX512-BF16, which this CPU does not have "
                      f"({host_cpu()[0]}): loading in fp32", RuntimeWarning, stacklevel=3)
        return "fp32"
    return precision


def _chooser(graph: Graph, threads: int, kernels: str, plan_file,
             precision: str = "fp32") -> tuple[Chooser, Callable[[dict], None]]:
    """A kernel chooser holding the saved plan (the user's file, else the cache's), and
    what to call with the decisions once made to keep them."""
    key = saved_plans.structure_key(graph, threads, kernels, precision)
    if plan_file is not None:
        path = Path(plan_file)
        saved = saved_plans.read_plan(path, trusted_only=False)

        def save(decisions: dict) -> None:
            if saved is None:
                saved_plans.write_plan(path, decisions, key, private=False)

        return Chooser(kernels, saved, "plan file", precision), save
    path = saved_plans.cached_plan_path(key)
    saved = None if path is None else saved_plans.read_plan(path, trusted_only=True)

    def keep(decisions: dict) -> None:
        if path is not None and decisions != saved:
            saved_plans.write_plan(path, decisions, key, private=True)

    return Chooser(kernels, saved, "cached plan", precision), keep
