"""Timing machinery shared by `sparsejit bench` and bench/run.py: one engine, one model,
one workload, in a process of its own.

This file is also the worker script: DeepSparse runs under its own venv's Python,
which has no sparsejit installed, so it is started as `python .../benchmark.py ENGINE
MODEL ...` and prints one JSON line. Hence only the standard library and numpy are
imported at module level.

    from sparsejit.benchmark import measure
    result = measure("ort", "model.onnx", batch=1, seq=128, runs=20, threads=2)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ENGINES = ("sparsejit", "numpy", "ort", "deepsparse")
DEFAULT_DEEPSPARSE_PYTHON = os.environ.get("SPARSEJIT_DEEPSPARSE_PYTHON", "")


def make_inputs(input_specs: list[tuple[str, str]], batch: int, seq: int, seed: int = 0) -> list:
    """Token ids (below 100, valid in any vocabulary) with a full attention mask, for
    every (name, numpy dtype) input."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, size=(batch, seq))
    arrays = []
    for name, dtype in input_specs:
        if "mask" in name:
            arrays.append(np.ones((batch, seq), dtype=dtype))
        elif "type" in name:
            arrays.append(np.zeros((batch, seq), dtype=dtype))
        else:
            arrays.append(ids.astype(dtype))
    return arrays


def _onnx_inputs(path: str) -> list[tuple[str, str]]:
    """The graph inputs' (name, dtype), without parsing the weights: onnx.load would add
    the whole file to the measured process's peak memory. sparsejit/onnx_file.py is
    loaded by path, as this may run in DeepSparse's venv where sparsejit is not installed."""
    import importlib.util

    from onnx import helper

    spec = importlib.util.spec_from_file_location(
        "_sparsejit_onnx_file", os.path.join(os.path.dirname(os.path.abspath(__file__)), "onnx_file.py"))
    onnx_file = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(onnx_file)
    model, mapped = onnx_file.load_mapped(path)
    inits = {t.name for t in model.graph.initializer} | set(mapped)
    return [(i.name, str(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)))
            for i in model.graph.input if i.name not in inits]


def _load(engine: str, path: str, batch: int, seq: int, threads: int):
    """-> (run(list of arrays), input (name, dtype) pairs)"""
    if engine in ("sparsejit", "numpy"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import sparsejit

        model = sparsejit.load(path, num_threads=threads, kernels="dense" if engine == "numpy" else "auto")
        return model.run, [(s.name, str(s.dtype)) for s in model.inputs]
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        specs = _onnx_inputs(path)
        names = [i.name for i in sess.get_inputs()]
        if names != [n for n, _ in specs]:
            raise ValueError(f"ONNX Runtime reports inputs {names}, the file {[n for n, _ in specs]}")
        return (lambda xs: sess.run(None, dict(zip(names, xs)))), specs
    if engine == "deepsparse":
        from deepsparse import compile_model

        # compile_model rewrites the file's input shapes in place: give it a copy.
        tmp = tempfile.mkdtemp(prefix="sparsejit_ds_")
        copy = os.path.join(tmp, os.path.basename(path))
        shutil.copy(path, copy)
        if os.path.exists(path + ".data"):
            shutil.copy(path + ".data", copy + ".data")
        specs = _onnx_inputs(copy)
        engine_ = compile_model(copy, batch_size=batch, num_cores=threads, input_shapes=[[batch, seq]] * len(specs))
        return engine_.run, specs
    raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")


def time_calls(fn, runs: int, warmup: int = 1) -> list[float]:
    """Seconds per call of fn() over `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_engine(engine: str, path: str, batch: int, seq: int, runs: int, threads: int, warmup: int = 3) -> dict:
    """Load and time in this process: medians over `runs` after `warmup` runs."""
    t0 = time.perf_counter()
    run, specs = _load(engine, path, batch, seq, threads)
    load_s = time.perf_counter() - t0
    xs = make_inputs(specs, batch, seq)
    times = time_calls(lambda: run(xs), runs, warmup)
    return summarise({"engine": engine, "model": os.path.basename(path), "batch": batch, "seq": seq,
                      "threads": threads, "load_s": load_s, "times_s": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def summarise(r: dict) -> dict:
    t = r["times_s"]
    med = statistics.median(t)
    return {**r, "median_ms": med * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
            "items_per_s": r["batch"] / med, "runs": len(t)}


def measure(engine: str, path: str, batch: int = 1, seq: int = 128, runs: int = 20, threads: int = 2,
            python: str | None = None, env: dict | None = None) -> dict:
    """Time one engine in a fresh process (DeepSparse under `python`, its own venv's;
    the others under this interpreter).

    Returns the summary dict, or {"engine": ..., "error": "..."} when it could not run.
    """
    if engine == "deepsparse":
        python = python or DEFAULT_DEEPSPARSE_PYTHON
        if not python or not os.path.exists(python):
            return {"engine": engine, "error": "no DeepSparse Python: pass --deepsparse-python or set "
                                               "SPARSEJIT_DEEPSPARSE_PYTHON (see bench/README.md)"}
    else:
        python = sys.executable  # `python` is DeepSparse's own venv, for it alone
    cmd = [python, os.path.abspath(__file__), engine, os.path.abspath(path), "--batch", str(batch),
           "--seq", str(seq), "--runs", str(runs), "--threads", str(threads)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"engine": engine, "error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="time one engine on one model (the benchmark worker)")
    ap.add_argument("engine", choices=ENGINES)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(time_engine(args.engine, args.model, args.batch, args.seq, args.runs, args.threads)))


if __name__ == "__main__":
    main()
