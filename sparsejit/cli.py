"""The `sparsejit` command line: run, bench, inspect, check, kernel, prune, quantize, export.

    sparsejit run model.onnx --batch 2 --seq 64
    sparsejit bench model.onnx --vs dense,ort
    sparsejit inspect model.onnx --plot layers.png
    sparsejit check model.onnx
    sparsejit kernel model.onnx 0
    sparsejit prune model.onnx --sparsity 0.9 --block 4 -o model_p90.onnx
    sparsejit export hf_model_folder -o model_folder

Errors (a missing file, an unsupported op, bad arguments) print one line naming what
was wrong and exit with status 2; `check` exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from .benchmark import make_inputs
from .choose import KERNEL_CHOICES

log = logging.getLogger("sparsejit")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


# --- helpers --------------------------------------------------------------------------


def _progress_printer(stream=None):
    """Layers done / total and how many reused an earlier layer's timing; silent off a terminal."""
    stream = stream or sys.stdout
    if not stream.isatty():
        return None
    reused = 0

    def show(done: int, total: int, layer) -> None:
        nonlocal reused
        reused += layer.timing_reused
        bar = "#" * (30 * done // total)
        stream.write(f"\rplanning kernels [{bar:<30}] {done}/{total} layers, {reused} timed like an earlier one")
        if done == total:
            stream.write("\n")
        stream.flush()

    return show


def _load(args, **kw):
    import sparsejit

    path = Path(args.model)
    if not path.exists():
        raise CLIError(f"model file not found: {path}")
    try:
        return sparsejit.load(path, num_threads=getattr(args, "threads", None),
                              kernels=getattr(args, "kernels", "auto"), progress=_progress_printer(), **kw)
    except sparsejit.UnsupportedModelError as e:
        raise CLIError(str(e)) from e
    except (ValueError, FileNotFoundError, IsADirectoryError) as e:
        raise CLIError(str(e)) from e


def _inputs(model, args) -> dict[str, np.ndarray]:
    """Inputs from --inputs FILE.npz, or generated ids with a full mask for --batch × --seq."""
    if getattr(args, "inputs", None):
        path = Path(args.inputs)
        if not path.exists():
            raise CLIError(f"inputs file not found: {path}")
        try:
            with np.load(path) as data:
                feeds = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise CLIError(f"{path}: not a readable .npz file: {e}") from e
        return feeds
    if args.batch < 1 or args.seq < 1:
        raise CLIError(f"--batch and --seq must be >= 1, got {args.batch} and {args.seq}")
    arrays = make_inputs([(s.name, str(s.dtype)) for s in model.inputs], args.batch, args.seq)
    return dict(zip(model.input_names, arrays))


def _run_checked(model, feeds):
    try:
        return model.run(feeds)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from e


# --- subcommands ----------------------------------------------------------------------


def cmd_run(args) -> int:
    model = _load(args)
    feeds = _inputs(model, args)
    t0 = time.perf_counter()
    outputs = _run_checked(model, feeds)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"{Path(args.model).name}: {len(model.layers)} linear layers "
          f"({sum(lp.kind == 'sparse' for lp in model.layers)} sparse), ran in {ms:.1f} ms (first run)")
    for name, a in zip(model.input_names, (feeds[n] for n in model.input_names)):
        print(f"  input  {name:24s} {a.dtype}{list(a.shape)}")
    for name, out in zip(model.output_names, outputs):
        print(f"  output {name:24s} {out.dtype}{list(out.shape)}  mean {out.mean():+.5f}  std {out.std():.5f}  "
              f"min {out.min():+.4f}  max {out.max():+.4f}")
    if args.output:
        np.savez(args.output, **dict(zip(model.output_names, outputs)))
        print(f"saved outputs to {args.output}")
    return 0


def cmd_bench(args) -> int:
    from .benchmark import ENGINES, measure_interleaved, paired_ratio

    engines = ["sparsejit"] + [e for e in (args.vs.split(",") if args.vs else []) if e]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise CLIError(f"unknown engine(s) {unknown} in --vs; choose from {', '.join(ENGINES[1:])}")
    if not Path(args.model).exists():
        raise CLIError(f"model file not found: {args.model}")
    if args.runs < 1 or args.batch < 1 or args.seq < 1 or args.threads < 1:
        raise CLIError("--runs, --batch, --seq and --threads must be >= 1")
    print(f"{Path(args.model).name}: batch {args.batch}, seq {args.seq}, {args.threads} threads for every engine, "
          f"median of {args.runs} runs in {min(5, args.runs)} interleaved rounds")
    print(f"{'engine':<12} {'median ms':>10} {'min':>8} {'max':>8} {'items/s':>9} {'load s':>7} "
          f"{'peak RSS MB':>12}  vs sparsejit")
    base = None
    failed = False
    rounds = min(5, args.runs)
    for engine, r in zip(engines, measure_interleaved(engines, args.model, args.batch, args.seq, args.runs,
                                                      args.threads, python=args.deepsparse_python, rounds=rounds)):
        if "error" in r:
            print(f"{engine:<12} error: {r['error']}")
            failed |= engine == "sparsejit"
            continue
        base = base or r
        # time relative to sparsejit's, as the median of per-round ratios (see paired_ratio)
        ratio = paired_ratio(base, r) or r["median_ms"] / base["median_ms"]
        print(f"{engine:<12} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['max_ms']:>8.2f} {r['items_per_s']:>9.1f} "
              f"{r['load_s']:>7.2f} {r['peak_rss_mb']:>12.0f}  {ratio:.2f}x time")
    return 1 if failed else 0


def _fmt_flops(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def cmd_inspect(args) -> int:
    model = _load(args)
    feeds = _inputs(model, args)
    _run_checked(model, feeds)
    prof = model.profile(feeds, runs=args.runs)
    tokens = args.batch * args.seq
    rows = []
    print(f"{Path(args.model).name}: batch {args.batch} x seq {args.seq} = {tokens} tokens, "
          f"{model.num_threads} threads, median of {args.runs} runs")
    head = (f"{'#':>3} {'layer':<44} {'op':<6} {'in x out':>10} {'density':>7} {'block':>5} {'kernel':<6} "
            f"{'FLOPs skipped':>13} {'ms':>7} {'decided by':<11}  why")
    print(head)
    print("-" * len(head))
    for i, lp in enumerate(model.layers):
        k, m = lp.pattern_shape
        dense_flops = 2 * k * m * tokens
        skipped = dense_flops * (1 - lp.pattern.density) if lp.kind == "sparse" else 0.0
        ms = prof.get(lp.name, 0.0) * 1e3
        op = lp.node.attrs["source_op"]
        rows.append((lp, ms, skipped, dense_flops))
        print(f"{i:>3} {lp.name[-44:]:<44} {op:<6} {f'{k}x{m}':>10} {lp.pattern.density:>7.3f} "
              f"{lp.pattern.block:>5} {lp.kind:<6} {_fmt_flops(skipped):>13} {ms:>7.3f} {lp.decided_by:<11}  "
              f"{lp.reason}")
    total_ms = sum(prof.values()) * 1e3
    lin_ms = sum(r[1] for r in rows)
    dense_total = sum(r[3] for r in rows)
    skipped_total = sum(r[2] for r in rows)
    print("-" * len(head))
    print(f"linear layers: {len(rows)} ({sum(lp.kind == 'sparse' for lp in model.layers)} sparse), "
          f"{lin_ms:.2f} ms; FLOPs skipped {_fmt_flops(skipped_total)} of {_fmt_flops(dense_total)} "
          f"({100 * skipped_total / max(dense_total, 1):.1f}%)")
    others: dict[str, float] = {}
    by_name = {n.name: n.op_type for n in model.graph.nodes}
    for name, sec in prof.items():
        if name not in {lp.name for lp in model.layers}:
            others[by_name.get(name, "?")] = others.get(by_name.get(name, "?"), 0.0) + sec * 1e3
    print("other ops: " + ", ".join(f"{op} {ms:.2f} ms" for op, ms in sorted(others.items(), key=lambda x: -x[1])))
    print(f"total: {total_ms:.2f} ms per run (sum of node medians)")
    if args.plot:
        _plot_layers(rows, args.plot, Path(args.model).name)
        print(f"wrote {args.plot}")
    return 0


def _plot_layers(rows, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise CLIError("--plot needs matplotlib: pip install 'sparsejit[plot]'") from e
    idx = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, len(rows) * 0.12 + 3), 5.5), sharex=True)
    a1.bar(idx, [100 * (1 - r[0].pattern.density) for r in rows],
           color=["tab:green" if r[0].kind == "sparse" else "tab:gray" for r in rows])
    a1.set_ylabel("sparsity %")
    a1.set_title(f"{title}: per-layer sparsity (green: sparse kernel) and time")
    a2.bar(idx, [r[1] for r in rows], color="tab:blue")
    a2.set_ylabel("ms per run")
    a2.set_xlabel("linear layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cmd_check(args) -> int:
    model = _load(args)
    oracle, why_not = _whole_model_oracle(model, args.model)
    if why_not:
        print(f"NOTE: {why_not}\n")
    report = model.check()
    print(f"every kernel against the dense numpy product of the same weights ({len(report)} layers):")
    print(report)
    ok = report.ok
    if oracle is not None:
        name, run = oracle
        print(f"\nwhole model against {name} (atol {args.atol}, rtol {args.rtol}):")
        for batch, seq in [(1, 7), (2, args.seq)]:
            ns = argparse.Namespace(inputs=None, batch=batch, seq=seq)
            feeds = _inputs(model, ns)
            mask = next((n for n in feeds if "mask" in n), None)
            if mask and seq > 2 and batch > 1:
                feeds[mask][1, seq // 2:] = 0  # a padded row
            got = _run_checked(model, feeds)
            want = run(feeds)
            for out, g, w in zip(model.output_names, got, want):
                err = float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0
                good = g.shape == w.shape and np.allclose(g, w, atol=args.atol, rtol=args.rtol)
                ok &= good
                print(f"  batch {batch} seq {seq:<4} {out:<24} max |err| {err:.2e}  {'ok' if good else 'MISMATCH'}")
    if not ok:
        print("MISMATCH")
    else:
        print("OK" if oracle is not None else "kernels OK; the whole model was NOT checked (see the note above)")
    return 0 if ok else 1


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


def cmd_kernel(args) -> int:
    model = _load(args)
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


def cmd_prune(args) -> int:
    from .prune import prune_model

    if not Path(args.model).exists():
        raise CLIError(f"model file not found: {args.model}")
    try:
        _, report = prune_model(args.model, args.output, args.sparsity, args.block, args.scope)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from e
    total = sum(r.shape[0] * r.shape[1] for r in report)
    zeros = sum(r.sparsity_after * r.shape[0] * r.shape[1] for r in report)
    for r in report:
        log.info("%s %s: sparsity %.3f -> %.3f", r.name, r.shape, r.sparsity_before, r.sparsity_after)
    print(f"pruned {len(report)} weights ({args.scope}, block {args.block}): {100 * zeros / total:.1f}% of "
          f"{total:,} weights are zero; wrote {args.output}")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_model

    if not Path(args.model).exists():
        raise CLIError(f"model file not found: {args.model}")
    try:
        quantize_model(args.model, args.output, args.mode, args.calibration)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from e
    print(f"quantized {args.model} ({args.mode} activations, symmetric per-channel int8 weights); wrote {args.output}")
    return 0


def cmd_export(args) -> int:
    from .hf_export import ExportError, export

    start = time.perf_counter()
    try:
        path = export(args.folder, args.output, task=args.task, opset=args.opset, verify=not args.no_verify)
    except (ImportError, ValueError, FileNotFoundError, ExportError) as e:
        raise CLIError(str(e)) from e
    checked = "" if args.no_verify else ", loaded by sparsejit and matching PyTorch"
    print(f"exported {args.folder} to {path} in {time.perf_counter() - start:.1f} s{checked}; "
          f"open it with sparsejit.pipeline(task, {str(args.output)!r})")
    return 0


def cmd_serve(args) -> int:
    from .serve import ServeConfig, serve

    if not Path(args.model).exists():
        raise CLIError(f"model not found: {args.model}")
    try:
        config = ServeConfig(args.model, args.task, args.name or "", args.max_batch, args.max_wait_ms,
                             args.max_items, args.max_tokens, args.max_queue, args.threads, args.api_key_env)
        if config.api_key_env and not os.environ.get(config.api_key_env):
            raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is not set")
        serve(config, args.host, args.port, args.workers)
    except (ImportError, ValueError) as e:
        raise CLIError(str(e)) from e
    return 0


# --- argument parsing -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsejit", description="Run, time, inspect and check sparse ONNX models.")
    p.add_argument("--verbose", "-v", action="store_true", help="log what load decides (standard logging, DEBUG)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_model(name, help_, threads=True):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("model", help="ONNX model file")
        if threads:
            sp.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
            sp.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
        return sp

    sp = with_model("run", "run on given or generated inputs; print output shapes and statistics")
    sp.add_argument("--inputs", help=".npz file of inputs by name (default: generated)")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--seq", type=int, default=128)
    sp.add_argument("--output", "-o", help="save the outputs to this .npz file")
    sp.set_defaults(func=cmd_run)

    sp = with_model("bench", "latency and throughput against other engines (each in its own process)", False)
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--seq", type=int, default=128)
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--runs", type=int, default=20)
    sp.add_argument("--vs", default="dense,ort", help="comma-separated: dense (sparsejit forced dense), ort, deepsparse")
    sp.add_argument("--deepsparse-python", default=None,
                    help="Python of a venv with deepsparse==1.8.0 (or set SPARSEJIT_DEEPSPARSE_PYTHON)")
    sp.set_defaults(func=cmd_bench)

    sp = with_model("inspect", "one row per linear layer: shape, density, blocks, kernel and why, FLOPs skipped, time")
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--seq", type=int, default=128)
    sp.add_argument("--runs", type=int, default=5)
    sp.add_argument("--plot", help="draw per-layer sparsity and time to this PNG (needs matplotlib)")
    sp.set_defaults(func=cmd_inspect, inputs=None)

    sp = with_model("check", "every kernel against dense numpy, the whole model against ONNX Runtime")
    sp.add_argument("--seq", type=int, default=33)
    sp.add_argument("--atol", type=float, default=1e-4)
    sp.add_argument("--rtol", type=float, default=1e-4)
    sp.set_defaults(func=cmd_check)

    sp = with_model("kernel", "print the generated source of one layer's kernel")
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
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("model", help="model folder")
    sp.add_argument("--task", choices=list(TASKS), required=True)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (loopback unless told otherwise)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--name", default=None, help="the model's name in responses (default: the folder's)")
    sp.add_argument("--max-batch", type=int, default=32, help="items per model call")
    sp.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    sp.add_argument("--max-items", type=int, default=256, help="items per request")
    sp.add_argument("--max-tokens", type=int, default=65536, help="tokens per request")
    sp.add_argument("--max-queue", type=int, default=1024, help="items waiting before requests get 503")
    sp.add_argument("--workers", type=int, default=1, help="server processes, each with the model loaded")
    sp.add_argument("--threads", type=int, default=None, help="kernel threads per process (default: all cores)")
    sp.add_argument("--api-key-env", default=None,
                    help="environment variable holding an API key every route but /health then requires")
    sp.set_defaults(func=cmd_serve)


def _file_commands(sub) -> None:
    """The commands that write a new model: prune, quantize, export."""
    sp = sub.add_parser("prune", help="magnitude-prune MatMul/Gemm weights into a new ONNX file",
                        description="magnitude-prune MatMul/Gemm weights into a new ONNX file")
    sp.add_argument("model", help="ONNX model file")
    sp.add_argument("--sparsity", type=float, required=True, help="fraction of weights to zero, in [0, 1)")
    sp.add_argument("--block", type=int, default=1, help="prune this many consecutive input weights together")
    sp.add_argument("--scope", choices=["layer", "global"], default="layer",
                    help="the same sparsity in every layer, or one threshold over all")
    sp.add_argument("-o", "--output", required=True, help="output ONNX file")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("quantize", help="INT8 model for the int8 kernels (onnxruntime.quantization)",
                        description="INT8 model for the int8 kernels: symmetric per-channel int8 weights (pruned "
                                    "zeros stay zero), activations quantized dynamically or from calibration")
    sp.add_argument("model", help="ONNX model file")
    sp.add_argument("--mode", choices=["dynamic", "static"], default="dynamic",
                    help="activation scales from each input at run time, or from calibration (QDQ format)")
    sp.add_argument("--calibration", help=".npz of inputs by name for static calibration (default: generated)")
    sp.add_argument("-o", "--output", required=True, help="output ONNX file")
    sp.set_defaults(func=cmd_quantize)

    from .hf_export import ALIASES, TASKS

    sp = sub.add_parser("export", help="a local Hugging Face model folder to a folder sparsejit.pipeline opens",
                        description="Export a local Hugging Face model folder (config.json, weights, tokenizer; "
                                    "a sentence-transformers folder too) to OUT: model.onnx with free batch and "
                                    "sequence, tokenizer.json, config.json and the sentence-transformers files. "
                                    "Needs torch and transformers (pip install 'sparsejit[export]').")
    sp.add_argument("folder", help="Hugging Face model folder")
    sp.add_argument("-o", "--output", required=True, help="output folder")
    sp.add_argument("--task", choices=[*TASKS, *ALIASES], default=None,
                    help="what the ONNX model outputs (default: from config.json's architectures)")
    sp.add_argument("--opset", type=int, default=14, help="ONNX opset (default: 14)")
    sp.add_argument("--no-verify", action="store_true", help="skip loading the export and comparing with PyTorch")
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
