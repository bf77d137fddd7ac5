"""The executor: runs a plan's steps in order.

Shape-only values (see `fold.shape_only_values`) are computed on the first run of each
input-shape signature and kept in a small LRU cache; later runs with those shapes skip
their nodes. Each intermediate is dropped right after its last reader, so memory holds
only live activations.

The first run of a signature walks the steps over a name → array dict. Later runs call
a forward function generated for the signature: one line per step, values in local
variables, `del` after each value's last reader (see `forward_source`), which costs the
interpreter less per step than the dict walk. There, a block's two FFN layers run
together over token tiles when there are many tokens (`TokenChain`). A signature that
keeps coming back is then taped (sparsejit.tape): its kernel launches made again without
the Python between them.
"""

from __future__ import annotations

import dataclasses
import itertools
import linecache
import math
import threading
import time
from collections import OrderedDict

import numpy as np

from .fold import shape_only_values
from .graph import Graph
from .kernels.layout import feature_major_empty, transposed_copy, unit_token_stride
from .kernels.linear import ByTokens, DenseLinear
from .plan import Step

MAX_SHAPE_SIGNATURES = 32
MAX_TAPES = 8  # signatures with a tape of their runs (sparsejit.tape), each holding a run's buffers
# When a signature's runs are taped (sparsejit.tape): a tape costs about three runs to make
# and saves about TAPE_SAVES seconds a step on each run after it, so a signature is taped
# once it has run through its forward as many times as its tape would need replays to
# repay that (at its fastest run so far), and at least TAPE_AFTER times: a short run of a
# small model after a few runs, a long one (a batch of 32) after dozens.
TAPE_AFTER = 3
TAPE_SAVES = 10e-6
# A tape whose fastest of its first TAPE_TRIAL replays is not under TAPE_KEEP of the
# forward's fastest run is dropped (where most of a run stays Python, say, its outputs
# copied to the arena).
TAPE_TRIAL = 5
TAPE_KEEP = 0.98

# Consecutive token-wise Linear layers (a block's FFN: its inner value read by nothing
# else) run over tiles of TOKEN_TILE tokens once x has TILE_FROM tokens or more, so that
# a tile's inner value stays in cache between the two (12 KB a token for BERT-base; for
# 1024 tokens it went out to L3 and back). Each token's result is the same either way:
# these kernels compute a token from that token alone (dynamic INT8, whose scale comes
# from all the tokens, is not token-wise). What was measured, longer chains too:
# bench/README.md, seventh session.
TOKEN_TILE = 128
TILE_FROM = 1024
# In a chain, a layer whose output the next layer reads as x hands it over in the form the
# next kernel reads: a static int8 layer to the next static int8 layer as the bytes it
# quantizes x to (int8.Int8Chunked.quantized_for), a bf16 layer to the next of its kind as
# its bfloat16 rows or pair rows (bf16._HandsOver). The same results either way.
HANDOFF = True


def feature_major_rows(a: np.ndarray) -> np.ndarray | None:
    """a as a 2-D view [tokens, features] where a is a kernel's feature-major float32
    output (its transpose's rows contiguous), else None."""
    if a.flags.c_contiguous or a.dtype != np.float32 or a.ndim < 2:
        return None
    rows = a.view()
    try:
        rows.shape = (-1, a.shape[-1])  # fails rather than copy when the axes do not merge
    except AttributeError:
        return None
    return rows if unit_token_stride(rows) else None


def _unwatched(name: str, value) -> None:
    """What Executor.run calls with each value when nothing observes them."""


def _c_order(a):
    a = np.asarray(a)
    if a.flags.c_contiguous:
        return a
    rows = feature_major_rows(a)
    if rows is not None:  # (a kernel's feature-major output: the tiled transpose, not numpy's strided copy)
        return transposed_copy(rows).reshape(a.shape)
    return a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def step_failed(node, e: Exception) -> RuntimeError:
    """The error a run raises when a step fails: it names the node."""
    return StepFailed(f"node {node.name!r} ({node.op_type}) failed: {e}")


class StepFailed(RuntimeError):
    """A step's failure, already naming its node."""


def tokenwise(node) -> bool:
    """Whether a node's kernel computes each token's output from that token's input alone."""
    return (node.op_type == "Linear" or node.op_type == "QLinear" and node.attrs.get("mode") == "static"
            ) and len(node.outputs) == 1 and bool(node.outputs[0])


# The ops whose steps launch kernels (and which a taped run replays: sparsejit.tape).
KERNEL_OPS = frozenset({"Linear", "LinearGroup", "QLinear", "QLinearGroup", "LayerNorm", "AttentionCore",
                        "FakeQuantize", "EmbedLayerNorm"})


def _inputs_first(steps: list, ready: set[str]) -> list:
    """`steps` (in an order that runs) with the steps that launch no kernel and read only
    the model's inputs, constants and what such steps make moved to the front, each
    part in its order: the attention mask's arithmetic, which exporters place after the
    embeddings, then runs before the first kernel, and a taped run's launches make one
    stretch (sparsejit.tape) instead of a first launch alone."""
    ready, front, rest = set(ready), [], []
    for s in steps:
        if s.node.op_type not in KERNEL_OPS and all(not i or i in ready for i in s.node.inputs):
            front.append(s)
            ready.update(o for o in s.node.outputs if o)
        else:
            rest.append(s)
    return front + rest


def chain_length(steps: tuple, drops: tuple, i: int, outputs: tuple[str, ...]) -> int:
    """How many steps from i on run as one TokenChain (0: fewer than two): token-wise
    steps on sparse kernels, each value they make but the last read by later steps of the
    chain only. (A dense GEMM streams all its weights per call and tiles the tokens
    itself: by token tiles it read them once per tile, and took longer. A layer that
    takes AMX's dense GEMM at many tokens, ByTokens, is left whole for the same reason.)"""
    j = i
    while j < len(steps) and tokenwise(steps[j].node) and not steps[j].optional \
            and not isinstance(steps[j].impl, (DenseLinear, ByTokens)):
        j += 1
    while j - i >= 2:
        dropped = {name for d in drops[i:j] for name in d}
        inner = [steps[k].node.outputs[0] for k in range(i, j - 1)]
        if all(h in dropped and h not in outputs for h in inner):
            return j - i
        j -= 1
    return 0


class TokenChain:
    """Token-wise steps run together (see TOKEN_TILE): called with the values they read
    from outside, in `outside` order; returns the last step's output, for every token."""

    def __init__(self, steps: tuple):
        self.steps = steps
        made = {s.node.outputs[0] for s in steps}
        self.outside = list(dict.fromkeys(i for s in steps for i in s.node.inputs if i and i not in made))
        self.output = steps[-1].node.outputs[0]
        # steps k that hand their output to step k + 1 in the form its kernel reads (HANDOFF)
        self.handing = {k for k, (s, nxt) in enumerate(itertools.pairwise(steps))
                        if nxt.node.inputs[0] == s.node.outputs[0] and hasattr(s.impl, "hands_to")
                        and s.impl.hands_to(nxt.impl)}

    def __call__(self, *values: np.ndarray) -> tuple[np.ndarray]:
        env = dict(zip(self.outside, values))
        lead = env[self.steps[0].node.inputs[0]].shape[:-1]
        n = int(np.prod(lead))
        per_token = {k for k, v in env.items() if v is not None and v.ndim and v.shape[:-1] == lead}
        # (a value broadcast over the tokens, other than a vector, would need slicing as broadcast: run whole)
        if n < TILE_FROM or any(v is not None and v.ndim > 1 and k not in per_token for k, v in env.items()):
            return (self._run(env),)
        tokens = {k: env[k].reshape(n, env[k].shape[-1]) for k in per_token}
        out = None
        for t0 in range(0, n, TOKEN_TILE):
            y = self._run({**env, **{k: v[t0:t0 + TOKEN_TILE] for k, v in tokens.items()}})
            if out is None:
                out = feature_major_empty(y.shape[-1], n)
            out[:, t0:t0 + TOKEN_TILE] = y.T
        return (out.T.reshape(lead + (out.shape[0],)),)

    def _run(self, env: dict) -> np.ndarray:
        k = 0
        while k < len(self.steps):
            s = self.steps[k]
            if HANDOFF and k in self.handing:
                nxt = self.steps[k + 1]
                x = env[s.node.inputs[0]]
                r = env[nxt.node.inputs[1]] if len(nxt.node.inputs) > 1 and nxt.node.inputs[1] else None
                given = env[s.node.inputs[2]] if len(s.node.inputs) > 2 else None  # (plan.hand_layernorm_bytes)
                xq = _called(s.node, s.impl.quantized_for, x, nxt.impl, given)
                env[nxt.node.outputs[0]] = _called(nxt.node, nxt.impl.from_quantized, xq, x.shape[:-1], r)
                k += 2
                continue
            (env[s.node.outputs[0]],) = _called(s.node, s.run, *[env[i] if i else None for i in s.node.inputs])
            k += 1
        return env[self.output]


@dataclasses.dataclass
class Call:
    """One call of a forward: a step, or token-wise steps run as one TokenChain (`run`),
    from step `index` on; the values it reads and makes, and those no later call reads."""

    index: int
    steps: tuple
    run: object
    inputs: list
    outputs: list
    drops: list


def calls(steps: tuple, drops: tuple, outputs: tuple[str, ...]) -> list[Call]:
    """A schedule's steps as the forward calls them (`chain_length`)."""
    found, i = [], 0
    while i < len(steps):
        n = chain_length(steps, drops, i, outputs)
        if n:
            chain = TokenChain(steps[i:i + n])
            found.append(Call(i, steps[i:i + n], chain, list(chain.outside), list(steps[i + n - 1].node.outputs),
                              [name for d in drops[i:i + n] for name in d]))
        else:
            node = steps[i].node
            found.append(Call(i, steps[i:i + 1], steps[i].run, list(node.inputs), list(node.outputs), list(drops[i])))
        i += max(n, 1)
    return found


def _called(node, fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        raise step_failed(node, e) from e


class Executor:
    def __init__(self, graph: Graph, steps: list[Step]):
        self.graph = graph
        self.steps = steps
        self.shape_only = shape_only_values(graph)
        self._shape_values: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._schedules: dict[tuple, tuple] = {}
        self._forwards: dict[tuple, Forward] = {}  # by (signature, outputs), for signatures in _shape_values
        # by (signature, outputs): a Tape (sparsejit.tape), or None where there is none; made
        # after enough runs through the forward (TAPE_SAVES), for up to MAX_TAPES of them
        self._tapes: dict[tuple, object] = {}
        self._taping = threading.Lock()

    def _schedule(self, outputs: tuple[str, ...], skip_shape_only: bool) -> tuple:
        """Steps needed for `outputs`, and after each the names no later step reads."""
        key = (outputs, skip_shape_only)
        if key in self._schedules:
            return self._schedules[key]
        # The first run of a signature computes every shape-only value, so that later
        # runs, whatever outputs they ask for, find them all in the cache.
        live = set(outputs) if skip_shape_only else set(outputs) | self.shape_only
        chosen = []
        for s in reversed(self.steps):
            if not any(o in live for o in s.node.outputs):
                continue
            if skip_shape_only and all(o in self.shape_only for o in s.node.outputs if o):
                continue
            chosen.append(s)
            live.update(i for i in s.node.inputs if i)
        chosen = _inputs_first(chosen[::-1], {i.name for i in self.graph.inputs} | set(self.graph.constants)
                               | (self.shape_only if skip_shape_only else set()))
        keep = set(outputs) | set(self.graph.constants)
        if not skip_shape_only:
            keep |= self.shape_only  # the first run of a signature collects them
        for idx, s in enumerate(chosen):  # values only steps that run without them read: not made
            if s.lean is not None and not keep.intersection(s.lean[0]) and all(
                    name in later.optional for later in chosen[idx + 1:] for name in s.lean[0]
                    if name in later.node.inputs):
                chosen[idx] = dataclasses.replace(s, run=s.lean[1], lean=None)
        seen: set[str] = set()
        drops: list[list[str]] = [[] for _ in chosen]
        for idx in range(len(chosen) - 1, -1, -1):
            for name in chosen[idx].node.inputs:
                if name and name not in seen and name not in keep:
                    drops[idx].append(name)
                    seen.add(name)
            seen.update(chosen[idx].node.inputs)
        schedule = (tuple(chosen), tuple(tuple(d) for d in drops))
        self._schedules[key] = schedule
        return schedule

    def run(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...],
            profile: dict[str, float] | None = None, observe=None) -> list[np.ndarray]:
        """Run the steps `outputs` need; with `profile`, add each node's seconds to it by
        name; with `observe`, call it with each value's name and value as it is made (the
        inputs and shape-only values first). Either runs step by step, untaped."""
        signature = self.signature(feeds)
        shape_values = self._shape_values.get(signature)
        if shape_values is not None and profile is None and observe is None:
            self._shape_values.move_to_end(signature)
            return self._run_known(signature, outputs, feeds)
        env = dict(self.graph.constants)
        env.update(feeds)
        if shape_values is not None:
            self._shape_values.move_to_end(signature)
            env.update(shape_values)
        watch = observe or _unwatched
        for name in (*feeds, *(shape_values or ())):
            watch(name, env[name])
        steps, drops = self._schedule(outputs, shape_values is not None)
        for step, drop in zip(steps, drops):
            node = step.node
            args = [env[i] if i else None for i in node.inputs]
            try:
                if profile is None:
                    results = step.run(*args)
                else:
                    t0 = time.perf_counter()
                    results = step.run(*args)
                    profile[node.name] = profile.get(node.name, 0.0) + time.perf_counter() - t0
            except Exception as e:
                raise step_failed(node, e) from e
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
                    watch(name, value)
            for name in drop:
                env.pop(name, None)
        if shape_values is None:
            self._shape_values[signature] = {k: env[k] for k in self.shape_only if k in env}
            if len(self._shape_values) > MAX_SHAPE_SIGNATURES:
                self._forget(self._shape_values.popitem(last=False)[0])
        # Kernels may hand back transposed views; callers get plain C-ordered arrays.
        return [_c_order(env[o]) for o in outputs]

    def _forget(self, signature: tuple) -> None:
        """Drop a signature's forwards and tapes (its shape-only values are gone)."""
        for cache in (self._forwards, self._tapes):
            for key in [k for k in cache if k[0] == signature]:
                del cache[key]

    def _run_known(self, signature: tuple, outputs: tuple[str, ...], feeds: dict[str, np.ndarray]) -> list:
        """A run of a signature whose shape-only values are cached: its tape where it has
        one (and is free), else its generated forward."""
        key = (signature, outputs)
        tape = self._tapes.get(key)
        if tape is not None:
            start = time.perf_counter()
            results = tape(feeds)
            if results is not None:
                tape.fastest = min(tape.fastest, time.perf_counter() - start)
                forward = self._forwards.get(key)
                if tape.replays == TAPE_TRIAL and forward is not None and tape.fastest > TAPE_KEEP * forward.fastest:
                    self._tapes[key] = None  # (no faster than the forward: dropped, its arena freed)
                return results
            if tape.dead:
                self._tapes[key] = None
        forward = self.forward(signature, outputs)
        start = time.perf_counter()
        results = [_c_order(a) for a in forward(feeds)]
        forward.fastest = min(forward.fastest, time.perf_counter() - start)
        forward.runs += 1
        if key not in self._tapes and forward.nodes and forward.runs >= max(TAPE_AFTER, 3 * forward.fastest / (
                TAPE_SAVES * len(forward.nodes))):  # (no nodes: outputs of the shapes alone, nothing to tape)
            self._tape(key, feeds)
        return results

    def settled(self, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> bool:
        """Whether runs of these inputs' shapes (for these outputs) run as they will from now
        on: their tape made, and kept or dropped after its trial replays, or refused."""
        tape = self._tapes.get((self.signature(feeds), tuple(outputs)), False)
        return tape is None or tape is not False and (tape.dead or tape.replays >= TAPE_TRIAL)

    def _tape(self, key: tuple, feeds: dict[str, np.ndarray]) -> None:
        """A tape of a signature (sparsejit.tape), made by this thread while no other makes
        one."""
        from . import tape

        if key not in self._forwards or not self._taping.acquire(blocking=False):
            return
        try:
            shape_values = self._shape_values.get(key[0])  # (None: dropped by another thread's run)
            if key in self._tapes or shape_values is None:
                return
            made = sum(t is not None for t in self._tapes.values()) < MAX_TAPES
            steps, drops = self._schedule(key[1], True)
            self._tapes[key] = made and tape.build(steps, drops, key[1], feeds, self.graph.constants,
                                                   shape_values) or None
        finally:
            self._taping.release()

    @staticmethod
    def signature(feeds: dict[str, np.ndarray]) -> tuple:
        return tuple((name, a.shape) for name, a in feeds.items())

    def knows(self, signature: tuple) -> bool:
        """Whether a run has computed this signature's shape-only values (still cached)."""
        return signature in self._shape_values

    def forward(self, signature: tuple, outputs: tuple[str, ...]) -> Forward:
        """The generated forward function for a signature already run once (its shape-only
        values are in the cache), built on first use from the steps as they are then."""
        key = (signature, outputs)
        if key not in self._forwards:
            steps, drops = self._schedule(outputs, True)
            self._forwards[key] = Forward(steps, drops, outputs, [name for name, _ in signature],
                                          self._shape_values[signature], self.graph.constants)
        return self._forwards[key]


class Forward:
    """A schedule as straight-line Python: `forward(feeds)` returns the outputs (as the
    steps leave them). A value is read from, in order: the step that made it, the
    shape-only cache, the feeds, the constants, as the dict walk reads its environment.
    A failing step is named from the line it failed on."""

    def __init__(self, steps: tuple, drops: tuple, outputs: tuple[str, ...], feed_names: list[str],
                 shape_values: dict[str, np.ndarray], constants: dict[str, np.ndarray]):
        self.nodes = [s.node for s in steps]
        self.runs, self.fastest = 0, math.inf  # (runs and the fastest's seconds: Executor._run_known)
        namespace: dict[str, object] = {"undefined": {}}
        local: dict[str, str] = {}  # value name → local variable
        bound: dict[str, str] = {}  # value name → namespace name

        def read(name: str) -> str:
            if not name:
                return "None"
            if name in local:
                return local[name]
            if name in feed_names and name not in shape_values:
                return f"feeds[{name!r}]"
            holder = shape_values if name in shape_values else constants if name in constants else None
            if holder is None:  # read before any step makes it: the KeyError names it
                return f"undefined[{name!r}]"
            if name not in bound:
                bound[name] = f"c{len(bound)}"
                namespace[bound[name]] = holder[name]
            return bound[name]

        lines = [f"# sparsejit forward: {len(steps)} steps, outputs {list(outputs)}",
                 "def forward(feeds):"]
        self._step_at: dict[int, int] = {}  # line number → step index
        made = 0
        for call in calls(steps, drops, outputs):
            i = call.index
            namespace[f"step{i}"] = call.run
            what = (f"{len(call.steps)} steps by token tiles: " + ", ".join(
                f"{s.node.op_type} {s.node.name!r}" for s in call.steps) if isinstance(call.run, TokenChain)
                else f"{call.steps[0].node.op_type} {call.steps[0].node.name!r}")
            self._step_at[len(lines) + 1] = i  # (a TokenChain's failing step is named already: StepFailed)
            args = ", ".join(read(name) for name in call.inputs)
            targets = []
            for name in call.outputs:
                if name:
                    local[name] = f"v{made}"
                    made += 1
                targets.append(local[name] if name else "_")
            # Names from the file appear only as repr() literals: no name can end the line.
            lines.append(f"    {', '.join(targets)}, = step{i}({args})  # {what}")
            gone = [local.pop(name) for name in call.drops if name in local]
            if gone:
                lines.append(f"    del {', '.join(gone)}")
        lines.append(f"    return [{', '.join(read(name) for name in outputs)}]")
        self.source = "\n".join(lines) + "\n"
        # Registered with linecache so that tracebacks through it show its lines.
        self._filename = f"<sparsejit forward {id(self):x}>"
        linecache.cache[self._filename] = (len(self.source), None, self.source.splitlines(True), self._filename)
        exec(compile(self.source, self._filename, "exec"), namespace)  # noqa: S102 (built above, names as literals)
        self._fn = namespace["forward"]

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._fn(feeds)
        except Exception as e:
            tb, at = e.__traceback__, None
            while tb is not None:
                if tb.tb_frame.f_code is self._fn.__code__:
                    at = self._step_at.get(tb.tb_lineno)
                tb = tb.tb_next
            if at is None or isinstance(e, StepFailed):
                raise
            raise step_failed(self.nodes[at], e) from e

    def __del__(self):
        linecache.cache.pop(getattr(self, "_filename", None), None)
