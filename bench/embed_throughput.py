"""Sentences per second embedding a corpus: sparsejit's pipeline against
sentence-transformers (PyTorch, and its ONNX backend on ONNX Runtime) and DeepSparse's
pipeline, on all-MiniLM-L6-v2 dense and pruned to 90%, the same threads for every engine.

    python bench/embed_throughput.py                       # 10,000 sentences, 2 threads, 3 rounds
    python bench/embed_throughput.py --sentences 2000 --rounds 2 --engines sparsejit,st-onnx

The corpus is generated (no text set ships offline with realistic sentences): word counts
drawn from a log-normal with median about 12 words and a long tail (about 3% above 60 words,
the longest truncated at the model's 256 tokens), from a vocabulary of common English
words, so that batching by length matters as it does on real text.

Each engine runs in a process of its own holding the loaded model; the engines take
turns, round by round, each timing one pass over the whole corpus (batch size 32, the
sentence-transformers default), so a slow spell of the machine lands on every engine
alike. Reported: median sentences/s per engine and model, and each engine's ratio to
sparsejit paired by round. Each engine's embeddings of the first 200 sentences are
compared with sparsejit's (minimum cosine), so the speeds are of the same answers.
Writes bench/results/embed_throughput.{json,md} (--out: another name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sparsejit.benchmark import cpu_name

HERE = Path(__file__).resolve().parent
MODELS_DIR = HERE / "models" / "text"
DEFAULT_DS_PYTHON = HERE / ".venv-deepsparse" / "bin" / "python"
# sparsejit-bf16: sparsejit's pipeline with precision="bf16" (float32 where the CPU has no AVX512-BF16)
ENGINES = ["sparsejit", "sparsejit-bf16", "st-torch", "st-onnx", "deepsparse"]
_VOCAB_TEXT = ("the of and to a in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no more out up into do any your "
         "what some can time about only other new people could these also two may first then way well should "
         "because each just those how years most where much through state between own many after world being "
         "under never city during model water long government system used since against small place large "
         "development however group number important without public several information research report "
         "according market country service company president national children himself history political")
VOCAB = _VOCAB_TEXT.split()


def corpus(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(13), 0.75, n).astype(int), 1, 400)
    words = np.array(VOCAB)
    return [" ".join(rng.choice(words, k)).capitalize() + "." for k in lengths]


# --- the worker: one engine, one model, loaded once ------------------------------------

def _engine(name: str, folder: Path, threads: int):
    """A function texts → embeddings [n, dim] (normalised, mean-pooled: MiniLM's own)."""
    if name in ("sparsejit", "sparsejit-bf16"):
        import sparsejit

        return sparsejit.pipeline("sentence-embeddings", folder, num_threads=threads, batch_size=32,
                                  precision="bf16" if name == "sparsejit-bf16" else "fp32")
    if name == "st-torch":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(str(folder / "hf"), device="cpu")
        return lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True)
    if name == "st-onnx":
        import onnxruntime as ort
        from sentence_transformers import SentenceTransformer

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        model = SentenceTransformer(str(folder), backend="onnx", device="cpu",
                                    model_kwargs={"file_name": "model.onnx", "provider": "CPUExecutionProvider",
                                                  "session_options": so})
        return lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True)
    if name == "deepsparse":
        import shutil
        import tempfile

        from deepsparse import Pipeline

        # DeepSparse rewrites the ONNX file's input shapes in place: it gets a copy.
        copy = Path(tempfile.mkdtemp()) / folder.name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("hf"))
        folder = copy
        # Its best set-up: one engine per length bucket (it pads to a fixed length), the whole
        # graph (no truncation to a layer); its mean leaves out [CLS] as well as padding.
        pipe = Pipeline.create(task="transformers_embedding_extraction", model_path=str(folder),
                               emb_extraction_layer=None, extraction_strategy="reduce_mean",
                               sequence_length=[32, 64, 128, 256], batch_size=32, num_cores=threads,
                               return_numpy=True)

        def run(texts):
            out = []
            for i in range(0, len(texts), 32):
                chunk = texts[i:i + 32]
                pad = chunk + [""] * (32 - len(chunk))  # the engine is compiled for batch 32
                e = np.asarray(pipe(inputs=pad).embeddings, np.float32)[:len(chunk)]
                out.append(e / np.linalg.norm(e, axis=1, keepdims=True))
            return np.concatenate(out)

        return run
    raise ValueError(name)


def worker(args) -> None:
    texts = json.loads(Path(args.texts).read_text())
    run = _engine(args.worker, Path(args.model), args.threads)
    run(texts[:64])  # warm-up: compiles, allocates
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            start = time.perf_counter()
            run(texts)
            print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
        elif cmd == "embed":
            print(json.dumps({"embeddings": np.asarray(run(texts[:200]), np.float32).tolist()}), flush=True)
        else:
            break


# --- the driver -------------------------------------------------------------------------

def make_models() -> dict[str, Path]:
    """bench/models/text/{minilm,minilm_p90}: exported folders, each with its HF folder in hf/."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import text_models

    import sparsejit

    out = {}
    for name in ("minilm", "minilm_p90"):
        folder = MODELS_DIR / name
        if not (folder / "model.onnx").is_file():
            hf = folder / "hf"
            if name == "minilm":
                import shutil

                shutil.copytree(text_models.minilm_folder(), hf, dirs_exist_ok=True)
            else:
                text_models.pruned_minilm(hf, 0.9)
            sparsejit.export(hf, folder)
        out[name] = folder
    return out


class Worker:
    def __init__(self, engine: str, model: Path, threads: int, texts: Path, python: str):
        self.engine = engine
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([python, __file__, "--worker", engine, "--model", str(model), "--threads",
                                      str(threads), "--texts", str(texts)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker exited ({self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def measure(model_name: str, folder: Path, engines: list[str], args, texts_file: Path, n: int) -> list[dict]:
    workers = {}
    for e in engines:
        python = args.deepsparse_python if e == "deepsparse" else sys.executable
        if e == "deepsparse" and not Path(python).exists():
            print(f"  deepsparse: no venv at {python}; left out", flush=True)
            continue
        if e == "st-torch" and model_name != "minilm":
            continue  # PyTorch multiplies every zero: the pruned model runs as the dense one does
        print(f"  loading {e} on {model_name}", flush=True)
        workers[e] = Worker(e, folder, args.threads, texts_file, python)
    reference = np.asarray(workers["sparsejit"].ask("embed")["embeddings"])
    agree = {}
    for e, w in workers.items():
        got = np.asarray(w.ask("embed")["embeddings"])
        agree[e] = float(((got * reference).sum(1) / np.linalg.norm(got, axis=1)
                          / np.linalg.norm(reference, axis=1)).min())
    times: dict[str, list[float]] = {e: [] for e in workers}
    order = list(workers)
    for r in range(args.rounds):
        for e in order[r % len(order):] + order[:r % len(order)]:
            time.sleep(0.3)
            times[e].append(workers[e].ask("run")["seconds"])
        print(f"  round {r + 1}: " + ", ".join(f"{e} {n / times[e][-1]:.0f}/s" for e in order), flush=True)
    for w in workers.values():
        w.close()
    rows = []
    for e in workers:
        ratios = [times[e][i] / times["sparsejit"][i] for i in range(args.rounds)]
        rows.append({"model": model_name, "engine": e, "sentences_per_s": n / statistics.median(times[e]),
                     "seconds": times[e], "sparsejit_speedup": statistics.median(ratios),
                     "min_cosine_vs_sparsejit": agree[e]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sentences", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--deepsparse-python", default=os.environ.get("SPARSEJIT_DEEPSPARSE_PYTHON",
                                                                  str(DEFAULT_DS_PYTHON)))
    ap.add_argument("--out", default="embed_throughput", help="results file name in bench/results (.json, .md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--texts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    texts = corpus(args.sentences)
    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    texts_file = MODELS_DIR / f"corpus_{args.sentences}.json"
    texts_file.write_text(json.dumps(texts))
    engines = args.engines.split(",")
    rows = []
    for name, folder in make_models().items():
        rows += measure(name, folder, engines, args, texts_file, len(texts))
    words = [len(t.split()) for t in texts]
    meta = {"cpu": cpu_name(), "threads": args.threads, "sentences": len(texts), "rounds": args.rounds,
            "words_median": statistics.median(words), "words_p95": float(np.percentile(words, 95)),
            "date": time.strftime("%Y-%m-%d")}
    results = HERE / "results"
    (results / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = (f"Embedding {len(texts):,} generated sentences (median {meta['words_median']:.0f} words, p95 "
            f"{meta['words_p95']:.0f}), batch 32, {args.threads} threads, {args.rounds} rounds; {meta['cpu']}, "
            f"{meta['date']}.")
    lines = [head, "",
             "| model | engine | sentences/s | sparsejit speedup (their time / sparsejit's, paired by round) | min cosine vs sparsejit |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['engine']} | {r['sentences_per_s']:.0f} | {r['sparsejit_speedup']:.2f}x | "
                     f"{r['min_cosine_vs_sparsejit']:.6f} |")
    (results / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
