"""Lowering: the passes after fusion that decide how the fused graph runs. Each is a
graph rewrite, so `Model.graph` and `Model.forward_source` show what runs.

- `group_linears`: Linear nodes that read the same input with the same activation and
  no residual (Q, K and V of every attention block) become one `LinearGroup` node: one
  kernel over their weights side by side, one call and one pass over xᵀ. Quantized
  Linear nodes that also quantize their input alike (both dynamic, or the same static
  scale and zero point) become one `QLinearGroup`: x is quantized once for all of them.
- `prepare_masks`: a mask that several AttentionCore nodes read gets a `PrepareMask` node
  before the first of them, and they read its output: the kernel's layout of the mask
  is made once per run rather than once per layer. The per-element steps that make the
  mask from the attention_mask input (Cast, then Sub and Mul by constants) go into it.
- `mark_layouts`: a LayerNormalization over the last axis with one output becomes a
  `LayerNorm` node, written feature-major when a Linear reads it (every Linear kernel,
  int8 too, works so), even from a token-major input (the embeddings): one transpose there rather
  than one per reader.
- `quantize_layernorms`: a LayerNorm or EmbedLayerNorm whose output is rounded to one grid
  (a FakeQuantize, and Linear layers quantizing to the same) rounds it as it stores it.
- `constants_second`: Add and Mul read a constant as their second input (a QDQ file's bias
  Add reads it first), so that fuse_rows takes them.
- `fuse_rows`: the per-element ops and means over the last axis that quantized graphs
  run between their Linear layers (a LayerNorm written out with a FakeQuantize after each
  step, GELU as lookups) become `RowGroup` nodes, one kernel each (kernels/rows.py).

Like the fusion passes, each returns a new graph and leaves the one it is given as it was.
"""

from __future__ import annotations

import heapq
from collections import Counter

import numpy as np

from .fold import merge_duplicates, shape_only_values
from .graph import Graph, Node
from .kernels import rows
from .ops import matmul_integer, op


def _with_nodes(graph: Graph, nodes: list[Node]) -> Graph:
    return Graph(nodes, graph.inputs, graph.outputs, graph.constants, graph.opset, graph.origin)


GROUPS = {"Linear": "LinearGroup", "QLinear": "QLinearGroup"}


def _group_key(n: Node) -> tuple | None:
    """Nodes with the same key compute side by side in one kernel; None: a node that doesn't."""
    if n.op_type not in GROUPS or n.attrs["residual"]:
        return None
    a, w = n.attrs, n.attrs["weight"]
    key = (n.op_type, n.inputs[0], a["activation"], w.shape[0], w.dtype.str)
    if n.op_type == "QLinear":  # x quantized once: alike for every member; outputs requantized by all or none
        key += (a["mode"], a.get("requantize") is None)
        key += tuple(None if v is None else (np.asarray(v).dtype.str, np.asarray(v).tobytes())
                     for v in (a["x_scale"], a["x_zero_point"]))
    return key


def group_linears(graph: Graph) -> Graph:
    groups: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        key = _group_key(n)
        if key is not None:
            groups.setdefault(key, []).append(n)
    first = {ms[0].name: ms for ms in groups.values() if len(ms) > 1}
    grouped = {m.name for ms in first.values() for m in ms}
    nodes = []
    for n in graph.nodes:
        if n.name in first:  # the group computes every member at the first one's place
            ms = first[n.name]
            nodes.append(Node(GROUPS[n.op_type], n.name, list(n.inputs), [m.outputs[0] for m in ms],
                              {"activation": n.attrs["activation"], "members": ms}))
        elif n.name not in grouped or n.op_type not in GROUPS:
            nodes.append(n)
    return _with_nodes(graph, nodes)


# The per-element ops an exported mask is made with from the attention_mask input, each with
# a scalar constant beside it but Cast ((1 - mask) · -10000, say), which PrepareMask applies
# itself: one step where there were three, in every run (a taped run's too). Also SDPA's
# exports' forms: Where(b, 0, -inf) of a bool mask ("Select"), Where(bool(x), min, x)
# ("MaskedFill", the bool a Cast or two of x), and the Expand of the mask to [batch, 1,
# queries, keys], which PrepareMask makes a broadcast view of the mask made unexpanded (every
# step is per element, so the Expand may come last).
MASK_STEPS = ("Cast", "Sub", "Mul", "Add", "Div", "Where", "Expand")
BOOL = 9  # ONNX's TensorProto.BOOL, a Cast's `to`


def _scalar(graph: Graph, name: str):
    c = graph.constants.get(name)
    return c if c is not None and np.size(c) == 1 and np.ndim(c) <= 1 else None


def _casts_to_bool(made: dict[str, Node], users: Counter, cond: str, x: str) -> list[Node] | None:
    """The Casts to bool that make `cond` from `x` (one, or two in a row), each read once."""
    casts = []
    while (n := made.get(cond)) is not None and n.op_type == "Cast" and n.attrs.get("to") == BOOL and len(casts) < 2:
        casts.append(n)
        if n.inputs[0] == x:
            return casts
        if users[n.inputs[0]] != 1:
            return None
        cond = n.inputs[0]
    return None


def _mask_steps(graph: Graph, mask: str, users: Counter, made: dict[str, Node]) -> tuple[str, tuple, list[Node], str]:
    """(the value the mask is made from, the steps from it, their nodes, the shape an Expand
    among them expands to or ""): the chain of MASK_STEPS ending at `mask` whose values
    nothing else reads (`made`: each value's node); (mask, (), [], "") if none."""
    outputs = set(graph.outputs)
    steps, chain, name, expand = [], [], mask, ""
    reads = {mask: users[mask]}  # (how many readers a value of the chain may have: its chain's)
    while (n := made.get(name)) is not None and n.op_type in MASK_STEPS and users[name] == reads.get(name, 1) and (
            name == mask or name not in outputs):
        if n.op_type == "Cast":
            if len(n.inputs) != 1:
                break
            steps.append((n.op_type, dict(n.attrs), None, False))
            name = n.inputs[0]
        elif n.op_type == "Expand":
            if expand or len(n.inputs) != 2:
                break
            expand, name = n.inputs[1], n.inputs[0]
        elif n.op_type == "Where":
            cond, a, b = n.inputs
            ca, cb = _scalar(graph, a), _scalar(graph, b)
            if ca is not None and cb is not None:
                steps.append(("Select", {}, (ca, cb), False))
                name = cond
            elif ca is not None and b not in graph.constants and (casts := _casts_to_bool(made, users, cond, b)):
                steps.append(("MaskedFill", {}, ca, False))
                chain += casts
                name, reads[b] = b, 2
            else:
                break
        else:
            consts = [graph.constants.get(i) for i in n.inputs]
            if len(n.inputs) != 2 or sum(c is not None and np.size(c) == 1 for c in consts) != 1:
                break
            first = consts[0] is not None and np.size(consts[0]) == 1
            steps.append((n.op_type, dict(n.attrs), consts[0 if first else 1], first))
            name = n.inputs[1 if first else 0]
        chain.append(n)
    return name, tuple(reversed(steps)), chain, expand


INT32 = 6  # ONNX's TensorProto.INT32, a Cast's `to`


def fold_id_casts(graph: Graph) -> Graph:
    """An EmbedLayerNorm whose ids are an int64 graph input Cast to int32, which only it
    reads (ONNX Runtime's optimizer leaves the int32 its EmbedLayerNormalization takes):
    the node reads the input itself, and its kernel makes the Cast (the `wrap` of each such
    table), where the Cast had run in Python before every run and its int32 ids were not
    the kernel's int64 (a copy of them on each call, which kept a taped run from launching
    the embeddings)."""
    made = {o: n for n in graph.nodes for o in n.outputs}
    readers: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in set(n.inputs):
            readers.setdefault(i, []).append(n)
    int64_inputs = {s.name for s in graph.inputs if np.dtype(s.dtype) == np.int64}
    gone, renamed = set(), {}  # (the Casts folded; the value each Shape of one reads instead)
    for n in graph.nodes:
        if n.op_type != "EmbedLayerNorm":
            continue
        for name in n.inputs[:-2]:
            c = made.get(name)
            others = [r for r in readers.get(name, []) if r is not n]
            if c is not None and c.op_type == "Cast" and c.attrs.get("to") == INT32 and c.inputs[0] in int64_inputs \
                    and name not in graph.outputs and all(r.op_type == "Shape" for r in others):
                gone.add(id(c))
                renamed[name] = c.inputs[0]  # (a Shape of it is the Shape of its input)
    nodes = []
    for n in graph.nodes:
        if id(n) in gone:
            continue
        if n.op_type == "EmbedLayerNorm" and any(i in renamed for i in n.inputs[:-2]):
            wrap = tuple(i in renamed for i in n.inputs[:-2])
            n = Node(n.op_type, n.name, [renamed.get(i, i) for i in n.inputs[:-2]] + n.inputs[-2:], list(n.outputs),
                     {**n.attrs, "wrap": wrap})
        elif n.op_type == "Shape" and n.inputs[0] in renamed:
            n = Node(n.op_type, n.name, [renamed[n.inputs[0]]] + n.inputs[1:], list(n.outputs), n.attrs)
        nodes.append(n)
    return _with_nodes(graph, nodes)


def prepare_masks(graph: Graph) -> Graph:
    readers = Counter(n.inputs[3] for n in graph.nodes if n.op_type == "AttentionCore" and len(n.inputs) > 3)
    shared = {name for name, count in readers.items() if name and count > 1}
    users = Counter(i for n in graph.nodes for i in n.inputs if i)
    made = {o: n for n in graph.nodes for o in n.outputs}
    folded: dict[str, tuple] = {}  # a mask read by attention only: (its source, steps) and the nodes gone
    for mask in shared:
        if users[mask] == readers[mask] and mask not in graph.outputs:
            source, steps, chain, expand = _mask_steps(graph, mask, users, made)
            if steps or expand:
                folded[mask] = (source, steps, {id(n) for n in chain}, expand)
    gone = {i for _, _, ids, _ in folded.values() for i in ids}
    prepared: dict[str, str] = {}
    nodes = []
    for n in graph.nodes:
        if id(n) in gone:
            continue
        mask = n.inputs[3] if n.op_type == "AttentionCore" and len(n.inputs) > 3 else ""
        if mask in shared:
            if mask not in prepared:
                prepared[mask] = f"{mask}::prepared"
                source, steps, _, expand = folded.get(mask, (mask, (), (), ""))
                nodes.append(Node("PrepareMask", f"{mask}::prepare", [source] + ([expand] if expand else []),
                                  [prepared[mask]], {"steps": steps} if steps else {}))
            n = Node(n.op_type, n.name, n.inputs[:3] + [prepared[mask]] + n.inputs[4:], list(n.outputs), n.attrs)
        nodes.append(n)
    return _with_nodes(graph, nodes)


def _linear_inputs(graph: Graph) -> set[str]:
    """The values some Linear kernel (float or int8, grouped or not) reads."""
    return {i for n in graph.nodes if n.op_type in ("Linear", "QLinear", *GROUPS.values()) for i in n.inputs}


def mark_layouts(graph: Graph) -> Graph:
    linear_inputs = _linear_inputs(graph)
    nodes = []
    for n in graph.nodes:
        outs = [o for o in n.outputs if o]
        if n.op_type == "LayerNormalization" and n.attrs.get("axis", -1) == -1 and outs == n.outputs[:1]:
            feature_major = True if outs[0] in linear_inputs else None  # None: as the input is laid out
            n = Node("LayerNorm", n.name, list(n.inputs), outs,
                     {"epsilon": n.attrs.get("epsilon", 1e-5), "feature_major": feature_major})
        nodes.append(n)
    return _with_nodes(graph, nodes)


def _same_grid(n: Node, grid: tuple) -> bool:
    """Whether a QLinear (or QLinearGroup) quantizes x statically with this scale and zero
    point: then it reads x rounded to that grid as x itself (the same bytes: (q - zero) ·
    scale, divided by the scale, rounds back to q - zero while the scale is a normal float
    whose 255 steps do not overflow)."""
    a = n.attrs["members"][0].attrs if n.op_type == "QLinearGroup" else n.attrs if n.op_type == "QLinear" else None
    scale = float(grid[0].reshape(-1)[0]) if grid[0].size == 1 else 0.0
    normal = np.finfo(np.float32).tiny <= scale <= 1e30
    return a is not None and normal and a["mode"] == "static" and all(
        v is not None and np.asarray(v).dtype == g.dtype and np.array_equal(np.asarray(v).reshape(-1), g.reshape(-1))
        for v, g in zip((a["x_scale"], a["x_zero_point"]), grid))


NORMS = ("LayerNorm", "EmbedLayerNorm")


def _absorbed_quantization(graph: Graph, n: Node, readers: dict) -> Node | None:
    """The FakeQuantize a LayerNorm can take into its stores: its output's one
    FakeQuantize, where every other reader quantizes it to the same grid."""
    out = n.outputs[0] if n.op_type in NORMS else None
    if not out or out in graph.outputs:
        return None
    fqs = [r for r in readers.get(out, []) if r.op_type == "FakeQuantize" and r.inputs[0] == out]
    if len(fqs) != 1 or not all(i in graph.constants for i in fqs[0].inputs[1:3]):
        return None
    grid = tuple(np.asarray(graph.constants[i]) for i in fqs[0].inputs[1:3])
    others = [r for r in readers[out] if r is not fqs[0]]
    return fqs[0] if all(_same_grid(r, grid) for r in others) else None


def quantize_layernorms(graph: Graph) -> Graph:
    """Static QDQ and SparseML files round each LayerNorm's output to the next Linear's
    grid (a FakeQuantize) for the residual, and the Linear quantizes the LayerNorm's output
    itself. Such a LayerNorm rounds its outputs as it stores them, and the Linear reads
    them rounded (quantizing a value on its own grid gives the same byte): one pass
    over the tensor instead of two. Its layout is then decided by all its readers."""
    readers = graph.consumers()
    linear_inputs = _linear_inputs(graph)
    absorbed = {n.name: fq for n in graph.nodes if (fq := _absorbed_quantization(graph, n, readers)) is not None}
    gone = {fq.name for fq in absorbed.values()}
    renamed = {fq.inputs[0]: fq.outputs[0] for fq in absorbed.values()}
    nodes = []
    for n in graph.nodes:
        fq = absorbed.get(n.name)
        if fq is not None:
            attrs = {**n.attrs, "quantize": tuple(graph.constants[i] for i in fq.inputs[1:3])}
            if n.op_type == "LayerNorm":  # (an EmbedLayerNorm writes feature-major always)
                linear = fq.outputs[0] in linear_inputs or n.outputs[0] in linear_inputs
                attrs["feature_major"] = True if linear else n.attrs["feature_major"]
            n = Node(n.op_type, n.name, list(n.inputs), list(fq.outputs), attrs)
        elif any(i in renamed for i in n.inputs):
            n = Node(n.op_type, n.name, [renamed.get(i, i) for i in n.inputs], list(n.outputs), n.attrs)
        if n.name not in gone:
            nodes.append(n)
    return _with_nodes(graph, nodes)


class _RowGroups:
    """The groups fuse_rows forms, as it forms them: each node's group, and whether a
    group would read, through nodes and groups outside it, what it writes."""

    def __init__(self, graph: Graph):
        self.graph, self.producer = graph, graph.producers()
        self.position = {id(n): k for k, n in enumerate(graph.nodes)}
        self.of: dict[int, int] = {}            # node → group
        self.members: dict[int, list[Node]] = {}

    def _made(self, nodes) -> list[Node]:
        """The nodes outside `nodes` that make what they read."""
        inside = {id(m) for m in nodes}
        return [p for m in nodes for i in m.inputs if i and (p := self.producer.get(i)) is not None
                and id(p) not in inside]

    def acyclic(self, nodes: list[Node]) -> bool:
        """Whether `nodes`, run as one, would not depend on themselves: no node they read
        depends on one of them, through nodes and other groups taken whole."""
        inside, first = {id(m) for m in nodes}, min(self.position[id(m)] for m in nodes)
        stack, seen = self._made(nodes), set()
        while stack:
            p = stack.pop()
            if id(p) in inside:
                return False
            if id(p) in seen:
                continue
            seen.add(id(p))
            g = self.of.get(id(p))
            if g is not None:
                seen.update(id(m) for m in self.members[g])
                stack += self._made(self.members[g])
            elif self.position[id(p)] > first:  # (a node before them all cannot read them)
                stack += [q for i in p.inputs if i and (q := self.producer.get(i)) is not None]
        return True

    def add(self, n: Node) -> None:
        """n into the group(s) it reads from, merged, where that stays acyclic; else into
        one of them; else a group of its own."""
        near = list(dict.fromkeys(self.of[id(p)] for i in n.inputs if i and (p := self.producer.get(i)) is not None
                                  and id(p) in self.of))
        for choice in ([near] if len(near) > 1 else []) + [[g] for g in near]:
            nodes = sorted([n, *(m for g in choice for m in self.members[g])], key=lambda m: self.position[id(m)])
            if self.acyclic(nodes):
                for g in choice[1:]:
                    del self.members[g]
                self.members[choice[0]] = nodes
                for m in nodes:
                    self.of[id(m)] = choice[0]
                return
        self.of[id(n)] = id(n)
        self.members[id(n)] = [n]


def _ordered(nodes: list[Node]) -> list[Node]:
    """`nodes` in an order where each comes after what it reads, else as they were."""
    producer = {o: k for k, n in enumerate(nodes) for o in n.outputs}
    waiting = [sum(1 for i in set(n.inputs) if i in producer) for n in nodes]
    readers: dict[int, list[int]] = {}
    for k, n in enumerate(nodes):
        for i in set(n.inputs):
            if i in producer:
                readers.setdefault(producer[i], []).append(k)
    ready = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        k = heapq.heappop(ready)
        out.append(nodes[k])
        for r in readers.get(k, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    return out


def fuse_rows(graph: Graph) -> Graph:
    """Groups of row ops (rows.row_op), each run by one RowKernel. Nodes are taken in
    order; each joins the groups it reads from (merged), or else one of them, where the
    group would not then read, through the nodes and groups outside it, what it writes.
    Each group stands where its first node stood, moved later where what it reads comes
    later. A group of one node stays as it was (its own kernel covers it), and so does
    arithmetic on shapes."""
    consts, shapes = graph.constants, shape_only_values(graph)
    groups = _RowGroups(graph)
    for n in graph.nodes:
        if rows.row_op(n, consts, graph.opset) and n.outputs[0] not in shapes:
            groups.add(n)
    readers, outputs = graph.consumers(), set(graph.outputs)
    nodes, gone = [], set()
    for g in groups.members.values():
        if len(g) < 2:
            continue
        inside = {id(m) for m in g}
        made = {o for m in g for o in m.outputs}
        names = list(dict.fromkeys(i for m in g for i in m.inputs if i and i not in consts and i not in made))
        outs = [o for m in g for o in m.outputs
                if o in outputs or any(id(r) not in inside for r in readers.get(o, []))]
        attrs = {"nodes": g, "names": names, "outputs": outs, "consts": {i: consts[i] for m in g for i in m.inputs
                                                                         if i in consts}}
        nodes.append((groups.position[id(g[0])], Node("RowGroup", g[0].name, names, outs, attrs)))
        gone |= inside
    nodes += [(groups.position[id(n)], n) for n in graph.nodes if id(n) not in gone]
    nodes.sort(key=lambda pn: pn[0])
    return _with_nodes(graph, _ordered([n for _, n in nodes]))


COMMUTING = ("Add", "Mul")


def constants_second(graph: Graph) -> Graph:
    """Add and Mul nodes whose first input is a constant and second is not read them the
    other way round (the same value, bit for bit): a QDQ file's bias Add(bias, x) then
    joins the row group of the per-element ops around it (rows.row_op takes a constant
    second)."""
    consts = graph.constants
    nodes = [Node(n.op_type, n.name, [n.inputs[1], n.inputs[0]], list(n.outputs), n.attrs)
             if n.op_type in COMMUTING and len(n.inputs) == 2 and n.inputs[0] in consts and n.inputs[1]
             and n.inputs[1] not in consts else n for n in graph.nodes]
    return _with_nodes(graph, nodes)


@op("MatMulIntegerB", fused=True)
def matmul_integer_b(a, a_zero_point=None, *, b, b_zero_point=None):
    """The fused node (integer_weights): MatMulInteger of a constant 2-D B, whose floats
    its step makes once (ops.integer_weight)."""
    return matmul_integer(a, b, a_zero_point, b_zero_point)


def integer_weights(graph: Graph) -> Graph:
    """A MatMulInteger the fusions left (a QOperator file's QGemm, contrib.qgemm) whose B is
    a 2-D constant and its zero point a constant or none: MatMulIntegerB, B in its
    attributes, whose step makes B's floats once (ops.integer_weight) where every run had
    converted and centred it."""
    consts, nodes = graph.constants, []
    for n in graph.nodes:
        a, b, az, bz = (list(n.inputs) + [""] * 4)[:4]
        if n.op_type == "MatMulInteger" and b in consts and np.ndim(consts[b]) == 2 and (not bz or bz in consts):
            n = Node("MatMulIntegerB", n.name, [a, az] if az else [a], list(n.outputs),
                     {"b": consts[b], "b_zero_point": consts[bz] if bz else None})
        nodes.append(n)
    return _with_nodes(graph, nodes)


LOWERING = (merge_duplicates, fold_id_casts, group_linears, prepare_masks, mark_layouts,
            quantize_layernorms, constants_second, fuse_rows, integer_weights)


def lower(graph: Graph) -> Graph:
    for p in LOWERING:
        graph = p(graph)
    return graph
