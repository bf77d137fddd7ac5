"""Turn generated kernel source into a compiled function, through one on-disk cache.

Numba kernels (`load_source`): the source text is written to `k_<sha256 of the text>.py`
in the cache directory and the text held in memory is compiled and run as a module
(never the file's content, never a `.pyc`), so Numba's `cache=True` machinery keeps
the machine code beside it in `__pycache__/`. Numba's files go through `CheckedCache`:
each data file is sealed with the sha256 of the key it was built for, so a damaged,
truncated or swapped entry is found, removed and compiled again.

LLVM IR kernels (`compile_ir`) keep their machine code as `ir_<key>.o`, the key being
the sha256 of the CPU name and features, the llvmlite and LLVM versions and the IR text.
Each file ends with the sha256 of the key and the code: a file that was cut short,
changed, or built for another key is compiled afresh and rewritten, never run.

The directory is `$SPARSEJIT_CACHE_DIR`, else `$XDG_CACHE_HOME/sparsejit`, else
`~/.cache/sparsejit`. Cached machine code runs as the loading user, so, as ssh and pip
do, the directories are made 0700 and the files 0600, and a directory or file that is
not the user's own or that group or others can write is not used: such a directory
is replaced by a private temporary one for the process (with a warning), such a file
is removed and compiled again.

Loads in several threads at once share this module's state under Numba's compiler
lock, which also serialises LLVM use between Numba and the IR kernels. Processes on one
cache (a load and its helper, prebuild.py; loads started together) compile each driver
and IR kernel once: a miss is compiled under a lock file beside it (`claimed`), and the
others, once they hold it, read the cache.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import pickle
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from numba.core.caching import CompileResultCacheImpl, FunctionCache, IndexDataCacheFile, InTreeCacheLocator
from numba.core.compiler_lock import global_compiler_lock
from numba.core.dispatcher import Dispatcher
from numba.core.types import Array
from numba.np.ufunc import parallel as _parallel

log = logging.getLogger("sparsejit")

_loaded: dict[str, ModuleType] = {}
_engines: dict[str, object] = {}  # keeps each compiled IR module's code alive
_dirs: dict[str, Path] = {}       # configured root → the kernels directory in use


# --- the cache directory and its files -----------------------------------------------

def cache_root() -> Path:
    """Where the cache lives (not checked): the environment's choice or the XDG default."""
    configured = os.environ.get("SPARSEJIT_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "sparsejit"


def untrusted(path: Path, follow: bool = True) -> str | None:
    """Why `path` must not be used for code that will run (None when it may): it must be
    the current user's and not writable by group or others; a link is refused where it
    is not followed (files inside the cache)."""
    st = os.stat(path) if follow else os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"it belongs to user id {st.st_uid}, not to this user ({os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others can write to it (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def private_dir(path: Path) -> str | None:
    """Make `path` (0700 where created) and say why it cannot be used, or None."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return untrusted(path)
    except OSError as e:
        return f"it cannot be created or read ({e.strerror})"


def cache_dir() -> Path:
    """The kernels directory: `<cache root>/kernels`, or, when the root or it is unsafe or
    unusable, a private temporary directory for this process (removed at exit)."""
    root = cache_root()
    key = str(root)
    found = _dirs.get(key)
    if found is not None:
        return found
    with global_compiler_lock:
        if key not in _dirs:
            kernels = root / "kernels"
            why = next(((d, w) for d in (root, kernels, kernels / "__pycache__") if (w := private_dir(d))), None)
            if why is not None:
                kernels = Path(tempfile.mkdtemp(prefix="sparsejit-kernels-"))
                atexit.register(shutil.rmtree, kernels, True)
                log.warning("not using the kernel cache %s: %s; compiling into %s for this process instead",
                            why[0], why[1], kernels)
            _dirs[key] = kernels
    return _dirs[key]


def read_trusted(path: Path) -> bytes | None:
    """A cache file's bytes, or None when it is missing; a file that fails `untrusted` is
    removed (with a warning) and reads as missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:  # a symbolic link (ELOOP), or unreadable
        discard(path, f"it cannot be opened safely ({e.strerror})")
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            discard(path, f"it belongs to user id {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}")
            return None
        return f.read()


def discard(path: Path | str, why: str) -> None:
    """Remove a cache file that must not be used, and say so (once: it is rebuilt)."""
    log.warning("kernel cache file %s is not used: %s; removed, compiling again", path, why)
    try:
        os.unlink(path)
    except OSError:
        pass


def write_private(path: Path | str, data: bytes) -> None:
    """Write a cache file 0600, atomically: a concurrent reader sees the whole file or none."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)  # (the cache may have been emptied meanwhile)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def seal(key: str, payload: bytes) -> bytes:
    """payload + sha256(key, payload): the file then says what it was built for."""
    return payload + hashlib.sha256(key.encode() + b"\0" + payload).digest()


def unseal(key: str, data: bytes) -> bytes | None:
    """The payload of a sealed file, or None when it was not sealed for `key` (or is damaged)."""
    payload, digest = data[:-32], data[-32:]
    if len(data) < 32 or hashlib.sha256(key.encode() + b"\0" + payload).digest() != digest:
        return None
    return payload


# --- Numba kernels ------------------------------------------------------------------

def source_key(source: str) -> str:
    import numba

    # The Numba version is part of the key so an upgrade never meets old machine code.
    return hashlib.sha256(f"numba {numba.__version__}\n{source}".encode()).hexdigest()[:24]


def load_source(source: str) -> ModuleType:
    """Run generated source as a module; its Numba functions compile lazily or load from
    the cache (through `CheckedCache`)."""
    # Keyed by the text itself: kernels call this on every run, and a str caches its
    # hash, so a hit costs no sha256.
    module = _loaded.get(source)
    if module is not None:
        return module
    with global_compiler_lock:
        if source not in _loaded:
            _loaded[source] = _build_module(source)
    return _loaded[source]


def _build_module(source: str) -> ModuleType:
    key = source_key(source)
    path = cache_dir() / f"k_{key}.py"
    # The file is there for Numba's cache (which stamps entries with its size and time)
    # and for readers of tracebacks; what runs is `source`. A file that is not exactly it
    # is rewritten, so that the stamp, and what a traceback shows, are of this text.
    if read_trusted(path) != source.encode():
        write_private(path, source.encode())
    name = f"sparsejit_kernel_{key}"
    module = ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (generated here, names as literals)
    for value in list(vars(module).values()):
        if isinstance(value, Dispatcher) and type(value._cache) is FunctionCache:
            value._cache = CheckedCache(value.py_func)
            marker = module.__dict__.get("ANY_LAYOUT")
            if marker and all(hasattr(value, name) for name in _NUMBA_HOOKS):
                _any_layout(value, () if marker is True else tuple(marker))
    return module


def compiled_cfunc(py_func, sig, **options):
    """Numba's `cfunc(sig, cache=True, **options)` of a function of a `load_source`
    module, its machine code kept through `CheckedCache` like the module's other
    functions (the decorator would compile it with Numba's plain cache); compiled under
    the cache's lock on it (`claimed`), so that a load waits for the helper compiling it
    (prebuild.py) and then reads it; kept for the process (its machine code with it) and
    noted in `cfuncs_met`."""
    from numba.core import sigutils
    from numba.core.ccallback import CFunc

    compiled = CFunc(py_func, sigutils.normalize_signature(sig), locals={}, options=options)
    compiled._cache = CheckedCache(py_func)
    with claimed(function_lock(py_func)):
        compiled.compile()
    _cfuncs.append(compiled)
    cfuncs_met.append((py_func.__module__.removeprefix("sparsejit_kernel_"), py_func.__name__, compiled.address))
    return compiled


_cfuncs: list = []  # every C function compiled_cfunc made (freeing one would free its machine code)
# each C function compiled or loaded (its source's key, its name, its address), in turn
cfuncs_met: list[tuple[str, str, int]] = []


# A driver is compiled anew for every argument type it meets (the first load's time:
# bench/README, twelfth and thirteenth sessions). Its arrays meet several types: the same
# buffer contiguous at one token count and a padded view at another, a weight read-only
# from the model's file or a writable copy. A source that sets ANY_LAYOUT has its
# functions, called from Python, compiled for one type per array's element type and
# dimensions, which every such array converts to (so one compiled signature takes them
# all, never two ambiguously): layout 'A', maybe unaligned, and read-only. ANY_LAYOUT =
# True: its Numba code may read its array arguments (pointers, strides, shapes, values),
# not write them; a tuple names the arguments it writes, which are typed writable (the
# drivers' rows of calls, launch.py).


# The dispatcher's internals _any_layout replaces or uses (Numba 0.68.1 has them); a
# Numba without them compiles its drivers per type as before, only slower to load cold.
_NUMBA_HOOKS = ("_search_new_conversions", "_compile_for_args", "get_call_template", "_compiler", "_can_compile")


def _relaxed(ty, widest: bool, writable: bool = False):
    """An array type as layout 'A', and with `widest` also maybe unaligned and read-only
    unless `writable`."""
    if type(ty) is not Array:
        return ty
    return Array(ty.dtype, ty.ndim, "A", readonly=not writable, aligned=False) if widest else ty.copy(layout="A")


def compile_driver(dispatcher: Dispatcher, sig: tuple) -> None:
    """Compile (or load from the cache) a driver made by `_any_layout` for `sig`, unless it
    has it: under the cache's lock on it (`claimed`); noted in `drivers_met`."""
    with global_compiler_lock:  # (threads loading at once: one turns compiling on and off at a time)
        if sig not in dispatcher.overloads:
            with claimed(driver_lock(dispatcher)):
                dispatcher._can_compile = True
                try:
                    dispatcher.compile(sig)
                finally:
                    dispatcher._can_compile = False
            drivers_met.append((dispatcher, sig))


def _any_layout(dispatcher: Dispatcher, written: tuple[str, ...]) -> None:
    """Compile `dispatcher`, called from Python, only for its argument types made widest
    (`_relaxed`; writable for the arguments named in `written`). Its compiling at call
    time is turned off, so that a call whose types have no exact compiled match comes to
    `_search_new_conversions` (Numba's C dispatcher asks it for conversions to a compiled
    signature and registers them, so the next such call is dispatched in C); here that
    first compiles the widest signature, if new. Calls from other Numba code, typed by
    `get_call_template`, compile for their arrays as layout 'A' (keeping whether the
    caller may write them)."""
    code = dispatcher.py_func.__code__
    writable = [name in written for name in code.co_varnames[:code.co_argcount]]

    def compile_relaxed(tys, widest: bool) -> tuple:
        sig = tuple(_relaxed(t, widest, i < len(writable) and writable[i]) for i, t in enumerate(tys))
        compile_driver(dispatcher, sig)
        return sig

    search, template = dispatcher._search_new_conversions, dispatcher.get_call_template

    def search_new_conversions(*args, **kws):
        compile_relaxed([dispatcher.typeof_pyval(a) for a in args], True)
        return search(*args, **kws)

    def compile_for_args(*args):
        # (the C dispatcher's way when it meets compiling turned on: another thread's
        # compile_relaxed, between its turning it on and off)
        sig = compile_relaxed([dispatcher.typeof_pyval(a) for a in args], True)
        search(*args)
        return dispatcher.overloads[sig].entry_point

    def get_call_template(args, kws):
        compile_relaxed(dispatcher._compiler.fold_argument_types(args, kws)[1], False)
        return template(args, kws)

    dispatcher._can_compile = False
    dispatcher._search_new_conversions = search_new_conversions
    dispatcher._compile_for_args = compile_for_args
    dispatcher.get_call_template = get_call_template


drivers_met: list[tuple[Dispatcher, tuple]] = []  # each driver and signature compiled or loaded, in turn


# Waits for a driver another process is compiling (prebuild.py's helper, or another load
# on the same cache) up to this long, then compiles it too: the other may be starved of a
# core (the helper runs only on an idle one).
CLAIM_WAIT_S = 5.0


@contextlib.contextmanager
def claimed(lock: Path):
    """Hold the cache's lock file `lock` while compiling what it names (a driver, an IR
    kernel): one process compiles it at a time, and the others, once they hold the lock,
    load its machine code from the cache. Waits at most `CLAIM_WAIT_S`; without a usable
    lock file it just compiles."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.debug("compiling %s: another process has held it for %.0f s", lock.stem, CLAIM_WAIT_S)
                    break
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # (releases the lock)


def driver_lock(dispatcher: Dispatcher) -> Path:
    """The lock file of a driver of a `load_source` module (`claimed`)."""
    return function_lock(dispatcher.py_func)


def function_lock(py_func) -> Path:
    """The lock file of a function of a `load_source` module (`claimed`)."""
    module = py_func.__module__.removeprefix("sparsejit_kernel_")
    return cache_dir() / f"k_{module}.{py_func.__name__}.lock"


class _InTree(CompileResultCacheImpl):
    # Beside the source, in the cache directory, whatever NUMBA_CACHE_DIR says.
    _locator_classes = (InTreeCacheLocator,)


class _SealedFiles(IndexDataCacheFile):
    """Numba's index and data files, read only when trusted, each data file sealed with
    its key: a damaged index, or a data file damaged or built for another key, is
    removed and reads as a miss."""

    def _load_index(self) -> dict:
        data = read_trusted(Path(self._index_path))
        if data is None:
            return {}
        try:
            f = io.BytesIO(data)
            if pickle.load(f) != self._version:
                return {}
            stamp, overloads = pickle.loads(f.read())
        except Exception as e:  # noqa: BLE001 (any damage: truncated, garbage, wrong types)
            discard(self._index_path, f"it is damaged ({type(e).__name__})")
            return {}
        return overloads if stamp == self._source_stamp else {}

    def save(self, key, data) -> None:
        overloads = self._load_index()
        name = overloads.get(key)
        if name is None:
            used = set(overloads.values())
            name = next(n for n in map(self._data_name, range(1, len(used) + 2)) if n not in used)
            overloads[key] = name
            self._save_index(overloads)
        write_private(self._data_path(name), seal(repr(key), self._dump(data)))

    def load(self, key):
        name = self._load_index().get(key)
        if name is None:
            return None
        path = self._data_path(name)
        data = read_trusted(Path(path))
        if data is None:
            return None
        payload = unseal(repr(key), data)
        if payload is None:
            discard(path, "it is damaged or was built for another kernel")
            return None
        try:
            return pickle.loads(payload)
        except Exception as e:  # noqa: BLE001
            discard(path, f"it cannot be read ({type(e).__name__})")
            return None

    def _save_index(self, overloads) -> None:
        buf = io.BytesIO()
        pickle.dump(self._version, buf, protocol=-1)
        buf.write(self._dump((self._source_stamp, overloads)))
        write_private(self._index_path, buf.getvalue())


class CheckedCache(FunctionCache):
    """Numba's per-function cache, with `_SealedFiles` and a rebuild that fails (code
    that no longer links, say) treated as a miss rather than an error."""

    _impl_class = _InTree

    def __init__(self, py_func):
        super().__init__(py_func)
        self._cache_file = _SealedFiles(self._cache_path, self._impl.filename_base, self._impl.locator.get_source_stamp())

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except Exception as e:  # noqa: BLE001
            log.warning("cached kernel %s cannot be rebuilt (%s: %s); compiling it again",
                        self._name, type(e).__name__, e)
            return None


# --- LLVM IR kernels (llvmlite) ---------------------------------------------------------

_host: tuple[str, str] | None = None


def host_cpu() -> tuple[str, str]:
    """(CPU name, feature string): part of every IR kernel's identity."""
    global _host
    if _host is None:
        import llvmlite.binding as llvm

        with global_compiler_lock:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _host = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    return _host


def threads() -> int:
    """The calling thread's kernel thread count: numba.get_num_threads() without its locks
    and checks, as every kernel call reads it. (Numba 0.68's pool state and the count's
    reader; another Numba, or a pool not started, goes through numba.get_num_threads.)"""
    if getattr(_parallel, "_is_initialized", False):
        return _parallel._get_num_threads()
    import numba

    return numba.get_num_threads()


def vector_lanes() -> int:
    """floats per vector register on this CPU: 16 with AVX-512, else 8."""
    return 16 if "+avx512f" in host_cpu()[1] else 8


def compile_ir(source: str, function: str) -> int:
    """Compile LLVM IR for this CPU at -O3; return the address of `function`.

    The machine code is kept in the cache directory as `ir_<key>.o`, the key being the
    sha256 of the CPU name, its feature string, the llvmlite and LLVM versions and the IR
    text: anything that could change the code changes the file name. A hit skips the
    optimisation passes and code generation."""
    return ir_engine(source).get_function_address(function)


def ir_engine(source: str):
    """The execution engine holding `source`'s machine code (`compile_ir`), kept for the
    process."""
    key = ir_key(source)
    engine = _engines.get(key)
    if engine is None:
        with global_compiler_lock:  # one engine per key: a second would free the first's code
            if key not in _engines:
                _engines[key] = _build_engine(source, key, *host_cpu())
            engine = _engines[key]
    return engine


def ir_key(source: str) -> str:
    """What an IR kernel's machine code is kept under: the sha256 of the CPU name and
    features, the llvmlite and LLVM versions and the IR text."""
    import llvmlite
    import llvmlite.binding as llvm

    cpu, features = host_cpu()
    return hashlib.sha256(f"{cpu} {features} llvmlite {llvmlite.__version__} llvm {llvm.llvm_version_info}\n"
                          f"{source}".encode()).hexdigest()


def _cached_object(path: Path, key: str) -> bytes | None:
    data = read_trusted(path)
    cached = None if data is None else unseal(key, data)
    if data is not None and cached is None:
        discard(path, "it is damaged or was built for another kernel")
    return cached


def _build_engine(source: str, key: str, cpu: str, features: str):
    path = cache_dir() / f"ir_{key[:32]}.o"
    cached = _cached_object(path, key)
    with contextlib.nullcontext() if cached is not None else claimed(path.with_suffix(".lock")):
        if cached is None:  # (another process may have compiled it while this one waited: then it is read)
            cached = _cached_object(path, key)
        ir_met.append((key, cached is None))
        return _engine(source, cpu, features, cached, path, key)


def _engine(source: str, cpu: str, features: str, cached: bytes | None, path: Path, key: str):
    """An engine for `source`: from the `cached` object code, or compiled and saved."""
    import llvmlite.binding as llvm

    mod = llvm.parse_assembly(source)
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
    if cached is None:
        pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
        pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)

    def save(_module, buffer: bytes) -> None:
        write_private(path, seal(key, buffer))

    engine.set_object_cache(save, lambda _module: cached)
    engine.finalize_object()
    return engine


ir_met: list[tuple[str, bool]] = []  # each IR kernel's key (ir_key) as the process met it, and whether it compiled it
