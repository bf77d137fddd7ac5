"""The executor: runs a plan's steps in order over a name → array environment.

Shape-only values (see `fold.shape_only_values`) are computed on the first run of each
input-shape signature and kept in a small LRU cache; later runs with those shapes skip
their nodes. Each intermediate is dropped right after its last reader, so memory holds
only live activations.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from .fold import shape_only_values
from .graph import Graph
from .kernels.layout import transposed_copy, unit_token_stride
from .plan import Step

MAX_SHAPE_SIGNATURES = 32


def _c_order(a):
    a = np.asarray(a)
    if a.flags.c_contiguous:
        return a
    if a.dtype == np.float32 and a.ndim >= 2:
        # A kernel's feature-major output: the tiled transpose, not numpy's strided copy
        # (BERT-base's [1, 128, 768] output: 68 µs by numpy).
        rows = a.view()
        try:
            rows.shape = (-1, a.shape[-1])  # fails rather than copy when the axes do not merge
        except AttributeError:
            rows = None
        if rows is not None and unit_token_stride(rows):
            return transposed_copy(rows).reshape(a.shape)
    return a.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


class Executor:
    def __init__(self, graph: Graph, steps: list[Step]):
        self.graph = graph
        self.steps = steps
        self.static = shape_only_values(graph)
        self._folded: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self._schedules: dict[tuple, tuple] = {}

    def _schedule(self, outputs: tuple[str, ...], skip_static: bool) -> tuple:
        """Steps needed for `outputs`, and after each the names no later step reads."""
        key = (outputs, skip_static)
        if key in self._schedules:
            return self._schedules[key]
        # The first run of a signature computes every shape-only value, so that later
        # runs, whatever outputs they ask for, find them all in the cache.
        live = set(outputs) if skip_static else set(outputs) | self.static
        chosen = []
        for s in reversed(self.steps):
            if not any(o in live for o in s.node.outputs):
                continue
            if skip_static and all(o in self.static for o in s.node.outputs if o):
                continue
            chosen.append(s)
            live.update(i for i in s.node.inputs if i)
        chosen.reverse()
        keep = set(outputs) | set(self.graph.constants)
        if not skip_static:
            keep |= self.static  # the first run of a signature collects them
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
            profile: dict[str, float] | None = None) -> list[np.ndarray]:
        """Run the steps `outputs` need; with `profile`, add each node's seconds to it by name."""
        signature = tuple((name, a.shape) for name, a in feeds.items())
        folded = self._folded.get(signature)
        env = dict(self.graph.constants)
        env.update(feeds)
        if folded is not None:
            self._folded.move_to_end(signature)
            env.update(folded)
        steps, drops = self._schedule(outputs, folded is not None)
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
                raise RuntimeError(f"node {node.name!r} ({node.op_type}) failed: {e}") from e
            for name, value in zip(node.outputs, results):
                if name:
                    env[name] = value
            for name in drop:
                env.pop(name, None)
        if folded is None:
            self._folded[signature] = {k: env[k] for k in self.static if k in env}
            if len(self._folded) > MAX_SHAPE_SIGNATURES:
                self._folded.popitem(last=False)
        # Kernels may hand back transposed views; callers get plain C-ordered arrays.
        return [_c_order(env[o]) for o in outputs]
