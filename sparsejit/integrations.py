"""sentence-transformers and optimum on sparsejit, with nothing for the user to patch.

    model = sparsejit.integrations.sentence_transformer("minilm/")   # a SentenceTransformer
    model.encode(["a sentence"], normalize_embeddings=True)

    from optimum.onnxruntime import ORTModelForSequenceClassification
    clf = sparsejit.integrations.ort_model(ORTModelForSequenceClassification, "sst2/")

Both build the library's own ONNX Runtime classes around a `sparsejit.InferenceSession`.
optimum constructs `onnxruntime.InferenceSession` and an `IOBinding` (ONNX Runtime's
GPU-buffer binding, unused on the CPU) itself; while one of these helpers builds a model,
optimum's two names point at sparsejit's session and at a stand-in binding that refuses
to be used, under a lock, and are restored before the helper returns.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

from .pipelines import find_onnx
from .session import InferenceSession

_patch_lock = threading.Lock()


class _NoIOBinding:
    """What optimum's ORTModel holds as its I/O binding on sparsejit: never used on the
    CPU (optimum binds only with CUDA), and an error naming why if it is."""

    def __init__(self, session):
        self.session = session

    def __getattr__(self, name):
        raise NotImplementedError(f"sparsejit sessions have no I/O binding ({name}); "
                                  "set use_io_binding=False (the default on the CPU)")


def _optimum():
    try:
        from optimum.onnxruntime import base, modeling
    except ImportError as e:
        raise ImportError("optimum's ORTModel classes come from optimum-onnx: pip install 'sparsejit[integrations]' "
                          "(or pip install optimum-onnx onnxruntime)") from e
    return base, modeling


@contextmanager
def _sparsejit_sessions(load_options: dict):
    """optimum builds sparsejit sessions (with `load_options`) while inside."""
    base, modeling = _optimum()

    def session(path, sess_options=None, providers=None, provider_options=None, **_):
        return InferenceSession(path, sess_options, **load_options)

    with _patch_lock:
        saved = modeling.InferenceSession, base.IOBinding
        modeling.InferenceSession, base.IOBinding = session, _NoIOBinding
        try:
            yield
        finally:
            modeling.InferenceSession, base.IOBinding = saved


def _relative_onnx(folder: Path, file_name: str | None) -> str:
    return file_name or find_onnx(folder).relative_to(folder).as_posix()


def ort_model(cls, folder: str | os.PathLike, *, file_name: str | None = None, num_threads: int | None = None,
              **load_options):
    """An optimum `ORTModelFor…` (`cls`) on `folder` (config.json and an ONNX file),
    running on sparsejit: use it as the class's own `from_pretrained` result, in
    `transformers.pipeline(..., model=it, tokenizer=...)` too."""
    folder = Path(folder)
    options = dict(load_options, num_threads=num_threads)
    with _sparsejit_sessions(options):
        return cls.from_pretrained(folder, file_name=_relative_onnx(folder, file_name), export=False,
                                   use_io_binding=False)


def sentence_transformer(folder: str | os.PathLike, *, file_name: str | None = None,
                         num_threads: int | None = None, **kwargs):
    """A `SentenceTransformer` (backend="onnx") on a sentence-transformers folder holding
    an ONNX export, running on sparsejit. `kwargs` go to SentenceTransformer, except
    `sparsejit_options`: a dict of options for `sparsejit.load` (`kernels`, `plan`)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("pip install 'sparsejit[integrations]' (sentence-transformers, optimum-onnx)") from e
    folder = Path(folder)
    load_options = dict(kwargs.pop("sparsejit_options", {}), num_threads=num_threads)
    model_kwargs = dict(kwargs.pop("model_kwargs", None) or {})
    model_kwargs.setdefault("file_name", _relative_onnx(folder, file_name))
    model_kwargs.setdefault("provider", "CPUExecutionProvider")
    with _sparsejit_sessions(load_options):
        return SentenceTransformer(str(folder), backend="onnx", device="cpu", model_kwargs=model_kwargs, **kwargs)
