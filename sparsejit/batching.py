"""A batch run as parts of a few samples each, where that gives every sample what the whole would.

The kernels take feature-major buffers: a value of n tokens is [features, n] with its rows
n (padded) floats apart, and each kernel walks it a tile of tokens at a time. With many
tokens a tile's rows lie far apart, and every kernel reads and writes them more slowly
than a tile of a short batch's (bench/README.md, forty-first session, has the numbers).
So `Parts.run` runs a batch of many short samples as parts of a few samples that hold
about `SAMPLE_TOKENS` tokens, and stacks their outputs.

Only where each sample's outputs depend on that sample's inputs alone: `separable`
proves it, once per input signature, from a run of the batch's last sample and one of the
whole batch, walking the compiled graph with what each value was in both. A sample's part
of a value is its block on axis 0. Every op on values made of the inputs' contents must
keep those blocks apart, by its rule in RULES: elementwise, row by row, per sequence
(attention), a view that leaves axis 0 in front, a reduction or gather on other axes. The
values made of constants and shapes alone are judged by their contents in the two runs:
shared by the samples, derived from the batch size (which may only give shapes, as
Reshape's), every block as one sample's, or sample numbers (b, or b times a block), which
may only pick each sample's own block (as a mask is gathered by them). Anything else (an
op without a rule, a reduction across samples, dynamic quantization's grid from all the
tokens) keeps the batch whole.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

SAMPLE_TOKENS = 128  # a part's tokens at most (its samples × an input's size past axis 0), one sample at least
MAX_SIGNATURES = 64  # input signatures whose verdict is kept
_INDEX_SIZE = 1 << 16  # the most elements an index (see _Walk) may have

ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Min", "Max", "Where", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "And", "Or", "Xor", "Not", "Cast", "Sqrt", "Erf", "Tanh", "Relu", "Sigmoid", "Neg", "Abs",
    "Exp", "Log", "Reciprocal", "Clip", "Identity", "Gelu", "Floor", "Ceil", "Round", "Sign", "IsNaN",
    "QuantizeLinear", "DequantizeLinear", "FakeQuantize", "Lookup", "Expand"})
# each row (the last axis) from that row's values: the Linear kernels, LayerNorm, the fused row ops
ROWWISE = frozenset({"Linear", "LinearGroup", "LayerNorm", "RowGroup", "MatMulIntegerB"})
VIEWS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "PrepareMask"})
# (op, input): where a value derived from the batch size may go (it gives the output's shape)
SHAPE_INPUTS = frozenset({("Reshape", 1), ("Expand", 1), ("ConstantOfShape", 0), ("PrepareMask", 1)})


def part_samples(feeds: dict[str, np.ndarray]) -> int:
    """Samples a part takes, or 0 where the batch runs whole: every input shares its size
    on axis 0 (the batch), a sample has at most SAMPLE_TOKENS tokens (an input's size past
    axis 0), and the batch more than two parts' worth. (Longer samples, or two parts, ran
    no faster apart.)"""
    arrays = list(feeds.values())
    if not arrays or any(a.ndim == 0 for a in arrays) or arrays[0].shape[0] < 3:
        return 0  # (two samples are at most two parts' worth)
    batch = arrays[0].shape[0]
    per = max(max(math.prod(a.shape[1:]) for a in arrays), 1)
    if any(a.shape[0] != batch for a in arrays) or per > SAMPLE_TOKENS or batch * per <= 2 * SAMPLE_TOKENS:
        return 0
    return SAMPLE_TOKENS // per


class Seen:
    """What a run's values were (`Executor.run`'s `observe`). For a run of one sample
    (`like` None): each one's shape and a copy. For a run of the batch, given the one
    sample's Seen (`like`) and the batch size: each value's shape, whether it equals the
    one sample's value where the shapes are the same, or its last sample's block does
    where axis 0 holds the batch (and whether every block does), and a copy of a small
    integer value whose last block does not (an index: `_Walk.kind`)."""

    def __init__(self, like: Seen | None = None, batch: int = 1):
        self.like, self.batch = like, batch
        self.values: dict[str, tuple] = {}  # name: (shape, copy) or (shape, same, every block same, copy or None)

    def __call__(self, name: str, value) -> None:
        if value is None:
            return
        mask = getattr(value, "mask", None)  # (a PreparedMask: the mask it holds)
        a = mask if isinstance(mask, np.ndarray) else value
        if isinstance(a, (np.generic, int, float)):  # (a shape's arithmetic may give numpy scalars)
            a = np.asarray(a)
        if not isinstance(a, np.ndarray):  # (a value the walk cannot judge: _Walk.kind refuses it)
            self.values[name] = (None, None) if self.like is None else (None, None, None, None)
        elif self.like is None:
            self.values[name] = (a.shape, np.array(a))
        else:
            shape, one = self.like.values.get(name, (None, None))
            split = shape is not None and len(shape) > 0 and a.shape[1:] == shape[1:] and \
                a.shape[0] == self.batch * shape[0]
            block = a[-shape[0]:] if split else a
            same = one is not None and one.dtype == a.dtype and one.shape == block.shape and \
                one.tobytes() == np.ascontiguousarray(block).tobytes()
            every = same and split and bool((a.reshape((self.batch,) + one.shape) == one).all())
            small = not same and a.dtype.kind in "iu" and a.size <= _INDEX_SIZE
            self.values[name] = (a.shape, same, every, np.array(a) if small else None)


class _Walk:
    """Each value's kind in the two runs: "batch" (its samples' blocks on axis 0, the last
    one as one sample's run made it), "tiled" (every block so), "shared" (the same in
    both), "sized" (the same shape, its contents depending on the batch size), "index"
    (integers whose block b is one sample's plus b times a step: `delta`), "differs" (any
    other block of a batch) or None (absent)."""

    def __init__(self, graph, batch: int, whole: Seen, one: Seen):
        self.graph, self.batch, self.whole, self.one = graph, batch, whole.values, one.values
        self.delta: dict[str, np.ndarray] = {}

    def kind(self, name: str, made: bool = False) -> str | None:
        """`made`: a value made of the model's inputs' contents, whose kind goes by its shape
        alone ("batch", or "whole" where axis 0 does not hold the batch): its samples'
        blocks differ, and floating point need not give the last one bit for bit."""
        if not name:
            return None
        if name in self.graph.constants and name not in self.whole:
            return "shared"
        if name not in self.whole or name not in self.one:
            return None
        (sb, same, _, copy), (s1, one) = self.whole[name], self.one[name]
        if sb is None or s1 is None:
            raise _Mixed(f"{name!r} is not an array")
        split = len(sb) == len(s1) > 0 and sb[0] == self.batch * s1[0] and sb[1:] == s1[1:]
        if made:
            return "batch" if split else "whole"
        if sb == s1:
            return "shared" if same else "sized"
        if not split:
            raise _Mixed(f"{name!r} has shape {sb} for the batch and {s1} for one sample")
        if same:
            return "tiled" if self.whole[name][2] else "batch"
        if copy is not None and self.batch > 1 and one.dtype == copy.dtype:
            blocks = copy.astype(np.int64).reshape((self.batch,) + one.shape)
            step = blocks[1] - blocks[0]
            if np.array_equal(blocks[0], one) and np.array_equal(
                    blocks, one + np.arange(self.batch).reshape((-1,) + (1,) * one.ndim) * step):
                self.delta[name] = step
                return "index"
        return "differs"

    def rank(self, name: str) -> int:
        if name in self.whole:
            return len(self.whole[name][0])
        return np.ndim(self.graph.constants[name]) if name in self.graph.constants else 0

    def content(self, name: str) -> np.ndarray | None:
        """One sample's value (a constant's, or the one sample's run's)."""
        if name in self.graph.constants:
            return np.asarray(self.graph.constants[name])
        return self.one.get(name, (None, None))[1]

    def block(self, name: str) -> int:
        """A sample's size on axis 0 of a batch value."""
        return self.one[name][0][0]


class _Mixed(Exception):
    """Why the samples of a batch may not run apart."""


def _gathers_own(w: _Walk, node, data: str, index: str) -> bool:
    """Whether a Gather on axis 0, or a GatherND, reads by `index` (kind "index") the block
    of `data` of its own sample: one sample's indices within its block, and block b's
    those plus b blocks (Gather), or plus b in the first coordinate (GatherND)."""
    step, one = w.delta[index], w.content(index)
    if one is None:
        return False
    if node.op_type == "Gather":
        size = w.block(data)
        return _axis(node, w.rank(data), 0) == 0 and bool(np.all(step == size)) and bool(
            np.all((one >= 0) & (one < size)))
    if node.op_type == "GatherND" and not node.attrs.get("batch_dims") and one.ndim and w.block(data) == 1:
        return bool(np.all(step[..., 0] == 1) and np.all(step[..., 1:] == 0) and np.all(one[..., 0] == 0))
    return False


def _axis(node, rank: int, default: int, key: str = "axis") -> int:
    a = node.attrs.get(key)
    a = default if a is None else int(a)
    return a + rank if a < 0 else a


def _axes(w: _Walk, node, rank: int, at: int) -> list[int] | None:
    """A reduction's or slice's axes (attribute, or input `at`), normalised; None: all of them."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > at and node.inputs[at]:
        if w.kind(node.inputs[at]) != "shared":
            return None
        axes = w.content(node.inputs[at])
    if axes is None:
        return None
    return [int(a) + rank if int(a) < 0 else int(a) for a in np.ravel(axes)]


def _static(node) -> bool:
    """Whether a QLinear (or each of a group's members) quantizes x on a fixed grid: dynamic
    quantization takes its grid from all the tokens."""
    members = node.attrs.get("members") or [node]
    return all(m.attrs.get("mode") == "static" for m in members)


def _same_rank(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    """Elementwise, broadcasting (and EmbedLayerNorm's sum of table rows): a batched input's
    axis 0 is the output's where its rank is the output's."""
    outs = [w.rank(o) for o in node.outputs if o in w.whole]
    top = max(outs) if outs and node.op_type != "EmbedLayerNorm" else max(ranks.values())
    return all(r == top for r in ranks.values())


def _rows(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    """Row by row (the last axis a row): batched inputs of one rank, the batch among the rows."""
    return (node.op_type not in ("QLinear", "QLinearGroup") or _static(node)) and \
        all(r >= 2 and r == ranks[batched[0]] for r in ranks.values())


def _attention(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    """q, k and v with the batch before their tokens and features, a batched mask of rank 4,
    the softmax not across axis 0."""
    return all(ranks[i] >= 3 and (k < 3 or ranks[i] == 4) for k, i in enumerate(node.inputs) if i in ranks) and (
        node.op_type == "Attention" or _axis(node, ranks.get(data, 3), -1) != 0)


def _transpose(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    perm = node.attrs.get("perm")
    return batched == [data] and (next(iter(perm)) if perm is not None else ranks[data] - 1) == 0


def _along(default: int | None):
    """An op along one axis (its `axis`, else `default`; None: Softmax's by opset), not axis 0."""
    def rule(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
        d = default if default is not None else -1 if w.graph.opset >= 13 else 1
        return _axis(node, w.rank(data), d) != 0 and len(set(ranks.values())) == 1
    return rule


def _gather(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    """A table's rows by batched indices (axis 0), or a batch's values on another axis."""
    axis = _axis(node, w.rank(data), 0)
    return axis == 0 if batched == [node.inputs[1]] else batched == [data] and axis != 0


def _reduce(at: int):
    """A reduction (or Slice) on its axes (attribute, or input `at`), none of them 0."""
    def rule(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
        if node.op_type in ("ArgMax", "ArgMin", "CumSum"):
            axes = [_axis(node, ranks[data], 0)] if node.op_type != "CumSum" else _axes(w, node, ranks[data], 1)
        else:
            axes = _axes(w, node, ranks[data], at)
        return batched == [data] and bool(axes) and 0 not in axes
    return rule


def _matmul(w: _Walk, node, batched: list[str], ranks: dict, data: str) -> bool:
    """A batched operand's axis 0 the product's: of the product's rank, and B's among its batch axes."""
    a, b = node.inputs[0], node.inputs[3 if node.op_type == "QLinearMatMul" else 1]
    top = max(w.rank(a), w.rank(b))
    return set(batched) <= {a, b} and all(ranks[i] == top for i in batched) and (b not in ranks or top >= 3) \
        and top >= 2


RULES = {
    **dict.fromkeys(ELEMENTWISE | {"EmbedLayerNorm"}, _same_rank),
    **dict.fromkeys(ROWWISE | {"QLinear", "QLinearGroup"}, _rows),
    **dict.fromkeys(("AttentionCore", "QAttentionCore", "Attention"), _attention),
    **dict.fromkeys(VIEWS, lambda w, node, batched, ranks, data: batched == [data]),
    "Transpose": _transpose,
    **dict.fromkeys(("Concat", "Split"), _along(0)),
    "GatherElements": lambda w, node, batched, ranks, data: data in ranks and _along(0)(w, node, batched, ranks, data),
    **dict.fromkeys(("Softmax", "LogSoftmax"), _along(None)),
    **dict.fromkeys(("QSoftmax", "LayerNormalization"), _along(-1)),
    "Gather": _gather,
    **dict.fromkeys(("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ArgMax",
                     "ArgMin", "CumSum"), _reduce(1)),
    "Slice": _reduce(3),
    **dict.fromkeys(("MatMul", "QLinearMatMul", "MatMulInteger"), _matmul),
    "Gemm": lambda w, node, batched, ranks, data: batched == [data] and not node.attrs.get("transA"),
}


def _check_op(w: _Walk, node, batched: list[str]) -> None:
    """Raise _Mixed unless `node` keeps each sample's block (axis 0) of its batched inputs
    apart, by its op's rule in RULES."""
    rule = RULES.get(node.op_type)
    if rule is None or not rule(w, node, batched, {i: w.rank(i) for i in batched},
                                node.inputs[0] if node.inputs else ""):
        raise _Mixed(f"{node.op_type} {node.name!r} may mix the samples")


def _check_node(w: _Walk, node, kinds: list, outs: list, reads: set) -> None:
    """Raise _Mixed unless `node` makes each sample's block of its outputs from that
    sample's blocks of its inputs (and from values the samples share). `reads`: its inputs
    made from the model's inputs (the rest come of constants and shapes alone)."""
    op, name = node.op_type, node.name
    if op in ("Shape", "Size"):
        return
    if "differs" in kinds:
        raise _Mixed(f"{op} {name!r} reads a value whose samples' blocks one sample's run did not make")
    if not reads:  # (arithmetic of shapes, sample numbers and shared values: each made value's kind tells)
        return
    for k, (i, kind) in enumerate(zip(node.inputs, kinds)):
        if kind == "whole":
            raise _Mixed(f"{op} {name!r} reads {i!r}, made of the inputs but not split on axis 0")
        if kind == "sized" and (op, k) not in SHAPE_INPUTS:
            raise _Mixed(f"{op} {name!r} reads {i!r}, which depends on the batch size")
        if kind == "index" and not (k == 1 and _gathers_own(w, node, node.inputs[0], i)):
            raise _Mixed(f"{op} {name!r} reads {i!r}, made of sample numbers, with the batch's values")
        if kind == "batch" and i not in reads:
            raise _Mixed(f"{op} {name!r} reads {i!r}, of no input but unlike one sample's in its samples' blocks")
    if any(k not in ("batch", "tiled") for k in outs if k):
        raise _Mixed(f"{op} {name!r} makes a value the samples of its batched inputs share")
    if "index" not in kinds:
        _check_op(w, node, [i for i, k in zip(node.inputs, kinds) if k in ("batch", "tiled")])


def separable(graph, batch: int, whole: Seen, one: Seen) -> str | None:
    """None where each sample's outputs come from its inputs alone (see the module's
    docstring), else why not. `whole`, `one`: what the values were in a run of the whole
    batch and of its last sample, on the same signature otherwise."""
    w = _Walk(graph, batch, whole, one)
    made = {s.name for s in graph.inputs}  # values made of the inputs' contents (not only their shapes)
    try:
        for name in made:
            if w.kind(name, True) != "batch":
                raise _Mixed(f"input {name!r} is not split on axis 0")
        for node in graph.nodes:
            reads = {i for i in node.inputs if i in made}
            carries = bool(reads) and node.op_type not in ("Shape", "Size")
            outs = [w.kind(o, carries) for o in node.outputs]
            if any(outs):  # (else not run: nothing the outputs need)
                _check_node(w, node, [w.kind(i, i in made) for i in node.inputs], outs, reads)
                if carries:
                    made.update(o for o in node.outputs if o)
        for name in graph.outputs:  # (an output of shapes alone: every sample's block one sample's)
            if w.kind(name, name in made) != ("batch" if name in made else "tiled"):
                raise _Mixed(f"output {name!r} is not split on axis 0")
    except _Mixed as e:
        return str(e)
    return None


class Parts:
    """Runs a model's batches whole or in parts (`part_samples`), as `separable` found for
    their signature; the verdicts of the last MAX_SIGNATURES signatures are kept."""

    def __init__(self, graph):
        self.graph = graph
        self.verdicts: OrderedDict[tuple, str | None] = OrderedDict()

    def run(self, executor, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        samples = part_samples(feeds)
        if not samples:
            return executor.run(feeds, outputs)
        signature = executor.signature(feeds)
        if signature not in self.verdicts:
            results, verdict = self._decide(executor, feeds, outputs, signature)
            if verdict is not None:
                return results
            # (run again in parts: a part may take another kernel than the whole batch, as
            # DenseLinear's GEMV for 16 tokens or fewer, whose sums round otherwise; so every
            # run of a signature, the first too, gives the same outputs)
        else:
            self.verdicts.move_to_end(signature)
            if self.verdicts[signature] is not None:
                return executor.run(feeds, outputs)
        batch = next(iter(feeds.values())).shape[0]
        parts = [executor.run({k: v[i:i + samples] for k, v in feeds.items()}, outputs)
                 for i in range(0, batch, samples)]
        return [np.concatenate(values) for values in zip(*parts)]

    def _decide(self, executor, feeds: dict[str, np.ndarray], outputs: tuple[str, ...], signature) -> tuple:
        """The batch's last sample's run, recording its values, then the whole batch's, and
        the verdict from the two: (the whole batch's outputs, the verdict)."""
        batch, everything = next(iter(feeds.values())).shape[0], tuple(self.graph.outputs)
        one, whole = Seen(), None
        try:
            executor.run({k: v[-1:] for k, v in feeds.items()}, everything, observe=one)
            whole = Seen(like=one, batch=batch)
        except Exception as e:  # noqa: BLE001 (then the batch's own run fails, or not, as it would have)
            verdict = f"its last sample alone fails: {e}"
        results = executor.run(feeds, everything, observe=whole)
        if whole is not None:
            try:
                verdict = separable(self.graph, batch, whole, one)
            except Exception as e:  # noqa: BLE001 (a value the walk did not foresee: the batch stays whole)
                verdict = f"not analysed: {type(e).__name__}: {e}"
        self.verdicts[signature] = verdict
        if len(self.verdicts) > MAX_SIGNATURES:
            self.verdicts.popitem(last=False)
        by_name = dict(zip(everything, results))
        return [by_name[o] for o in outputs], verdict
