"""Beyond one machine, with Ray: a corpus through Ray Data, traffic through Ray Serve.

    import ray, sparsejit.ray
    ds = ray.data.from_items([{"text": t} for t in texts])
    out = sparsejit.ray.map_batches(ds, "minilm-onnx/", task="sentence-embeddings", concurrency=4)
    # each row gets "embedding" (a classifier's: "label" and "score")

    from ray import serve
    handle = serve.run(sparsejit.ray.deployment("sst2-onnx/", task="text-classification", num_replicas=2))
    handle.remote("great").result()        # what the pipeline answers for one input

One loaded pipeline per actor or replica, its kernel threads set from the CPUs Ray gave
it. Needs the `ray` extra (`ray[data,serve]`).
"""

from __future__ import annotations

import os

import numpy as np

from .pipelines import TASKS, pipeline


def _threads(options: dict) -> int:
    """Kernel threads for this actor: as asked, else the CPUs Ray assigned it."""
    if options.get("num_threads"):
        return int(options.pop("num_threads"))
    options.pop("num_threads", None)
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, int(cpus or 1))


class PipelineActor:
    """A callable class for `ray.data.Dataset.map_batches` (with `concurrency`): a pipeline
    loaded once per actor, adding its answers to each batch as columns: "embedding" for
    embeddings, "label" and "score" for a classifier, the answers (objects) otherwise."""

    def __init__(self, model_folder: str | os.PathLike, task: str = "sentence-embeddings", column: str = "text",
                 output: str | None = None, **options):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        self.column, self.task = column, task
        self.output = output or ("embedding" if TASKS[task].task == "sentence-embeddings" else "result")
        self.pipe = pipeline(task, model_folder, num_threads=_threads(options), **options)

    def __call__(self, batch: dict) -> dict:
        if self.column not in batch:
            raise KeyError(f"the batch has no column {self.column!r} (columns: {sorted(batch)}); "
                           "pass column= the one holding the text")
        texts = [str(t) for t in batch[self.column]]
        answers = self.pipe(texts)
        if isinstance(answers, np.ndarray):
            batch[self.output] = answers
        elif TASKS[self.task].task == "text-classification" and all(isinstance(a, dict) for a in answers):
            batch["label"] = np.array([a["label"] for a in answers])
            batch["score"] = np.array([a["score"] for a in answers], np.float32)
        else:
            column = np.empty(len(answers), object)
            column[:] = answers
            batch[self.output] = column
        return batch


def map_batches(dataset, model_folder: str | os.PathLike, *, task: str = "sentence-embeddings",
                column: str = "text", output: str | None = None, concurrency: int = 1, num_cpus: float = 1,
                batch_size: int = 256, **options):
    """`dataset` with the pipeline's answers added to every row, by an actor pool of
    `concurrency` actors with `num_cpus` each (their kernel threads)."""
    return dataset.map_batches(PipelineActor, fn_constructor_args=(str(model_folder), task, column, output),
                               fn_constructor_kwargs=options, concurrency=concurrency, num_cpus=num_cpus,
                               batch_size=batch_size, batch_format="numpy")


def deployment(model_folder: str | os.PathLike, *, task: str, num_replicas: int = 1, num_cpus: float = 1,
               max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005, **options):
    """A Ray Serve application answering one input per call (a handle's `remote(item)`, or
    HTTP `{"inputs": item}`), batched across concurrent calls by Ray Serve's `@serve.batch`."""
    from ray import serve

    from .serve import _to_json

    folder = str(model_folder)

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": num_cpus})
    class SparsejitPipeline:
        def __init__(self):
            self.pipe = pipeline(task, folder, num_threads=_threads(dict(options)),
                                 **{k: v for k, v in options.items() if k != "num_threads"})

        async def __call__(self, item):
            if hasattr(item, "json"):  # an HTTP request through Serve's proxy
                item = (await item.json())["inputs"]
            return await self.predict(item)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def predict(self, items: list) -> list:
            answers = self.pipe([tuple(x) if isinstance(x, list) else x for x in items])
            return [_to_json(a) for a in answers]

    return SparsejitPipeline.bind()
