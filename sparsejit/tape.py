"""A run's kernel launches, taped once per input shape and launched again.

A run of a small input spends much of its time in Python around the kernels: each step
checks its arguments, makes its output arrays, fills the kernel's rows of calls and
launches them. Once a shape signature has run, those rows are the same every time but
for the arrays' addresses. A tape fixes the addresses: every buffer the kernels write
comes from one arena, laid out once so that buffers whose lives do not overlap share
memory (as the heap would reuse them), and the rows are filled once. A taped run then
copies the inputs into the tape's own buffers and launches the rows in order, in one
Numba call per stretch of kernels; what is not a kernel launch (the embedding's lookup,
the mask's arithmetic, any op without a kernel) runs as before, its outputs copied to
where the kernels read them.

What makes a step taped (a "launch" step), and so skipped as Python on a taped run:
- its op is one whose Python side only lays out arrays by their shapes (LAUNCH_OPS;
  an int8 layer's dynamic scale is made by its kernels, a FakeQuantize, QuantizeLinear or
  DequantizeLinear only of a fixed scale and zero point);
- it launched kernels only through `launch.run`, whose drivers return nothing;
- each array its kernels got is the arena's, the tape's inputs, a model constant or a
  kernel's own (weights), or the output of a step that runs on a taped run, and each of
  its outputs is the arena's;
- attention's mask is a PreparedMask (whose layouts the tape makes again in place from
  the mask's new values: `PreparedMask.refill`) or none, and its scales constants or shape values;
- what it checks after its launches (the embeddings' ids: `launch.checked`) the replay
  checks after its launches too, raising as the step would.
Steps that only take views (VIEW_OPS, an output sharing its input's memory; a Gather only
of a constant index) are skipped too: their outputs are the same memory on every run.
Everything else runs in Python.

A tape is checked before it is used: the arena is filled with 0xFF bytes (NaN as float32),
the run is replayed on the same inputs, and its outputs must equal the taped run's bit
for bit. A step that wrote into a buffer outside its kernels (a copy made in numpy) would
leave the fill in place and fail that check; then there is no tape and runs go on as
before. So does any step that fails to tape (`NotTaped`).

A tape holds its arena (about a run's peak of activations) for the life of its shape
signature, and runs one call at a time: a run that finds it busy (another thread in it)
runs as before.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.array_utils import byte_bounds

from .executor import KERNEL_OPS, TILE_FROM, Call, TokenChain, _c_order, calls, feature_major_rows, step_failed
from .kernels import launch, layout
from .kernels.attention import PreparedMask

log = logging.getLogger("sparsejit")

# SPARSEJIT_TAPE=0 in the environment: no tapes (every run as before).
ENABLED = os.environ.get("SPARSEJIT_TAPE", "1") != "0"
# Inputs of this many elements or more get no tape (their runs are long beside the Python
# saved), nor does a run whose arena would pass MAX_ARENA_BYTES.
MAX_INPUT_ELEMENTS = 4096
MAX_ARENA_BYTES = 128 << 20
# (and the per-element ops, their row groups and QOperator attention, whose kernels take their constants
# as they are: a QuantizeLinear's or DequantizeLinear's only of a fixed scale and zero point)
LAUNCH_OPS = KERNEL_OPS | {"QuantizeLinear", "DequantizeLinear", "Lookup", "QAttentionCore", "RowGroup"}
SCALED_OPS = ("FakeQuantize", "QuantizeLinear", "DequantizeLinear")  # (their scale and zero point inputs 1, 2)
VIEW_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Gather"})


class NotTaped(Exception):
    """Why a schedule gets no tape."""


@dataclass
class _Group(Call):
    """A call of the forward (executor.calls), and how a tape takes it."""

    kind: str = "host"  # "launch", "view", "host" or "mask" (a PreparedMask, refilled)
    launches: list = field(default_factory=list)
    checks: list = field(default_factory=list)  # (flags, check): the _Recorder's


def _groups(steps: tuple, drops: tuple, outputs: tuple) -> list[_Group]:
    return [_Group(**vars(c)) for c in calls(steps, drops, outputs)]


def _walk(groups: list[_Group], values: dict, keep: bool, seen=None) -> None:
    """Run the groups over `values` (dropping each value after its last reader unless
    `keep`); `seen(group, args, results)` after each."""
    for g in groups:
        args = [values[name] if name else None for name in g.inputs]
        results = g.run(*args)
        for name, value in zip(g.outputs, results):
            if name:
                values[name] = value
        if seen is not None:
            seen(g, args, results)
        if not keep:
            for name in g.drops:
                values.pop(name, None)


class _Trace:
    """The first pass's allocator: numpy buffers, each one's life in ticks of a clock
    that counts allocations and frees."""

    def __init__(self):
        self.clock = 0
        self.sizes: list[int] = []
        self.lives: list[list[int]] = []

    def __call__(self, shape: tuple, dtype) -> np.ndarray:
        a = layout.aligned_empty(shape, dtype, lasting=True)
        owner = a
        while owner.base is not None:
            owner = owner.base
        k = len(self.sizes)
        self.sizes.append(a.nbytes)
        self.lives.append([self._tick(), math.inf])
        weakref.finalize(owner, self._freed, k)  # (when the memory goes: no view of it is left)
        return a

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def _freed(self, k: int) -> None:
        self.lives[k][1] = self._tick()


def _layout(sizes: list[int], lives: list[list[int]]) -> tuple[list[int], int]:
    """Offsets in one arena for buffers of these sizes and lives (first fit, in order of
    allocation; buffers whose lives overlap never overlap), and the arena's size."""
    events = sorted([(life[0], 1, k) for k, life in enumerate(lives)] +
                    [(life[1], 0, k) for k, life in enumerate(lives) if life[1] != math.inf])
    live: list[tuple[int, int, int]] = []  # (offset, end, k), by offset
    offsets, top = [0] * len(sizes), 0
    for _, alloc, k in events:
        if not alloc:
            live = [b for b in live if b[2] != k]
            continue
        size, at = -(-max(sizes[k], 1) // layout.ALIGN) * layout.ALIGN, 0
        for offset, end, _ in live:
            if offset - at >= size:
                break
            at = max(at, end)
        offsets[k] = at
        live.append((at, at + size, k))
        live.sort()
        top = max(top, at + size)
    return offsets, top


class _Planned:
    """The second pass's allocator: the k-th buffer at its offset in the arena."""

    def __init__(self, arena: np.ndarray, offsets: list[int], sizes: list[int]):
        self.arena, self.offsets, self.sizes, self.k = arena, offsets, sizes, 0

    def __call__(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = math.prod(shape) * dtype.itemsize
        k = self.k
        if k >= len(self.sizes) or self.sizes[k] != n:
            raise NotTaped("the second pass allocated differently from the first")
        self.k += 1
        return self.arena[self.offsets[k]:self.offsets[k] + n].view(dtype).reshape(shape)


class _Recorder:
    """A group's launches, and whether any was made in a way a tape cannot hold."""

    def __init__(self):
        self.launches: list[tuple] = []
        self.checks: list[tuple] = []  # (flags, check) after its launches (launch.checked)
        self.untaped = False

    def check(self, flags: np.ndarray, check) -> None:
        self.checks.append((flags, check))

    def __call__(self, part: int, calls: np.ndarray, args, result) -> None:
        if args is None or result is not None:
            self.untaped = True
        else:
            self.launches.append((part, calls, args))


def _with_hooks(allocate, record, fn):
    layout.allocate_with(allocate)
    launch.record_with(record)
    try:
        return fn()
    finally:
        layout.allocate_with(None)
        launch.record_with(None)


def _arrays_in(obj, out: list, seen: dict, depth: int = 4) -> None:
    """The numpy arrays reachable from obj (attributes, closures and defaults, containers)
    within `depth` steps, but not through thread-local objects (a thread's scratch)."""
    if depth < 0 or seen.get(id(obj), -1) >= depth or isinstance(obj, (threading.local, str, bytes, int, float,
                                                                         type, type(sys))):
        return
    seen[id(obj)] = depth
    if isinstance(obj, np.ndarray):
        out.append(obj)
        return
    for v in _parts(obj):
        _arrays_in(v, out, seen, depth - 1)


def _parts(obj) -> list:
    """What obj holds: a container's items, a function's closure and defaults, a bound
    method's object, an object's attributes."""
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, dict):
        return list(obj.values())
    if hasattr(obj, "__self__") and hasattr(obj, "__func__"):  # (a bound method)
        return [obj.__self__, obj.__func__]
    if isinstance(obj, types.FunctionType):
        cells = []
        for cell in obj.__closure__ or ():
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # (an empty cell)
                continue
        return cells + list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
    return list(vars(obj).values()) if hasattr(obj, "__dict__") else []


def _module_arrays() -> list[np.ndarray]:
    """The kernels' module-level constant arrays (what a kernel gets for a residual it has
    not, say)."""
    return [v for name, mod in list(sys.modules.items()) if name.startswith("sparsejit.kernels.")
            for v in vars(mod).values() if isinstance(v, np.ndarray)]


class _Memory:
    """Address ranges a taped kernel may read or write."""

    def __init__(self):
        self.spans: list[tuple[int, int]] = []

    def add(self, a: np.ndarray) -> None:
        if a.size:
            self.spans.append(byte_bounds(a))

    def holds(self, a: np.ndarray) -> bool:
        if not a.size:
            return True
        lo, hi = byte_bounds(a)
        return any(s <= lo and hi <= e for s, e in self.spans)


def _launch_arrays(args) -> list[np.ndarray]:
    """The arrays a launch's driver got: its arguments', and those of tuples among them (the
    embeddings' ids)."""
    out = []
    for a in args:
        if isinstance(a, np.ndarray):
            out.append(a)
        elif isinstance(a, tuple):
            out += [b for b in a if isinstance(b, np.ndarray)]
    return out


def _static(node, fixed: dict) -> bool:
    """Whether a node's scales are the same every run or made by its kernels: it is none of
    SCALED_OPS, or one whose scale and zero point are `fixed` (Tape._kind's). (An int8
    layer's dynamic scale is its launches' work: int8._Quantized._grid_terms.)"""
    if node.op_type in SCALED_OPS:
        return all(not i or i in fixed for i in node.inputs[1:3])
    return True


class Tape:
    """A run for one shape signature, taped: `tape(feeds)` gives the outputs as the
    executor's forward would, or None where it cannot run (busy, or inputs of another
    dtype)."""

    def __init__(self, steps: tuple, drops: tuple, outputs: tuple, feeds: dict, constants: dict,
                 shape_values: dict):
        self.outputs = outputs
        self.dead = False
        self._lock = threading.Lock()
        self._feeds = {name: np.array(a, copy=True, order="C") for name, a in feeds.items()}
        fixed = {**constants, **shape_values}  # (values the same on every run of the signature)
        base = {**fixed, **self._feeds}
        groups = _groups(steps, drops, outputs)
        # pass 1: every buffer's life
        trace = _Trace()
        _with_hooks(trace, None, lambda: _walk(groups, dict(base), keep=False))
        offsets, size = _layout(trace.sizes, trace.lives)
        if size > MAX_ARENA_BYTES:
            raise NotTaped(f"an arena of {size} bytes")
        self._arena = layout.aligned_empty((size,), np.uint8, lasting=True)
        # pass 2: the same run in the arena, each group's launches recorded
        values = dict(base)
        planned = _Planned(self._arena, offsets, trace.sizes)
        recorder = [None]

        def seen(g, args, results):
            g.launches, g.checks = recorder[0].launches, recorder[0].checks
            g.kind = self._kind(g, recorder[0], args, results, fixed)
            recorder[0] = _Recorder()
            launch.record_with(recorder[0])

        recorder[0] = _Recorder()
        _with_hooks(planned, recorder[0], lambda: _walk(groups, values, keep=True, seen=seen))
        if planned.k != len(trace.sizes):
            raise NotTaped("the second pass allocated differently from the first")
        self._values = values
        self._check_memory(groups, steps, base)
        self._outs: dict[str, np.ndarray] = {}  # outputs copied to C order in the last stretch
        self._segments = self._compile(groups, self._output_copies(outputs))
        taped = [self._copy_out(values[o]) for o in outputs]
        # the check: poisoned buffers, the same inputs, the same outputs
        self._arena.fill(0xFF)
        again = self._replay()
        if again is None or not all(a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
                                    for a, b in zip(taped, again)):
            raise NotTaped("a replay on the same inputs gave other outputs")
        self.launches = len(self._table)
        self.kinds = [g.kind for g in groups]
        self._groups = groups
        self.replays, self.fastest = 0, math.inf  # (the fastest replay's seconds: Executor._run_known)

    @staticmethod
    def _kind(g: _Group, rec: _Recorder, args: list, results, fixed: dict) -> str:
        """How a taped run takes a group: "launch", "view", "mask" or "host". `fixed`: the
        values every run of the signature shares (the model's constants, shape values)."""
        ops = {s.node.op_type for s in g.steps}
        arrays = [a for a in args if isinstance(a, np.ndarray)]
        tiled = isinstance(g.run, TokenChain) and math.prod(args[0].shape[:-1]) >= TILE_FROM  # (tiles copied in numpy)
        if rec.launches and not rec.untaped and not tiled and ops <= LAUNCH_OPS and all(_static(s.node, fixed)
                                                                                      for s in g.steps):
            if "AttentionCore" in ops:
                node = g.steps[0].node
                mask = args[3] if len(args) > 3 else None
                scales = node.inputs[4:7]  # (the scores', q's and kᵀ's: fuse._prescaled)
                if not (mask is None or isinstance(mask, PreparedMask)) or any(s and s not in fixed for s in scales):
                    return "host"
            return "launch"
        # (a Gather's view is the same memory every run only where its index is the model's)
        same = all(s.node.op_type != "Gather" or s.node.inputs[1] in fixed for s in g.steps)
        if not rec.launches and not rec.untaped and ops <= VIEW_OPS and same and all(
                isinstance(r, np.ndarray) and any(np.may_share_memory(r, a) for a in arrays) for r in results):
            return "view"
        if len(results) and all(isinstance(r, PreparedMask) for r in results):
            return "mask"
        for name, r in zip(g.outputs, results):
            if name and r is not None and not (isinstance(r, np.ndarray) and (r.flags.writeable or any(
                    np.may_share_memory(r, a) for a in arrays))):
                raise NotTaped(f"{g.steps[0].node.name!r} gives a {type(r).__name__} a tape cannot refill")
        return "host"

    def _check_memory(self, groups: list[_Group], steps: tuple, base: dict) -> None:
        """Launch groups whose kernels got an array from elsewhere run in Python instead."""
        memory = _Memory()
        memory.add(self._arena)
        found: list[np.ndarray] = _module_arrays()
        seen: dict = {}
        for s in steps:
            _arrays_in(s.impl, found, seen)
            _arrays_in(s.run, found, seen)
        found += [v for v in base.values() if isinstance(v, np.ndarray)]
        for g in groups:
            if g.kind == "host":
                found += [self._values[name] for name in g.outputs if isinstance(self._values.get(name), np.ndarray)]
            elif g.kind == "mask":  # (its layouts: the mask's own buffers, refilled in place on each run)
                found += [a for name in g.outputs for a in self._values[name].layouts()]
        found += [flags for g in groups for flags, _ in g.checks]  # (the caller's own: see launch.checked)
        for a in found:
            memory.add(a)
        arena = _Memory()
        arena.add(self._arena)
        for g in groups:
            if g.kind != "launch":
                continue
            made = [self._values[name] for name in g.outputs if name and self._values[name] is not None]
            if not all(isinstance(a, np.ndarray) and arena.holds(a) for a in made):
                why = "an output not made in the arena"  # (made or copied outside the kernels)
            elif not all(memory.holds(a) for _, _, args in g.launches for a in _launch_arrays(args)):
                why = "a kernel reads memory the tape does not hold"
            else:
                continue
            g.kind = "host"
            log.debug("tape: %s runs in Python (%s)", g.steps[0].node.name, why)

    def _output_copies(self, outputs: tuple) -> list:
        """The launches copying each feature-major output (a kernel's) to C order, into a
        buffer of the tape's own (`_outs`), for the end of the last stretch: after the
        replay each copy was a parallel region of its own, and a Python call."""
        made = []
        for o in dict.fromkeys(outputs):
            rows = feature_major_rows(self._values[o]) if isinstance(self._values[o], np.ndarray) else None
            if rows is None or rows.strides[0] % 4 or rows.strides[1] % 4:  # (else the transpose copies it first)
                continue
            buf = layout.aligned_empty(rows.shape, np.float32, lasting=True)
            rec = _Recorder()
            launch.record_with(rec)
            try:
                layout._transpose_into(rows.T, buf)
            finally:
                launch.record_with(None)
            if rec.launches and not rec.untaped:
                self._outs[o] = buf.reshape(self._values[o].shape)
                made += rec.launches
        return made

    def _compile(self, groups: list[_Group], copies: list) -> list:
        """The taped run: a launch stretch (a range of the table) or a group run in Python;
        `copies`' launches last."""
        table, keep, segments = [], [], []

        def add(launches):
            start = len(table)
            for part, rows, _ in launches:
                table.append((part, launch.address(rows), rows.shape[0], rows.shape[1]))
                keep.append(rows)
            if segments and segments[-1][0] == "launch":
                segments[-1] = ("launch", segments[-1][1], len(table))
            else:
                segments.append(("launch", start, len(table)))

        for g in groups:
            if g.kind == "launch":
                add(g.launches)
            elif g.kind in ("host", "mask"):
                segments.append((g.kind, g, [self._values[name] if name else None for name in g.outputs]))
        if copies:
            add(copies)
        # what each replay checks after its launches (launch.checked), with the node to name
        self._checks = [(g.steps[0].node, flags, check) for g in groups if g.kind == "launch"
                        for flags, check in g.checks]
        self._table = np.array(table, np.int64).reshape(-1, 4)
        self._claims = launch.new_claims(len(table))
        self._calls = keep
        return segments

    def _replay(self) -> list[np.ndarray] | None:
        values = self._values
        for seg in self._segments:
            if seg[0] == "launch":
                launch.replay(self._table, seg[1], seg[2], self._claims)
            elif seg[0] == "mask":
                for prepared in seg[2]:
                    prepared.refill()
            else:
                g, outs = seg[1], seg[2]
                args = [values[name] if name else None for name in g.inputs]
                try:
                    results = g.run(*args)
                except Exception as e:
                    raise step_failed(g.steps[0].node, e) from e
                for out, r in zip(outs, results):
                    if out is None:
                        continue
                    if not _refill(out, r):
                        self.dead = True  # (an output whose shape follows the values, say: runs go on untaped)
                        return None
        for node, flags, check in self._checks:
            try:
                check(flags)
            except Exception as e:
                raise step_failed(node, e) from e
        return [self._outs[o].copy() if o in self._outs else self._copy_out(values[o]) for o in self.outputs]

    @staticmethod
    def _copy_out(a) -> np.ndarray:
        c = _c_order(a)
        return c.copy() if c is a or (isinstance(a, np.ndarray) and np.may_share_memory(c, a)) else c

    def __call__(self, feeds: dict) -> list[np.ndarray] | None:
        if not self._lock.acquire(blocking=False):
            return None
        try:
            for name, buf in self._feeds.items():
                a = feeds[name]
                if not isinstance(a, np.ndarray) or a.dtype != buf.dtype or a.shape != buf.shape:
                    return None
                np.copyto(buf, a)
            results = self._replay()
            self.replays += results is not None
            return results
        finally:
            self._lock.release()


def _refill(out: np.ndarray, r) -> bool:
    """Make a Python step's taped output `out` hold its new output `r`: a copy, or nothing
    where r is out's memory itself (a read-only view of the step's input, say). False
    where neither can be."""
    if not isinstance(r, np.ndarray) or r.shape != out.shape or r.dtype != out.dtype:
        return False
    if r is out:
        return True
    if out.flags.writeable:  # (a copy: onto itself where r is out's memory; the addresses cost more to compare)
        np.copyto(out, r)
        return True
    return r.strides == out.strides and launch.address(r) == launch.address(out)


def build(steps: tuple, drops: tuple, outputs: tuple, feeds: dict, constants: dict,
          shape_values: dict) -> Tape | None:
    """A tape of this schedule, or None (with the reason in the debug log) where it gets
    none."""
    if not ENABLED or any(np.asarray(a).size >= MAX_INPUT_ELEMENTS for a in feeds.values()):
        return None
    try:
        return Tape(steps, drops, outputs, feeds, constants, shape_values)
    except Exception as e:  # noqa: BLE001 (NotTaped, or a step failing on the tape's allocator: runs go on untaped)
        log.debug("no tape: %s", e)
        return None
