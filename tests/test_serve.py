"""`sparsejit serve`: the real server in a subprocess on a free loopback port, talked to
with httpx. Results are compared with the pipeline in this process at atol 1e-5 (a
request's texts may share a batch, and so a padded length, with other requests')."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the tests talk to the server with httpx")
pytest.importorskip("torch", reason="the test models are exported with torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import text_models as tm

import sparsejit

TEXTS = tm.sentences(80, seed=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return tm.exported_small_berts(root)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(folder, task, *flags, env=None):
    """(base URL, process) of a server that has answered /ready."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sparsejit", "serve", str(folder), "--task", task, "--port",
                             str(port), "--threads", "1", *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {env['SJ_KEY']}"} if env and "SJ_KEY" in env else {}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", headers=headers, timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.3)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw)


def test_every_route_of_an_embedding_server(folders):
    folder = folders["feature-extraction"]
    want = sparsejit.pipeline("sentence-embeddings", folder)(TEXTS[:5])
    with serving(folder, "sentence-embeddings") as (url, _):
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/ready").json()["task"] == "sentence-embeddings"
        r = _post(url, "/v1/embeddings", {"input": TEXTS[:5], "model": "mine"}).json()
        assert r["object"] == "list" and r["model"] == "mine" and r["usage"]["prompt_tokens"] > 5
        got = np.array([d["embedding"] for d in sorted(r["data"], key=lambda d: d["index"])])
        np.testing.assert_allclose(got, want, atol=1e-5)
        r = _post(url, "/v1/embeddings", {"input": TEXTS[0], "encoding_format": "base64"}).json()
        np.testing.assert_allclose(np.frombuffer(base64.b64decode(r["data"][0]["embedding"]), np.float32), want[0],
                                   atol=1e-5)
        np.testing.assert_allclose(_post(url, "/predict", {"inputs": TEXTS[:5]}).json(), want, atol=1e-5)
        np.testing.assert_allclose(_post(url, "/predict", {"inputs": TEXTS[0]}).json(), want[0], atol=1e-5)
        name = folder.name
        meta = httpx.get(f"{url}/v2/models/{name}").json()
        assert [i["name"] for i in meta["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        model = sparsejit.load(folder / "model.onnx")
        feeds = {n: np.array([[101, 2023, 2003, 102]], np.int64) if n == "input_ids" else
                 np.array([[1, 1, 1, 1]] if n == "attention_mask" else [[0, 0, 0, 0]], np.int64)
                 for n in model.input_names}
        body = {"id": "7", "inputs": [{"name": n, "shape": list(a.shape), "datatype": "INT64", "data": a.ravel().tolist()}
                                      for n, a in feeds.items()]}
        r = _post(url, f"/v2/models/{name}/infer", body).json()
        assert r["id"] == "7" and r["outputs"][0]["datatype"] == "FP32"
        out = np.array(r["outputs"][0]["data"], np.float32).reshape(r["outputs"][0]["shape"])
        np.testing.assert_allclose(out, model.run(feeds)[0], atol=1e-5)
        bad = _post(url, f"/v2/models/{name}/infer", {"inputs": [{**body["inputs"][0], "datatype": "TEXT"}]})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "inputs[0].datatype"
        assert _post(url, "/v2/models/other/infer", body).status_code == 404
        paths = httpx.get(url + "/openapi.json").json()["paths"]
        assert {"/v1/embeddings", "/predict", "/v2/models/{name}/infer", "/health", "/ready", "/metrics"} <= set(paths)
        metrics = httpx.get(url + "/metrics").text
        assert 'sparsejit_requests_total{route="/v1/embeddings",status="200"} 2.0' in metrics
        assert "sparsejit_batch_items_bucket" in metrics and "sparsejit_request_seconds_bucket" in metrics


def test_bad_requests_get_4xx_naming_the_field(folders):
    folder = folders["feature-extraction"]
    with serving(folder, "sentence-embeddings", "--max-items", 4, "--max-tokens", 60) as (url, _):
        def error(path, body, status, param, raw=None):
            r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60) \
                if raw is not None else _post(url, path, body)
            assert r.status_code == status, r.text
            assert r.json()["error"]["param"] == param, r.text
            return r.json()["error"]["message"]

        assert "not valid JSON" in error("/v1/embeddings", None, 400, "body", raw=b'{"input": ["a"')
        assert error("/v1/embeddings", {"input": 5}, 422, "input") == "'input' must be a string or a list of strings"
        assert error("/v1/embeddings", {"text": "a"}, 422, "input") == "'input' is required"
        assert error("/predict", {"inputs": []}, 422, "inputs") == "'inputs' is empty"
        assert "empty string" in error("/predict", {"inputs": ["a", ""]}, 422, "inputs")
        assert "must be a string or a list of strings" in error("/predict", {"inputs": [{"a": 1}]}, 422, "inputs")
        assert "holds 5 items; the limit is 4" in error("/predict", {"inputs": ["a"] * 5}, 413, "inputs")
        assert "the limit is 60 per request" in error("/predict", {"inputs": [" ".join(["word"] * 80)]}, 413, "inputs")
        assert httpx.get(url + "/health").status_code == 200  # and the server is still up


def test_64_concurrent_clients_get_the_pipelines_results_batched(folders):
    folder = folders["text-classification"]
    pipe = sparsejit.pipeline("text-classification", folder)
    requests = [TEXTS[i:i + 1 + i % 3] for i in range(64)]
    with serving(folder, "text-classification", "--max-wait-ms", 20) as (url, _):
        results: list = [None] * 64

        def client(i):
            results[i] = _post(url, "/predict", {"inputs": requests[i]})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 64
        for items, r in zip(requests, results):
            want = pipe(items)
            assert [g["label"] for g in r.json()] == [w["label"] for w in want]
            np.testing.assert_allclose([g["score"] for g in r.json()], [w["score"] for w in want], atol=1e-5)
        metrics = httpx.get(url + "/metrics").text
        calls = float(next(line.split()[-1] for line in metrics.splitlines()
                            if line.startswith("sparsejit_batch_items_count")))
        assert calls < 64, calls  # requests shared model calls


def test_a_full_queue_gets_503_with_retry_after(folders):
    folder = folders["text-classification"]
    with serving(folder, "text-classification", "--max-queue", 2, "--max-wait-ms", 800, "--max-batch", 64) as (url, _):
        results: list = [None] * 8

        def client(i):
            results[i] = _post(url, "/predict", {"inputs": [TEXTS[i]]})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        full = next(r for r in results if r.status_code == 503)
        assert full.headers["retry-after"] == "1" and "queue is full" in full.json()["error"]["message"]


def test_an_api_key_guards_every_route_but_health(folders):
    folder = folders["text-classification"]
    with serving(folder, "text-classification", "--api-key-env", "SJ_KEY", env={"SJ_KEY": "s3cret"}) as (url, _):
        assert httpx.get(url + "/health").status_code == 200
        denied = _post(url, "/predict", {"inputs": "a"})
        assert denied.status_code == 401 and denied.json()["error"]["param"] == "authorization"
        assert httpx.get(url + "/metrics").status_code == 401
        ok = _post(url, "/predict", {"inputs": "a"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()[0]["label"]
    env = {k: v for k, v in os.environ.items() if k != "SJ_NOT_SET"}
    p = subprocess.run([sys.executable, "-m", "sparsejit", "serve", str(folder), "--task", "text-classification",
                        "--api-key-env", "SJ_NOT_SET"], capture_output=True, text=True, env=env, timeout=120,
                       check=False)
    assert p.returncode == 2 and "SJ_NOT_SET: that environment variable is not set" in p.stderr


def test_health_answers_during_a_long_batch_and_sigterm_finishes_in_flight(folders):
    folder = folders["text-classification"]
    long_texts = [" ".join(TEXTS) for _ in range(200)]
    with serving(folder, "text-classification", "--max-items", 256, "--max-tokens", 10**6) as (url, proc):
        done: dict = {}

        def big():
            done["response"] = _post(url, "/predict", {"inputs": long_texts})
            done["at"] = time.monotonic()

        worker = threading.Thread(target=big)
        worker.start()
        time.sleep(0.5)
        start = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        answered = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # while the big request is in flight
        worker.join(timeout=120)
        assert done["response"].status_code == 200 and len(done["response"].json()) == 200
        assert answered - start < 1.0 and answered < done["at"]  # health answered before the batch was done
        # uvicorn shuts down gracefully, then re-raises SIGTERM as its exit status
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read()


def test_a_failing_batch_fails_only_its_own_requests():
    """The batcher alone: a model call that raises answers 500 to the requests in that batch;
    the next batch runs."""
    import asyncio

    from sparsejit.serve import Batcher, HTTPError, Metrics

    def run(items):
        if "boom" in items:
            raise RuntimeError("kernel exploded")
        return [x.upper() for x in items]

    async def main():
        batcher = Batcher(run, max_batch=4, max_wait_ms=50, max_queue=100, metrics=Metrics())
        batcher.start()
        together = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["boom"]), return_exceptions=True)
        return together, await batcher.submit(["c", "d"])

    together, after = asyncio.run(main())
    assert all(isinstance(r, HTTPError) and r.status == 500 and "kernel exploded" in r.message for r in together)
    assert after == ["C", "D"]
