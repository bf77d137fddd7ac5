"""Text in, answers out: `sparsejit.pipeline(task, model_folder)`.

A pipeline tokenises with Hugging Face's `tokenizers` (the Rust tokenizer, from the
folder's tokenizer.json), batches texts of similar length together so that little is
padded, runs the model, and turns its outputs into what `transformers.pipeline` and
sentence-transformers return:

    >>> embed = sparsejit.pipeline("sentence-embeddings", "minilm/")   # doctest: +SKIP
    >>> embed(["a sentence", "another one"]).shape                      # doctest: +SKIP
    (2, 384)

A model folder holds one ONNX file (model.onnx, or the single .onnx in it or in onnx/),
tokenizer.json, and config.json (labels, maximum length); a sentence-transformers folder
also has modules.json, sentence_bert_config.json and 1_Pooling/config.json, which set
the pooling, the normalisation and the maximum length. `sparsejit export` writes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import Model, load
from .ops import softmax  # (ONNX Softmax's reference: over the last axis)

# A batch of one text or of batch_size texts, of at most PAD_BELOW tokens, is padded to a
# multiple of PAD_MULTIPLE tokens: its shape then comes back often, and a model runs a
# shape it has seen often from its tape (sparsejit/tape.py), which skips the Python a short
# run spends much of its time in: more than the padded tokens cost. The mask keeps the
# padding out of every text's outputs. A larger batch runs long enough that its tape would
# take many runs to repay, and batches of other sizes (a server's, as requests come)
# seldom repeat a shape: for those the padding only costs (bench/README.md,
# twenty-eighth session).
PAD_MULTIPLE = 16
PAD_BELOW = 512
PAIR_TASKS = ("text-classification", "sentiment-analysis")  # tasks whose inputs may be (text, text_pair)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class PipelineError(ValueError):
    """A model folder lacks what the task needs, or an input is not one the task takes."""


# --- the model folder ------------------------------------------------------------------

@dataclass
class ModelFolder:
    """Where a pipeline's pieces come from: the ONNX file and, from its folder, the rest."""

    onnx: Path
    folder: Path | None  # config.json, sentence-transformers files (None: none to read)
    tokenizer: object  # a tokenizers.Tokenizer
    config: dict

    def read_json(self, *parts: str) -> dict | list | None:
        if self.folder is None:
            return None
        path = self.folder.joinpath(*parts)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path}: not readable JSON: {e}") from e


def find_onnx(folder: Path) -> Path:
    """model.onnx, else the single .onnx file in the folder, else the one in onnx/."""
    for where in (folder, folder / "onnx"):
        if (where / "model.onnx").is_file():
            return where / "model.onnx"
        found = sorted(where.glob("*.onnx")) if where.is_dir() else []
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise PipelineError(f"{where} holds {len(found)} ONNX files ({', '.join(p.name for p in found)}) and "
                                "no model.onnx: pass the one to use as `model`, with `tokenizer=` the folder")
    raise PipelineError(f"{folder} holds no ONNX model (model.onnx, a single .onnx file, or onnx/model.onnx); "
                        "`sparsejit export` writes one from a Hugging Face folder")


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("pipelines tokenise with Hugging Face's `tokenizers` package: "
                          "pip install 'sparsejit[pipelines]' (or pip install tokenizers)") from e
    return tokenizers


def _load_tokenizer(tokenizer, folder: Path | None):
    tokenizers = _tokenizers()
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    where = Path(tokenizer) if tokenizer is not None else folder
    if where is None:
        raise PipelineError("a model given as an .onnx file needs `tokenizer=`: a folder with tokenizer.json, "
                            "the tokenizer.json file itself, or a tokenizers.Tokenizer")
    path = where / "tokenizer.json" if where.is_dir() else where
    if not path.is_file():
        raise PipelineError(f"{where} has no tokenizer.json (the fast tokenizer file Hugging Face tokenizers save); "
                            "pass `tokenizer=` a folder that has one, or re-save the tokenizer with "
                            "`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise PipelineError(f"{path}: not a tokenizer this `tokenizers` can read: {e}") from e


def open_folder(model: str | os.PathLike, tokenizer=None) -> ModelFolder:
    """Resolve `model` (a folder, or an .onnx file with `tokenizer=`) into its parts."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if path.is_dir():
        onnx_path, folder = find_onnx(path), path
    else:
        onnx_path = path
        # Labels and pooling come from the tokenizer's folder when one is given, else from beside the file.
        given = Path(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else None
        folder = (given if given.is_dir() else given.parent) if given is not None else path.parent
        if onnx_path.parent.name == "onnx" and tokenizer is None:
            folder = onnx_path.parent.parent
    tok = _load_tokenizer(tokenizer, folder if path.is_dir() or tokenizer is None else None)
    mf = ModelFolder(onnx_path, folder, tok, {})
    mf.config = mf.read_json("config.json") or {}
    return mf


# --- tokens to model inputs --------------------------------------------------------------

def _max_length(mf: ModelFolder, given: int | None) -> int:
    """The longest input the model takes: `max_length` if given, else sentence-transformers'
    max_seq_length, else the smaller of the tokenizer's model_max_length and the position table."""
    if given is not None:
        if given < 2:
            raise ValueError(f"max_length must be at least 2, got {given}")
        return int(given)
    st = mf.read_json("sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        return int(st["max_seq_length"])
    limits = []
    tc = mf.read_json("tokenizer_config.json") or {}
    if isinstance(tc.get("model_max_length"), (int, float)) and tc["model_max_length"] < 1e6:
        limits.append(int(tc["model_max_length"]))
    positions = mf.config.get("max_position_embeddings")
    if positions:
        # RoBERTa-family position ids start after the padding index.
        offset = mf.config.get("pad_token_id", 1) + 1 if mf.config.get("model_type") in (
            "roberta", "xlm-roberta", "camembert") else 0
        limits.append(int(positions) - offset)
    return min(limits) if limits else 512


def _pad_id(mf: ModelFolder) -> int:
    padding = mf.tokenizer.padding
    if padding and padding.get("pad_id") is not None:
        return int(padding["pad_id"])
    if mf.config.get("pad_token_id") is not None:
        return int(mf.config["pad_token_id"])
    for token in ("[PAD]", "<pad>"):
        i = mf.tokenizer.token_to_id(token)
        if i is not None:
            return int(i)
    return 0


class Pipeline:
    """The shared part: tokenise, batch by length, run. Subclasses turn outputs into answers."""

    task = ""

    def __init__(self, mf: ModelFolder, model: Model, *, batch_size: int = 32, max_length: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.folder, self.model, self.batch_size = mf, model, batch_size
        self.tokenizer = mf.tokenizer
        self.max_length = _max_length(mf, max_length)
        self.pad_id = _pad_id(mf)
        unknown = [n for n in model.input_names if n not in TEXT_INPUTS]
        if unknown:
            raise PipelineError(f"{mf.onnx}: input(s) {unknown} are not text inputs a pipeline can fill "
                                f"(it fills {', '.join(TEXT_INPUTS)})")
        if "input_ids" not in model.input_names:
            raise PipelineError(f"{mf.onnx}: the model takes no input_ids (its inputs: {model.input_names})")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_length)

    def __repr__(self) -> str:
        return f"<sparsejit pipeline {self.task!r} on {self.folder.onnx}, max_length {self.max_length}>"

    def encode(self, texts: list) -> list:
        """Encodings of strings, or of (text, text_pair) pairs, truncated to max_length."""
        for i, t in enumerate(texts):
            ok = isinstance(t, str) or (isinstance(t, (tuple, list)) and len(t) == 2
                                        and all(isinstance(s, str) for s in t))
            if not ok:
                raise TypeError(f"{self.task} input {i}: expected a string or a (text, text_pair) pair of "
                                f"strings, got {type(t).__name__}")
        return self.tokenizer.encode_batch([tuple(t) if not isinstance(t, str) else t for t in texts])

    def feeds(self, encodings: Sequence) -> dict[str, np.ndarray]:
        """The model's inputs for encodings, padded on the right to the longest, and a small
        batch of one text or of batch_size texts (the sizes that come back: one request,
        a long list's batches) further to a multiple of PAD_MULTIPLE tokens (within
        max_length)."""
        n, length = len(encodings), max(len(e.ids) for e in encodings)
        padded = -(-length // PAD_MULTIPLE) * PAD_MULTIPLE
        if n in (1, self.batch_size) and n * padded <= PAD_BELOW and padded <= self.max_length:
            length = padded
        ids = np.full((n, length), self.pad_id, np.int64)
        mask = np.zeros((n, length), np.int64)
        types = np.zeros((n, length), np.int64)
        for i, e in enumerate(encodings):
            k = len(e.ids)
            ids[i, :k], mask[i, :k], types[i, :k] = e.ids, e.attention_mask, e.type_ids
        positions = np.broadcast_to(np.arange(length, dtype=np.int64), (n, length))
        every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": positions}
        return {name: every[name] for name in self.model.input_names}

    def batches(self, encodings: Sequence) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """(indices into encodings, feeds) in batches of similar length, longest first: at
        most batch_size each, and a new batch where a text is less than half the batch's
        longest (less 16 tokens), so that no text is padded to much more than twice its
        length (a server's batch of random texts would otherwise be padded to its longest)."""
        lengths = [len(e.ids) for e in encodings]
        order = np.argsort([-n for n in lengths], kind="stable")
        start = 0
        while start < len(order):
            longest, end = lengths[order[start]], start + 1
            while end < len(order) and end - start < self.batch_size and longest <= 2 * lengths[order[end]] + 16:
                end += 1
            idx = order[start:end]
            yield idx, self.feeds([encodings[i] for i in idx])
            start = end

    def output(self, names: Sequence[str], rank: int) -> str:
        """The first model output named in `names`, else the first of rank `rank`."""
        io = self.model.io
        ranks = {o.name: len(o.shape) for o in io.outputs} if io else {}
        for name in names:
            if name in self.model.output_names:
                return name
        for name in self.model.output_names:
            if ranks.get(name) == rank:
                return name
        raise PipelineError(f"{self.folder.onnx}: no output for {self.task} (wanted one of {list(names)}, or any "
                            f"of rank {rank}); the model's outputs: {self.model.output_names}")


def _as_list(inputs, task: str) -> tuple[list, bool]:
    """(items, whether one input was given). A tuple is one (text, text_pair) input only
    where pairs are taken (text classification); elsewhere it is a sequence of texts."""
    if isinstance(inputs, str) or (isinstance(inputs, tuple) and task in PAIR_TASKS):
        return [inputs], True
    if isinstance(inputs, (Sequence, np.ndarray)):
        return list(inputs), False
    raise TypeError(f"{task} takes a string or a list of strings, got {type(inputs).__name__}")


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --- sentence embeddings -------------------------------------------------------------

POOLINGS = ("cls", "max", "mean", "mean_sqrt_len")


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """sentence-transformers' Pooling: the modes' vectors side by side, in its order."""
    m = mask[..., None].astype(hidden.dtype)
    parts = []
    for mode in POOLINGS:
        if mode not in modes:
            continue
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(m > 0, hidden, np.float32(-1e9)).max(axis=1))
        else:
            total, count = (hidden * m).sum(axis=1), np.maximum(m.sum(axis=1), 1e-9)
            parts.append(total / (count if mode == "mean" else np.sqrt(count)))
    return np.concatenate(parts, axis=-1)


class SentenceEmbeddings(Pipeline):
    """Strings → embeddings: numpy [n, dim] for a list, [dim] for one string (as
    sentence-transformers' `encode`). Pooling and normalisation come from the
    sentence-transformers files, else `pooling="mean"` and `normalize=False`."""

    task = "sentence-embeddings"

    def __init__(self, mf, model, *, pooling: str | Sequence[str] | None = None, normalize: bool | None = None,
                 **kw):
        super().__init__(mf, model, **kw)
        st_pooling = mf.read_json("1_Pooling", "config.json")
        modules = mf.read_json("modules.json") or []
        if pooling is None:
            pooling = self._folder_pooling(st_pooling or {})
        self.pooling = [pooling] if isinstance(pooling, str) else list(pooling)
        bad = [p for p in self.pooling if p not in POOLINGS]
        if bad:
            raise ValueError(f"pooling must be among {POOLINGS}, got {bad}")
        if normalize is None:
            normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        self.normalize = bool(normalize)
        self.out = self.output(["sentence_embedding", "token_embeddings", "last_hidden_state"], 3)
        # A graph with the pooling in it gives [batch, dim] already.
        shape = next((o.shape for o in (model.io.outputs if model.io else []) if o.name == self.out), None)
        self.pooled_in_graph = shape is not None and len(shape) == 2

    def _folder_pooling(self, config: dict) -> list[str]:
        """The modes 1_Pooling/config.json turns on (none: mean); one sparsejit lacks is refused."""
        on = {k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
              for k, v in config.items() if k.startswith("pooling_mode_") and v}
        missing = on - set(POOLINGS)
        if missing:
            raise PipelineError(f"{self.folder.folder / '1_Pooling' / 'config.json'}: pooling {sorted(missing)} is "
                                f"not one sparsejit has ({', '.join(POOLINGS)}); pass pooling= to choose one")
        return [m for m in POOLINGS if m in on] or ["mean"]

    def __call__(self, inputs: str | Sequence[str]) -> np.ndarray:
        texts, single = _as_list(inputs, self.task)
        encodings = self.encode(texts)
        result: np.ndarray | None = None
        for idx, feeds in self.batches(encodings):
            (out,) = self.model.run(feeds, [self.out])
            if out.ndim == 3:
                out = pool(out, feeds["attention_mask"], self.pooling)
            if self.normalize:
                out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
            if result is None:
                result = np.empty((len(texts), out.shape[-1]), np.float32)
            result[idx] = out
        if result is None:
            return np.zeros((0, 0), np.float32)
        return result[0] if single else result


# --- classification -----------------------------------------------------------------

def _labels(config: dict, n: int) -> list[str]:
    id2label = config.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


class TextClassification(Pipeline):
    """Strings, or (text, text_pair) pairs for cross-encoders → labels with scores, as
    `transformers.pipeline("text-classification")`: one string gives [{"label", "score"}];
    a list gives one dict per input (top_k=1) or a list of top_k dicts per input."""

    task = "text-classification"

    def __init__(self, mf, model, *, top_k: int | None = 1, function_to_apply: str | None = None, **kw):
        super().__init__(mf, model, **kw)
        self.top_k = top_k
        self.out = self.output(["logits"], 2)
        c = mf.config
        num_labels = len(c.get("id2label") or {}) or c.get("num_labels") or 0
        if function_to_apply is None:
            if c.get("problem_type") == "regression":
                function_to_apply = "none"
            elif c.get("problem_type") == "multi_label_classification" or num_labels == 1:
                function_to_apply = "sigmoid"
            else:
                function_to_apply = "softmax"
        if function_to_apply not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"function_to_apply must be softmax, sigmoid or none, got {function_to_apply!r}")
        self.function = function_to_apply

    def scores(self, inputs) -> np.ndarray:
        """The scores [n, labels] after softmax, sigmoid or none."""
        texts, _ = _as_list(inputs, self.task)
        encodings = self.encode(texts)
        logits: np.ndarray | None = None
        for idx, feeds in self.batches(encodings):
            (out,) = self.model.run(feeds, [self.out])
            if logits is None:
                logits = np.empty((len(texts), out.shape[-1]), np.float32)
            logits[idx] = out
        if logits is None:
            return np.zeros((0, 0), np.float32)
        return {"softmax": softmax, "sigmoid": sigmoid, "none": lambda x: x}[self.function](logits)

    def __call__(self, inputs, top_k: int | None | str = "default"):
        top_k = self.top_k if top_k == "default" else top_k
        _, single = _as_list(inputs, self.task)
        scores = self.scores(inputs)
        labels = _labels(self.folder.config, scores.shape[-1])
        results = []
        for row in scores:
            if top_k == 1:
                best = int(row.argmax())
                results.append({"label": labels[best], "score": float(row[best])})
                continue
            order = np.argsort(-row, kind="stable")[:top_k]
            results.append([{"label": labels[i], "score": float(row[i])} for i in order])
        if single:
            return results if top_k == 1 else results[0]
        return results


# --- token classification -----------------------------------------------------------

def _bio(label: str) -> tuple[str, str]:
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label  # as transformers: a label without a prefix continues a group


class TokenClassification(Pipeline):
    """Strings → entities with character offsets, as `transformers.pipeline("ner")`:
    aggregation_strategy "none" (one entry per token) or "simple" (adjacent tokens of
    one entity grouped, B-/I- tags followed, the mean score)."""

    task = "token-classification"

    def __init__(self, mf, model, *, aggregation_strategy: str = "none", ignore_labels: Sequence[str] = ("O",),
                 **kw):
        super().__init__(mf, model, **kw)
        if aggregation_strategy not in ("none", "simple"):
            raise ValueError(f"aggregation_strategy must be 'none' or 'simple', got {aggregation_strategy!r}")
        self.aggregation, self.ignore = aggregation_strategy, set(ignore_labels)
        self.out = self.output(["logits"], 3)

    def __call__(self, inputs):
        texts, single = _as_list(inputs, self.task)
        encodings = self.encode(texts)
        results: list = [None] * len(texts)
        for idx, feeds in self.batches(encodings):
            (logits,) = self.model.run(feeds, [self.out])
            for row, i in enumerate(idx):
                results[i] = self._entities(encodings[i], softmax(logits[row, :len(encodings[i].ids)]))
        return results[0] if single else results

    def _entities(self, enc, scores: np.ndarray) -> list[dict]:
        labels = _labels(self.folder.config, scores.shape[-1])
        tokens = []
        for t, (special, offsets) in enumerate(zip(enc.special_tokens_mask, enc.offsets)):
            if special:
                continue
            best = int(scores[t].argmax())
            tokens.append({"entity": labels[best], "score": float(scores[t, best]), "index": t,
                           "word": enc.tokens[t], "start": offsets[0], "end": offsets[1], "id": enc.ids[t]})
        if self.aggregation == "none":
            return [{k: v for k, v in e.items() if k != "id"} for e in tokens if e["entity"] not in self.ignore]
        groups: list[list[dict]] = []
        for e in tokens:
            bi, tag = _bio(e["entity"])
            if groups and bi != "B" and _bio(groups[-1][-1]["entity"])[1] == tag:
                groups[-1].append(e)
            else:
                groups.append([e])
        entities = []
        for g in groups:
            tag = g[0]["entity"].split("-", 1)[-1]
            if tag in self.ignore:
                continue
            entities.append({"entity_group": tag, "score": float(np.mean([e["score"] for e in g])),
                             "word": self.tokenizer.decode([e["id"] for e in g]),
                             "start": g[0]["start"], "end": g[-1]["end"]})
        return entities


# --- question answering -------------------------------------------------------------

class QuestionAnswering(Pipeline):
    """{"question", "context"} (or a list of them, or question=, context=) → {"answer",
    "score", "start", "end"}, as `transformers.pipeline("question-answering")`: a long
    context is read in overlapping windows (`doc_stride` tokens of overlap), the best
    span over all windows wins, and the answer is widened to whole words."""

    task = "question-answering"

    def __init__(self, mf, model, *, doc_stride: int | None = None, max_answer_len: int = 15, top_k: int = 1, **kw):
        kw.setdefault("max_length", None)
        super().__init__(mf, model, **kw)
        if kw["max_length"] is None:
            self.max_length = min(self.max_length, 384)
        self.doc_stride = min(self.max_length // 2, 128) if doc_stride is None else int(doc_stride)
        if not 0 <= self.doc_stride < self.max_length:
            raise ValueError(f"doc_stride must be in [0, max_length={self.max_length}), got {self.doc_stride}")
        self.max_answer_len, self.top_k = max_answer_len, top_k
        self.starts, self.ends = self._outputs()
        # Windows come from a copy of the tokenizer set to overlap them (the shared one stays as it is).
        self.windows = _tokenizers().Tokenizer.from_str(self.tokenizer.to_str())
        self.windows.enable_truncation(self.max_length, stride=self.doc_stride, strategy="only_second")
        self.cls_id = next((self.tokenizer.token_to_id(t) for t in ("[CLS]", "<s>")
                            if self.tokenizer.token_to_id(t) is not None), None)

    def _outputs(self) -> tuple[str, str]:
        names = self.model.output_names
        if "start_logits" in names and "end_logits" in names:
            return "start_logits", "end_logits"
        raise PipelineError(f"{self.folder.onnx}: question answering needs outputs start_logits and end_logits; "
                            f"the model's outputs: {names}")

    def __call__(self, inputs=None, *, question: str | None = None, context: str | None = None):
        if inputs is None:
            if question is None or context is None:
                raise TypeError("question-answering takes {'question': ..., 'context': ...}, a list of them, "
                                "or question= and context=")
            inputs = {"question": question, "context": context}
        single = isinstance(inputs, dict)
        examples = [inputs] if single else list(inputs)
        for i, ex in enumerate(examples):
            if not (isinstance(ex, dict) and isinstance(ex.get("question"), str)
                    and isinstance(ex.get("context"), str)):
                raise TypeError(f"question-answering input {i}: expected a dict with string 'question' and "
                                f"'context', got {ex!r:.80}")
            if not ex["question"].strip() or not ex["context"].strip():
                raise ValueError(f"question-answering input {i}: question and context must not be empty")
        windows, owner = [], []
        for i, enc in enumerate(self.windows.encode_batch([(ex["question"], ex["context"]) for ex in examples])):
            for w in [enc, *enc.overflowing]:
                windows.append(w)
                owner.append(i)
        found: list[list[dict]] = [[] for _ in examples]
        for idx, feeds in self.batches(windows):
            starts, ends = self.model.run(feeds, [self.starts, self.ends])
            for row, w in enumerate(idx):
                n = len(windows[w].ids)
                self._spans(windows[w], starts[row, :n], ends[row, :n], examples[owner[w]]["context"],
                            found[owner[w]])
        results = []
        for answers in found:
            answers = sorted(answers, key=lambda a: a["score"], reverse=True)[:self.top_k]
            results.append(answers[0] if len(answers) == 1 else answers)
        return results[0] if single else results

    def _spans(self, enc, start: np.ndarray, end: np.ndarray, context: str, answers: list[dict]) -> None:
        """transformers' select_starts_ends and decode_spans on one window, answers merged by text."""
        ids = np.asarray(enc.ids)
        desired = np.array([s == 1 for s in enc.sequence_ids], dtype=bool)
        if self.cls_id is not None:
            desired |= ids == self.cls_id
        start = np.where(desired, start, -10000.0)
        end = np.where(desired, end, -10000.0)
        start, end = softmax(start), softmax(end)
        start[0] = end[0] = 0.0
        candidates = np.tril(np.triu(np.outer(start, end)), self.max_answer_len - 1)
        flat = candidates.ravel()
        want = self.top_k * 2 + 10
        best = np.argsort(-flat, kind="stable")[:want] if want < flat.size else np.argsort(-flat, kind="stable")
        for s, e in zip(*np.unravel_index(best, candidates.shape)):
            if not (desired[s] and desired[e]):
                continue
            a, b = self._chars(enc, int(s), int(e))
            text = context[a:b]
            same = next((x for x in answers if x["answer"].lower() == text.lower()), None)
            if same:
                same["score"] += float(candidates[s, e])
            else:
                answers.append({"score": float(candidates[s, e]), "start": a, "end": b, "answer": text})

    @staticmethod
    def _chars(enc, s: int, e: int) -> tuple[int, int]:
        """The answer's characters in the context, widened to whole words."""
        words = enc.token_to_word(s), enc.token_to_word(e)
        chars = [None if w is None else enc.word_to_chars(w, sequence_index=1) for w in words]
        if chars[0] is None or chars[1] is None:  # as transformers: tokenizers without words keep to offsets
            return enc.offsets[s][0], enc.offsets[e][1]
        return chars[0][0], chars[1][1]


TASKS = {
    "sentence-embeddings": SentenceEmbeddings,
    "feature-extraction": SentenceEmbeddings,
    "text-classification": TextClassification,
    "sentiment-analysis": TextClassification,
    "token-classification": TokenClassification,
    "ner": TokenClassification,
    "question-answering": QuestionAnswering,
}
_TASK_OPTIONS = {"pooling", "normalize", "top_k", "function_to_apply", "aggregation_strategy", "ignore_labels",
                 "doc_stride", "max_answer_len"}


def pipeline(task: str, model: str | os.PathLike, *, tokenizer=None, batch_size: int = 32,
             max_length: int | None = None, num_threads: int | None = None, **options) -> Pipeline:
    """A callable that takes text and returns answers, on a model folder (or an .onnx file
    with `tokenizer=`).

    Tasks: "sentence-embeddings" (or "feature-extraction"), "text-classification"
    ("sentiment-analysis"), "token-classification" ("ner"), "question-answering".
    Task options: `pooling`, `normalize` (embeddings); `top_k`, `function_to_apply`
    (classification); `aggregation_strategy`, `ignore_labels` (tokens); `doc_stride`,
    `max_answer_len`, `top_k` (QA). Other keyword options go to `sparsejit.load`
    (`kernels`, `plan`, `progress`).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    mf = open_folder(model, tokenizer)
    task_options = {k: options.pop(k) for k in list(options) if k in _TASK_OPTIONS}
    loaded = load(mf.onnx, num_threads=num_threads, **options)
    cls = TASKS[task]
    try:
        p = cls(mf, loaded, batch_size=batch_size, max_length=max_length, **task_options)
    except TypeError as e:
        raise TypeError(f"{task}: {e}") from e
    p.task = task
    return p
