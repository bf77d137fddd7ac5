"""sparsejit: a JIT compiler for sparse BERT-family ONNX models on the CPU, in Python.

    import sparsejit
    model = sparsejit.load("model.onnx")
    outputs = model.run({"input_ids": ids, "attention_mask": mask})
"""

from __future__ import annotations

from pathlib import Path

# kernels/ sits beside sparsejit/ in the repository and is installed as sparsejit.kernels.
# Imported from a source checkout (the repository root on sys.path shadowing an
# installed copy), map it the same way.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_checkout / "kernels" / "linear.py").is_file():
    import importlib.util as _util

    if _util.find_spec(__name__ + ".kernels") is None:
        __path__.append(str(_checkout))

from .api import CheckReport, Model, load
from .graph import UnsupportedModelError
from .ops import SUPPORTED_OPS

__version__ = "0.1.0"
__all__ = ["SUPPORTED_OPS", "CheckReport", "Model", "UnsupportedModelError", "default_model_path", "load"]


def default_model_path() -> Path:
    """The small pruned BERT shipped inside the package (2 layers, hidden 256, 90% sparse)."""
    return Path(__file__).parent / "models" / "bert_small_p90.onnx"
