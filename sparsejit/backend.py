"""`onnx.backend.base.Backend` for sparsejit, so the official ONNX node tests can run it.

    from sparsejit.backend import SparsejitBackend
    rep = SparsejitBackend.prepare(model_proto)
    outputs = rep.run([x, y])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from .api import Model, load


class SparsejitRep(BackendRep):
    def __init__(self, model: Model):
        self.model = model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        return tuple(self.model.run(list(inputs)))


class SparsejitBackend(Backend):
    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        from .ops import SUPPORTED_OPS

        return all(n.op_type in SUPPORTED_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node)

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> SparsejitRep:
        super().prepare(model, device, **kwargs)
        return SparsejitRep(load(model, **kwargs))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device == "CPU"


prepare = SparsejitBackend.prepare
run_model = SparsejitBackend.run_model
supports_device = SparsejitBackend.supports_device
