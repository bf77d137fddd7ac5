"""Time one engine on one model and workload, in a process of its own; print JSON.

Run by bench/run.py (DeepSparse's under its own venv's Python, which has none of
sparsejit's dependencies: this file imports only what the chosen engine needs).

    python bench/worker.py ENGINE MODEL --batch 1 --seq 128 --runs 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time


def make_inputs(names, batch, seq):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return [feeds[n] for n in names]


def load_engine(engine, path, batch, seq, threads):
    """-> (run(inputs) callable, input names)"""
    if engine in ("sparsejit", "sparsejit-dense"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import sparsejit

        model = sparsejit.load(path, num_threads=threads, kernels="dense" if engine == "sparsejit-dense" else "auto")
        return (lambda xs: model.run(xs)), model.input_names, model
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        return (lambda xs: sess.run(None, dict(zip(names, xs)))), names, None
    if engine == "deepsparse":
        import onnx
        from deepsparse import compile_model

        # compile_model rewrites the file's input shapes in place: give it a copy.
        tmp = tempfile.mkdtemp(prefix="ds_")
        copy = os.path.join(tmp, os.path.basename(path))
        shutil.copy(path, copy)
        if os.path.exists(path + ".data"):
            shutil.copy(path + ".data", copy + ".data")
        names = [i.name for i in onnx.load(copy, load_external_data=False).graph.input]
        eng = compile_model(copy, batch_size=batch, num_cores=threads, input_shapes=[[batch, seq]] * len(names))
        return (lambda xs: eng.run(xs)), names, None
    raise SystemExit(f"unknown engine {engine!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t0 = time.perf_counter()
    run, names, _ = load_engine(args.engine, args.model, args.batch, args.seq, args.threads)
    load_s = time.perf_counter() - t0
    xs = make_inputs(names, args.batch, args.seq)
    for _ in range(args.warmup):
        run(xs)
    times = []
    for _ in range(args.runs):
        t = time.perf_counter()
        run(xs)
        times.append(time.perf_counter() - t)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": args.engine, "model": os.path.basename(args.model), "batch": args.batch,
                      "seq": args.seq, "threads": args.threads, "load_s": load_s, "times_s": times,
                      "peak_rss_mb": peak_rss_mb}))


if __name__ == "__main__":
    main()
