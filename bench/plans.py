"""One model under several plans, in one process, taking turns: the kernels' choice
against its alternatives, paired by round (the machine's slow moments fall on all).

The plans: every Linear layer on the sparse kernels (VNNI for int8; `kernels="sparse"`),
every layer on AMX's dense tiles, every layer on AMX's compressed tiles (`kernels="dense"`,
amx.COMPRESS_BELOW at 0 and above 1), and `kernels="auto"`, the plan timed at load. Each
plan's time is given over the sparse plan's, median and quartiles of the rounds' ratios.
Without AMX only the sparse and auto plans run.

    python bench/plans.py MODEL [--batch 1] [--seq 128] [--rounds 30] [--precision bf16]

The ninth session's numbers in bench/README.md came from this. Not part of CI.
"""

from __future__ import annotations

import argparse
import collections
import time

import numpy as np
from sparsejit.kernels import amx

import sparsejit

# name: (kernels=, amx.COMPRESS_BELOW while loading)
PLANS = {"sparse": ("sparse", amx.COMPRESS_BELOW), "AMX dense tiles": ("dense", 0.0),
         "AMX compressed tiles": ("dense", 1.01), "auto": ("auto", amx.COMPRESS_BELOW)}


def kernel_counts(model) -> dict:
    """{kernel class (+ " compressed"): layers} of a loaded model."""
    def name(lp):
        impl = getattr(lp.impl, "group", lp.impl)
        compressed = getattr(getattr(impl, "config", None), "compressed", False)
        return type(impl).__name__ + (" compressed" if compressed else "")
    return dict(collections.Counter(name(lp) for lp in model.layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    tiles = amx.has_amx("bf16" if args.precision == "bf16" else "int8")
    models, default = {}, amx.COMPRESS_BELOW
    for name, (kernels, below) in PLANS.items():
        if name.startswith("AMX") and not tiles:
            continue
        amx.COMPRESS_BELOW = below
        models[name] = sparsejit.load(args.model, kernels=kernels, precision=args.precision)
        amx.COMPRESS_BELOW = default
        print(f"{name}: {kernel_counts(models[name])}")
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 100, (args.batch, args.seq)),  # (inside any vocabulary here)
             "attention_mask": np.ones((args.batch, args.seq), np.int64),
             "token_type_ids": np.zeros((args.batch, args.seq), np.int64)}
    feeds = {k: v for k, v in feeds.items() if k in models["sparse"].input_names}
    for m in models.values():
        m.run(feeds)
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            t = time.perf_counter()
            m.run(feeds)
            times[name].append(time.perf_counter() - t)
    base = np.array(times["sparse"])
    print(f"batch {args.batch}, seq {args.seq}, {args.rounds} rounds; time over the sparse plan's, paired by round")
    for name, ts in times.items():
        q = np.percentile(np.array(ts) / base, [25, 50, 75])
        print(f"{name:>22}: median {np.median(ts) * 1e3:.1f} ms, {q[1]:.3f} (quartiles {q[0]:.2f}-{q[2]:.2f})")


if __name__ == "__main__":
    main()
