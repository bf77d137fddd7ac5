"""The drivers of a first load compiled on the other core, by a helper process.

On an empty kernel cache most of a first load is compiling, one thing after another on
one core: the IR kernels, and the Numba drivers that launch them (a quarter to half a
second each; bench/README.md, fifteenth session). The drivers do not depend on the model:
`DRIVERS` lists each with the argument types a load compiles it for. So `start`, called
as a load begins, starts this module as a helper process that compiles them into the
cache while the load reads, packs and races its kernels; the load, when it needs a
driver, loads it from the cache, or waits while the helper is compiling it
(`compile.claimed`), or compiles it itself.

The helper runs at the idle scheduling class (SCHED_IDLE): on a core the load, its
kernels' threads or anyone else wants, it does not run, so it does not change what the
planner measures. When done it leaves a mark in the cache, so that later loads start
none; a process that exits first leaves it to finish (the CLI waits for it: `wait`).
`SPARSEJIT_PREBUILD=0` turns it off.

`python -m sparsejit.kernels.prebuild --record MODEL[:PRECISION] ...` prints the drivers
the loads of those models compile, as `DRIVERS` lines with the models in place of what
each serves (tests/test_prebuild.py checks that the table holds what the test models
compile).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

# (kernels module, its source of drivers, driver, argument types, what it serves), in the
# order a load first meets them. Types are Numba's, where A(dtype, ndim) is an array as
# compile._any_layout compiles a driver for it (layout 'A', maybe unaligned, read-only)
# and W(dtype, ndim) one the driver writes. What it serves: "float" every model, "int8"
# quantized models, "bf16" loads with precision="bf16" (a space between several).
DRIVERS = (
    ("linear", "SPARSE_DRIVER_SOURCE", "run_rows",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(int64, 1), A(uint16, 1), A(float32, 1), A(float32, 1), "
     "A(float32, 2), A(float32, 2), int64, A(int32, 1), A(int64, 1)"), "float"),
    ("bf16", "DRIVER_SOURCE", "pack_pairs",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2)", "bf16"),
    ("amx", "DRIVER_SOURCE", "run_amx",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(uint8, 1), A(float32, 1), A(float32, 2), A(float32, 2), "
     "int64, int64, int64, A(uint8, 1), A(int64, 1), A(uint8, 2)"), "int8 bf16"),
    ("int8", "DRIVER_SOURCE", "run_range",
     "int64, int64, W(int64, 2), int64, A(float32, 2), W(float32, 3)", "int8"),
    ("embed", "EMBED_DRIVER_SOURCE", "run_embed",
     ("int64, int64, W(int64, 2), int64, UniTuple(int64[:, ::1], 3), A(int64, 1), A(int64, 1), int64, int64, "
     "A(float32, 2), A(float32, 2), W(int64, 2)"), "float"),
    ("layernorm", "COLUMNS_DRIVER_SOURCE", "run_columns",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2), A(float32, 1), A(float32, 1), float32, "
     "A(float32, 1), A(int32, 2)"), "float"),
    ("int8", "DRIVER_SOURCE", "run_quantize",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2), float32, float32, float32", "int8"),
    ("int8", "DRIVER_SOURCE", "run_int8",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(int64, 1), A(int64, 1), A(uint16, 1), A(int32, 1), "
     "A(int32, 1), A(float32, 1), A(float32, 1), A(float32, 2), A(float32, 2), A(float32, 2), A(int64, 1)"), "int8"),
    ("attention", "HEADS_DRIVER_SOURCE", "run_heads",
     ("int64, int64, W(int64, 2), int64, A(float32, 4), A(float32, 4), A(float32, 4), A(float32, 4), A(float32, 4), "
     "float32, A(float32, 2), A(float32, 2)"), "float"),
    ("elementwise", "EACH_DRIVER", "run_each",
     ("int64, int64, W(int64, 2), int64, A(uint8, 1), A(uint8, 1), int64, float32, float32, float32, float32, "
     "A(uint8, 1)"), "int8"),
    ("layout", "TRANSPOSE_SOURCE", "transpose",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2)", "float"),
    ("linear", "DENSE_DRIVER_SOURCE", "run_panels",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 3), A(float32, 1), A(float32, 2), A(float32, 2), "
     "int64"), "float"),
)

_helper: subprocess.Popen | None = None


def _array(writable: bool):
    from numba.core.types import Array

    return lambda dtype, ndim: Array(dtype, ndim, "A", readonly=not writable, aligned=False)


def signature(text: str) -> tuple:
    """A `DRIVERS` entry's argument types as Numba's."""
    from numba.core import types

    # (eval: the text is this module's own, read with Numba's type names and A, W only)
    return tuple(eval(f"({text},)", {"__builtins__": {}},
                      {**vars(types), "A": _array(False), "W": _array(True)}))


def type_text(ty) -> str:
    """A Numba type as `signature` reads it."""
    from numba.core.types import Array, UniTuple

    if isinstance(ty, Array):
        if ty.layout == "A" and not ty.aligned:
            return f"{'W' if ty.mutable else 'A'}({ty.dtype}, {ty.ndim})"
        if ty.layout == "C" and ty.aligned and ty.mutable:
            return f"{ty.dtype}[{', '.join([':'] * (ty.ndim - 1) + ['::1'])}]"
    if isinstance(ty, UniTuple):
        return f"UniTuple({type_text(ty.dtype)}, {ty.count})"
    return str(ty)


def driver(module: str, source: str, name: str):
    from .compile import load_source

    return getattr(load_source(getattr(importlib.import_module(f"{__package__}.{module}"), source)), name)


def mark(tag: str) -> Path:
    """The file whose presence says the helper has built `tag`'s drivers into this cache,
    for this table, these sources, this Numba and this CPU."""
    import numba

    from .compile import cache_dir, host_cpu

    h = hashlib.sha256(f"numba {numba.__version__} {host_cpu()}".encode())
    for entry in DRIVERS:
        if tag in entry[4].split():
            h.update(repr(entry).encode())
            h.update(getattr(importlib.import_module(f"{__package__}.{entry[0]}"), entry[1]).encode())
    return cache_dir() / f"prebuilt-{tag}-{h.hexdigest()[:24]}"


def start(tags: tuple[str, ...]) -> None:
    """Start the helper for `tags`' drivers, unless it is off, running, or done for them,
    or there is no other core, or the cache is a temporary one."""
    global _helper
    from .compile import cache_dir, cache_root

    if (os.environ.get("SPARSEJIT_PREBUILD", "1") == "0" or not sys.platform.startswith("linux")
            or (_helper is not None and _helper.poll() is None) or len(os.sched_getaffinity(0)) < 2
            or cache_dir() != cache_root() / "kernels"):
        return
    needed = [t for t in tags if not mark(t).exists()]
    if not needed:
        return
    # The helper imports this sparsejit: from where it is installed, or from the checkout
    # put on sys.path (bench/ab.py's trees, whose sparsejit/kernels links to kernels/).
    root = Path(sys.modules["sparsejit"].__file__).resolve().parent.parent
    path = [str(root)] if (root / "sparsejit" / "kernels").is_dir() else []
    code = f"import sys; sys.path[:0] = {path!r}; from sparsejit.kernels.prebuild import build; build({needed!r})"
    try:
        _helper = subprocess.Popen([sys.executable, "-c", code], cwd=cache_dir(),
                                   env={**os.environ, "SPARSEJIT_CACHE_DIR": str(cache_root())},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return


def wait(timeout: float | None = None) -> int | None:
    """Wait for the helper this process started, if any; its exit status (None: none)."""
    return None if _helper is None else _helper.wait(timeout)


def build(tags: list[str]) -> None:
    """The helper: compile `tags`' drivers, the last a load needs first, then mark them done."""
    from .compile import compile_driver

    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    for module, source, name, types, serves in reversed(DRIVERS):
        if set(serves.split()) & set(tags):
            compile_driver(driver(module, source, name), signature(types))
    for tag in tags:
        mark(tag).touch(0o600)


# The kernels modules, each before those that import its sources (a source is named
# after the module that makes it).
MODULES = ("launch", "linear", "layout", "layernorm", "embed", "elementwise", "attention", "int8", "bf16", "amx")


def met(specs: list[str]) -> list[tuple[str, str, str, str, str]]:
    """The drivers that loading these models (each MODEL or MODEL:PRECISION) and running
    them at 1 × 128 and 2 × 21 tokens compiles or loads, in turn, as `DRIVERS` entries
    with the specs (space-separated) that met each in place of what it serves."""
    import numpy as np

    import sparsejit

    from .compile import drivers_met

    entries: dict[tuple, list[str]] = {}
    for spec in specs:
        path, _, precision = spec.partition(":")
        m = sparsejit.load(path, precision=precision or "fp32")
        for shape in ((1, 128), (2, 21)):
            ids = np.ones(shape, np.int64)
            m.run({n: ids if n != "token_type_ids" else 0 * ids for n in m.input_names})
        for dispatcher, sig in drivers_met:
            key = (*source_of(dispatcher), dispatcher.py_func.__name__, ", ".join(type_text(t) for t in sig))
            entries.setdefault(key, []).append(spec)
        drivers_met.clear()
    return [(*key, " ".join(by)) for key, by in entries.items()]


def source_of(dispatcher) -> tuple[str, str]:
    """(kernels module, name of its source) of a driver."""
    from .compile import _loaded

    for module in MODULES:
        for attr, value in vars(importlib.import_module(f"{__package__}.{module}")).items():
            if isinstance(value, str) and getattr(_loaded.get(value), "__name__", None) == dispatcher.py_func.__module__:
                return module, attr
    raise LookupError(f"no kernels module holds the source of {dispatcher.py_func.__name__}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--record"]:
        os.environ["SPARSEJIT_PREBUILD"] = "0"
        for module, source, name, types, by in met(sys.argv[2:]):
            print(f'    ("{module}", "{source}", "{name}",\n     "{types}", "{by}"),')
    else:
        sys.exit(__doc__)
