"""Timing, for the planner and the bench: seconds per call, and races between candidates."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn() over `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def race(fns: dict, rounds: int = 7) -> dict:
    """ms per call of each candidate over `rounds` rounds that call every candidate once,
    after one warm-up call each (a fresh kernel's compile): the first candidate's median,
    and for each other the first's median times the median of its time over the first's
    in the same round. Candidates are compared by round, as the bench compares engines:
    a change in the machine's speed moves both times of a round together, where separate
    medians could each fall on a different side of it (bench/README.md, eleventh session)."""
    for fn in fns.values():
        fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(time_calls(fn, 1, warmup=0)[0] * 1e3)
    first = samples[next(iter(fns))]
    base = statistics.median(first)
    return {name: base * statistics.median(t / f for t, f in zip(ms, first)) for name, ms in samples.items()}
