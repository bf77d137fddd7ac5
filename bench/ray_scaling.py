"""How embedding throughput scales with Ray actors on this machine: all-MiniLM-L6-v2 90%
(bench/models/text/minilm_p90, made by embed_throughput.py) over a generated corpus,
through `sparsejit.ray.map_batches` with 1 actor of 2 CPUs (2 kernel threads) and 2
actors of 1 CPU, against the pipeline in one process with 2 threads.

    python bench/ray_scaling.py [--sentences 5000]

Each Ray run's time includes starting its actors and loading the model in each; a run
over 64 sentences measures that part alone. Writes bench/results/ray_scaling.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from embed_throughput import MODELS_DIR, corpus, cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=5000)
    args = ap.parse_args()
    import ray

    import sparsejit
    import sparsejit.ray as sray

    folder = MODELS_DIR / "minilm_p90"
    texts = corpus(args.sentences, seed=3)
    rows = []
    embed = sparsejit.pipeline("sentence-embeddings", folder, num_threads=2)
    embed(texts[:64])
    start = time.perf_counter()
    embed(texts)
    rows.append(("one process, 2 threads (no Ray)", time.perf_counter() - start, 0.0))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for actors, cpus in [(1, 2), (2, 1)]:
        def run(items, actors=actors, cpus=cpus):
            ds = ray.data.from_items([{"text": t} for t in items])
            start = time.perf_counter()
            sray.map_batches(ds, folder, concurrency=actors, num_cpus=cpus, batch_size=256).materialize()
            return time.perf_counter() - start

        startup = run(texts[:64])
        rows.append((f"Ray Data, {actors} actor(s) x {cpus} CPU", run(texts), startup))
    ray.shutdown()
    head = (f"Embedding {len(texts):,} generated sentences, all-MiniLM-L6-v2 90%; {cpu_name()}, "
            f"{time.strftime('%Y-%m-%d')}.")
    lines = [head, "",
             "| how | seconds | sentences/s | of which actor start-up and load (64-sentence run) |", "|---|---|---|---|"]
    lines += [f"| {how} | {s:.1f} | {len(texts) / s:.0f} | {f'{up:.1f} s' if up else '-'} |" for how, s, up in rows]
    (HERE / "results" / "ray_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
