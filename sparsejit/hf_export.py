"""A local Hugging Face model folder → a folder `sparsejit.pipeline` opens.

    sparsejit export ./my-pruned-bert -o ./my-pruned-bert-onnx [--task text-classification]

The model is exported by PyTorch's own ONNX exporter (`torch.onnx.export`, TorchScript
path, eager attention), with batch and sequence free; beside it go config.json, the
tokenizer (tokenizer.json, written from the slow tokenizer files when the folder has
none) and the sentence-transformers files. The export is then loaded by sparsejit and
compared with the PyTorch model on a padded batch. Needs the `export` extra (torch,
transformers).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

# task → (transformers Auto class, ONNX output names)
TASKS = {
    "feature-extraction": ("AutoModel", ["last_hidden_state"]),
    "text-classification": ("AutoModelForSequenceClassification", ["logits"]),
    "token-classification": ("AutoModelForTokenClassification", ["logits"]),
    "question-answering": ("AutoModelForQuestionAnswering", ["start_logits", "end_logits"]),
}
ALIASES = {"sentence-embeddings": "feature-extraction", "sentiment-analysis": "text-classification",
           "ner": "token-classification"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class ExportError(ValueError):
    """The folder is not a model folder this exporter can read."""


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not readable JSON: {e}") from e


def transformer_folder(folder: Path) -> Path:
    """Where the transformer's config.json and weights are: the folder, or the path of the
    Transformer module a sentence-transformers modules.json names."""
    modules = folder / "modules.json"
    if modules.is_file():
        for m in _read_json(modules):
            if str(m.get("type", "")).endswith("Transformer"):
                return folder / m.get("path", "")
    return folder


def infer_task(config: dict, folder: Path) -> str:
    """The task config.json's architectures name (a sentence-transformers folder: embeddings)."""
    if (folder / "modules.json").is_file():
        return "feature-extraction"
    for arch in config.get("architectures") or []:
        for suffix, task in (("ForSequenceClassification", "text-classification"),
                             ("ForTokenClassification", "token-classification"),
                             ("ForQuestionAnswering", "question-answering")):
            if arch.endswith(suffix):
                return task
    return "feature-extraction"


def _dependencies():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError("export needs torch and transformers: pip install 'sparsejit[export]'") from e
    return torch, transformers


def _copy_tokenizer(src: Path, out: Path, transformers) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if not (out / "tokenizer.json").is_file():  # only slow tokenizer files: let transformers convert them
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(src), use_fast=True)
        except Exception as e:
            raise ExportError(f"{src}: no tokenizer.json and no tokenizer transformers can read: {e}") from e
        if not getattr(tok, "is_fast", False):
            raise ExportError(f"{src}: the tokenizer has no fast (tokenizer.json) form; pipelines need one")
        tok.save_pretrained(str(out))


def _copy_sentence_transformers(folder: Path, inner: Path, out: Path) -> None:
    """modules.json and the modules' folders, with the Transformer module at the root."""
    modules = _read_json(folder / "modules.json")
    for m in modules:
        path = m.get("path", "")
        if str(m.get("type", "")).endswith("Transformer"):
            m["path"] = ""
        elif path and (folder / path).is_dir():
            shutil.copytree(folder / path, out / path, dirs_exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    for name in ST_FILES[1:]:
        for where in (inner, folder):
            if (where / name).is_file():
                shutil.copy2(where / name, out / name)
                break


class _Keywords:
    """Calls the model with keyword arguments (transformers 5 wants them), returns a tuple."""

    def __new__(cls, torch, model, names, outputs):
        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *args):
                out = self.model(**dict(zip(names, args)))
                return tuple(getattr(out, o) for o in outputs)

        return Wrapped().eval()


def export(folder: str | os.PathLike, out: str | os.PathLike, *, task: str | None = None, opset: int = 14,
           verify: bool = True) -> Path:
    """Export the Hugging Face model in `folder` to `out`/model.onnx with its tokenizer,
    config and sentence-transformers files; returns the ONNX path. With `verify`, the
    export is loaded by sparsejit and compared with PyTorch on a padded batch."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a model folder: {folder}")
    inner = transformer_folder(folder)
    if not (inner / "config.json").is_file():
        raise ExportError(f"{inner} has no config.json: expected a Hugging Face model folder "
                          "(config.json, model.safetensors or pytorch_model.bin, tokenizer files)")
    config = _read_json(inner / "config.json")
    task = ALIASES.get(task, task) if task else infer_task(config, folder)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join([*TASKS, *ALIASES])}")
    torch, transformers = _dependencies()
    auto, outputs = TASKS[task]
    try:
        model = getattr(transformers, auto).from_pretrained(str(inner), attn_implementation="eager").eval()
    except Exception as e:
        raise ExportError(f"{inner}: transformers cannot load it as {auto}: {e}") from e
    params = model.forward.__code__.co_varnames
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    if "token_type_ids" in names and not getattr(model.config, "type_vocab_size", 0):
        names.remove("token_type_ids")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    feeds = _example(names, model.config)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({o: {0: "batch", 1: "sequence"} if o != "logits" or task == "token-classification" else {0: "batch"}
                 for o in outputs})
    wrapped = _Keywords(torch, model, names, outputs)
    with torch.no_grad():
        torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes=axes)
        want = [t.numpy() for t in wrapped(*args)]
    model.config.save_pretrained(str(out))
    _copy_tokenizer(inner, out, transformers)
    if (folder / "modules.json").is_file():
        _copy_sentence_transformers(folder, inner, out)
    if verify:
        _verify(path, feeds, want, outputs)
    return path


def _example(names: list[str], config) -> dict[str, np.ndarray]:
    """A padded batch of two: the second row is half padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(5, max(6, min(getattr(config, "vocab_size", 1000), 1000)), size=(2, 16), dtype=np.int64)
    mask = np.ones((2, 16), np.int64)
    mask[1, 8:] = 0
    every = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: every[n] for n in names}


def _verify(path: Path, feeds: dict, want: list[np.ndarray], outputs: list[str]) -> None:
    from .api import load

    got = load(path).run(feeds, outputs)
    mask = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
    for name, g, w in zip(outputs, got, want):
        if g.ndim >= 2 and mask is not None and g.shape[:2] == mask.shape:
            g, w = g[mask], w[mask]  # padded positions carry no meaning
        err = float(np.max(np.abs(g - w))) if g.size else 0.0
        if not np.allclose(g, w, atol=1e-3, rtol=1e-3):
            raise ExportError(f"{path}: output {name} differs from PyTorch's by up to {err:.2e} "
                              "(tolerance 1e-3): the export is not faithful")
