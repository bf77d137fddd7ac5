"""`sparsejit.InferenceSession`: ONNX Runtime's session interface, run by sparsejit.

For code written against `onnxruntime.InferenceSession` (optimum's ORTModel classes,
sentence-transformers' ONNX backend, your own): construct it the same way, call
`run(None, feed)`, ask `get_inputs()`/`get_outputs()`. What sparsejit cannot run is
refused at construction, naming the node, as `sparsejit.load` does.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .api import Model, load
from .graph import ModelIO

PROVIDER = "SparsejitExecutionProvider"


@dataclass(frozen=True)
class NodeArg:
    """An input or output as ONNX Runtime describes it: free dimensions by name (or None)."""

    name: str
    shape: list
    type: str


def _threads(sess_options) -> int | None:
    n = getattr(sess_options, "intra_op_num_threads", 0) if sess_options is not None else 0
    return int(n) if n and n > 0 else None


def _check_providers(providers) -> None:
    """Providers name where ONNX Runtime runs; sparsejit runs on the CPU whatever is asked.
    A GPU provider asked for is worth a warning: the user expected something else."""
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers or []]
    elsewhere = [p for p in names if p not in ("CPUExecutionProvider", PROVIDER)]
    if elsewhere:
        warnings.warn(f"sparsejit runs on the CPU; providers {elsewhere} are ignored", stacklevel=3)


class InferenceSession:
    """A drop-in for `onnxruntime.InferenceSession` on what sparsejit runs.

    - `InferenceSession(path_or_bytes, sess_options=None, providers=None, provider_options=None,
      **load_options)`: `sess_options.intra_op_num_threads` (when > 0) sets the threads;
      `load_options` go to `sparsejit.load` (`num_threads`, `kernels`, `plan`, `progress`).
    - `run(output_names, input_feed, run_options=None)`: None or [] for every output.
    - `get_inputs()`, `get_outputs()`, `get_overridable_initializers()`, `get_modelmeta()`,
      `get_providers()`, `get_provider_options()`, `get_session_options()`.
    - `.model`: the `sparsejit.Model` underneath (`check()`, `layers`, `kernel_source`).
    """

    def __init__(self, path_or_bytes: str | os.PathLike | bytes, sess_options=None, providers=None,
                 provider_options=None, **load_options):
        _check_providers(providers)
        if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
            self._model_path = None
            self._model_bytes = bytes(path_or_bytes)
        else:
            self._model_path = str(Path(path_or_bytes))
            self._model_bytes = None
        self._sess_options = sess_options
        threads = load_options.pop("num_threads", None) or _threads(sess_options)
        self.model: Model = load(self._model_bytes if self._model_bytes is not None else self._model_path,
                                 num_threads=threads, **load_options)
        io = self.model.io
        self._inputs = [NodeArg(i.name, list(i.shape), i.type) for i in io.inputs]
        self._outputs = [NodeArg(o.name, list(o.shape), o.type) for o in io.outputs]

    def __repr__(self) -> str:
        return f"<sparsejit.InferenceSession {self._model_path or '<bytes>'}, {self.model.num_threads} threads>"

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray],
            run_options=None) -> list[np.ndarray]:
        """The outputs named (None or []: all, in graph order) for `input_feed` {name: array}."""
        if not isinstance(input_feed, Mapping):
            raise TypeError(f"input_feed must be a dict name -> array, got {type(input_feed).__name__}")
        return self.model.run(input_feed, output_names)

    def get_inputs(self) -> list[NodeArg]:
        return list(self._inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self._outputs)

    def get_overridable_initializers(self) -> list[NodeArg]:
        return []  # initializers are compiled into the kernels: none can be fed

    def get_modelmeta(self) -> ModelIO:
        """producer_name, graph_name, domain, description, graph_description, version and
        custom_metadata_map, as ONNX Runtime's ModelMetadata has them."""
        return self.model.io

    def get_providers(self) -> list[str]:
        return [PROVIDER]

    def get_provider_options(self) -> dict[str, dict]:
        return {PROVIDER: {"num_threads": str(self.model.num_threads)}}

    def get_session_options(self):
        return self._sess_options

    def set_providers(self, providers=None, provider_options=None) -> None:
        _check_providers(providers)

    def io_binding(self):
        raise NotImplementedError("sparsejit runs on the CPU with numpy arrays: I/O binding is not supported; "
                                  "use run(output_names, input_feed)")

    def end_profiling(self) -> str:
        return ""
