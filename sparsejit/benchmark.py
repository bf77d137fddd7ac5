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
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __package__:
    from .timing import time_calls
else:  # the worker script, run by path (its directory is on sys.path)
    from timing import time_calls

# dense: sparsejit with kernels="dense"; bf16: sparsejit with precision="bf16"; openvino:
# OpenVINO at its default precision for the CPU (bf16 where the CPU has AMX or
# AVX512-BF16), openvino-f32: forced to f32.
ENGINES = ("sparsejit", "dense", "bf16", "ort", "deepsparse", "openvino", "openvino-f32")
DEFAULT_DEEPSPARSE_PYTHON = os.environ.get("SPARSEJIT_DEEPSPARSE_PYTHON", "")
# OpenVINO runs under the Python given (--openvino-python, SPARSEJIT_OPENVINO_PYTHON), else
# under this one, where `pip install openvino` may have put it.
DEFAULT_OPENVINO_PYTHON = os.environ.get("SPARSEJIT_OPENVINO_PYTHON", "")


def cpu_name() -> str:
    """The CPU's name, LLVM's name for it and the vector features that decide the kernels,
    for every result that reports a time."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    import llvmlite.binding as llvm

    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return f"{name} ({llvm.get_host_cpu_name()}: {', '.join(vector) or 'no AVX2'})"


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


# sparsejit's warm-up goes on until a shape's runs are settled (its tape made and kept, or
# not: Executor.settled), for at most these many runs or seconds
SETTLE_RUNS, SETTLE_SECONDS = 400, 60.0


def _load(engine: str, path: str, batch: int, seq: int, threads: int):
    """-> (run(list of arrays), input (name, dtype) pairs)"""
    if engine in ("sparsejit", "dense", "bf16"):
        import sparsejit  # the installed package: this worker runs under the venv that has it
        from sparsejit.kernels import prebuild

        model = sparsejit.load(path, num_threads=threads, kernels="dense" if engine == "dense" else "auto",
                               precision="bf16" if engine == "bf16" else "fp32")
        prebuild.wait()  # (a first load's helper done before any timing)
        specs = [(s.name, str(s.dtype)) for s in model.inputs]

        def run(xs):
            return model.run(xs)

        def settle(xs, runs: int = SETTLE_RUNS, seconds: float = SETTLE_SECONDS) -> None:
            # until the shape's runs are as they will stay (taped, or not): a user's steady state
            feeds, end = dict(zip((n for n, _ in specs), xs)), time.perf_counter() + seconds
            for _ in range(runs):
                if model._executor.settled(feeds, tuple(model.output_names)) or time.perf_counter() > end:
                    return
                model.run(xs)

        run.settle = settle
        return run, specs
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
    if engine in ("openvino", "openvino-f32"):
        return _load_openvino(path, batch, seq, threads, f32=engine == "openvino-f32")
    if engine == "deepsparse":
        from deepsparse import compile_model

        # compile_model rewrites the file's input shapes in place: give it a copy, and
        # delete the copy once compiled (left behind, a model's size per run filled /tmp).
        with tempfile.TemporaryDirectory(prefix="sparsejit_ds_") as tmp:
            copy = os.path.join(tmp, os.path.basename(path))
            shutil.copy(path, copy)
            if os.path.exists(path + ".data"):
                shutil.copy(path + ".data", copy + ".data")
            specs = _onnx_inputs(copy)
            engine_ = compile_model(copy, batch_size=batch, num_cores=threads,
                                    input_shapes=[[batch, seq]] * len(specs))
        return engine_.run, specs
    raise ValueError(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")


def _load_openvino(path: str, batch: int, seq: int, threads: int, f32: bool):
    """OpenVINO on the CPU, shapes fixed to [batch, seq] (as DeepSparse's), latency hint,
    `threads` inference threads; f32 forces fp32, else the CPU plugin's default precision."""
    import openvino as ov

    core = ov.Core()
    specs = _onnx_inputs(path)
    model = core.read_model(path)
    model.reshape({name: [batch, seq] for name, _ in specs})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = core.compile_model(model, "CPU", config).create_infer_request()
    names = [name for name, _ in specs]
    return (lambda xs: request.infer(dict(zip(names, xs)))), specs


def time_engine(engine: str, path: str, batch: int, seq: int, runs: int, threads: int, warmup: int = 3) -> dict:
    """Load and time in this process: medians over `runs` after `warmup` runs (sparsejit's
    then go on until its runs of the shape are settled: SETTLE_RUNS)."""
    t0 = time.perf_counter()
    run, specs = _load(engine, path, batch, seq, threads)
    load_s = time.perf_counter() - t0
    xs = make_inputs(specs, batch, seq)
    time_calls(lambda: run(xs), 0, warmup)
    getattr(run, "settle", lambda xs: None)(xs)
    times = time_calls(lambda: run(xs), runs, 0)
    return summarise({"engine": engine, "model": os.path.basename(path), "batch": batch, "seq": seq,
                      "threads": threads, "load_s": load_s, "times_s": times,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def latency_stats(times_s: list[float]) -> dict:
    """p50/p90/p99 (numpy's linear percentiles), mean, std, min and max of call times, in ms."""
    ms = sorted(t * 1e3 for t in times_s)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"runs": len(ms), "p50_ms": statistics.median(ms), "p90_ms": q[89], "p99_ms": q[98],
            "mean_ms": statistics.fmean(ms), "std_ms": statistics.pstdev(ms), "min_ms": ms[0], "max_ms": ms[-1]}


def summarise(r: dict) -> dict:
    stats = latency_stats(r["times_s"])
    return {**r, **stats, "median_ms": stats["p50_ms"], "items_per_s": r["batch"] / stats["p50_ms"] * 1e3}


def _worker_command(engine: str, path: str, batch: int, seq: int, threads: int, python: str | dict | None,
                    extra: list[str]) -> list[str] | dict:
    """The worker's command line, or an error dict when the engine has no Python to run under."""
    pythons = python if isinstance(python, dict) else {"deepsparse": python}
    if engine == "deepsparse":
        python = pythons.get("deepsparse") or DEFAULT_DEEPSPARSE_PYTHON
        if not python or not os.path.exists(python):
            return {"engine": engine, "error": "no DeepSparse Python: pass --deepsparse-python or set "
                                               "SPARSEJIT_DEEPSPARSE_PYTHON (see bench/README.md)"}
    elif engine.startswith("openvino"):
        python = pythons.get("openvino") or DEFAULT_OPENVINO_PYTHON or sys.executable
        if not os.path.exists(python):
            return {"engine": engine, "error": f"no OpenVINO Python at {python}"}
    else:
        python = sys.executable  # the other Pythons are their engines' own venvs
    return [python, os.path.abspath(__file__), engine, os.path.abspath(path), "--batch", str(batch),
            "--seq", str(seq), "--threads", str(threads), *extra]


def measure(engine: str, path: str, batch: int = 1, seq: int = 128, runs: int = 20, threads: int = 2,
            python: str | dict | None = None, env: dict | None = None) -> dict:
    """Time one engine in a fresh process (DeepSparse under `python`, its own venv's, or
    each peer under its own: `python={"deepsparse": ..., "openvino": ...}`; the others
    under this interpreter).

    Returns the summary dict, or {"engine": ..., "error": "..."} when it could not run.
    """
    cmd = _worker_command(engine, path, batch, seq, threads, python, ["--runs", str(runs)])
    if isinstance(cmd, dict):
        return cmd
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        return {"engine": engine, "error": worker_failure(proc.stderr, proc.returncode)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FAILURE = re.compile(r"error|exception|assert|abort|fatal|not supported|unsupported", re.IGNORECASE)


def worker_failure(stderr: str, returncode: int) -> str:
    """Why a worker failed, in a line: how it ended (a signal by name), and the last line of
    its stderr that names a failure, else its last line. DeepSparse's abort on a dynamically
    quantized file ends with a backtrace and 'Please email a copy of this stack trace';
    its 'Assertion at ...planner.hpp:70' line is the one that says something."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    named = [line for line in lines if _FAILURE.search(line)]
    said = named[-1] if named else lines[-1] if lines else ""
    try:
        ended = f"killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    except ValueError:
        ended = f"exit status {returncode}"
    return f"{ended}: {said}" if said else ended


# Seconds between one engine's timed calls and the next engine's: ONNX Runtime's and
# DeepSparse's pool threads spin for a while after a run, and would take the cores
# from whichever engine is timed next.
SETTLE_S = 0.3


def measure_interleaved(engines: list[str], path: str, batch: int = 1, seq: int = 128, runs: int = 20,
                        threads: int = 2, python: str | dict | None = None, rounds: int = 5,
                        progress=None) -> list[dict]:
    """Time several engines on one model in alternation: each loads once in a process of
    its own (one after another, so loads do not compete), then `rounds` rounds each
    time runs/rounds calls of every engine, in a rotating order.

    The machine's speed drifts over minutes (bench/README.md); timed one after another,
    a slow spell lands on one engine and the ratio says so. Interleaved, every engine
    shares the spells.
    Returns one summary dict per engine (or one with "error"), in `engines` order.
    `progress(stage, done, total)`, when given, hears of each engine loaded and each
    engine's turn in a round (done 0 starts a stage).
    """
    workers, results = {}, {}
    with contextlib.ExitStack() as files:
        try:
            return _interleave(engines, path, batch, seq, runs, threads, python, rounds, workers, results, files,
                               progress or (lambda stage, done, total: None))
        finally:
            for proc in workers.values():
                proc.stdin.close()  # a worker ends when its stdin does
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _interleave(engines: list[str], path: str, batch: int, seq: int, runs: int, threads: int, python: str | dict | None,
                rounds: int, workers: dict, results: dict, files: contextlib.ExitStack, progress) -> list[dict]:
    """measure_interleaved's body; `workers` collects the processes for it to close."""
    progress(f"loading {len(engines)} engines, one after another", 0, len(engines))
    for engine in engines:
        cmd = _worker_command(engine, path, batch, seq, threads, python, ["--serve"])
        if isinstance(cmd, dict):
            results[engine] = cmd
            continue
        err = files.enter_context(tempfile.TemporaryFile("w+"))  # noqa: SIM115 (the ExitStack closes it)
        proc, said = start_worker(cmd, err)
        if proc is None:
            results[engine] = {"engine": engine, "error": said}
            continue
        workers[engine] = proc
        results[engine] = {**said, "times_s": [], "rounds_s": []}
        progress("", len(workers), len(engines))
    live = [e for e in engines if e in workers]
    per_round = [runs // rounds + (i < runs % rounds) for i in range(rounds)]
    progress(f"timing {runs} runs each in {rounds} rounds", 0, rounds * len(live))
    for i, n in enumerate(per_round):
        order = live[i % len(live):] + live[:i % len(live)] if live else []
        for engine in order:
            progress("", 1, rounds * len(live))
            time.sleep(SETTLE_S)
            workers[engine].stdin.write(f"time {n}\n")
            times = json.loads(workers[engine].stdout.readline())["times_s"]
            results[engine]["times_s"] += times
            results[engine]["rounds_s"].append(times)
    for engine in live:
        workers[engine].stdin.write("quit\n")
        results[engine].update(json.loads(workers[engine].stdout.readline()))
        results[engine] = summarise({**results[engine], "rounds": rounds})
    return [results[e] for e in engines]


def start_worker(cmd: list[str], err) -> tuple[subprocess.Popen | None, dict | str]:
    """Start a `--serve` worker and wait until it has loaded: (process, what it said), or
    (None, the last line of its stderr) when it failed. Its stderr goes to the file `err`:
    DeepSparse logs plenty, and a full pipe would stall the worker."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
    line = proc.stdout.readline()
    if line:
        return proc, json.loads(line)
    proc.wait()
    err.seek(0)
    return None, worker_failure(err.read(), proc.returncode)


def paired_ratio(base: dict, other: dict) -> float | None:
    """The median over rounds of other's round median / base's round median.

    Each round times the engines within seconds of each other, so a ratio taken inside
    a round sees one machine speed; the median over rounds then drops the rounds a
    neighbour's burst skewed. (The two engines' overall medians can each come from a
    different speed.) None without per-round times."""
    ratios = round_ratios(base, other)
    return statistics.median(ratios) if ratios else None


def round_ratios(base: dict, other: dict) -> list[float]:
    """other's median / base's median in each round (empty when the rounds do not pair up)."""
    a, b = base.get("rounds_s"), other.get("rounds_s")
    if not a or not b or len(a) != len(b):
        return []
    return [statistics.median(o) / statistics.median(s) for s, o in zip(a, b) if s and o]


def serve(engine: str, path: str, batch: int, seq: int, threads: int, warmup: int = 3) -> None:
    """The interleaved worker: load, warm up (sparsejit until settled), say so; then answer `time N` (one untimed
    call, N timed) and `quit` (peak RSS) on stdin, one JSON line each."""
    t0 = time.perf_counter()
    run, specs = _load(engine, path, batch, seq, threads)
    load_s = time.perf_counter() - t0
    xs = make_inputs(specs, batch, seq)
    time_calls(lambda: run(xs), 0, warmup)
    getattr(run, "settle", lambda xs: None)(xs)
    print(json.dumps({"engine": engine, "model": os.path.basename(path), "batch": batch, "seq": seq,
                      "threads": threads, "load_s": load_s}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["time"]:
            print(json.dumps({"times_s": time_calls(lambda: run(xs), int(cmd[1]), 1)}), flush=True)
        elif cmd[:1] == ["quit"]:
            print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}),
                  flush=True)
            return


def main() -> None:
    ap = argparse.ArgumentParser(description="time one engine on one model (the benchmark worker)")
    ap.add_argument("engine", choices=ENGINES)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", action="store_true", help="stay up and time on request (measure_interleaved)")
    args = ap.parse_args()
    if args.serve:
        serve(args.engine, args.model, args.batch, args.seq, args.threads)
    else:
        print(json.dumps(time_engine(args.engine, args.model, args.batch, args.seq, args.runs, args.threads)))


if __name__ == "__main__":
    main()
