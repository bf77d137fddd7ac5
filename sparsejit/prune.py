"""Magnitude pruning of an ONNX file's MatMul/Gemm weights, to make sparse models to try.

    from sparsejit.prune import prune_model
    report = prune_model("bert.onnx", "bert_p90.onnx", sparsity=0.9, block=4)

Each constant 2-D weight of a MatMul or Gemm (its second input) has its smallest
magnitudes zeroed until the asked fraction of its weights is zero, counting the zeros
already there: per layer (every weight to the target) or globally (the smallest over
all of them). With block=4, four consecutive *input* weights of one output are scored by
their L2 norm and pruned together, as oBERT does, which the sparse kernels turn into
4-wide blocks.

The model's heads (pooler, classifier, QA and LM heads), which SparseML's recipes leave
dense, are left alone unless `heads=True`; `exclude` leaves out more by regex.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import load_model_proto
from .kernels.compress import analyse

# Node or weight names of a task head: BERT's pooler and classifier, QA's span head, the
# LM heads (BERT's cls.predictions, GPT's lm_head), sequence scoring heads.
HEADS = r"pooler|classifier|qa_outputs|lm_head|cls[./]predictions|(^|[./])score([./]|$)"


@dataclass
class PrunedWeight:
    name: str
    node: str
    shape: tuple[int, int]
    sparsity_before: float
    sparsity_after: float
    block_seen: int = 1  # the block size sparsejit's loader will find (kernels.compress.analyse)
    excluded: str = ""   # why it was left alone ("head", "--exclude"), or "" when pruned

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


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


def _groups(w_in_out: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(score, nonzero count) of every group, flat: |w| (block 1) or the L2 norm of
    `block` consecutive inputs of one output."""
    k, m = w_in_out.shape
    g = w_in_out.reshape(k // block, block, m).astype(np.float64)
    return np.sqrt((g**2).sum(axis=1)).ravel(), (g != 0).sum(axis=1).ravel()


def _prune_mask(scores: np.ndarray, nonzeros: np.ndarray, more: int) -> np.ndarray:
    """Which groups to zero for `more` weights to become zero: the lowest-scoring groups,
    each adding its nonzeros, until enough (groups already all zero score 0 and come
    first, free). Ties go by position; the last group may overshoot by under a block."""
    prune = np.zeros(scores.size, bool)
    if more > 0:
        order = np.argsort(scores, kind="stable")
        k = min(int(np.searchsorted(np.cumsum(nonzeros[order]), more)) + 1, scores.size)
        prune[order[:k]] = True
    return prune


def _excluded(node: onnx.NodeProto, t: onnx.TensorProto, exclude: Sequence[str], heads: bool) -> str:
    names = f"{node.name}\n{t.name}"
    if not heads and re.search(HEADS, names, re.MULTILINE):
        return "head"
    return next((f"--exclude {p}" for p in exclude if re.search(p, names, re.MULTILINE)), "")


def prune_model(source: str | os.PathLike | onnx.ModelProto, out_path: str | os.PathLike | None,
                sparsity: float, block: int = 1, scope: str = "layer", exclude: Sequence[str] = (),
                heads: bool = False) -> tuple[onnx.ModelProto, list[PrunedWeight]]:
    """Prune and (when out_path is given) save; returns the model and one row per weight
    (those left alone too, with `excluded` saying why).

    `sparsity` is the fraction of each weight (scope "layer") or of all the pruned
    weights together ("global") that is zero afterwards, zeros already there included."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    for p in exclude:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"--exclude {p!r} is not a regular expression: {e}") from e
    model, where, _ = load_model_proto(source)
    targets = prunable_weights(model)
    if not targets:
        raise ValueError(f"{where}: no MatMul/Gemm with a constant 2-D float weight to prune")
    report, work = [], []
    for node, t, trans_b in targets:
        w = numpy_helper.to_array(t).astype(np.float32)
        w = w.T if trans_b else w  # [in, out]
        zero = float(np.mean(w == 0))
        row = PrunedWeight(t.name, node.name, tuple(w.shape), zero, zero, excluded=_excluded(node, t, exclude, heads))
        report.append(row)
        if row.excluded:
            row.block_seen = analyse(w).block  # (a pruned weight's is found after pruning)
            continue
        if w.shape[0] % block:
            raise ValueError(f"{where}: weight {t.name!r} of node {node.name!r} has {w.shape[0]} inputs, "
                             f"not a multiple of block {block}")
        work.append((row, t, trans_b, w))
    if not work:
        raise ValueError(f"{where}: every MatMul/Gemm weight is excluded (heads, --exclude); nothing to prune")
    _prune(work, sparsity, block, scope)
    if out_path is not None:
        out_path = Path(out_path)
        big = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
        onnx.save_model(model, str(out_path), save_as_external_data=big,
                        location=out_path.name + ".data" if big else None)
    return model, report


def _prune(work: list, sparsity: float, block: int, scope: str) -> None:
    """Zero the groups chosen in each weight of `work` (rows, tensors, [in, out] arrays),
    write them back and fill in each row's result."""
    groups = [_groups(w, block) for _, _, _, w in work]
    if scope == "global":
        scores = np.concatenate([g[0] for g in groups])
        nonzeros = np.concatenate([g[1] for g in groups])
        total = sum(w.size for *_, w in work)
        zeros = total - int(nonzeros.sum())
        prune = _prune_mask(scores, nonzeros, round(sparsity * total) - zeros)
        masks = np.split(prune, np.cumsum([g[0].size for g in groups])[:-1])
    else:
        masks = [_prune_mask(s, nz, round(sparsity * w.size) - (w.size - int(nz.sum())))
                 for (s, nz), (*_, w) in zip(groups, work)]
    for (row, t, trans_b, w), prune in zip(work, masks):
        keep = ~prune.reshape(w.shape[0] // block, w.shape[1])
        pruned = (w * np.repeat(keep, block, axis=0)).astype(np.float32)
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(pruned.T if trans_b else pruned), t.name))
        row.sparsity_after = float(np.mean(pruned == 0))
        row.block_seen = analyse(pruned).block
