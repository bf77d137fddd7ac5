"""`sparsejit serve`: a pipeline behind HTTP, with dynamic batching.

    sparsejit serve minilm-onnx/ --task sentence-embeddings --port 8000

Routes: `POST /v1/embeddings` (OpenAI's request and response), `POST /predict`
(`{"inputs": ...}` → what the pipeline returns), `POST /v2/models/{name}/infer` (KServe
v2 / Triton JSON tensors), `GET /health` (alive), `GET /ready` (model loaded),
`GET /metrics` (Prometheus), `GET /docs` (OpenAPI).

Concurrent requests wait in one queue; a loop takes up to `max_batch` items, or what
came within `max_wait_ms` of the first, runs them as one pipeline call in a worker
thread (the event loop keeps answering), and hands each request its own results. A
batch that fails fails only the requests in it. Errors are JSON in OpenAI's shape,
`{"error": {"message", "type", "param"}}`, `param` naming the field: 400 for a body that
is not JSON, 422 for a wrong type or an empty input, 413 for too many items or tokens,
401 without the API key, 503 with Retry-After when the queue is full.
Needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from fastapi import Request  # (the serve extra: this module is imported only to serve)
from pydantic import BaseModel

CONFIG_ENV = "SPARSEJIT_SERVE_CONFIG"  # how `--workers N` hands each worker process its settings


@dataclass
class ServeConfig:
    model: str
    task: str
    name: str = ""  # the model's name in responses and in /v2/models/{name} (default: the folder's)
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_items: int = 256  # per request
    max_tokens: int = 65536  # per request, after tokenising
    max_queue: int = 1024  # items waiting; more gets 503
    num_threads: int | None = None
    api_key_env: str | None = None
    precision: str = "fp32"  # sparsejit.load's: "bf16" where the CPU has AVX512-BF16

    def __post_init__(self):
        self.name = self.name or os.path.basename(os.path.normpath(self.model))
        for field in ("max_batch", "max_items", "max_tokens", "max_queue"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(self, field)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must not be negative, got {self.max_wait_ms}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def _error_type(status: int) -> str:
    return {401: "authentication_error", 503: "overloaded"}.get(status, "invalid_request_error" if status < 500
                                                                 else "server_error")


# --- the batcher -------------------------------------------------------------------------

@dataclass
class _Request:
    items: list
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests' items into one call of `run(items) -> results`."""

    def __init__(self, run, max_batch: int, max_wait_ms: float, max_queue: int, metrics: Metrics):
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue, self.metrics = max_queue, metrics
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.waiting = 0  # items queued, not yet taken into a batch
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sparsejit-batch")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, items: list) -> list:
        if self.waiting + len(items) > self.max_queue:
            raise HTTPError(503, f"the queue is full ({self.waiting} items waiting, limit {self.max_queue}); "
                                 "retry shortly", headers={"Retry-After": "1"})
        request = _Request(items, asyncio.get_running_loop().create_future())
        self.waiting += len(items)
        self.metrics.queue_depth.set(self.waiting)
        await self.queue.put(request)
        return await request.future

    async def _take(self) -> list[_Request]:
        batch = [await self.queue.get()]
        count = len(batch[0].items)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            left = deadline - time.monotonic()
            try:
                nxt = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(nxt)
            count += len(nxt.items)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            items = [x for r in batch for x in r.items]
            self.waiting -= len(items)
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.batch_size.observe(len(items))
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, items)
                self.metrics.batch_seconds.observe(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 (a failing batch fails its own requests, and the loop goes on)
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(HTTPError(500, f"the model failed on this batch: {e}"))
                continue
            start = 0
            for r in batch:
                if not r.future.done():  # (a client that went away)
                    r.future.set_result(results[start:start + len(r.items)])
                start += len(r.items)


# --- metrics -----------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("sparsejit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("sparsejit_request_seconds", "request latency by route", ["route"],
                                 registry=self.registry)
        self.batch_size = Histogram("sparsejit_batch_items", "items per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.batch_seconds = Histogram("sparsejit_batch_seconds", "seconds per model call", registry=self.registry)
        self.queue_depth = Gauge("sparsejit_queue_items", "items waiting for a batch", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# --- requests ----------------------------------------------------------------------------

def _texts(value: Any, field: str, task: str, limit: int) -> tuple[list, bool]:
    """A request's inputs as a list of pipeline items, and whether it was a single one."""
    if task == "question-answering":
        single = isinstance(value, dict)
        items = [value] if single else value
        ok = isinstance(items, list) and all(isinstance(x, dict) and isinstance(x.get("question"), str)
                                             and isinstance(x.get("context"), str) for x in items)
        what = "an object {question, context} or a list of them"
    else:
        single = isinstance(value, str)  # (a pair comes in a list: [[text, text_pair]])
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list) and all(
            isinstance(x, str) or (task == "text-classification" and isinstance(x, list) and len(x) == 2
                                   and all(isinstance(s, str) for s in x)) for x in items)
        what = "a string or a list of strings" + (" (or [text, text_pair] pairs)" if task == "text-classification"
                                                  else "")
    if not ok:
        raise HTTPError(422, f"'{field}' must be {what}", field)
    if not items:
        raise HTTPError(422, f"'{field}' is empty", field)
    if len(items) > limit:
        raise HTTPError(413, f"'{field}' holds {len(items)} items; the limit is {limit} per request", field)
    if task != "question-answering" and any(isinstance(x, str) and not x for x in items):
        raise HTTPError(422, f"'{field}' holds an empty string", field)
    return [tuple(x) if isinstance(x, list) else x for x in items], single


def _to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


KSERVE_TYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP16": np.float16, "BOOL": np.bool_,
                "FP64": np.float64, "UINT8": np.uint8, "INT8": np.int8}
KSERVE_NAMES = {np.dtype(v): k for k, v in KSERVE_TYPES.items()}


def _kserve_inputs(body: dict, model) -> dict[str, np.ndarray]:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HTTPError(422, "'inputs' must be a non-empty list of {name, shape, datatype, data}", "inputs")
    feeds = {}
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict) or not {"name", "shape", "datatype", "data"} <= set(t):
            raise HTTPError(422, f"'{where}' must have name, shape, datatype and data", where)
        if t["datatype"] not in KSERVE_TYPES:
            raise HTTPError(422, f"'{where}.datatype' {t['datatype']!r} is not one of {sorted(KSERVE_TYPES)}",
                            f"{where}.datatype")
        try:
            feeds[t["name"]] = np.asarray(t["data"], KSERVE_TYPES[t["datatype"]]).reshape(t["shape"])
        except (TypeError, ValueError) as e:
            raise HTTPError(422, f"'{where}': data does not fit shape {t['shape']}: {e}", f"{where}.data") from e
    return feeds


# --- the app -----------------------------------------------------------------------------

class EmbeddingsRequest(BaseModel):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class PredictRequest(BaseModel):
    inputs: Any


class Server:
    """The loaded pipeline and batcher behind the app (loaded in a thread at start-up, so
    that /health answers and /ready says 503 until it is done)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.pipeline = None
        self.failed: str | None = None
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self.api_key = None
        if config.api_key_env:
            self.api_key = os.environ.get(config.api_key_env)
            if not self.api_key:
                raise ValueError(f"--api-key-env {config.api_key_env}: that environment variable is not set")

    def load(self) -> None:
        from .pipelines import pipeline

        try:
            self.pipeline = pipeline(self.config.task, self.config.model, batch_size=self.config.max_batch,
                                     num_threads=self.config.num_threads, precision=self.config.precision)
        except Exception as e:  # noqa: BLE001 (reported by /ready and the log; the server stays up to say so)
            self.failed = f"{type(e).__name__}: {e}"
            print(f"sparsejit serve: the model did not load: {self.failed}", flush=True)

    def run_items(self, items: list) -> list:
        out = self.pipeline(items)
        return list(out) if isinstance(out, np.ndarray) else out

    async def off_loop(self, fn, *args):
        """fn(*args) in a thread: tokenising a large request must not hold up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def count_tokens(self, items: list, field: str) -> int:
        """The request's tokens (after truncation to the model's maximum), refused over max_tokens."""
        if self.pipeline.task == "question-answering":
            return 0  # long contexts are read in windows: no per-request token limit applies
        n = sum(len(e.ids) for e in self.pipeline.encode(items))
        if n > self.config.max_tokens:
            raise HTTPError(413, f"'{field}' comes to {n} tokens; the limit is {self.config.max_tokens} per request",
                            field)
        return n

    def ready(self):
        if self.pipeline is None:
            raise HTTPError(503, self.failed or "the model is still loading", headers={"Retry-After": "1"})
        return self.pipeline


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": _error_type(status), "param": param}},
                        status_code=status, headers=headers)


def create_app(config: ServeConfig):
    from fastapi import FastAPI

    server = Server(config)

    async def lifespan(app):
        threading.Thread(target=server.load, name="sparsejit-load", daemon=True).start()
        server.batcher = Batcher(server.run_items, config.max_batch, config.max_wait_ms, config.max_queue,
                                 server.metrics)
        server.batcher.start()
        yield

    app = FastAPI(title="sparsejit serve", description=f"{config.task} on {config.model}", lifespan=lifespan)
    app.state.server = server
    _errors_and_auth(app, server)
    _text_routes(app, server)
    _kserve_routes(app, server)
    _status_routes(app, server)
    return app


def _errors_and_auth(app, server: Server) -> None:
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(HTTPError)
    async def http_error(request, e: HTTPError):
        return _error(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('msg')}", "body")
        # The field, not pydantic's branch of a union ('input', not 'input.str').
        field = next((str(x) for x in first.get("loc", ()) if x != "body"), "body")
        if first.get("type") == "missing":
            return _error(422, f"'{field}' is required", field)
        what = {"input": "a string or a list of strings"}.get(field)
        return _error(422, f"'{field}' must be {what}" if what else f"'{field}': {first.get('msg')}", field)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        route = request.url.path
        if server.api_key and route != "/health" and \
                request.headers.get("authorization") != f"Bearer {server.api_key}":
            response = _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authorization")
        else:
            start = time.perf_counter()
            response = await call_next(request)
            server.metrics.latency.labels(route).observe(time.perf_counter() - start)
        server.metrics.requests.labels(route, str(response.status_code)).inc()
        return response


def _text_routes(app, server: Server) -> None:
    config = server.config

    @app.post("/v1/embeddings", summary="OpenAI embeddings API")
    async def embeddings(body: EmbeddingsRequest):
        server.ready()
        if config.task not in ("sentence-embeddings", "feature-extraction"):
            raise HTTPError(404, f"this server runs {config.task}; /v1/embeddings is for embedding models")
        items, _ = _texts(body.input, "input", config.task, config.max_items)
        tokens = await server.off_loop(server.count_tokens, items, "input")
        vectors = await server.batcher.submit(items)
        data = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, np.float32)
            emb = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": body.model or config.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/predict", summary="the pipeline's answer for {'inputs': ...}")
    async def predict(body: PredictRequest):
        server.ready()
        items, single = _texts(body.inputs, "inputs", config.task, config.max_items)
        await server.off_loop(server.count_tokens, items, "inputs")
        results = await server.batcher.submit(items)
        if single:  # as the pipeline answers one input: a label comes in a list of one (top_k=1)
            return _to_json([results[0]] if config.task in ("text-classification", "sentiment-analysis")
                            else results[0])
        return _to_json(results)


def _kserve_routes(app, server: Server) -> None:
    config = server.config

    def model_named(name: str):
        pipe = server.ready()
        if name != config.name:
            raise HTTPError(404, f"no model {name!r}; this server has {config.name!r}", "name")
        return pipe.model

    @app.get("/v2/models/{name}", summary="KServe v2 model metadata")
    async def metadata(name: str):
        io = model_named(name).io
        return {"name": config.name, "platform": "sparsejit", "inputs": [_kserve_describe(t) for t in io.inputs],
                "outputs": [_kserve_describe(t) for t in io.outputs]}

    @app.post("/v2/models/{name}/infer", summary="KServe v2 / Triton JSON tensors in, tensors out")
    async def infer(name: str, request: Request):
        model = model_named(name)
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise HTTPError(400, f"the body is not valid JSON: {e}", "body") from e
        if not isinstance(body, dict):
            raise HTTPError(422, "the body must be an object with 'inputs'", "body")
        feeds = _kserve_inputs(body, model)
        wanted = [o.get("name") for o in body.get("outputs") or [] if isinstance(o, dict)] or None
        try:
            outs = await asyncio.get_running_loop().run_in_executor(server.batcher.executor, model.run, feeds, wanted)
        except (ValueError, TypeError) as e:  # sparsejit's input checks name the input
            raise HTTPError(422, str(e), "inputs") from e
        return {"model_name": config.name, "id": body.get("id"),
                "outputs": [{"name": n, "shape": list(o.shape), "datatype": KSERVE_NAMES.get(o.dtype, str(o.dtype)),
                             "data": o.ravel().tolist()} for n, o in zip(wanted or model.output_names, outs)]}


def _kserve_describe(t) -> dict:
    dtype = t.type.removeprefix("tensor(").removesuffix(")")
    kind = {"float": "FP32", "int64": "INT64", "int32": "INT32", "float16": "FP16", "bool": "BOOL"}
    return {"name": t.name, "datatype": kind.get(dtype, dtype.upper()),
            "shape": [d if isinstance(d, int) else -1 for d in t.shape]}


def _status_routes(app, server: Server) -> None:
    from fastapi.responses import Response

    @app.get("/health", summary="alive")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="the model is loaded")
    async def ready():
        server.ready()
        return {"status": "ready", "model": server.config.name, "task": server.config.task}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4")


def app_from_env():
    """The app for one of `--workers N` processes: its settings come in $SPARSEJIT_SERVE_CONFIG."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    try:
        import uvicorn
    except ImportError as e:
        raise ImportError("sparsejit serve needs fastapi and uvicorn: pip install 'sparsejit[serve]'") from e
    if workers > 1:
        os.environ[CONFIG_ENV] = json.dumps(asdict(config))
        uvicorn.run("sparsejit.serve:app_from_env", factory=True, host=host, port=port, workers=workers,
                    timeout_graceful_shutdown=30)
    else:
        uvicorn.run(create_app(config), host=host, port=port, timeout_graceful_shutdown=30)
