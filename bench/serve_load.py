"""A bounded load test of serving, on loopback: `sparsejit serve` against `deepsparse.server`
and a plain FastAPI app calling sentence-transformers (PyTorch), on all-MiniLM-L6-v2
pruned to 90% (bench/models/text/minilm_p90, made by embed_throughput.py).

    python bench/serve_load.py [--seconds 15] [--clients 1,8,64]

Each server runs alone, with 2 kernel threads, and gets one sentence per request from
1, 8 and 64 concurrent clients (threads of this process with httpx, each sending its
next request when the last is answered) for --seconds after a warm-up; reported:
requests/s, p50 and p99 latency. The clients share the 2 cores with the server, alike
for every server. Writes bench/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from embed_throughput import DEFAULT_DS_PYTHON, MODELS_DIR, corpus, cpu_name

ST_APP = '''
import os, sys
import torch
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

torch.set_num_threads(2)
model = SentenceTransformer(os.environ["ST_FOLDER"], device="cpu")
app = FastAPI()

class Body(BaseModel):
    inputs: list[str]

@app.post("/predict")
def predict(body: Body):
    return model.encode(body.inputs, normalize_embeddings=True).tolist()
'''

DS_CONFIG = """num_cores: 2
num_workers: 2
endpoints:
  - task: transformers_embedding_extraction
    route: /predict
    model: {model}
    batch_size: 1
    kwargs:
      emb_extraction_layer: null
      extraction_strategy: reduce_mean
      sequence_length: [32, 64, 128, 256]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(engine: str, folder: Path, port: int, tmp: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    if engine == "sparsejit":
        cmd = [sys.executable, "-m", "sparsejit", "serve", str(folder), "--task", "sentence-embeddings",
               "--port", str(port), "--threads", "2"]
    elif engine == "st-fastapi":
        (tmp / "st_app.py").write_text(ST_APP)
        env["ST_FOLDER"] = str(folder / "hf")
        cmd = [sys.executable, "-m", "uvicorn", "st_app:app", "--app-dir", str(tmp), "--port", str(port),
               "--log-level", "warning"]
    else:  # deepsparse, on a copy: it rewrites the file's input shapes
        import shutil

        copy = tmp / "ds_model"
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("hf"), dirs_exist_ok=True)
        (tmp / "ds.yaml").write_text(DS_CONFIG.format(model=copy))
        ds = Path(os.environ.get("SPARSEJIT_DEEPSPARSE_PYTHON", DEFAULT_DS_PYTHON)).parent / "deepsparse.server"
        cmd = [str(ds), "--config_file", str(tmp / "ds.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen, body: dict) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            if httpx.post(url, json=body, timeout=30).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not answer")


def load(url: str, texts: list[str], clients: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client(c: int):
        with httpx.Client(timeout=60) as http:
            i = c
            while time.monotonic() < stop:
                t = time.perf_counter()
                r = http.post(url, json={"inputs": [texts[i % len(texts)]]})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        failures[0] += 1
                i += clients

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start_t = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start_t
    lat = np.array(latencies) * 1e3
    return {"clients": clients, "requests_per_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "requests": len(lat), "failures": failures[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--clients", default="1,8,64")
    ap.add_argument("--engines", default="sparsejit,deepsparse,st-fastapi")
    args = ap.parse_args()
    folder = MODELS_DIR / "minilm_p90"
    if not (folder / "model.onnx").is_file():
        raise SystemExit(f"{folder} missing: run bench/embed_throughput.py first (it exports the models)")
    texts = corpus(2000, seed=1)
    rows = []
    for engine in args.engines.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            port = _free_port()
            proc = start(engine, folder, port, Path(tmp))
            # (DeepSparse's server puts an endpoint routed "/predict" at /v2/models/predict/infer)
            path = "/v2/models/predict/infer" if engine == "deepsparse" else "/predict"
            url = f"http://127.0.0.1:{port}{path}"
            try:
                wait_ready(url, proc, {"inputs": texts[:4]})
                load(url, texts, 8, 3)  # warm-up: every padded length the corpus needs, mostly
                for c in map(int, args.clients.split(",")):
                    row = {"engine": engine, **load(url, texts, c, args.seconds)}
                    print(row, flush=True)
                    rows.append(row)
            except RuntimeError as e:
                print(f"{engine}: {e}; left out", flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    meta = {"cpu": cpu_name(), "seconds": args.seconds, "date": time.strftime("%Y-%m-%d"), "model": "minilm_p90"}
    results = HERE / "results"
    (results / "serve_load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = (f"One sentence per request, loopback, {args.seconds:.0f} s per level, 2 kernel threads per server; "
            f"all-MiniLM-L6-v2 90% pruned; {meta['cpu']}, {meta['date']}.")
    lines = [head, "",
             "| server | clients | requests/s | p50 ms | p99 ms | failed |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['clients']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['failures']} |" for r in rows]
    (results / "serve_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
