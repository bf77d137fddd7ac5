"""What a first load compiles beside its model, compiled on the other core by a helper.

On an empty kernel cache most of a first load is compiling, one thing after another on
one core: the IR kernels, and the Numba drivers that launch them (bench/README.md,
fifteenth session). Much of it does not depend on the model's weights: the drivers
(with the argument types a load compiles each for), LayerNorm's, attention's and the
launcher's code, and the Linear kernels of unstructured weights as transformers like
BERT have them. `BUILDS` lists them, in the order a load needs them. `start`, called as
a load begins, starts a helper process that builds them into the cache while the load
reads, packs and races its kernels. The load, when it needs one, reads it from the
cache, or waits while the helper compiles it (`compile.claimed`), or compiles it itself
(what `BUILDS` misses, or what it meets before the helper).

The helper runs at the idle scheduling class (SCHED_IDLE): on a core the load, its
kernels' threads or anyone else wants, it does not run, so it does not change what the
planner measures. When done it leaves a mark in the cache, so that later loads start
none; a process that exits first leaves it to finish (the CLI waits for it: `wait`).
`SPARSEJIT_PREBUILD=0` turns it off.

`python -m sparsejit.kernels.prebuild --record MODEL[:PRECISION] ...` prints the drivers
the loads of those models compile, as `Driver` lines with the models in place of what
each serves (tests/test_prebuild.py checks that `BUILDS` holds what the test models
compile, and that what else it builds is what they meet).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple


class Driver(NamedTuple):
    """A Numba driver: its kernels module, the name of its source there, its name, its
    argument types, and what it serves. Types are Numba's, where A(dtype, ndim) is an
    array as compile._any_layout compiles a driver for it (layout 'A', maybe unaligned,
    read-only), W(dtype, ndim) one the driver writes and R(dtype, ndim) a read-only
    C-contiguous one (the embeddings' ids)."""

    module: str
    source: str
    name: str
    types: str
    serves: str


class CFunction(NamedTuple):
    """A Numba function compiled as a C function (the launcher, a kernel the launcher
    runs): its kernels module, the expression there that compiles it (or reads it from
    the cache) and gives its address, what it serves, and when it is built."""

    module: str
    source: str
    serves: str
    when: str = "True"


class IR(NamedTuple):
    """An IR kernel (or the launcher): its kernels module, the expression there that makes
    its source (`VECTOR_LANES` this CPU's, `part_ir` launch's), what it serves, and when
    it is built (an expression there too: this CPU has what it needs)."""

    module: str
    source: str
    serves: str
    when: str = "True"
    # met only where the kernels it follows from win their race at load (bf16's scattered
    # FFN handover: where both FFN layers run the scattered kernel, not float32's)
    raced: bool = False


# What a first load compiles that does not depend on its model's weights (bench/README.md,
# fifteenth session): the drivers, and the IR kernels of transformers like BERT
# (LayerNorm, attention, the float and int8 Linear kernels of unstructured weights, int8
# with 16 outputs in the lanes where the CPU has VBMI;
# attention with a mask per query, as transformers' exports make it). In the order a load
# needs them, but for what only some quantized models need (dynamic quantization's
# ranges and grid; the VNNI int8 driver, where AMX does not win), put first: the helper, which
# works from the last, comes to those last. What it serves: "float" every model, "fp32"
# models with float32 Linear layers (not a quantized model's float head alone), "int8"
# quantized models, "qoperator" those with QLinearMatMul or quantized attention (QOperator's attention:
# QAttentionCore's kernel with this CPU's products, for up to 258 keys where they are
# BLAS's; the lanes kernel requantizing QLinearMatMul's sums, and storing Q, K and V as
# bytes), "bf16" loads with precision="bf16" (a space between several).
BUILDS = (
    CFunction("launch", "launcher()", "float"),
    IR("int8", "range_ir(VECTOR_LANES)", "int8"),
    IR("int8", "part_ir(RANGE_SIGNATURE)", "int8"),
    Driver("int8", "DRIVER_SOURCE", "run_range",
     "int64, int64, W(int64, 2), int64, A(float32, 2), W(float32, 3)", "int8"),
    IR("int8", "grid_ir(VECTOR_LANES)", "int8"),
    IR("int8", "part_ir(GRID_SIGNATURE)", "int8"),
    Driver("int8", "DRIVER_SOURCE", "run_grid",
     ("int64, int64, W(int64, 2), int64, W(float32, 3), A(float32, 1), int64, A(float32, 1), A(int32, 1), int64, "
      "A(float32, 1), A(float32, 1), A(int64, 1)"), "int8"),
    Driver("int8", "DRIVER_SOURCE", "run_int8",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(int64, 1), A(int64, 1), A(uint16, 1), A(int32, 1), "
     "A(int32, 1), A(float32, 1), A(float32, 1), A(float32, 2), A(float32, 2), A(float32, 2), A(int64, 1)"), "int8"),
    IR("int8", "quantize_ir(VECTOR_LANES)", "int8"),
    IR("int8", "ir_source(IRConfig(1, 'none', False, 16, SPARSE_VECTORS[16], 16, int8=True))", "int8", "VECTOR_LANES == 16"),
    IR("int8", "lanes_ir(LanesConfig('none', False))", "int8", "VECTOR_LANES == 16 and has_lanes()"),
    IR("int8", "lanes_ir(LanesConfig('none', False, requantize=True))", "qoperator", "VECTOR_LANES == 16 and has_lanes()"),
    IR("int8", "part_ir(LANES_SIGNATURE)", "int8", "VECTOR_LANES == 16 and has_lanes()"),
    Driver("int8", "LANES_DRIVER_SOURCE", "run_lanes",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), int64, A(int32, 1), A(uint8, 2), A(int8, 2), A(float32, 1), "
     "int64, A(float32, 2), A(float32, 2), A(int32, 2), int64, A(int64, 1)"), "int8"),
    IR("linear", "ir_source(kernel_config(1, 'none', False))", "fp32"),
    IR("linear", "part_ir(SPARSE_SIGNATURE)", "float"),
    Driver("linear", "SPARSE_DRIVER_SOURCE", "run_rows",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(int64, 1), A(uint16, 1), A(float32, 1), A(float32, 1), "
     "A(float32, 2), A(float32, 2), int64, A(int32, 1), A(int64, 1)"), "float"),
    IR("amx", "amx_ir(AmxConfig('int8', 'none', False, True, True))", "int8", "has_amx('int8')"),
    IR("amx", "part_ir(SIGNATURE)", "int8 bf16", "has_amx('int8') or has_amx('bf16')"),
    Driver("bf16", "DRIVER_SOURCE", "pack_pairs",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 3)", "bf16"),
    IR("bf16", "rows_ir()", "bf16", "VECTOR_LANES == 16 and has_bf16()"),
    IR("bf16", "ir_source(scattered_config('none', False))", "bf16", "VECTOR_LANES == 16 and has_bf16()"),
    IR("bf16", "ir_source(scattered_config('none', True))", "bf16", "VECTOR_LANES == 16 and has_bf16()"),
    IR("bf16", "ir_source(scattered_config('gelu', False))", "bf16", "VECTOR_LANES == 16 and has_bf16()"),
    IR("bf16", "ir_source(replace(scattered_config('gelu', False), rows_out=True))", "bf16",
       "VECTOR_LANES == 16 and has_bf16()", raced=True),
    Driver("amx", "DRIVER_SOURCE", "run_amx",
     ("int64, int64, W(int64, 2), int64, A(float32, 3), A(uint8, 1), A(float32, 1), A(float32, 3), A(float32, 2), "
     "int64, int64, A(int64, 1), int64, A(uint8, 1), A(int64, 1), A(uint8, 2), int64"), "int8 bf16"),
    IR("int8", "ir_source(IRConfig(1, 'none', True, 16, SPARSE_VECTORS[16], 16, int8=True))", "int8", "VECTOR_LANES == 16"),
    IR("int8", "lanes_ir(LanesConfig('none', True))", "int8", "VECTOR_LANES == 16 and has_lanes()"),
    IR("linear", "ir_source(kernel_config(1, 'none', True))", "fp32"),
    IR("amx", "amx_ir(AmxConfig('int8', 'none', True, True, True))", "int8", "has_amx('int8')"),
    IR("int8", "ir_source(IRConfig(1, 'gelu', False, 16, SPARSE_VECTORS[16], 16, int8=True))", "int8", "VECTOR_LANES == 16"),
    IR("int8", "lanes_ir(LanesConfig('gelu', False))", "int8", "VECTOR_LANES == 16 and has_lanes()"),
    IR("linear", "ir_source(kernel_config(1, 'gelu', False))", "fp32"),
    IR("amx", "amx_ir(AmxConfig('int8', 'gelu', False, True, True))", "int8", "has_amx('int8')"),
    IR("amx", "amx_ir(AmxConfig('int8', 'gelu', False, True, True, quant_out=True, unsigned_grid=True))", "int8",
       "has_amx('int8')", raced=True),
    IR("linear", "dense_ir(dense_config('none', False, VECTOR_LANES))", "float"),
    IR("linear", "dense_ir(replace(dense_config('none', False, VECTOR_LANES), vectors=1, gemv=True))", "float"),
    IR("linear", "part_ir(DENSE_SIGNATURE)", "float"),
    IR("embed", "embed_ir(VECTOR_LANES, 3)", "float"),
    IR("embed", "part_ir(SIGNATURE)", "float"),
    Driver("embed", "EMBED_DRIVER_SOURCE", "run_embed",
     ("int64, int64, W(int64, 2), int64, UniTuple(R(int64, 2), 3), A(int64, 1), A(int64, 1), int64, int64, "
     "A(float32, 2), A(float32, 2), A(int64, 1)"), "float"),
    IR("layernorm", "columns_ir(VECTOR_LANES)", "float"),
    IR("layernorm", "columns_ir(VECTOR_LANES, quantize=True)", "int8"),
    IR("layernorm", "part_ir(COLUMNS_SIGNATURE)", "float"),
    Driver("layernorm", "COLUMNS_DRIVER_SOURCE", "run_columns",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2), A(float32, 1), A(float32, 1), float32, "
     "A(float32, 1), A(int32, 3)"), "float"),
    # (a LayerNorm after a Linear splits by features on more than one thread: layernorm._run_columns)
    *(IR("layernorm", f"columns_ir(VECTOR_LANES, split='{split}')", "float", "threads() > 1")
      for split in ("stats", "outputs")),
    *(IR("layernorm", f"columns_ir(VECTOR_LANES, quantize=True, to_bytes={b}, split='outputs')", "int8",
         "threads() > 1") for b in (False, True)),
    Driver("layernorm", "COLUMNS_DRIVER_SOURCE", "run_features",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2), A(float32, 1), A(float32, 1), float32, "
     "A(float32, 1), A(int32, 3), A(float32, 2), int64, int64"), "float"),
    # (a LayerNorm whose output bf16 layers on AMX read, where the race puts them there, stores
    # their pair rows: plan.hand_layernorm_pairs)
    IR("layernorm", "columns_ir(VECTOR_LANES, split='outputs', to_pairs=True)", "bf16",
       "threads() > 1 and has_amx('bf16')", raced=True),
    IR("layernorm", "columns_ir(VECTOR_LANES, to_pairs=True)", "bf16", "threads() == 1 and has_amx('bf16')",
       raced=True),
    IR("int8", "part_ir(QUANTIZE_SIGNATURE)", "int8"),
    Driver("int8", "DRIVER_SOURCE", "run_quantize",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2), A(float32, 1)", "int8"),
    IR("attention", "attention_ir(attention_config(True))", "float"),
    IR("attention", "part_ir(SIGNATURE)", "float"),
    Driver("attention", "HEADS_DRIVER_SOURCE", "run_heads",
     ("int64, int64, W(int64, 2), int64, A(float32, 4), A(float32, 4), A(float32, 4), A(float32, 4), A(float32, 4), "
     "float32, A(float32, 2), A(float32, 2), A(float32, 4), A(float32, 1)"), "float"),
    IR("layernorm", "columns_ir(VECTOR_LANES, quantize=True, to_bytes=True)", "int8", "threads() == 1"),
    IR("elementwise", "each_ir('fake_quantize')", "int8"),
    IR("elementwise", "part_ir(EACH)", "int8"),
    Driver("elementwise", "EACH_DRIVER", "run_each",
     ("int64, int64, W(int64, 2), int64, A(uint8, 1), A(uint8, 1), int64, float32, float32, float32, float32, "
     "A(uint8, 1)"), "int8"),
    IR("rows", "part_ir(ROWS)", "int8"),
    Driver("rows", "ROWS_DRIVER", "run_row_group", "int64, int64, W(int64, 2), int64, A(int64, 1), int64, int64", "int8"),
    IR("layout", "transpose_ir()", "float"),
    IR("layout", "part_ir(TRANSPOSE_SIGNATURE)", "float"),
    Driver("layout", "TRANSPOSE_SOURCE", "transpose",
     "int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 2)", "float"),
    Driver("linear", "DENSE_DRIVER_SOURCE", "run_panels",
     ("int64, int64, W(int64, 2), int64, A(float32, 2), A(float32, 3), A(float32, 1), A(float32, 2), A(float32, 2), "
     "int64"), "float"),
    IR("int8", "lanes_ir(LanesConfig('none', False, requantize=True, bytes_out=True))", "qoperator",
       "VECTOR_LANES == 16 and has_lanes()", raced=True),
    CFunction("elementwise", "each_kernel('dequantize')", "int8"),
    CFunction("elementwise", "each_kernel('quantize')", "int8"),
    IR("amx", "amx_ir(AmxConfig('int8', 'none', False, True, True, requantize=True))", "qoperator",
       "has_amx('int8')", raced=True),
    IR("elementwise", "part_ir(QATTENTION)", "qoperator"),
    IR("elementwise", "row_bytes_ir()", "qoperator", "qattention_products() == 'vnni' and has_permutes()"),
    CFunction("elementwise", "qattention_kernel(('uint8',) * 5 + ('float32',) * 2)", "qoperator",
              "qattention_products() == 'blas'"),
    IR("elementwise", "qattention_ir(_offsets(('uint8',) * 4))", "qoperator", "qattention_products() == 'vnni'"),
)
DRIVERS = tuple(b for b in BUILDS if isinstance(b, Driver))

_helper: subprocess.Popen | None = None
_starting = threading.Lock()


def _forked() -> None:
    # A forked child did not start its parent's helper, and may have been forked while
    # another thread held the lock.
    global _helper, _starting
    _helper, _starting = None, threading.Lock()


os.register_at_fork(after_in_child=_forked)


def _array(writable: bool):
    from numba.core.types import Array

    return lambda dtype, ndim: Array(dtype, ndim, "A", readonly=not writable, aligned=False)


def signature(text: str) -> tuple:
    """A `Driver`'s argument types as Numba's."""
    from numba.core import types

    # (eval: the text is this module's own, read with Numba's type names and A, W only)
    return tuple(eval(f"({text},)", {"__builtins__": {}},
                      {**vars(types), "A": _array(False), "W": _array(True),
                       "R": lambda dtype, ndim: types.Array(dtype, ndim, "C", readonly=True)}))


def type_text(ty) -> str:
    """A Numba type as `signature` reads it."""
    from numba.core.types import Array, UniTuple

    if isinstance(ty, Array):
        if ty.layout == "A" and not ty.aligned:
            return f"{'W' if ty.mutable else 'A'}({ty.dtype}, {ty.ndim})"
        if ty.layout == "C" and ty.aligned and ty.mutable:
            return f"{ty.dtype}[{', '.join([':'] * (ty.ndim - 1) + ['::1'])}]"
        if ty.layout == "C" and ty.aligned:
            return f"R({ty.dtype}, {ty.ndim})"
    if isinstance(ty, UniTuple):
        return f"UniTuple({type_text(ty.dtype)}, {ty.count})"
    return str(ty)


def driver(module: str, source: str, name: str):
    from .compile import load_source

    return getattr(load_source(getattr(importlib.import_module(f"{__package__}.{module}"), source)), name)


def mark(tag: str) -> Path:
    """The file whose presence says the helper has built `tag`'s share of `BUILDS` into
    this cache, for this Numba, this CPU and these kernels (their generators' source)."""
    import numba

    from ..saved_plans import kernels_fingerprint
    from .compile import cache_dir, host_cpu

    h = hashlib.sha256(f"{tag} numba {numba.__version__} {host_cpu()} {kernels_fingerprint()}".encode())
    return cache_dir() / f"prebuilt-{tag}-{h.hexdigest()[:24]}"


def made(entry: IR | CFunction):
    """What an `IR` or `CFunction` entry's expression makes (an IR source; a C function's
    address), or None where its `when` does not hold."""
    from .amx import has_amx
    from .compile import vector_lanes
    from .launch import part_ir

    names = {**vars(importlib.import_module(f"{__package__}.{entry.module}")), "VECTOR_LANES": vector_lanes(),
             "part_ir": part_ir, "has_amx": has_amx}
    # (eval: the expressions are this module's own)
    return eval(entry.source, {"__builtins__": {}}, names) if eval(entry.when, {"__builtins__": {}}, names) else None


def start(tags: tuple[str, ...]) -> None:
    """Start the helper for `tags`' share of `BUILDS`, unless it is off, running, or
    done for them, or there is no other core, or the cache is a temporary one, or this
    process is not a Python interpreter that a helper could be (embedded, or frozen)."""
    with _starting:  # (threads loading at once start one helper)
        _start(tags)


def _start(tags: tuple[str, ...]) -> None:
    global _helper
    from .compile import cache_dir, cache_root

    if (os.environ.get("SPARSEJIT_PREBUILD", "1") == "0" or not sys.platform.startswith("linux")
            or getattr(sys, "frozen", False) or not Path(sys.executable or "").name.startswith("python")
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
    code = (f"import os, sys; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); sys.path[:0] = {path!r}; "
            f"from sparsejit.kernels.prebuild import build; build({needed!r})")
    try:
        _helper = subprocess.Popen([sys.executable, "-c", code], cwd=cache_dir(),
                                   env={**os.environ, "SPARSEJIT_CACHE_DIR": str(cache_root())},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return
    threading.Thread(target=_helper.wait, name="sparsejit-prebuild-reaper", daemon=True).start()  # (no zombie)


def wait(timeout: float | None = None) -> int | None:
    """Wait for the helper this process started, if any; its exit status (None: none)."""
    return None if _helper is None else _helper.wait(timeout)


def build(tags: list[str]) -> None:
    """The helper (at the idle scheduling class from its first line, `start`): build
    `tags`' share of `BUILDS` from the last (the load works from the first; it waits
    for what the helper is compiling, or finds it done), then mark them done."""
    from .compile import compile_driver, ir_engine

    for entry in reversed(BUILDS):
        if not set(entry.serves.split()) & set(tags):
            continue
        try:
            if isinstance(entry, Driver):
                compile_driver(driver(entry.module, entry.source, entry.name), signature(entry.types))
            elif isinstance(source := made(entry), str):
                ir_engine(source)
        except Exception:  # noqa: BLE001, S112 (what fails here, a load compiles itself as without a helper)
            continue
    for tag in tags:
        mark(tag).touch(0o600)


# The kernels modules, each before those that import its sources (a source is named
# after the module that makes it).
MODULES = ("launch", "linear", "layout", "layernorm", "embed", "elementwise", "rows", "attention", "int8", "bf16", "amx")


def met(specs: list[str]) -> dict:
    """What loading these models (each MODEL or MODEL:PRECISION) and running them at
    1 × 128 and 2 × 21 tokens, twice each (a shape's second run is the generated forward's,
    where a chain's layers hand their outputs over), compiles or loads: "drivers", as `Driver` fields with the
    specs (space-separated) that met each in place of what it serves; "ir", the keys
    (compile.ir_key) of the IR kernels; "cfuncs", the C functions (compile.cfuncs_met)."""
    import numpy as np

    import sparsejit

    from .compile import cfuncs_met, drivers_met, ir_met

    entries: dict[tuple, list[str]] = {}
    for spec in specs:
        path, _, precision = spec.partition(":")
        m = sparsejit.load(path, precision=precision or "fp32")
        for shape in ((1, 128), (1, 128), (2, 21), (2, 21)):
            ids = np.ones(shape, np.int64)
            m.run({n: ids if n != "token_type_ids" else 0 * ids for n in m.input_names})
        for dispatcher, sig in drivers_met:
            key = (*source_of(dispatcher), dispatcher.py_func.__name__, ", ".join(type_text(t) for t in sig))
            entries.setdefault(key, []).append(spec)
        drivers_met.clear()
    return {"drivers": [(*key, " ".join(by)) for key, by in entries.items()], "ir": [key for key, _ in ir_met],
            "cfuncs": sorted(set(cfuncs_met))}


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
        for module, source, name, types, by in met(sys.argv[2:])["drivers"]:
            print(f'    Driver("{module}", "{source}", "{name}",\n     "{types}", "{by}"),')
    else:
        sys.exit(__doc__)
