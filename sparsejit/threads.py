"""The one place that sets threads: Numba's threading layer, each model's thread count, BLAS.

- **Layer**: every kernel runs on Numba's pool. sparsejit asks for Numba's `tbb` layer (the
  `tbb` package, a dependency on x86-64), the one that is safe both when several Python
  threads launch kernels at once and in a child forked after a run; GNU OpenMP (`omp`)
  kills a forked child, and `workqueue` aborts on concurrent launches. Without tbb it
  takes `workqueue`, and serialises the runs. A layer the user chose
  (`NUMBA_THREADING_LAYER`, or Numba's pool already started) is kept; with `workqueue`
  runs are serialised, with `omp` a forked child cannot run a model (README, Guarantees).
- **Threads per model**: Numba's thread count is per calling thread. `ThreadScope` sets
  the model's count around each of its runs (and its load) and puts the caller's back.
- **BLAS**: only the numpy reference ops call it. Inside a scope, numpy's and scipy's
  OpenBLAS run single-threaded: their threads spin after each call and starved the next
  kernel on a 2-core machine. The caller's setting is restored when the last scope ends.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import threading
from importlib import metadata

import numba
import numpy as np

log = logging.getLogger("sparsejit")

# Layers safe for concurrent launches from several threads; others get a lock.
THREAD_SAFE_LAYERS = ("tbb", "omp")


def _preload_tbb() -> bool:
    """Load the tbb wheel's libtbb (it installs into <prefix>/lib, where Numba's tbbpool
    does not look) so that Numba's tbb layer can be imported."""
    try:
        files = metadata.distribution("tbb").files or []
    except metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name.startswith("libtbb.so"):
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            try:
                import numba.np.ufunc.tbbpool  # noqa: F401
            except ImportError:
                return False
            return True
    return False


def choose_layer() -> None:
    """Ask Numba for the tbb layer (else workqueue) unless the user or an earlier parallel
    launch has settled it. A user's choice that may take tbb gets the wheel's libtbb
    loaded, as ours does."""
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return
    chosen = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER
    if chosen == "default":
        numba.config.THREADING_LAYER = "tbb" if _preload_tbb() else "workqueue"
    elif chosen in ("tbb", "safe", "threadsafe", "forksafe"):
        _preload_tbb()  # without it Numba does not find the wheel's libtbb: "No threading layer could be loaded"


choose_layer()

# --- BLAS ---------------------------------------------------------------------------------

_blas: list[tuple] | None = None  # (get, set) per OpenBLAS build
_blas_lock = threading.Lock()
_blas_depth = 0
_blas_saved: list[int] = []


def _find_blas() -> list[tuple]:
    """numpy's and scipy's bundled OpenBLAS builds (scipy's is the one Numba's np.dot
    calls) each export a prefixed get/set_num_threads pair; find them by name."""
    import scipy

    libs = []
    for pkg, libdir in ((np, "numpy.libs"), (scipy, "scipy.libs")):
        libs += glob.glob(os.path.join(os.path.dirname(pkg.__file__), os.pardir, libdir, "*openblas*"))
    pairs = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"),
                               ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                pairs.append((get, put))
                break
    return pairs


def _blas_single(enter: bool) -> None:
    global _blas, _blas_depth, _blas_saved
    with _blas_lock:
        if _blas is None:
            _blas = _find_blas()
        if enter:
            _blas_depth += 1
            if _blas_depth == 1:
                _blas_saved = [get() for get, _ in _blas]
                for _, put in _blas:
                    put(1)
        else:
            _blas_depth -= 1
            if _blas_depth == 0:
                for (_, put), n in zip(_blas, _blas_saved):
                    put(n)


# --- threads per model --------------------------------------------------------------------

_serial = threading.RLock()  # taken around runs when the layer is not thread-safe
_serialise: bool | None = None


def _reset_after_fork() -> None:
    # Another thread may have held a lock when the process forked; it does not exist in
    # the child to release it.
    global _serial, _blas_lock
    _serial, _blas_lock = threading.RLock(), threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def resolve_threads(n: int | None) -> int:
    """`n` threads (default: all of Numba's pool), checked and capped at the pool's size."""
    pool = numba.config.NUMBA_NUM_THREADS
    n = pool if n is None else int(n)
    if n < 1:
        raise ValueError(f"num_threads must be >= 1, got {n}")
    return min(n, pool)


class ThreadScope:
    """`with ThreadScope(n):` kernels run on n threads and BLAS on one; on exit the calling
    thread's previous count and BLAS's setting are back. Under a layer that is not
    thread-safe, scopes in different threads take turns."""

    __slots__ = ("lock", "n", "prev")

    def __init__(self, n: int):
        self.n = n

    def __enter__(self) -> None:
        global _serialise
        if _serialise is None:
            numba.get_num_threads()  # starts the pool, which settles the layer
            _serialise = numba.threading_layer() not in THREAD_SAFE_LAYERS
            log.debug("threading layer %s%s", numba.threading_layer(), ", runs serialised" if _serialise else "")
        self.lock = _serial if _serialise else None
        if self.lock is not None:
            self.lock.acquire()
        self.prev = numba.get_num_threads()
        if self.prev != self.n:
            numba.set_num_threads(self.n)
        _blas_single(True)

    def __exit__(self, *exc) -> None:
        _blas_single(False)
        if self.prev != self.n:
            numba.set_num_threads(self.prev)
        if self.lock is not None:
            self.lock.release()
