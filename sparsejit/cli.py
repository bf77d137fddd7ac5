"""The `sparsejit` command line: run, bench, inspect, check, kernel, prune, quantize, export, serve.

    sparsejit run model.onnx --batch 2 --seq 64
    sparsejit bench model.onnx --vs dense,onnxruntime
    sparsejit inspect model.onnx --plot layers.png
    sparsejit check model.onnx --json
    sparsejit kernel model.onnx 0
    sparsejit prune model.onnx --sparsity 0.9 --block 4 -o model_p90.onnx
    sparsejit export hf_model_folder -o model_folder

Errors (a missing file, an unsupported op, bad arguments) print one line naming what
was wrong and exit with status 2, before anything slow runs where they can be found
from the arguments alone; `check` exits 1 on a mismatch. Progress goes to stderr (a
rich bar with `pip install 'sparsejit[cli]'`), results to stdout; `--json` makes the
results one JSON document.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .benchmark import latency_stats, make_inputs
from .choose import KERNEL_CHOICES, PRECISIONS
from .console import Column, Steps, print_table, print_text
from .executor import TILE_FROM, TOKEN_TILE
from .kernels import prebuild

log = logging.getLogger("sparsejit")

ENGINE_ALIASES = {"onnxruntime": "ort", "sparsejit-dense": "dense", "sparsejit-bf16": "bf16", "ov": "openvino", "ov-f32": "openvino-f32"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# --- argument types and checks made before loading ---------------------------------------


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _model_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"model file not found: {p}")
    if p.is_dir():
        raise CLIError(f"{p} is a folder; these commands take an ONNX file (sparsejit.pipeline opens folders)")
    return p


def position_table(path: Path) -> tuple[int, str] | None:
    """(rows, name) of the model's position-embedding table, read without parsing the
    weights (the file is mapped), or None when there is no table to find: the longest
    sequence the model can take, known before the slow load."""
    from .onnx_file import load_mapped

    model, mapped = load_mapped(path)
    inits = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "Gather" or not n.input or "position" not in f"{n.name} {n.input[0]}".lower():
            continue
        table = n.input[0]
        dims = mapped[table].shape if table in mapped else (
            tuple(inits[table].dims) if table in inits else None)
        if dims is not None and len(dims) == 2:
            return int(dims[0]), table
    return None


def _check_seq(path: Path, seq: int | None) -> None:
    if seq is None:
        return
    table = position_table(path)
    if table is not None and seq > table[0]:
        raise CLIError(f"--seq {seq} is longer than the model's position table ({table[0]} positions, "
                       f"{table[1]!r}): use --seq {table[0]} or less")


def _check_plot(path: str | None) -> None:
    if path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError("--plot needs matplotlib: pip install 'sparsejit[plot]'") from None


def _shape_args(args) -> None:
    """--batch/--seq describe generated inputs: refused beside --inputs, else defaulted."""
    given = [f"--{a}" for a in ("batch", "seq") if getattr(args, a, None) is not None]
    if getattr(args, "inputs", None):
        if given:
            verb = "describe" if len(given) > 1 else "describes"
            raise CLIError(f"{' and '.join(given)} {verb} generated inputs, and --inputs gives them: pass one or "
                           "the other")
        if not Path(args.inputs).exists():
            raise CLIError(f"inputs file not found: {args.inputs}")
        return
    args.batch = 1 if args.batch is None else args.batch
    args.seq = 128 if args.seq is None else args.seq


# --- loading, inputs, running ------------------------------------------------------------


def _load(args, steps: Steps, **kw):
    import sparsejit

    path = _model_file(args.model)
    steps.start(f"reading and fusing {path.name}")
    try:
        model = sparsejit.load(path, num_threads=getattr(args, "threads", None),
                               kernels=getattr(args, "kernels", "auto"), progress=steps.layer_callback(),
                               precision=getattr(args, "precision", "fp32"), **kw)
        prebuild.wait()  # (a first load's helper: all it builds in the cache before any timing or exit)
        return model
    except sparsejit.UnsupportedModelError as e:
        raise CLIError(str(e)) from e
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        raise CLIError(str(e)) from e


def _inputs(model, args) -> dict[str, np.ndarray]:
    """Inputs from --inputs FILE.npz, or generated ids with a full mask for --batch × --seq."""
    if getattr(args, "inputs", None):
        path = Path(args.inputs)
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise CLIError(f"{path}: not a readable .npz file: {e}") from e
    arrays = make_inputs([(s.name, str(s.dtype)) for s in model.inputs], args.batch, args.seq)
    return dict(zip(model.input_names, arrays))


def _run_checked(model, feeds):
    try:
        return model.run(feeds)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CLIError(str(e)) from e


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


# --- run -----------------------------------------------------------------------------------


def _first_run(args, steps: Steps):
    """Load, make the inputs and run once (the run that sets up their shape):
    (model, feeds, outputs, ms of that run)."""
    model = _load(args, steps)
    feeds = _inputs(model, args)
    steps.start("first run (sets up this input shape)")
    t0 = time.perf_counter()
    outputs = _run_checked(model, feeds)
    return model, feeds, outputs, (time.perf_counter() - t0) * 1e3


def cmd_run(args) -> int:
    path = _model_file(args.model)
    _shape_args(args)
    _check_seq(path, args.seq)
    with Steps() as steps:
        model, feeds, outputs, first_ms = _first_run(args, steps)
        steps.start("timing", total=args.runs)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            model.run(feeds)
            times.append(time.perf_counter() - t0)
            steps.advance()
    result = {"model": str(path), "threads": model.num_threads, "linear_layers": len(model.layers),
              "sparse_layers": sum(lp.sparse for lp in model.layers),
              "precision": model.precision,
              "kernels": dict(Counter(lp.kind for lp in model.layers)), "first_run_ms": first_ms,
              "latency": latency_stats(times),
              "inputs": [{"name": n, "dtype": str(feeds[n].dtype), "shape": list(feeds[n].shape)}
                         for n in model.input_names],
              "outputs": [{"name": n, "dtype": str(o.dtype), "shape": list(o.shape),
                           **({"mean": float(o.mean()), "std": float(o.std()), "min": float(o.min()),
                               "max": float(o.max())} if o.size else {})}
                          for n, o in zip(model.output_names, outputs)]}
    if args.output:
        np.savez(args.output, **dict(zip(model.output_names, outputs)))
        result["saved_to"] = str(args.output)
    if args.json:
        _emit_json(result)
    else:
        _print_run(result)
    return 0


def _kinds(counts) -> str:
    """'30 sparse, 6 dense': how many linear layers run on each kernel."""
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none"


def _print_run(r: dict) -> None:
    lat = r["latency"]
    print_text(f"{Path(r['model']).name}: {r['linear_layers']} linear layers ({_kinds(r['kernels'])}), "
          f"{r['threads']} threads")
    print_text(f"first run {r['first_run_ms']:.1f} ms (sets up this input shape); then over {lat['runs']} runs: "
          f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f}, p99 {lat['p99_ms']:.2f}, std {lat['std_ms']:.2f}")
    for i in r["inputs"]:
        print_text(f"  input  {i['name']:24s} {i['dtype']}{i['shape']}")
    for o in r["outputs"]:
        stats = (f"  mean {o['mean']:+.5f}  std {o['std']:.5f}  min {o['min']:+.4f}  max {o['max']:+.4f}"
                 if "mean" in o else "")
        print_text(f"  output {o['name']:24s} {o['dtype']}{o['shape']}{stats}")
    if "saved_to" in r:
        print_text(f"saved outputs to {r['saved_to']}")


# --- bench ---------------------------------------------------------------------------------


def _engines(text: str) -> list[str]:
    from .benchmark import ENGINES

    asked = [ENGINE_ALIASES.get(e.strip(), e.strip()) for e in text.split(",") if e.strip()]
    unknown = [e for e in asked if e not in ENGINES]
    if unknown:
        raise CLIError(f"unknown engine(s) {unknown} in --vs; choose from dense, bf16, ort (or onnxruntime), deepsparse, "
                       "openvino, openvino-f32")
    return ["sparsejit"] + [e for e in dict.fromkeys(asked) if e != "sparsejit"]


def cmd_bench(args) -> int:
    from .benchmark import cpu_name, measure_interleaved, paired_ratio, round_ratios
    from .threads import resolve_threads

    engines = _engines(args.vs)
    path = _model_file(args.model)
    _check_seq(path, args.seq)
    threads = args.threads or resolve_threads(None)
    rounds = min(5, args.runs)
    with Steps() as steps:
        def progress(stage: str, done: int, total: int) -> None:
            if done == 0:
                steps.start(stage, total=total)
            else:
                steps.advance()

        results = measure_interleaved(engines, str(path), args.batch, args.seq, args.runs, threads,
                                      python={"deepsparse": args.deepsparse_python,
                                              "openvino": args.openvino_python},
                                      rounds=rounds, progress=progress)
    base = results[0] if "error" not in results[0] else None
    rows = []
    for r in results:
        row = {k: v for k, v in r.items() if k not in ("times_s", "rounds_s")}
        if "error" not in r and base is not None:
            row["time_vs_sparsejit"] = r["p50_ms"] / base["p50_ms"]
            row["paired_time_vs_sparsejit"] = paired_ratio(base, r)
            row["per_round_time_vs_sparsejit"] = round_ratios(base, r)
        rows.append(row)
    out = {"model": str(path), "cpu": cpu_name(), "batch": args.batch, "seq": args.seq, "threads": threads,
           "runs": args.runs, "rounds": rounds, "engines": rows}
    if args.json:
        _emit_json(out)
    else:
        _print_bench(out)
    return 1 if base is None else 0


def _print_bench(out: dict) -> None:
    print_text(f"{Path(out['model']).name}: batch {out['batch']}, seq {out['seq']}, {out['threads']} threads for every "
          f"engine, {out['runs']} runs in {out['rounds']} interleaved rounds; {out['cpu']}")
    cols = [Column("engine"), *(Column(h, numeric=True) for h in
                                ("p50 ms", "p90 ms", "p99 ms", "std", "items/s", "load s", "RSS MB", "time"))]
    rows, notes = [], []
    for r in out["engines"]:
        if "error" in r:
            hint = (" (pip install 'sparsejit[check]')" if "onnxruntime" in r["error"] else
                    " (pip install openvino, or --openvino-python)" if "'openvino'" in r["error"] else "")
            notes.append(f"{r['engine']}: could not run: {r['error']}{hint}")
            continue
        ratio = f"{r['time_vs_sparsejit']:.2f}x" if "time_vs_sparsejit" in r else "-"
        rows.append([r["engine"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                     f"{r['std_ms']:.2f}", f"{r['items_per_s']:.1f}", f"{r['load_s']:.2f}",
                     f"{r['peak_rss_mb']:.0f}", ratio])
        per_round = r.get("per_round_time_vs_sparsejit") or []
        if r["engine"] != "sparsejit" and per_round:
            notes.append(f"{r['engine']}: {r['paired_time_vs_sparsejit']:.2f}x sparsejit's time paired by round "
                         f"(rounds {min(per_round):.2f}x to {max(per_round):.2f}x)")
            if abs(r["paired_time_vs_sparsejit"] / r["time_vs_sparsejit"] - 1) > 0.1:
                notes.append("  the machine's speed changed during the run (the paired and the p50 ratios differ "
                             "by over 10%): rerun with more --runs")
    footer = ["time: each engine's p50 / sparsejit's p50 (above 1: slower than sparsejit).", *notes]
    print_table(cols, rows, footer=footer)


# --- inspect -------------------------------------------------------------------------------


def _fmt_flops(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def layer_rows(model, prof: dict, tokens: int) -> list[dict]:
    """One dict per Linear layer for `inspect`: shape, density, kernel, FLOPs skipped, time;
    a layer computed inside a grouped kernel (Q, K and V) names the group's first layer,
    on which the group's time is booked."""
    from .kernels.linear import ByTokens, OutputSlice

    rows, first_of = [], {}
    for i, lp in enumerate(model.layers):
        k, m = lp.pattern_shape
        dense_flops = 2 * k * m * tokens
        group = lp.impl.group if isinstance(lp.impl, OutputSlice) else None
        lead = first_of.setdefault(id(group), i) if group is not None else i
        impl = lp.impl if group is None else group
        # (a layer on two kernels by token count, at this many tokens on AMX's dense one: no zeros skipped)
        many = isinstance(impl, ByTokens) and tokens >= impl.at
        rows.append({"index": i, "name": lp.name, "op": lp.node.attrs["source_op"], "in": k, "out": m,
                     "density": lp.pattern.density, "block": lp.pattern.block,
                     "kernel": impl.many.kind if many else lp.kind, "dense_flops": dense_flops,
                     "flops_skipped": 0.0 if many else dense_flops * lp.skipped,
                     "ms": prof.get(lp.name, 0.0) * 1e3 if lead == i else None, "time_in": lead,
                     "decided_by": lp.decided_by, "why": lp.reason})
    return rows


def cmd_inspect(args) -> int:
    path = _model_file(args.model)
    _check_plot(args.plot)
    _shape_args(args)
    _check_seq(path, args.seq)
    with Steps() as steps:
        model, feeds, _, _ = _first_run(args, steps)
        steps.start(f"profiling {args.runs} runs")
        prof = model.profile(feeds, runs=args.runs)
    tokens = args.batch * args.seq
    rows = layer_rows(model, prof, tokens)
    names = {lp.name for lp in model.layers}
    by_name = {n.name: n.op_type for n in model.graph.nodes}
    others: dict[str, float] = {}
    for name, sec in prof.items():
        if name not in names:
            op = by_name.get(name, "?")
            others[op] = others.get(op, 0.0) + sec * 1e3
    out = {"model": str(path), "batch": args.batch, "seq": args.seq, "tokens": tokens,
           "threads": model.num_threads, "runs": args.runs, "layers": rows,
           "linear_ms": sum(r["ms"] or 0.0 for r in rows),
           "other_ops_ms": dict(sorted(others.items(), key=lambda x: -x[1])), "total_ms": sum(prof.values()) * 1e3}
    if args.plot:
        from .plots import plot_layers

        plot_layers(rows, args.plot, f"{path.name}: batch {args.batch} x seq {args.seq}, "
                                     f"{model.num_threads} threads, median of {args.runs} runs")
        out["plot"] = str(args.plot)
    if args.json:
        _emit_json(out)
    else:
        _print_inspect(out, args.verbose)
    return 0


def _common_prefix(names: list[str]) -> str:
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    return prefix[:prefix.rfind("/") + 1]


def _split_block(name: str, op: str) -> tuple[str, str]:
    """(the name up to its encoder block, e.g. "encoder/layer.3/", and the rest without
    a trailing op name): inspect shows the rows under a line per block, so that the
    names fit an 80-column terminal."""
    from .plots import split_block

    head, _, rest = split_block(name)
    return head, rest.removesuffix("/" + op) or rest


def _sectioned(names: list[str], ops: list[str], prefix: str, cells: list[list[str]], at: int) -> list:
    """Table rows with each layer's short name put in at column `at`, under a section line
    per encoder block (print_table's sections)."""
    table, section = [], None
    for name, op, row in zip(names, ops, cells):
        head, short = _split_block(name[len(prefix):], op)
        if head != section:
            table.append(head or "(outside the encoder blocks)")
            section = head
        table.append([*row[:at], short, *row[at + 1:]])
    return table


def _print_inspect(out: dict, verbose: bool) -> None:
    rows = out["layers"]
    prefix = _common_prefix([r["name"] for r in rows])
    title = (f"{Path(out['model']).name}: batch {out['batch']} x seq {out['seq']} = {out['tokens']} tokens, "
             f"{out['threads']} threads, median of {out['runs']} runs"
             + (f"; layer names below start with {prefix}" if prefix else ""))
    cols = [Column("#", numeric=True), Column("layer", wrap=True), Column("in x out", numeric=True),
            Column("density", numeric=True), Column("block", numeric=True), Column("kernel"),
            Column("skipped", numeric=True), Column("ms", numeric=True)]
    table = _sectioned([r["name"] for r in rows], [r["op"] for r in rows], prefix, [
        [str(r["index"]), "", f"{r['in']}x{r['out']}", f"{r['density']:.3f}", str(r["block"]), r["kernel"],
         _fmt_flops(r["flops_skipped"]), f"{r['ms']:.3f}" if r["ms"] is not None else f"in #{r['time_in']}"]
        for r in rows], at=1)
    dense_total = sum(r["dense_flops"] for r in rows)
    skipped = sum(r["flops_skipped"] for r in rows)
    footer = [("skipped: the FLOPs a dense product would do that the kernel does not; ms: median time, "
              "'in #N' for a layer computed by layer N's grouped kernel"),
              (f"linear layers: {len(rows)} ({_kinds(Counter(r['kernel'] for r in rows))}), "
              f"{out['linear_ms']:.2f} ms; FLOPs skipped {_fmt_flops(skipped)} of {_fmt_flops(dense_total)} "
              f"({100 * skipped / max(dense_total, 1):.1f}%)"),
              "other ops: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in out["other_ops_ms"].items()),
              f"total: {out['total_ms']:.2f} ms per run (sum of node medians)"]
    if out["tokens"] >= TILE_FROM:
        footer.append(f"each node is timed alone: from {TILE_FROM} tokens, model.run takes a block's two sparse FFN layers "
                      f"together over {TOKEN_TILE}-token tiles")
    if "plot" in out:
        footer.append(f"wrote {out['plot']}")
    footer.append("" if verbose else "who decided each kernel (rule, measurement, saved plan) and why: add -v")
    print_table(cols, table, title=title, footer=[f for f in footer if f])
    if verbose:
        print_text("\nwho decided each kernel, and why:")
        for r in rows:
            print_text(f"#{r['index']} {r['name']}: {r['decided_by']}: {r['why']}")


# --- check ---------------------------------------------------------------------------------


def cmd_check(args) -> int:
    path = _model_file(args.model)
    _check_seq(path, args.seq)
    with Steps() as steps:
        model = _load(args, steps)
        steps.start("every kernel against dense numpy")
        report = model.check()
        oracle, why_not = _whole_model_oracle(model, path)
        whole = []
        if oracle is not None:
            steps.start(f"the whole model against {oracle[0]}")
            whole = _compare_whole(model, oracle[1], args)
        fp32 = _fp32_layers(model, path, args, steps) if args.fp32 else None
    ok = report.ok and all(r["ok"] for r in whole)
    out = {"model": str(path), "ok": ok, "whole_model_checked": oracle is not None,
           "oracle": oracle[0] if oracle else None, "note": why_not, "atol": args.atol, "rtol": args.rtol,
           "quantized": any(lp.kind == "int8" for lp in model.layers), "precision": model.precision,
           "kernels": [{**r.__dict__, "op": lp.node.attrs["source_op"]} for r, lp in zip(report, model.layers)],
           "whole_model": whole, "seq": args.seq, "fp32": str(args.fp32) if args.fp32 else None,
           "fp32_layers": fp32}
    if args.json:
        _emit_json(out)
    else:
        _print_check(out)
    return 0 if ok else 1


# Quantized activations: a float difference of an ulp upstream (a LayerNorm's sum in another
# order) can move a value across a rounding boundary of the next quantization, and the
# layers after amplify it, as much as the reference ops differ from themselves with one
# scale an ulp apart (bench/README, "Measured and tried"). The int8 kernels themselves are
# checked exactly (model.check); the whole model is held to the agreement ONNX Runtime
# shows with itself on INT8 files (issue 15). A bf16 model (precision="bf16") is held to
# the same cosine against the float32 oracle: each of its sparse layers rounds inputs and
# weights to 8-bit mantissas, an error the float32 tolerance cannot hold.
INT8_POOLED_COSINE = 0.999


def _pooled_cosine(g: np.ndarray, w: np.ndarray) -> float:
    """The smallest cosine similarity over the batch of the outputs averaged over tokens."""
    if g.ndim < 2 or not g.size:
        return 1.0
    pg, pw = (a.reshape(a.shape[0], -1, a.shape[-1]).mean(1).astype(np.float64) for a in (g, w))
    norms = np.linalg.norm(pg, axis=-1) * np.linalg.norm(pw, axis=-1)
    return float(np.min(np.where(norms > 0, (pg * pw).sum(-1) / np.where(norms > 0, norms, 1), 1.0)))


def _compare_whole(model, run, args) -> list[dict]:
    quantized = any(lp.kind == "int8" for lp in model.layers) or model.precision == "bf16"
    rows = []
    for batch, seq in [(1, 7), (2, args.seq)]:
        feeds = _inputs(model, argparse.Namespace(inputs=None, batch=batch, seq=seq))
        mask = next((n for n in feeds if "mask" in n), None)
        if mask and seq > 2 and batch > 1:
            feeds[mask][1, seq // 2:] = 0  # a padded row
        got, want = _run_checked(model, feeds), run(feeds)
        for out, g, w in zip(model.output_names, got, want):
            err = float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
            cosine = _pooled_cosine(g, w) if g.shape == w.shape else 0.0
            close = bool(np.allclose(g, w, atol=args.atol, rtol=args.rtol))
            good = g.shape == w.shape and (close or quantized and cosine >= INT8_POOLED_COSINE)
            rows.append({"batch": batch, "seq": seq, "output": out, "max_abs_err": err, "pooled_cosine": cosine,
                         "ok": good})
    return rows


def _fp32_layers(model, path: Path, args, steps: Steps) -> list[dict]:
    """check --fp32: each int8 layer against the layer of the FP32 file it was quantized from."""
    from .quantize import layer_errors

    if not any(lp.int8 for lp in model.layers):
        raise CLIError(f"--fp32 compares int8 layers with the FP32 weights they came from, and {path.name} "
                       "has no int8 layer")
    steps.start(f"each int8 layer against {Path(args.fp32).name}")
    fp32 = _load(argparse.Namespace(model=args.fp32, threads=getattr(args, "threads", None)), steps)
    if not any(lp.kind != "int8" for lp in fp32.layers):
        raise CLIError(f"--fp32 {args.fp32}: that model's layers are int8 too; give the file before quantization")
    feeds = _inputs(fp32, argparse.Namespace(inputs=None, batch=2, seq=args.seq))
    try:
        rows = layer_errors(model, fp32, feeds)
    except (ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"--fp32 {args.fp32}: {e}") from e
    if not any(r["fp32_layer"] for r in rows):
        raise CLIError(f"--fp32 {args.fp32}: no int8 layer of {path.name} has a layer of its name (less _quant or "
                       "_integer) and shape there; give the FP32 file it was quantized from")
    return rows


def _print_fp32_layers(out: dict) -> None:
    rows = out["fp32_layers"]
    prefix = _common_prefix([r["layer"] for r in rows])
    print_text(f"\neach int8 layer against the FP32 layer it came from in {Path(out['fp32']).name} (its weight, "
               f"and its output on the activations the FP32 model computes for batch 2 x seq {out['seq']}):")
    cols = [Column("layer", wrap=True), Column("in x out", numeric=True), Column("weight err", numeric=True),
            Column("zeros kept"), Column("output err", numeric=True), Column("output cosine", numeric=True)]

    def cells(r):
        if r["fp32_layer"] is None:
            return ["", f"{r['shape'][0]}x{r['shape'][1]}", "no FP32 layer of this name and shape", "", "", ""]
        out_err = f"{r['output_error']:.2e}" if "output_error" in r else "-"
        cos = f"{r['output_cosine']:.6f}" if "output_cosine" in r else "-"
        return ["", f"{r['shape'][0]}x{r['shape'][1]}", f"{r['weight_error']:.2e}",
                "yes" if r["zeros_kept"] else "NO", out_err, cos]

    print_table(cols, _sectioned([r["layer"] for r in rows], ["MatMul"] * len(rows), prefix,
                                 [cells(r) for r in rows], at=0),
                footer=[("err: |quantized - fp32| / |fp32| (Frobenius norms); zeros kept: every weight the FP32 "
                        "layer prunes is zero in the int8 one; '-': the two layers' epilogues differ (an "
                        "activation the int8 file computes outside the layer), so only the weights compare")])


def _maybe(err: float | None) -> str:
    return "" if err is None else f"{err:.2e}"


def _print_check(out: dict) -> None:
    if out["note"]:
        print_text(f"NOTE: {out['note']}\n")
    names = [r["layer"] for r in out["kernels"]]
    prefix = _common_prefix(names)
    print_text(f"every kernel against the dense numpy product of the same weights ({len(names)} layers"
          + (f"; names below start with {prefix}):" if prefix else "):"))
    bf16 = out["precision"] == "bf16"
    cols = [Column("layer", wrap=True), Column("kernel"), Column("in x out", numeric=True),
            Column("density", numeric=True), Column("max |err|", numeric=True), Column("max |ref|", numeric=True),
            *([Column("vs fp32", numeric=True)] if bf16 else []), Column("ok")]
    print_table(cols, _sectioned(names, [r["op"] for r in out["kernels"]], prefix, [
        ["", r["kind"], f"{r['shape'][0]}x{r['shape'][1]}", f"{r['density']:.3f}", f"{r['max_abs_err']:.2e}",
         f"{r['max_ref']:.2e}", *([_maybe(r["fp32_err"])] if bf16 else []), "yes" if r["ok"] else "NO"]
        for r in out["kernels"]], at=0))
    if bf16:
        print_text("(bf16 layers: max |err| against the product of the same bfloat16-rounded inputs and weights; "
                   "vs fp32: against the float32 weights loaded, within the rounding's bound)")
    if out["whole_model_checked"]:
        also = f", or pooled cosine >= {INT8_POOLED_COSINE} for int8 and bf16" if out["quantized"] or bf16 else ""
        print_text(f"\nwhole model against {out['oracle']} (atol {out['atol']}, rtol {out['rtol']}{also}):")
        for r in out["whole_model"]:
            print_text(f"  batch {r['batch']} seq {r['seq']:<4} {r['output']:<24} max |err| {r['max_abs_err']:.2e}  "
                       f"cosine {r['pooled_cosine']:.6f}  {'ok' if r['ok'] else 'MISMATCH'}")
        if out["quantized"]:
            print_text("  (int8 activations are quantized as the model runs: a float difference of an ulp before a "
                       "quantization can move one value a step, so the int8 model is compared by its pooled "
                       "output; its kernels above are exact)")
    if out["fp32_layers"] is not None:
        _print_fp32_layers(out)
    if not out["ok"]:
        print_text("MISMATCH")
    else:
        print_text("OK" if out["whole_model_checked"] else "kernels OK; the whole model was NOT checked (see the note above)")


def _whole_model_oracle(model, path):
    """((name, feeds -> outputs), None) for the whole-model comparison, or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, ("ONNX Runtime is not installed, so the whole model is not compared with it "
                      "(pip install 'sparsejit[check]'); only the kernels are checked")
    if any(lp.kind == "int8" for lp in model.layers):
        from .quantize import ort_u8s8_exact

        if not ort_u8s8_exact():
            import sparsejit

            reference = sparsejit.load(path, mode="reference")
            why = ("ONNX Runtime's uint8 x int8 products are not exact on this CPU (no VNNI: pairs summed in "
                   "int16 with saturation), so this int8 model is compared with the reference ops instead")
            return ("the graph on sparsejit's reference ops", reference.run), why
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (f"ONNX Runtime {ort.__version__}", lambda feeds: sess.run(None, feeds)), None


# --- kernel --------------------------------------------------------------------------------


def cmd_kernel(args) -> int:
    _model_file(args.model)
    with Steps() as steps:
        model = _load(args, steps)
    layer: str | int = args.layer
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
        if not -len(model.layers) <= layer < len(model.layers):
            raise CLIError(f"layer index {layer} out of range: the model has {len(model.layers)} linear layers "
                           "(see `sparsejit inspect`)")
    try:
        print(model.kernel_source(layer))
    except KeyError as e:
        raise CLIError(str(e.args[0])) from e
    return 0


# --- the commands that write files -------------------------------------------------------------


def cmd_prune(args) -> int:
    from .prune import prune_model

    path = _model_file(args.model)
    if not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity is the fraction of weights to zero: sparsity must be in [0, 1), "
                       f"got {args.sparsity}")
    with Steps() as steps:
        steps.start(f"pruning {path.name}")
        try:
            model, report = prune_model(path, args.output, args.sparsity, args.block, args.scope,
                                        exclude=args.exclude, heads=args.prune_heads)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from e
        steps.start("comparing outputs before and after (generated inputs, reference ops)")
        cosine = _pruning_cost(path, model)
    pruned = [r for r in report if not r.excluded]
    for r in report:
        log.info("%s %s: sparsity %.3f -> %.3f%s", r.node, r.shape, r.sparsity_before, r.sparsity_after,
                 f" (left alone: {r.excluded})" if r.excluded else "")
    _print_prune(args, pruned, [r for r in report if r.excluded], cosine)
    return 0


def _print_prune(args, pruned, excluded, cosine) -> None:
    total = sum(r.size for r in pruned)
    before = sum(r.sparsity_before * r.size for r in pruned)
    after = sum(r.sparsity_after * r.size for r in pruned)
    print_text(f"pruned {len(pruned)} MatMul/Gemm weights ({args.scope} scope, block {args.block}) to "
          f"{100 * after / total:.1f}% zero: {after:,.0f} of {total:,} weights, of which {before:,.0f} "
          f"({100 * before / total:.1f}%) were zero already; wrote {args.output}")
    if excluded:
        print_text(f"left {len(excluded)} alone: " + ", ".join(f"{r.node} ({r.excluded})" for r in excluded)
              + ("" if args.prune_heads else "; --prune-heads prunes the heads too"))
    if args.block > 1:
        unstructured = [r for r in pruned if r.block_seen != args.block]
        if unstructured:
            print_text(f"NOTE: {len(unstructured)} of the {len(pruned)} pruned weights keep zeros inside their "
                  f"{args.block}-blocks from earlier pruning, so sparsejit runs them as unstructured (block "
                  f"{unstructured[0].block_seen}); prune the dense model for {args.block}-blocks")
    if cosine is not None:
        print_text(f"WARNING: one-shot magnitude pruning costs accuracy. On generated inputs the outputs' cosine "
              f"similarity to the unpruned model's is {cosine:.4f} (mean over tokens of the first output); "
              "recover it with fine-tuning or pruning during training (oBERT, SparseML)")


def _pruning_cost(path: Path, pruned_model) -> float | None:
    """Mean cosine over the rows of the first output, unpruned vs pruned, on generated
    inputs (batch 2 x seq 16), on the reference ops; None when that cannot run."""
    import sparsejit

    try:
        before = sparsejit.load(path, mode="reference")
        after = sparsejit.load(pruned_model, mode="reference")
        feeds = dict(zip(before.input_names, make_inputs([(s.name, str(s.dtype)) for s in before.inputs], 2, 16)))
        a, b = before.run(feeds)[0], after.run(feeds)[0]
    except (ValueError, TypeError, RuntimeError, sparsejit.UnsupportedModelError) as e:
        log.info("pruning's cost not measured: %s", e)
        return None
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-30)))


def cmd_quantize(args) -> int:
    from .quantize import quantize_model

    _model_file(args.model)
    with Steps() as steps:
        steps.start(f"quantizing {Path(args.model).name} ({args.mode})")
        try:
            quantize_model(args.model, args.output, args.mode, args.calibration)
        except (ImportError, ValueError) as e:
            raise CLIError(str(e)) from e
    print_text(f"quantized {args.model} ({args.mode} activations, symmetric per-channel int8 weights); wrote {args.output}"
               f"\neach layer's error against the FP32 weights: sparsejit check {args.output} --fp32 {args.model}")
    return 0


def cmd_export(args) -> int:
    from .hf_export import ExportError, export

    start = time.perf_counter()
    with Steps() as steps:
        steps.start(f"exporting {args.folder}" + ("" if args.no_verify else " and checking it against PyTorch"))
        try:
            path = export(args.folder, args.output, task=args.task, opset=args.opset, verify=not args.no_verify)
        except (ImportError, ValueError, FileNotFoundError, ExportError) as e:
            raise CLIError(str(e)) from e
    checked = "" if args.no_verify else ", loaded by sparsejit and matching PyTorch"
    print_text(f"exported {args.folder} to {path} in {time.perf_counter() - start:.1f} s{checked}; "
          f"open it with sparsejit.pipeline(task, {str(args.output)!r})")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    if not Path(args.model).exists():
        raise CLIError(f"model not found: {args.model}")
    try:
        config = ServeConfig(args.model, args.task, args.name or "", args.max_batch, args.max_wait_ms,
                             args.max_items, args.max_tokens, args.max_queue, args.threads, args.api_key_env,
                             args.precision)
        if config.api_key_env and not os.environ.get(config.api_key_env):
            raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is not set")
        serve(config, args.host, args.port, args.workers)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from e
    return 0


# --- argument parsing ------------------------------------------------------------------------


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or not action.help:
            return action.help
        return super()._get_help_string(action)


def _common(sp, json_out: bool = False) -> None:
    """Options every subcommand takes: -v after the subcommand as before it; --json."""
    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                    help="log what load decides, and say why each kernel was chosen")
    if json_out:
        sp.add_argument("--json", action="store_true", help="print the results as one JSON document")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="sparsejit", description="Run, time, inspect and check sparse ONNX models.",
                                formatter_class=_Formatter)
    p.add_argument("--version", action="version", version=f"sparsejit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what load decides (standard logging, DEBUG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_model(name, help_, json_out=True, threads=True):
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        sp.add_argument("model", help="ONNX model file")
        if threads:
            sp.add_argument("--threads", type=positive_int, default=None, help="threads (default: all cores)")
            sp.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                            help="sparse or dense per layer by rule or measurement, or force one")
            sp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                            help="bf16: sparse layers in bfloat16 where the CPU has AVX512-BF16")
        _common(sp, json_out)
        return sp

    shape = {"batch": "batch size of the generated inputs (default: 1)",
             "seq": "sequence length of the generated inputs (default: 128)"}
    sp = with_model("run", "run on given or generated inputs; print output statistics and steady-state latency")
    sp.add_argument("--inputs", help=".npz file of inputs by name (default: generated; then no --batch/--seq)")
    sp.add_argument("--batch", type=positive_int, default=None, help=shape["batch"])
    sp.add_argument("--seq", type=positive_int, default=None, help=shape["seq"])
    sp.add_argument("--runs", type=positive_int, default=10, help="timed runs after the first")
    sp.add_argument("--output", "-o", help="save the outputs to this .npz file")
    sp.set_defaults(func=cmd_run)

    sp = with_model("bench", "latency and throughput against other engines (each in its own process)",
                    threads=False)
    sp.add_argument("--batch", type=positive_int, default=1, help="batch size")
    sp.add_argument("--seq", type=positive_int, default=128, help="sequence length")
    sp.add_argument("--threads", type=positive_int, default=None, help="threads for every engine (default: all cores)")
    sp.add_argument("--runs", type=positive_int, default=20, help="timed runs per engine")
    sp.add_argument("--vs", default="dense,ort",
                    help="comma-separated: dense (sparsejit forced dense), bf16 (sparsejit in bf16), ort or "
                         "onnxruntime, deepsparse, openvino "
                         "(its default precision: bf16 on CPUs with AMX), openvino-f32")
    sp.add_argument("--deepsparse-python", default=None,
                    help="Python of a venv with deepsparse==1.8.0 (or set SPARSEJIT_DEEPSPARSE_PYTHON)")
    sp.add_argument("--openvino-python", default=None,
                    help="Python of a venv with openvino (or set SPARSEJIT_OPENVINO_PYTHON; default: this one)")
    sp.set_defaults(func=cmd_bench)

    sp = with_model("inspect", "one row per linear layer: shape, density, blocks, kernel, FLOPs skipped, time")
    sp.add_argument("--batch", type=positive_int, default=None, help=shape["batch"])
    sp.add_argument("--seq", type=positive_int, default=None, help=shape["seq"])
    sp.add_argument("--runs", type=positive_int, default=5, help="profiled runs (the median is shown)")
    sp.add_argument("--plot", help="draw per-layer time and density to this PNG (needs matplotlib)")
    sp.set_defaults(func=cmd_inspect, inputs=None)

    sp = with_model("check", "every kernel against dense numpy, the whole model against ONNX Runtime")
    sp.add_argument("--seq", type=positive_int, default=33, help="sequence length of the batch-2 comparison")
    sp.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the whole-model comparison")
    sp.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the whole-model comparison")
    sp.add_argument("--fp32", type=Path, default=None, metavar="FILE",
                    help="for an int8 model: the FP32 file it was quantized from, to show each layer's error "
                         "against its FP32 weights")
    sp.set_defaults(func=cmd_check)

    sp = with_model("kernel", "print the generated source of one layer's kernel", json_out=False)
    sp.add_argument("layer", help="layer index (as `inspect` numbers them), node name, or 'attention'")
    sp.set_defaults(func=cmd_kernel)
    _file_commands(sub)
    _serve_command(sub)
    return p


def _serve_command(sub) -> None:
    from .pipelines import TASKS

    sp = sub.add_parser("serve", help="serve a model folder over HTTP, with dynamic batching",
                        description="Serve a model folder (as sparsejit.pipeline opens it) over HTTP: "
                                    "/v1/embeddings (OpenAI), /predict, /v2/models/NAME/infer (KServe v2), "
                                    "/health, /ready, /metrics, /docs. Needs pip install 'sparsejit[serve]'.",
                        formatter_class=_Formatter)
    sp.add_argument("model", help="model folder")
    sp.add_argument("--task", choices=list(TASKS), required=True, help="what the model does")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    sp.add_argument("--port", type=positive_int, default=8000, help="port to listen on")
    sp.add_argument("--name", default=None, help="the model's name in responses (default: the folder's)")
    sp.add_argument("--max-batch", type=positive_int, default=32, help="items per model call")
    sp.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    sp.add_argument("--max-items", type=positive_int, default=256, help="items per request")
    sp.add_argument("--max-tokens", type=positive_int, default=65536, help="tokens per request")
    sp.add_argument("--max-queue", type=positive_int, default=1024, help="items waiting before requests get 503")
    sp.add_argument("--workers", type=positive_int, default=1, help="server processes, each with the model loaded")
    sp.add_argument("--threads", type=positive_int, default=None,
                    help="kernel threads per process (default: all cores)")
    sp.add_argument("--api-key-env", default=None,
                    help="environment variable holding an API key every route but /health then requires")
    sp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                    help="bf16: Linear layers in bfloat16 where the CPU has AVX512-BF16 and it pays")
    _common(sp)
    sp.set_defaults(func=cmd_serve)


def _file_commands(sub) -> None:
    """The commands that write a new model: prune, quantize, export."""
    sp = sub.add_parser("prune", help="magnitude-prune MatMul/Gemm weights into a new ONNX file",
                        description="Magnitude-prune MatMul/Gemm weights into a new ONNX file (one shot: "
                                    "fine-tune after, or prune while training, to keep accuracy). The heads "
                                    "(pooler, classifier, QA, LM) are left dense, as SparseML's recipes do.",
                        formatter_class=_Formatter)
    sp.add_argument("model", help="ONNX model file")
    sp.add_argument("--sparsity", type=float, required=True,
                    help="fraction of the pruned layers' weights that is zero after, in [0, 1), zeros already "
                         "there included")
    sp.add_argument("--block", type=positive_int, default=1,
                    help="prune this many consecutive input weights together (4: the blocks sparse kernels use)")
    sp.add_argument("--scope", choices=["layer", "global"], default="layer",
                    help="the same sparsity in every layer, or the smallest weights over all of them")
    sp.add_argument("--exclude", action="append", default=[], metavar="REGEX",
                    help="leave alone the layers whose node or weight name matches (repeatable)")
    sp.add_argument("--prune-heads", action="store_true", help="prune the pooler and task heads too")
    sp.add_argument("-o", "--output", required=True, help="output ONNX file")
    _common(sp)
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("quantize", help="INT8 model for the int8 kernels (onnxruntime.quantization)",
                        description="INT8 model for the int8 kernels: symmetric per-channel int8 weights (pruned "
                                    "zeros stay zero), activations quantized dynamically or from calibration",
                        formatter_class=_Formatter)
    sp.add_argument("model", help="ONNX model file")
    sp.add_argument("--mode", choices=["dynamic", "static"], default="dynamic",
                    help="activation scales from each input at run time, or from calibration (QDQ format, the "
                         "Linear layers' inputs only: attention stays in float)")
    sp.add_argument("--calibration", help=".npz of inputs by name for static calibration (default: generated)")
    sp.add_argument("-o", "--output", required=True, help="output ONNX file")
    _common(sp)
    sp.set_defaults(func=cmd_quantize)
    _export_command(sub)


def _export_command(sub) -> None:
    from .hf_export import ALIASES, TASKS

    sp = sub.add_parser("export", help="a local Hugging Face model folder to a folder sparsejit.pipeline opens",
                        description="Export a local Hugging Face model folder (config.json, weights, tokenizer; "
                                    "a sentence-transformers folder too) to OUT: model.onnx with free batch and "
                                    "sequence, tokenizer.json, config.json and the sentence-transformers files. "
                                    "Needs torch and transformers (pip install 'sparsejit[export]').",
                        formatter_class=_Formatter)
    sp.add_argument("folder", help="Hugging Face model folder")
    sp.add_argument("-o", "--output", required=True, help="output folder")
    sp.add_argument("--task", choices=[*TASKS, *ALIASES], default=None,
                    help="what the ONNX model outputs (default: from config.json's architectures)")
    sp.add_argument("--opset", type=positive_int, default=14, help="ONNX opset")
    sp.add_argument("--no-verify", action="store_true", help="skip loading the export and comparing with PyTorch")
    _common(sp)
    sp.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("numba").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"sparsejit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
