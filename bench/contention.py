"""Busy machines: each engine's latency alone and beside a co-runner that burns one core.

    .venv-test/bin/python bench/contention.py [--model M] [--engines sparsejit,ort,deepsparse,openvino]

Every engine runs in a worker process of its own (sparsejit.benchmark's worker, as
`sparsejit bench` uses), all with the same thread count (default: every core). In each
round, every engine in turn (the order rotates) is timed `--runs` calls alone, then
`--runs` calls while a co-runner process spins on one core: started just before those
calls, stopped just after. The slowdown is busy over alone, per round, then the median
over rounds (both halves of a ratio were timed seconds apart). Writes
bench/results/contention.md and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparsejit.benchmark import SETTLE_S, _worker_command, cpu_name, latency_stats, round_ratios, start_worker

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "models" / "text" / "minilm_p90" / "model.onnx"
PYTHONS = {"deepsparse": str(HERE / ".venv-deepsparse" / "bin" / "python"),
           "openvino": str(HERE / ".venv-openvino" / "bin" / "python")}
BURN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


class CoRunner:
    """A process spinning on one core (the last this process may use) while in a `with`."""

    def __init__(self):
        self.core = max(os.sched_getaffinity(0))
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", BURN, str(self.core)])
        time.sleep(0.2)  # running, and on its core
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


class Worker:
    def __init__(self, engine: str, model: Path, batch: int, seq: int, threads: int):
        cmd = _worker_command(engine, str(model), batch, seq, threads, PYTHONS, ["--serve"])
        if isinstance(cmd, dict):
            raise RuntimeError(cmd["error"])  # noqa: TRY004 (an engine that cannot run, not a type error)
        self.err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close())
        self.proc, self.info = start_worker(cmd, self.err)
        if self.proc is None:
            self.err.close()
            raise RuntimeError(self.info)

    def time(self, n: int) -> list[float]:
        self.proc.stdin.write(f"time {n}\n")
        return json.loads(self.proc.stdout.readline())["times_s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()


def measure(args) -> dict:
    workers, failed = {}, {}
    for engine in args.engines.split(","):
        try:
            workers[engine] = Worker(engine, args.model, args.batch, args.seq, args.threads)
            print(f"  {engine}: loaded in {workers[engine].info['load_s']:.1f} s", flush=True)
        except RuntimeError as e:
            failed[engine] = str(e)
            print(f"  {engine}: left out ({e})", flush=True)
    live = list(workers)
    times = {e: {"alone": [], "busy": []} for e in live}
    for r in range(args.rounds):
        for engine in live[r % len(live):] + live[:r % len(live)]:
            time.sleep(SETTLE_S)
            alone = workers[engine].time(args.runs)
            with CoRunner():
                busy = workers[engine].time(args.runs)
            times[engine]["alone"].append(alone)
            times[engine]["busy"].append(busy)
            print(f"  round {r + 1}/{args.rounds} {engine}: alone {1e3 * statistics.median(alone):.2f} ms, "
                  f"busy {1e3 * statistics.median(busy):.2f} ms", flush=True)
    for w in workers.values():
        w.close()
    return {"times": times, "failed": failed}


def summary(engine: str, t: dict) -> dict:
    alone = latency_stats([x for r in t["alone"] for x in r])
    busy = latency_stats([x for r in t["busy"] for x in r])
    per_round = round_ratios({"rounds_s": t["alone"]}, {"rounds_s": t["busy"]})
    return {"engine": engine, "alone_p50": alone["p50_ms"], "alone_p90": alone["p90_ms"], "busy_p50": busy["p50_ms"],
            "busy_p90": busy["p90_ms"], "busy_min": busy["min_ms"], "slowdown": statistics.median(per_round),
            "slowdown_range": (min(per_round), max(per_round))}


def report(args, result: dict) -> str:
    rows = [summary(e, t) for e, t in result["times"].items()]
    lines = ["# Busy machine: latency alone and beside a co-runner burning one core\n",
             (f"{args.model.parent.name}/{args.model.name}, batch {args.batch}, seq {args.seq}, {args.threads} threads "
             f"for every engine; {args.rounds} rounds of {args.runs} calls alone then {args.runs} busy per engine; "
             f"{cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}.\n"),
             ("| engine | alone p50 ms | alone p90 | busy p50 ms | busy p90 | busy min | slowdown (busy/alone, "
             "paired by round) |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["slowdown_range"]
        lines.append(f"| {r['engine']} | {r['alone_p50']:.2f} | {r['alone_p90']:.2f} | {r['busy_p50']:.2f} | "
                     f"{r['busy_p90']:.2f} | {r['busy_min']:.2f} | **{r['slowdown']:.2f}x** ({lo:.2f}-{hi:.2f}) |")
    lines += [f"\n{e}: left out ({why})" for e, why in result["failed"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--engines", default="sparsejit,ort,deepsparse,openvino")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", type=int, default=20, help="calls per engine, alone and busy, in each round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "contention.md")
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"no {args.model}: make it with bench/embed_throughput.py (or pass --model)")
    text = report(args, measure(args))
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
