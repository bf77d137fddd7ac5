"""The first load on a machine: import, load and first run of a model in a fresh process
with an empty kernel cache, for one or two code trees taking turns.

Each round, each side runs in a new process with `SPARSEJIT_CACHE_DIR` a new empty
directory, so every kernel and driver it needs is compiled; `--warm N` then loads it N
more times in new processes on that same cache. What is printed per process: seconds
to `import sparsejit`, to `sparsejit.load`, to the first `run`, Numba's own compile
time (its "numba:compile" events; nested compiles counted once), and how long after the
first run the load's helper (kernels/prebuild.py), if any, was still compiling.

    python bench/first_load.py [TREE ...] [--model M] [--batch 1 --seq 128 --rounds 2 --warm 0]

A TREE is `.` (the installed package) or a checkout whose sparsejit/ and kernels/ are used
(a `git worktree` of an older commit with `ln -s ../kernels sparsejit/kernels`), as for
bench/ab.py. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def worker(tree: str, model: str, batch: int, seq: int) -> None:
    if tree != ".":
        sys.path.insert(0, tree)
    t0 = time.perf_counter()
    from numba.core import event

    compiling = event.RecordingListener()
    event.register("numba:compile", compiling)
    import numpy as np

    import sparsejit

    t1 = time.perf_counter()
    m = sparsejit.load(model, num_threads=2)
    t2 = time.perf_counter()
    ids = np.ones((batch, seq), np.int64)
    m.run({n: ids if n != "token_type_ids" else 0 * ids for n in m.input_names})
    t3 = time.perf_counter()
    depth, started, numba_s = 0, 0.0, 0.0  # (outermost compiles only: a compile includes what it calls)
    for at, ev in compiling.buffer:
        if ev.is_start:
            started = at if depth == 0 else started
            depth += 1
        else:
            depth -= 1
            numba_s += (at - started) if depth == 0 else 0.0
    try:  # (a first load's helper, where the tree has one: done before the next process starts)
        from sparsejit.kernels import prebuild
    except ImportError:
        helper_s = 0.0
    else:
        prebuild.wait()
        helper_s = time.perf_counter() - t3
    print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first run": t3 - t2, "numba": numba_s,
                      "helper after": helper_s}))


def one(tree: str, args, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", tree, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq)]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "SPARSEJIT_CACHE_DIR": cache})
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*", default=["."])
    ap.add_argument("--model", default="bench/models/bert_base_p90.onnx")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warm", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.batch, args.seq)
    for r in range(args.rounds):
        for tree in (args.trees if r % 2 == 0 else args.trees[::-1]):
            with tempfile.TemporaryDirectory(prefix="sparsejit-first-load-") as cache:
                for k in range(1 + args.warm):
                    t = one(tree, args, cache)
                    total = t["import"] + t["load"] + t["first run"]
                    print(f"round {r + 1} {tree} {'first' if k == 0 else f'warm {k}'}: import {t['import']:.1f} + "
                          f"load {t['load']:.1f} + first run {t['first run']:.1f} = {total:.1f} s "
                          f"(Numba compiling {t['numba']:.1f} s; helper done {t['helper after']:.1f} s after)",
                          flush=True)


if __name__ == "__main__":
    main()
