"""sparsejit: a JIT compiler for sparse BERT-family ONNX models on the CPU, in Python.

    import sparsejit
    embed = sparsejit.pipeline("sentence-embeddings", "model_folder/")
    vectors = embed(["text in", "vectors out"])
    model = sparsejit.load("model.onnx")
    outputs = model.run({"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version
from pathlib import Path

# kernels/ sits beside sparsejit/ in the repository and is installed as sparsejit.kernels:
# sparsejit runs from an installed copy (`pip install -e .` for a checkout).
try:
    from . import kernels as _kernels  # noqa: F401
except ModuleNotFoundError as _e:
    raise ImportError(f"sparsejit is imported from {Path(__file__).parent}, a source checkout that is not "
                      "installed (its kernels/ sits beside the package): `pip install -e .` there, or run from "
                      "another directory so that the installed sparsejit is found") from _e

from .api import CheckReport, Model, load
from .graph import UnsupportedModelError
from .ops import SUPPORTED_OPS
from .pipelines import pipeline
from .session import InferenceSession

try:  # one place for the version: pyproject.toml, read back from the installed metadata
    __version__ = _version("sparsejit")
except PackageNotFoundError:  # pragma: no cover - imported from a copy pip did not install
    __version__ = "0+unknown"
__all__ = ["SUPPORTED_OPS", "CheckReport", "InferenceSession", "Model", "UnsupportedModelError", "default_model_path",
           "export", "load", "pipeline"]


def export(folder, out, **options):
    """A Hugging Face model folder → a folder `pipeline` opens (`sparsejit.hf_export.export`;
    needs the `export` extra: torch, transformers)."""
    from .hf_export import export as _export

    return _export(folder, out, **options)


def default_model_path() -> Path:
    """The small pruned BERT shipped inside the package (2 layers, hidden 256, 90% sparse)."""
    return Path(__file__).parent / "models" / "bert_small_p90.onnx"
