"""Turn generated kernel source into a compiled function, through one on-disk cache.

The source text is written to `<cache dir>/<sha256 of the source>.py` and imported, so
Numba's own `cache=True` machinery keeps the machine code beside it. The file name is
the hash of everything that shaped the source, so a changed generator, pattern
granularity or config yields a new file, never a stale hit. Numba's cache index adds
the CPU, the Numba version and the file's timestamp, which is why a file is written
once and rewritten only when its text is not the source's (a damaged file).

LLVM IR kernels (compile_ir) keep their machine code in the same directory as
`ir_<sha256>.o`, the hash covering the CPU name and features, the llvmlite and LLVM
versions and the IR text. Each file ends with the sha256 of its code; one that fails
the check is compiled again, never run.

The directory is `$SPARSEJIT_CACHE_DIR`, else `~/.cache/sparsejit`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

_loaded: dict[str, ModuleType] = {}


def cache_dir() -> Path:
    d = os.environ.get("SPARSEJIT_CACHE_DIR") or os.path.join(Path.home(), ".cache", "sparsejit")
    path = Path(d) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_key(source: str) -> str:
    import numba

    # The Numba version is part of the key so an upgrade never meets old machine code.
    return hashlib.sha256(f"numba {numba.__version__}\n{source}".encode()).hexdigest()[:24]


def load_source(source: str) -> ModuleType:
    """Import generated source as a module (compiled lazily or from Numba's cache)."""
    # Keyed by the text itself: kernels call this on every run, and a str caches its
    # hash, so a hit costs no sha256.
    if source in _loaded:
        return _loaded[source]
    key = source_key(source)
    path = cache_dir() / f"k_{key}.py"
    # A file that is not exactly the source (damaged, truncated, edited) is rewritten:
    # a kernel cut short at a line end could still import and compute something else.
    if not path.exists() or path.read_bytes() != source.encode():
        _write_atomic(path, source.encode())
    name = f"sparsejit_kernel_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _loaded[source] = module
    return module


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # atomic: a concurrent loader sees the whole file or none


def _read_checked(path: Path) -> bytes | None:
    """A cached object file's machine code, or None when it is missing or damaged: the
    file ends with the sha256 of what precedes it, and code that fails the check is
    compiled afresh (and the file rewritten) rather than run."""
    if not path.exists():
        return None
    data = path.read_bytes()
    code, digest = data[:-32], data[-32:]
    if len(data) <= 32 or hashlib.sha256(code).digest() != digest:
        logging.getLogger("sparsejit").warning("kernel cache file %s is damaged; compiling it again", path)
        return None
    return code


# --- LLVM IR kernels (llvmlite) ---------------------------------------------------------

_engines: dict[str, object] = {}  # keeps each compiled module's code alive


@functools.cache
def host_cpu() -> tuple[str, str]:
    """(CPU name, feature string): part of every IR kernel's identity."""
    import llvmlite.binding as llvm

    _init_llvm()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def vector_lanes() -> int:
    """floats per vector register on this CPU: 16 with AVX-512, else 8."""
    return 16 if "+avx512f" in host_cpu()[1] else 8


def _init_llvm() -> None:
    import llvmlite.binding as llvm

    if not _engines.get("_init"):
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _engines["_init"] = True


def compile_ir(source: str, function: str) -> int:
    """Compile LLVM IR for this CPU at -O3; return the address of `function`.

    The machine code is kept in the cache directory as `ir_<key>.o`, the key being the
    sha256 of the CPU name, its feature string, the llvmlite and LLVM versions and the IR
    text: anything that could change the code changes the file name. A hit skips the
    optimisation passes and code generation."""
    import llvmlite
    import llvmlite.binding as llvm

    cpu, features = host_cpu()
    key = hashlib.sha256(f"{cpu} {features} llvmlite {llvmlite.__version__} llvm {llvm.llvm_version_info}\n"
                         f"{source}".encode()).hexdigest()
    if key not in _engines:
        path = cache_dir() / f"ir_{key[:32]}.o"
        cached = _read_checked(path)
        mod = llvm.parse_assembly(source)
        mod.verify()
        tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
        if cached is None:
            pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
            pb.getModulePassManager().run(mod, pb)
        engine = llvm.create_mcjit_compiler(mod, tm)

        def save(_module, buffer: bytes) -> None:
            _write_atomic(path, buffer + hashlib.sha256(buffer).digest())

        engine.set_object_cache(save, lambda _module: cached)
        engine.finalize_object()
        _engines[key] = engine
    return _engines[key].get_function_address(function)
