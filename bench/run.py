"""sparsejit against sparsejit forced dense, ONNX Runtime and DeepSparse, measured in one run.

    python bench/make_models.py                       # once: BERT-base variants, MiniLM
    python bench/run.py                               # everything; see --help to subset

Each engine runs in a process of its own (sparsejit.benchmark, the machinery
`sparsejit bench` uses too; DeepSparse under its own venv's Python), with the same
thread count, on the same model file and inputs:
medians over --runs timed runs after warm-up, with min and max. Ratios compare
engines within this one run only: the machine is shared and noisy. Writes
bench/results/results.json, results.md and latency_vs_sparsity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from sparsejit.benchmark import (  # the installed package (make bench: the test venv's editable install)
    cpu_name,
    measure,
    measure_interleaved,
    paired_ratio,
    time_calls,
)

MODELS = ["bert_base_p0", "bert_base_p80", "bert_base_p90", "bert_base_p95", "bert_base_p97",
          "bert_base_p80_block4", "minilm_p90"]
SPARSITY = {"bert_base_p0": 0.0, "bert_base_p80": 0.8, "bert_base_p90": 0.9, "bert_base_p95": 0.95,
            "bert_base_p97": 0.97}
WORKLOADS = {"latency": (1, 128), "throughput": (8, 128), "seq384": (1, 384)}
# dense: sparsejit forced dense (its IR GEMM); openvino: at its default precision for the CPU
# (bf16 with AMX or AVX512-BF16), openvino-f32: forced to f32
ENGINES = ["sparsejit", "dense", "ort", "deepsparse", "openvino", "openvino-f32"]
DEFAULT_DS_PYTHON = HERE / ".venv-deepsparse" / "bin" / "python"
DEFAULT_OV_PYTHON = HERE / ".venv-openvino" / "bin" / "python"
PEERS = {"deepsparse": "DeepSparse", "openvino": "OpenVINO", "openvino-f32": "OpenVINO f32"}


def kernel_level(threads: int, runs: int) -> list[dict]:
    """768 → 3072 over 128 tokens: sparsejit's kernel, scipy.sparse CSR and dense numpy."""
    from sparsejit.threads import ThreadScope

    with ThreadScope(threads):
        return _kernel_rows(runs)


def _kernel_rows(runs: int) -> list[dict]:
    import scipy.sparse
    from sparsejit.kernels.layout import feature_major_empty
    from sparsejit.kernels.linear import DenseLinear, SparseLinear

    from sparsejit.choose import Chooser

    rng = np.random.default_rng(0)
    k, m, n = 768, 3072, 128
    x = rng.standard_normal((n, k)).astype(np.float32)
    rows = []
    for sparsity, block in [(0.8, 1), (0.9, 1), (0.95, 1), (0.97, 1), (0.8, 4)]:
        w = rng.standard_normal((k, m)).astype(np.float32)
        if block == 1:
            w[rng.random((k, m)) < sparsity] = 0
        else:
            w *= np.repeat(rng.random((k // block, m)) >= sparsity, block, axis=0)
        nnz = int((w != 0).sum())
        sparse, dense = SparseLinear(w, None, "none", False), DenseLinear(w, None, "none", False)
        # The K-chunk size the planner would choose at load, by the same timings.
        sparse = sparse.with_chunk(Chooser().time_kernels(sparse, None, False)["k_chunk"])
        csr = scipy.sparse.csr_matrix(w.T)  # yᵀ = Wᵀ xᵀ, the usual SpMM orientation
        # sparsejit's kernels take xᵀ as a model's layers hand it over (feature-major, rows
        # on cache lines): no transpose timed.
        xt = feature_major_empty(k, n)
        xt[:] = x.T
        np.testing.assert_allclose(sparse(xt.T), x @ w, atol=1e-3, rtol=1e-3)
        np.testing.assert_allclose(dense(xt.T), x @ w, atol=1e-3, rtol=1e-3)
        impls = [("sparsejit", sparse, xt.T), ("sparsejit dense GEMM", dense, xt.T),
                 ("numpy x @ W", w.__rmatmul__, x), ("scipy.sparse CSR", csr.__matmul__, xt)]
        for name, f, arg in impls:
            times = time_calls(lambda f=f, arg=arg: f(arg), runs)
            med = statistics.median(times)
            rows.append({"shape": f"{k}x{m}x{n}", "sparsity": sparsity, "block": block, "impl": name,
                         "k_chunk": sparse.k_chunk if name == "sparsejit" else None,
                         "median_ms": med * 1e3, "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
                         "gflops_nonzero": 2 * nnz * n / med / 1e9, "gflops_dense_equiv": 2 * k * m * n / med / 1e9})
    return rows


def load_times(model: Path, threads: int) -> dict:
    """Cold load (empty kernel cache, fresh process) then warm load (same cache, fresh process)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {"SPARSEJIT_CACHE_DIR": cache}
        cold = measure("sparsejit", str(model), 1, 128, 1, threads, env=env)
        warm = measure("sparsejit", str(model), 1, 128, 1, threads, env=env)
    return {"model": model.stem, "cold_s": cold.get("load_s"), "warm_s": warm.get("load_s"),
            "error": cold.get("error") or warm.get("error")}


def _cell(r: dict | None, throughput: bool) -> str:
    if r is None or "error" in r:
        return "—" if r is None else "error"
    if throughput:
        return f"{r['items_per_s']:.1f} items/s"
    return f"{r['median_ms']:.1f} ({r['min_ms']:.1f}–{r['max_ms']:.1f})"


def _ratio(by: dict, engine: str) -> str:
    a, o = by.get("sparsejit"), by.get(engine)
    if not a or not o or "error" in a or "error" in o:
        return "—"
    paired = paired_ratio(a, o)
    return f"{paired if paired is not None else o['median_ms'] / a['median_ms']:.2f}×"


def markdown(results: dict) -> str:
    out = [f"# sparsejit benchmark — {results['date']}", "",
           (f"Machine: {results['machine']}; {results['threads']} threads for every engine; "
            f"medians of {results['runs']} runs after warm-up (min–max in brackets), taken in "
            f"{results.get('rounds', 1)} rounds that alternate the engines, each loaded once in a process of "
            "its own."), ""]
    for wl, (b, s) in WORKLOADS.items():
        rows = [r for r in results["end_to_end"] if r.get("workload") == wl]
        if not rows:
            continue
        out += [f"## {wl}: batch {b}, seq {s}", "",
                ("| model | sparsejit | sparsejit forced dense | ORT | DeepSparse | OpenVINO | OpenVINO f32 | vs ORT "
                "| vs DeepSparse | vs OpenVINO | vs OpenVINO f32 |"),
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for model in dict.fromkeys(r["model"] for r in rows):
            by = {r["engine"]: r for r in rows if r["model"] == model}
            cells = [_cell(by.get(e), wl == "throughput") for e in ENGINES]
            ratios = [_ratio(by, e) for e in ("ort", "deepsparse", "openvino", "openvino-f32")]
            out.append(f"| {model} | {' | '.join(cells)} | {' | '.join(ratios)} |")
        out.append("")
    out += [("Ratios (above 1: sparsejit is faster): in each round, the other engine's median time over "
            "sparsejit's; the table gives the median of those per-round ratios, so each ratio compares "
            "times taken seconds apart."), ""]
    if results.get("memory"):
        out += ["## Peak RSS (latency workload)", "", "| model | engine | peak RSS MB | load s |", "|---|---|---|---|"]
        for r in results["memory"]:
            out.append(f"| {r['model']} | {r['engine']} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |")
        out.append("")
    if results.get("load"):
        out += ["## sparsejit load time", "", "| model | cold s (empty cache) | warm s |", "|---|---|---|"]
        for r in results["load"]:
            out.append(f"| {r['model']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} |" if not r.get("error")
                       else f"| {r['model']} | error: {r['error']} | |")
        out.append("")
    if results.get("kernel"):
        out += ["## Kernel: 768 → 3072 over 128 tokens", "",
                "| sparsity | block | implementation | median ms | GFLOP/s (nonzeros) | GFLOP/s (dense equiv.) |",
                "|---|---|---|---|---|---|"]
        for r in results["kernel"]:
            impl = r["impl"] + (f" (K-chunks of {r['k_chunk']})" if r.get("k_chunk") else "")
            out.append(f"| {r['sparsity']} | {r['block']} | {impl} | {r['median_ms']:.3f} | "
                       f"{r['gflops_nonzero']:.0f} | {r['gflops_dense_equiv']:.0f} |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["end_to_end"] if r.get("workload") == "latency" and r["model"] in SPARSITY
            and "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in ENGINES:
        pts = sorted((SPARSITY[r["model"]] * 100, r["median_ms"]) for r in rows if r["engine"] == engine)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=engine)
    ax.set_xlabel("unstructured sparsity of every linear weight (%)")
    ax.set_ylabel("latency, batch 1 × seq 128 (ms, median)")
    ax.set_title(f"BERT-base on {results['threads']} threads")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="the runs are split into this many interleaved rounds")
    ap.add_argument("--deepsparse-python", default=str(DEFAULT_DS_PYTHON))
    ap.add_argument("--openvino-python", default=str(DEFAULT_OV_PYTHON))
    ap.add_argument("--models-dir", type=Path, default=HERE / "models")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    engines = args.engines.split(",")
    pythons = {"deepsparse": args.deepsparse_python, "openvino": args.openvino_python}
    for engine in [e for e in engines if e in PEERS]:
        if not Path(pythons[engine.split("-")[0]]).exists():
            print(f"{PEERS[engine]} skipped: no {pythons[engine.split('-')[0]]} (see bench/README.md)", file=sys.stderr)
            engines.remove(engine)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "runs": args.runs,
               "rounds": args.rounds,
               "machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "end_to_end": [], "memory": [], "load": [], "kernel": []}
    for model in args.models.split(","):
        path = args.models_dir / f"{model}.onnx"
        if not path.exists():
            print(f"{path} missing: run bench/make_models.py", file=sys.stderr)
            continue
        for wl in args.workloads.split(","):
            batch, seq = WORKLOADS[wl]
            rs = measure_interleaved(engines, str(path), batch, seq, args.runs, args.threads,
                                     python=pythons, rounds=args.rounds)
            for engine, r in zip(engines, rs):
                r.update(model=model, workload=wl, engine=engine)
                results["end_to_end"].append(r)
                msg = r.get("error") or f"{r['median_ms']:.1f} ms (load {r['load_s']:.1f} s)"
                print(f"{model:22s} {wl:10s} {engine:16s} {msg}", flush=True)
                if wl == "latency" and "error" not in r:
                    results["memory"].append({k: r[k] for k in ("model", "engine", "peak_rss_mb", "load_s")})
    if not args.skip_load:
        for model in ("bert_base_p90",):
            if (args.models_dir / f"{model}.onnx").exists():
                results["load"].append(load_times(args.models_dir / f"{model}.onnx", args.threads))
                print("load", results["load"][-1], flush=True)
    if not args.skip_kernel:
        results["kernel"] = kernel_level(args.threads, max(args.runs, 20))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    plotted = plot(results, args.out / "latency_vs_sparsity.png")
    print(markdown(results))
    print("wrote", args.out / "results.json", args.out / "results.md",
          "and the plot" if plotted else "(no plot: pip install matplotlib)")


if __name__ == "__main__":
    main()
