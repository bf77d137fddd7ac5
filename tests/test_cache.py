"""The on-disk kernel cache: where it lives, what its keys cover, and that a hit is used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Compiles `define i64 @answer() { ret i64 N }` and prints N as the compiled code returns it.
SCRIPT = textwrap.dedent("""\
    import ctypes, sys
    sys.path.insert(0, {root!r})
    from sparsejit.kernels import compile as c
    n = int(sys.argv[1])
    c.host_cpu()  # initialises LLVM
    if len(sys.argv) > 2:  # pretend to be another CPU
        c.host_cpu = lambda: ("x86-64", "+sse2")
    addr = c.compile_ir(f"define i64 @answer() {{{{\\n  ret i64 {{n}}\\n}}}}\\n", "answer")
    print(ctypes.CFUNCTYPE(ctypes.c_int64)(addr)())
""")


def run(cache: Path, *args: str) -> str:
    env = {"SPARSEJIT_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT)), *args], capture_output=True,
                       text=True, env=env, check=True)
    return p.stdout.strip()


def objects(cache: Path) -> set[str]:
    return {p.name for p in (cache / "kernels").glob("ir_*.o")}


def test_ir_cache_is_keyed_by_source_and_cpu(tmp_path):
    assert run(tmp_path, "1") == "1"
    first = objects(tmp_path)
    assert len(first) == 1  # the directory comes from SPARSEJIT_CACHE_DIR
    stamp = (tmp_path / "kernels" / next(iter(first))).stat().st_mtime_ns
    assert run(tmp_path, "1") == "1" and objects(tmp_path) == first  # a new process hits it,
    assert (tmp_path / "kernels" / next(iter(first))).stat().st_mtime_ns == stamp  # not rewriting it
    assert run(tmp_path, "2") == "2"  # other source: its own file, not the stale code
    assert len(objects(tmp_path)) == 2
    assert run(tmp_path, "2", "generic") == "2"  # same source, other CPU and features: another file
    assert len(objects(tmp_path)) == 3


def test_numba_sources_are_keyed_by_text(tmp_path, monkeypatch):
    from sparsejit.kernels import compile as c

    monkeypatch.setenv("SPARSEJIT_CACHE_DIR", str(tmp_path))
    a = c.load_source("from numba import njit\n\n\n@njit(cache=True)\ndef f():\n    return 1\n")
    b = c.load_source("from numba import njit\n\n\n@njit(cache=True)\ndef f():\n    return 2\n")
    assert (a.f(), b.f()) == (1, 2)
    files = sorted(p.name for p in (tmp_path / "kernels").glob("k_*.py"))
    assert len(files) == 2
