"""The shape the code keeps (CONTRIBUTING.md): no function over 80 lines in sparsejit/ or
kernels/ (complexity is ruff's C901, `make lint`), and no import of the repository root
by path from the package."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def test_no_function_over_80_lines():
    long = []
    for path in sorted([*ROOT.glob("sparsejit/*.py"), *ROOT.glob("kernels/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_package_does_not_put_the_checkout_on_sys_path():
    for path in sorted([*ROOT.glob("sparsejit/*.py"), *ROOT.glob("kernels/*.py")]):
        assert "sys.path.insert" not in path.read_text() and "__path__.append" not in path.read_text(), path
