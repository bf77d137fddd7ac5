"""Magnitude pruning of an ONNX file's MatMul/Gemm weights, to make sparse models to try.

    from sparsejit.prune import prune_model
    report = prune_model("bert.onnx", "bert_p90.onnx", sparsity=0.9, block=4)

Each constant 2-D weight of a MatMul or Gemm (its second input) has its smallest
magnitudes zeroed: per layer (every weight to the target sparsity) or globally (one
threshold over all of them). With block=4, four consecutive *input* weights of one
output are scored by their L2 norm and pruned together, as oBERT does, which the
sparse kernels turn into 4-wide blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import load_model_proto


@dataclass
class PrunedWeight:
    name: str
    node: str
    shape: tuple[int, int]
    sparsity_before: float
    sparsity_after: float


def prunable_weights(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto, bool]]:
    """(node, initializer, weight is [out, in]) for every MatMul/Gemm with a constant 2-D float weight."""
    inits = {t.name: t for t in model.graph.initializer}
    found, seen = [], set()
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm") or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT or t.name in seen:
            continue
        seen.add(t.name)
        trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        found.append((n, t, trans_b))
    return found


def _scores(w_in_out: np.ndarray, block: int) -> np.ndarray:
    """Per-group magnitude: |w| (block 1) or the L2 norm of `block` consecutive inputs."""
    if block == 1:
        return np.abs(w_in_out)
    k, m = w_in_out.shape
    return np.sqrt((w_in_out.reshape(k // block, block, m) ** 2).sum(axis=1))


def _apply(w_in_out: np.ndarray, keep: np.ndarray, block: int) -> np.ndarray:
    return w_in_out * (np.repeat(keep, block, axis=0) if block > 1 else keep)


def prune_model(source: str | os.PathLike | onnx.ModelProto, out_path: str | os.PathLike | None,
                sparsity: float, block: int = 1, scope: str = "layer") -> tuple[onnx.ModelProto, list[PrunedWeight]]:
    """Prune and (when out_path is given) save; returns the model and one row per weight."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    model, where, _ = load_model_proto(source)
    targets = prunable_weights(model)
    if not targets:
        raise ValueError(f"{where}: no MatMul/Gemm with a constant 2-D float weight to prune")
    weights = []
    for node, t, trans_b in targets:
        w = numpy_helper.to_array(t)
        w = w.T if trans_b else w  # [in, out]
        if w.shape[0] % block:
            raise ValueError(f"{where}: weight {t.name!r} of node {node.name!r} has {w.shape[0]} inputs, "
                             f"not a multiple of block {block}")
        weights.append(w.astype(np.float32))
    thresholds = None
    if scope == "global":
        allscores = np.concatenate([_scores(w, block).ravel() for w in weights])
        k = round(sparsity * allscores.size)
        thresholds = [np.partition(allscores, k - 1)[k - 1] if k else -np.inf] * len(weights)
    report = []
    for i, ((node, t, trans_b), w) in enumerate(zip(targets, weights)):
        s = _scores(w, block)
        if thresholds is None:
            k = round(sparsity * s.size)
            # Keep exactly s.size - k groups: ties at the threshold are broken by position.
            keep = np.ones(s.size, bool)
            if k:
                keep[np.argpartition(s.ravel(), k - 1)[:k]] = False
            keep = keep.reshape(s.shape)
        else:
            keep = s > thresholds[i]
        pruned = _apply(w, keep, block).astype(np.float32)
        before = float(np.mean(w == 0))
        new = numpy_helper.from_array(np.ascontiguousarray(pruned.T if trans_b else pruned), t.name)
        t.CopyFrom(new)
        report.append(PrunedWeight(t.name, node.name, tuple(w.shape), before, float(np.mean(pruned == 0))))
    if out_path is not None:
        out_path = Path(out_path)
        big = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
        onnx.save_model(model, str(out_path), save_as_external_data=big,
                        location=out_path.name + ".data" if big else None)
    return model, report
