"""The on-disk kernel cache: where it lives, what its keys cover, and that a hit is used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Compiles `define i64 @answer() { ret i64 N }` and prints N as the compiled code returns it.
SCRIPT = textwrap.dedent("""\
    import ctypes, sys
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
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(), *args], capture_output=True,
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


def test_damaged_cache_files_are_compiled_again_not_run(tmp_path):
    """A cached object whose bytes changed (or were cut short) fails its checksum and is
    rebuilt; a Numba source file whose text is not the kernel's is rewritten."""
    assert run(tmp_path, "7") == "7"
    obj = next((tmp_path / "kernels").glob("ir_*.o"))
    good = obj.read_bytes()
    for damaged in (good[:len(good) // 2], good[:-40] + bytes(8) + good[-32:], b""):
        obj.write_bytes(damaged)
        assert run(tmp_path, "7") == "7"
        assert obj.read_bytes() == good  # compiled again and rewritten whole

    from sparsejit.kernels import compile as c

    source = "from numba import njit\n\n\n@njit(cache=True)\ndef f(x):\n    x += 1\n    return x * 3\n"
    path = tmp_path / "kernels" / f"k_{c.source_key(source)}.py"
    path.write_text(source.replace("    x += 1\n", ""))  # a line lost: still imports, wrong answer
    probe = ("from sparsejit.kernels import compile as c; "
             f"print(c.load_source({source!r}).f(1))")
    env = {"SPARSEJIT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "6" and path.read_text() == source


def test_a_change_to_the_kernels_makes_cached_plans_stale(tmp_path, monkeypatch):
    """A plan holds timings of the kernels the generators made, and the decisions the
    planner drew from them: after a change to either (a new register tiling, a new way to
    choose) the plan made before is not reused."""
    import shutil

    from sparsejit import kernels as package
    from sparsejit import saved_plans
    from sparsejit.graph import Graph

    graph = Graph([], [], [], {}, 14)
    before = saved_plans.structure_key(graph, 2, "auto")
    copy = tmp_path / "kernels"
    shutil.copytree(Path(package.__file__).parent, copy)
    (copy / "sparse_ir.py").write_text((copy / "sparse_ir.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(package, "__file__", str(copy / "__init__.py"))
    saved_plans.kernels_fingerprint.cache_clear()
    try:
        changed = saved_plans.structure_key(graph, 2, "auto")
        assert changed != before
        # the planner's own source too: a new way to choose makes the decisions stale
        planner = tmp_path / "sparsejit"
        planner.mkdir()
        for name in ("choose.py", "plan.py"):
            shutil.copy(Path(saved_plans.__file__).parent / name, planner / name)
        (planner / "choose.py").write_text((planner / "choose.py").read_text() + "\n# changed\n")
        monkeypatch.setattr(saved_plans, "__file__", str(planner / "saved_plans.py"))
        saved_plans.kernels_fingerprint.cache_clear()
        assert saved_plans.structure_key(graph, 2, "auto") not in (before, changed)
    finally:
        saved_plans.kernels_fingerprint.cache_clear()


ANY_LAYOUT_SOURCE = """\
import numpy as np
from numba import njit

ANY_LAYOUT = True


@njit(cache=True)
def corner(a, b):
    return a[1, 2] + b[0] + a.shape[1]


@njit(cache=True)
def fill(out, v):
    out[:] = v


@njit(cache=True)
def through(a, b):
    out = np.empty(3, np.float32)
    fill(out, a[0, 0])  # (called from Numba code: may write its argument)
    return corner(a, b) + out[2]
"""


def test_a_driver_compiles_once_for_every_layout_of_its_arrays(tmp_path, monkeypatch):
    """A source with ANY_LAYOUT compiles each function for one array type per element type
    and dimensions (compile._any_layout): the same buffer contiguous, as a padded view,
    read-only and unaligned takes that one compiled signature, and no two compiled
    signatures ever match one call ambiguously. A new element type compiles anew."""
    import numpy as np
    from sparsejit.kernels import compile as c

    monkeypatch.setenv("SPARSEJIT_CACHE_DIR", str(tmp_path))
    m = c.load_source(ANY_LAYOUT_SOURCE)
    wide = np.arange(24, dtype=np.float32).reshape(4, 6)
    contiguous = np.ascontiguousarray(wide[:, :4])
    frozen = contiguous.copy()
    frozen.flags.writeable = False
    raw = np.zeros(4 * 4 * 4 + 1, np.uint8)[1:].view(np.float32).reshape(4, 4)  # unaligned
    raw[:] = contiguous
    assert not raw.flags.aligned
    b = np.ones(2, np.float32)
    for a in (contiguous, wide[:, :4], frozen, raw, contiguous, wide[:, :4]):
        assert m.corner(a, b) == 8 + 1 + 4
        assert m.through(a, frozen[0, :2]) == 8 + 0 + 4 + 0  # (b read-only: 0, 1)
    m.corner._can_compile = True  # as while another thread compiles (a load in each of two threads)
    assert m.corner(np.asfortranarray(contiguous), b) == 8 + 1 + 4
    m.corner._can_compile = False
    assert len(m.corner.signatures) == len(m.through.signatures) == 1
    (sig,) = m.corner.signatures
    assert all(t.layout == "A" and not t.mutable for t in sig)
    assert len(m.fill.signatures) == 1 and m.fill.signatures[0][0].mutable  # (from Numba code, as the caller has it)
    assert m.corner(contiguous.astype(np.float64), b) == 8 + 1 + 4
    assert len(m.corner.signatures) == 2


WRITES_SOURCE = """\
from numba import njit

ANY_LAYOUT = ("out",)


@njit(cache=True)
def twice(a, out):
    for i in range(a.shape[0]):
        out[i] = 2 * a[i]
"""


def test_a_driver_that_writes_an_argument_compiles_it_writable_once(tmp_path, monkeypatch):
    """ANY_LAYOUT naming the arguments a function writes: those typed writable, layout 'A'
    (one signature for a contiguous and a strided output); a read-only output is refused."""
    import numpy as np
    import pytest
    from sparsejit.kernels import compile as c

    monkeypatch.setenv("SPARSEJIT_CACHE_DIR", str(tmp_path))
    m = c.load_source(WRITES_SOURCE)
    a = np.arange(3, dtype=np.float32)
    out = np.zeros(6, np.float32)
    m.twice(a, out[:3])
    m.twice(a, out[::2])
    assert out.tolist() == [0, 2, 2, 0, 4, 0]
    (sig,) = m.twice.signatures
    assert sig[1].mutable and sig[1].layout == "A" and not sig[0].mutable
    out.flags.writeable = False
    with pytest.raises(TypeError):
        m.twice(a, out[:3])


# A new process on a cache that `sparsejit run` filled: loads the model, runs it on the
# inputs the cache was filled with, and prints how many Numba compiles it made.
WARM_RUN = textwrap.dedent("""\
    import sys
    import numpy as np
    from numba.core import event
    compiles = event.RecordingListener()
    event.register("numba:compile", compiles)
    import sparsejit
    m = sparsejit.load(sys.argv[1], num_threads=2)
    assert np.isfinite(m.run(dict(np.load(sys.argv[2])))[0]).all()
    print(sum(1 for _, e in compiles.buffer if e.is_start))
""")


def test_a_cache_filled_by_sparsejit_run_starts_a_new_process_warm(tmp_path):
    """README's "Starting warm": after `sparsejit run` has filled an empty cache with the
    inputs to be served (batch 2, one sequence padded: a shape whose last LayerNorm reads
    token-major values in this model), a new process loading the model and running it on
    them compiles nothing (no Numba compile) and writes nothing to the cache (no kernel,
    driver or plan made again)."""
    import os

    import numpy as np

    model = Path(__file__).parent / "models" / "int8" / "bert_block4_p90_int8_sparseml.onnx"
    mask = np.ones((2, 21), np.int64)
    mask[1, 13:] = 0
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, input_ids=np.ones((2, 21), np.int64), attention_mask=mask,
             token_type_ids=np.zeros((2, 21), np.int64))
    cache = tmp_path / "cache"
    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(cache)}
    subprocess.run([sys.executable, "-m", "sparsejit", "run", str(model), "--threads", "2", "--runs", "1",
                    "--inputs", str(inputs)], capture_output=True, text=True, env=env, check=True, timeout=600)

    def files():
        return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}

    filled = files()
    assert any(p.name.startswith("ir_") for p in filled) and any(p.suffix == ".nbi" for p in filled)
    p = subprocess.run([sys.executable, "-c", WARM_RUN, str(model), str(inputs)], capture_output=True, text=True,
                       env=env, check=False, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0"]
    assert files() == filled
