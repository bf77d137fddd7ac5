"""The demo: load the embedded pruned BERT, run it, check it, time sparse against dense.

    python -m sparsejit.demo
"""

from __future__ import annotations

import time

import numpy as np

import sparsejit
from sparsejit.benchmark import time_calls


def _median_ms(fn, runs: int = 20) -> float:
    return float(np.median(time_calls(fn, runs))) * 1e3


def main() -> int:
    path = sparsejit.default_model_path()
    t0 = time.perf_counter()
    model = sparsejit.load(path)
    print(f"loaded {path.name} in {time.perf_counter() - t0:.2f} s on {model.num_threads} thread(s)")
    sparse = sum(lp.sparse for lp in model.layers)
    print(f"{len(model.layers)} linear layers: {sparse} generated sparse kernels, "
          f"{len(model.layers) - sparse} dense GEMM (chosen by measurement)")

    rng = np.random.default_rng(0)
    batch, seq = 4, 128
    ids = rng.integers(2, 256, size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 100:] = 0  # a padded row
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    outputs = model.run(feeds)
    for name, out in zip(model.output_names, outputs):
        print(f"  {name}: shape {out.shape}, mean {out.mean():+.4f}, std {out.std():.4f}")

    report = model.check()
    print("\nper-layer check against the dense numpy product of the same weights:")
    print(report)
    reference = sparsejit.load(path, mode="reference").run(feeds)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(outputs, reference))
    print(f"\nwhole model against the dense numpy reference graph: max |error| {worst:.2e}")

    dense = sparsejit.load(path, kernels="dense")
    t_sparse = _median_ms(lambda: model.run(feeds))
    t_dense = _median_ms(lambda: dense.run(feeds))
    print(f"\nlatency, batch {batch} x seq {seq}, median of 20: sparsejit {t_sparse:.2f} ms, "
          f"forced dense {t_dense:.2f} ms ({t_dense / t_sparse:.2f}x)")
    ok = report.ok and worst < 1e-3
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
