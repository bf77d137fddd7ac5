"""Ray: a corpus through Ray Data's actor pool, and Ray Serve, on a local Ray cluster
started here (2 CPUs), both equal to the single-process pipeline (atol 1e-5: batches
are padded to different lengths)."""

from __future__ import annotations

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray extra (ray[data,serve]) is not installed")
pytest.importorskip("ray.serve", reason="the ray extra (ray[data,serve]) is not installed")
pytest.importorskip("torch", reason="the test models are exported with torch (the test extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import text_models as tm

import sparsejit
import sparsejit.ray as sray

TEXTS = tm.sentences(60, seed=4)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    folders = tm.exported_small_berts(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    yield folders
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_map_batches_embeds_a_corpus_as_the_pipeline_does(cluster):
    folder = cluster["feature-extraction"]
    ds = ray.data.from_items([{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    rows = sray.map_batches(ds, folder, task="sentence-embeddings", concurrency=2, batch_size=16).take_all()
    rows.sort(key=lambda r: r["id"])
    want = sparsejit.pipeline("sentence-embeddings", folder)(TEXTS)
    np.testing.assert_allclose(np.stack([r["embedding"] for r in rows]), want, atol=1e-5)

    folder = cluster["text-classification"]
    rows = sray.map_batches(ds, folder, task="text-classification", batch_size=16).take_all()
    rows.sort(key=lambda r: r["id"])
    want = sparsejit.pipeline("text-classification", folder)(TEXTS)
    assert [r["label"] for r in rows] == [w["label"] for w in want]
    np.testing.assert_allclose([r["score"] for r in rows], [w["score"] for w in want], atol=1e-5)


def test_a_missing_column_is_named(cluster):
    ds = ray.data.from_items([{"sentence": t} for t in TEXTS[:4]])
    with pytest.raises(Exception, match="no column 'text'"):
        sray.map_batches(ds, cluster["feature-extraction"]).take_all()


def test_serve_deployment_batches_concurrent_calls(cluster):
    from ray import serve

    folder = cluster["text-classification"]
    handle = serve.run(sray.deployment(folder, task="text-classification", max_batch_size=8), name="clf",
                       route_prefix=None)
    responses = [handle.remote(t) for t in TEXTS[:24]]
    got = [r.result(timeout_s=120) for r in responses]
    want = sparsejit.pipeline("text-classification", folder)(TEXTS[:24])
    assert [g["label"] for g in got] == [w["label"] for w in want]
    np.testing.assert_allclose([g["score"] for g in got], [w["score"] for w in want], atol=1e-5)
