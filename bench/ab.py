"""Paired A/B of sparsejit against itself: two code trees, or two model files, or both.

Each side loads in a worker process of its own and stays loaded; the sides then take
turns, `--rounds` rounds of `--runs` timed runs each, 0.2 s apart, in alternating order.
The ratio reported is the median over rounds of B's median over A's, so each ratio
compares times taken seconds apart on a noisy machine.

A worker keeps what its process drew for the whole run (where its buffers landed, which
pages are huge), so the same tree on both sides can differ for as long as the workers
live (bench/README.md, thirty-seventh session). `--restarts N` splits the rounds among N pairs of workers,
started afresh in turn with the sides' order swapped each time, and pools their rounds.

    python bench/ab.py A B [--model M] [--batch 1 --seq 128 --rounds 20 --runs 10] [--plan FILE] [--precision bf16]
                           [--threads 2] [--restarts 1]
    python bench/ab.py A B --texts --model FOLDER   # sentence-embedding pipeline calls, one text each

With `--texts`, MODEL is a pipeline folder (bench/models/text/minilm_p90, say) and a run
is one `sparsejit.pipeline("sentence-embeddings")` call on one text, the texts of
embed_throughput.py's corpus in turn (a server's single requests).

A side is `TREE` (a checkout whose sparsejit/ and kernels/ are used, e.g. a `git worktree`
of an older commit with `ln -s ../kernels sparsejit/kernels`), `TREE|MODEL` (that tree
on another model) or `.` for the installed package. `--plan` makes both sides load one
plan file, so that their K-chunks are the same. Not part of CI.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _runner(model: str, batch: int, seq: int, plan: str | None, precision: str, texts: bool, threads: int):
    """The timed unit: a run of the model on ones, or with `texts` one pipeline call on the
    corpus's next text."""
    import numpy as np

    import sparsejit

    if texts:
        from embed_throughput import corpus

        pipe = sparsejit.pipeline("sentence-embeddings", model, num_threads=threads, precision=precision)
        items, at = corpus(5000, seed=1), [0]

        def one() -> None:
            pipe(items[at[0] % len(items)])
            at[0] += 1
        for _ in range(100):
            one()
        return one
    m = sparsejit.load(model, num_threads=threads, precision=precision, **({"plan": plan} if plan else {}))
    ids = np.ones((batch, seq), np.int64)
    feeds = {n: ids if n != "token_type_ids" else 0 * ids for n in m.input_names}
    for _ in range(3):
        m.run(feeds)
    return lambda: m.run(feeds)


def worker(tree: str, model: str, batch: int, seq: int, plan: str | None, precision: str, texts: bool,
           threads: int) -> None:
    if tree != ".":
        sys.path.insert(0, tree)
    one = _runner(model, batch, seq, plan, precision, texts, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        one()
        times = []
        for _ in range(int(line)):
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
        print(f"{statistics.median(times) * 1e3:.4f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sides", nargs=2)
    ap.add_argument("--model", default="bench/models/bert_base_p90.onnx")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--plan", default=None)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--restarts", type=int, default=1, help="pairs of workers the rounds are split among")
    ap.add_argument("--texts", action="store_true", help="MODEL is a pipeline folder: one call a text")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.batch, args.seq, args.plan, args.precision, args.texts,
                      args.threads)
    times: list[list[float]] = [[], []]
    restarts = max(1, min(args.restarts, args.rounds))
    for k in range(restarts):
        started = {i: _start(args, args.sides[i]) for i in ((0, 1) if k % 2 == 0 else (1, 0))}  # (who starts first)
        procs = [started[0], started[1]]
        first = len(times[0])
        for r in range(k * args.rounds // restarts, (k + 1) * args.rounds // restarts):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                time.sleep(0.2)
                procs[i].stdin.write(f"{args.runs}\n")
                procs[i].stdin.flush()
                times[i].append(float(procs[i].stdout.readline()))
        for p in procs:
            p.stdin.close()
            p.wait()
        if restarts > 1:
            print(f"workers {k + 1}: B/A paired by round {statistics.median(b / a for a, b in zip(times[0][first:], times[1][first:])):.3f}")
    ratio = statistics.median(b / a for a, b in zip(*times))
    print(f"A {args.sides[0]}: median {statistics.median(times[0]):.2f} ms; B {args.sides[1]}: median "
          f"{statistics.median(times[1]):.2f} ms; B/A paired by round: {ratio:.3f}")


def _start(args, side: str) -> subprocess.Popen:
    """A worker for `side`, loaded."""
    tree, _, model = side.partition("|")
    cmd = [sys.executable, __file__, *args.sides, "--worker", tree, model or args.model, "--batch",
           str(args.batch), "--seq", str(args.seq), "--precision", args.precision, "--threads", str(args.threads)] + \
        (["--plan", args.plan] if args.plan else []) + (["--texts"] if args.texts else [])
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert p.stdout.readline().strip() == "ready", f"{side} did not load"
    return p


if __name__ == "__main__":
    main()
