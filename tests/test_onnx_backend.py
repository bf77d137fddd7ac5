"""The official ONNX backend node tests, for every op sparsejit claims (`SUPPORTED_OPS`).

onnx ≥ 1.20 loads the node cases straight from their Python definitions in the wheel,
so no generated data directory is needed.
"""

from __future__ import annotations

import re

import onnx.backend.test
from onnx.backend.test.loader import load_model_tests

from sparsejit.backend import SparsejitBackend
from sparsejit.ops import SUPPORTED_OPS

# ONNX test names spell a few op types joined up rather than in snake case.
_TEST_NAME = {"ConstantOfShape": "constantofshape", "GatherND": "gathernd", "IsNaN": "isnan",
              "QuantizeLinear": "quantizelinear", "DequantizeLinear": "dequantizelinear",
              "DynamicQuantizeLinear": "dynamicquantizelinear", "MatMulInteger": "matmulinteger",
              "QLinearMatMul": "qlinearmatmul",
              "CumSum": "cumsum", "GreaterOrEqual": "greater_equal", "LessOrEqual": "less_equal",
              "MatMul": "matmul"}


def node_test_prefix(op_type: str) -> str:
    """ReduceMean → reduce_mean, the spelling of the op's node tests."""
    if op_type in _TEST_NAME:
        return _TEST_NAME[op_type]
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(op_type))


# Node tests of claimed ops that exercise what BERT-family models never need; each says why.
EXCLUDED: dict[str, str] = {
    r"^test_cast_.*FLOAT8": "8-bit float types (saturation, rounding modes): numpy has no such dtypes",
    r"^test_identity_(sequence|opt)_": "Identity on sequence and optional values: sparsejit runs tensors only",
    r"^test_attention_.*_bf16": "bfloat16 tensors (ml_dtypes): the reference ops compute in numpy's dtypes",
    r"^test_(de)?quantizelinear_.*(e4m3|e5m2|float4e2m1|int4|uint4|int2|uint2|float8|fp8|float4|float6)":
        "8-, 6- and 4-bit float and 4- and 2-bit integer types: models quantize to 8- and 16-bit integers",
}



def claimed_node_tests() -> list[str]:
    """Node tests named for a claimed op whose graph uses claimed ops only ("_expanded"
    variants that decompose into other ops, and ops that merely share a prefix, such as
    less_equal under Less, are not claims)."""
    prefixes = re.compile("^test_(" + "|".join(sorted(node_test_prefix(o) for o in SUPPORTED_OPS)) + ")(_|$)")
    names = []
    for case in load_model_tests(kind="node"):
        ops = {(n.domain, n.op_type) for n in case.model.graph.node}
        if prefixes.match(case.name) and all(d in ("", "ai.onnx") and o in SUPPORTED_OPS for d, o in ops):
            names.append(case.name)
    return names


backend_test = onnx.backend.test.BackendTest(SparsejitBackend, __name__)
for name in claimed_node_tests():
    backend_test.include(rf"^{name}_cpu$")
for pattern in EXCLUDED:
    backend_test.exclude(pattern)

globals().update(backend_test.test_cases)
