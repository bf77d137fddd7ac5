"""Small BERT-style encoders built node by node, in the forms torch's legacy exporter emits,
with weights pruned to any sparsity (unstructured or 4-blocks): models of any shape for
the generated robustness tests, without an exporter.

The graph: word + position embeddings (positions from Shape → Range), LayerNorm, an
additive mask from attention_mask, then per layer Q/K/V MatMul + bias, heads by Reshape
and Transpose, MatMul → Div → Add mask → Softmax (→ the SDPA NaN guard) → MatMul, output
dense + residual + LayerNorm, FFN with GELU written out with Erf, + residual + LayerNorm;
a pooler (Gather token 0 → Gemm → Tanh). LayerNorm is the native op at opset 17 and
written out (ReduceMean … Add) below it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class EncoderSpec:
    hidden: int = 16
    heads: int = 2
    ffn: int = 32
    layers: int = 1
    vocab: int = 50
    max_positions: int = 64
    sparsity: float = 0.9
    block: int = 1            # 4: prune whole 4-blocks along the input dimension
    opset: int = 14
    nan_guard: bool = False   # Where(IsNaN(p), 0, p) after the softmax, as SDPA exports have
    seed: int = 0


def pruned(rng: np.random.Generator, k: int, m: int, sparsity: float, block: int) -> np.ndarray:
    w = (rng.standard_normal((k, m)) * 0.2).astype(np.float32)
    if block == 4 and k % 4 == 0:
        keep = rng.random((k // 4, m)) >= sparsity
        return w * np.repeat(keep, 4, axis=0)
    return np.where(rng.random((k, m)) >= sparsity, w, np.float32(0))


class _Builder:
    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.rng = np.random.default_rng(spec.seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def const(self, value, dtype=np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self.n += 1
        out = f"{op_type.lower()}{self.n}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"/{op_type}_{self.n}", **attrs))
        return out

    def linear(self, x: str, k: int, m: int) -> str:
        w = pruned(self.rng, k, m, self.spec.sparsity, self.spec.block)
        b = (self.rng.standard_normal(m) * 0.1).astype(np.float32)
        return self.op("Add", [self.op("MatMul", [x, self.const(w)]), self.const(b)])

    def layernorm(self, x: str) -> str:
        h = self.spec.hidden
        gamma = self.const(1 + 0.1 * self.rng.standard_normal(h))
        beta = self.const(0.1 * self.rng.standard_normal(h))
        if self.spec.opset >= 17:
            return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)
        mean = self.op("ReduceMean", [x], axes=[-1])
        d = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Pow", [d, self.const(2.0)])], axes=[-1])
        std = self.op("Sqrt", [self.op("Add", [var, self.const(1e-12)])])
        return self.op("Add", [self.op("Mul", [self.op("Div", [d, std]), gamma]), beta])

    def gelu(self, x: str) -> str:
        erf = self.op("Erf", [self.op("Div", [x, self.const(np.sqrt(2.0))])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, self.const(1.0)])]), self.const(0.5)])

    def attention(self, x: str, mask: str) -> str:
        s = self.spec
        hd = s.hidden // s.heads
        split = self.const([0, 0, s.heads, hd], np.int64)

        def heads(t: str, perm: list[int]) -> str:
            return self.op("Transpose", [self.op("Reshape", [t, split])], perm=perm)

        q = heads(self.linear(x, s.hidden, s.hidden), [0, 2, 1, 3])
        kt = heads(self.linear(x, s.hidden, s.hidden), [0, 2, 3, 1])
        v = heads(self.linear(x, s.hidden, s.hidden), [0, 2, 1, 3])
        scores = self.op("Add", [self.op("Div", [self.op("MatMul", [q, kt]), self.const(np.sqrt(hd))]), mask])
        p = self.op("Softmax", [scores], axis=-1)
        if s.nan_guard:
            p = self.op("Where", [self.op("IsNaN", [p]), self.const(0.0), p])
        ctx = self.op("Transpose", [self.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
        return self.op("Reshape", [ctx, self.const([0, 0, s.hidden], np.int64)])

    def build(self) -> onnx.ModelProto:
        s = self.spec
        words = self.const(self.rng.standard_normal((s.vocab, s.hidden)) * 0.5)
        positions = self.const(self.rng.standard_normal((s.max_positions, s.hidden)) * 0.5)
        seq = self.op("Gather", [self.op("Shape", ["input_ids"]), self.const(1, np.int64)], axis=0)
        pos_ids = self.op("Range", [self.const(0, np.int64), seq, self.const(1, np.int64)])
        x = self.op("Add", [self.op("Gather", [words, "input_ids"], axis=0),
                            self.op("Gather", [positions, pos_ids], axis=0)])
        x = self.layernorm(x)
        m = self.op("Cast", [self.op("Unsqueeze", ["attention_mask", self.const([1, 2], np.int64)])],
                    to=TensorProto.FLOAT)
        mask = self.op("Mul", [self.op("Sub", [self.const(1.0), m]), self.const(-10000.0)])
        for _ in range(s.layers):
            attn = self.linear(self.attention(x, mask), s.hidden, s.hidden)
            x = self.layernorm(self.op("Add", [attn, x]))
            ffn = self.linear(self.gelu(self.linear(x, s.hidden, s.ffn)), s.ffn, s.hidden)
            x = self.layernorm(self.op("Add", [ffn, x]))
        self.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/out"))
        first = self.op("Gather", [x, self.const(0, np.int64)], axis=1)
        wp = pruned(self.rng, s.hidden, s.hidden, s.sparsity, 1).T.copy()
        pooled = self.op("Gemm", [first, self.const(wp), self.const(np.zeros(s.hidden))], transB=1)
        self.nodes.append(helper.make_node("Tanh", [pooled], ["pooler_output"], name="/pooler"))
        ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
               for n in ("input_ids", "attention_mask")]
        outs = [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", s.hidden]),
                helper.make_tensor_value_info("pooler_output", TensorProto.FLOAT, ["batch", s.hidden])]
        graph = helper.make_graph(self.nodes, "encoder", ids, outs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", s.opset)], ir_version=8)


def make_encoder(spec: EncoderSpec) -> onnx.ModelProto:
    return _Builder(spec).build()


def padded_inputs(rng: np.random.Generator, batch: int, seq: int, vocab: int, lengths=None) -> dict:
    """Token ids and a mask keeping `lengths[i]` tokens of row i (random, at least 1)."""
    lengths = rng.integers(1, seq + 1, size=batch) if lengths is None else lengths
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    mask = (np.arange(seq)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}
