"""The helper that compiles a first load's drivers beside it (kernels/prebuild.py): its
table holds what loads compile, a load with it gives what a load without it gives, what
it builds alone is every driver a load needs, and a driver whose lock a stuck process
holds is compiled all the same. Each in subprocesses with caches of their
own (conftest.py turns the helper off for every other test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sparsejit.kernels import compile, prebuild
from sparsejit.kernels.bf16 import has_bf16

MODELS = Path(__file__).parent / "models"
FLOAT = MODELS / "bert_sdpa_h64_op14_legacy_p90.onnx"
INT8 = [MODELS / "int8" / f"bert_block4_p90_int8_{form}.onnx" for form in ("sparseml", "dynamic", "qoperator", "qdq")] + \
    [MODELS / "int8" / "roberta_p90_int8_sparseml.onnx", MODELS / "int8" / "bert_op14_p90_int8_qoperator.onnx"]
# (the last two unstructured: their int8 layers on lanes_ir's kernel)


def _python(code: str, cache: Path, *args, helper: bool = False, timeout: int = 600) -> str:
    env = {**os.environ, "SPARSEJIT_CACHE_DIR": str(cache), "SPARSEJIT_PREBUILD": "1" if helper else "0"}
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                       check=False, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_builds_holds_each_driver_the_test_models_compile_and_only_ir_they_meet(tmp_path):
    """Every driver (and argument types) that loading and running the test models compiles
    is in BUILDS, serving the kind of model that met it first (a float model first, so
    that what the int8 and bf16 ones add serves them); and every IR kernel and C function
    BUILDS makes on this CPU for the kinds loaded is one those loads meet (the helper
    builds nothing they would not use), every C function they meet one BUILDS makes."""
    specs = [str(FLOAT)] + [str(p) for p in INT8] + ([f"{FLOAT}:bf16"] if has_bf16() else [])
    loaded = {"float", "fp32", "int8", "qoperator"} | ({"bf16"} if has_bf16() else set())
    out = _python("import json, sys; from sparsejit.kernels import prebuild; "
                  "met = prebuild.met(sys.argv[2:]); "
                  "built = [prebuild.made(e) for e in prebuild.BUILDS if isinstance(e, prebuild.CFunction) "
                  "and set(e.serves.split()) & set(sys.argv[1].split())]; "
                  "met['built'] = [a for a in built if a is not None]; "
                  "print(json.dumps(met))", tmp_path / "cache", " ".join(loaded), *specs)
    met = json.loads(out.splitlines()[-1])
    assert len(met["drivers"]) >= 8  # (the float model alone meets six)
    table = {entry[:4]: entry.serves.split() for entry in prebuild.DRIVERS}
    for module, source, name, types, spec in met["drivers"]:
        assert (module, source, name, types) in table, f"{name}({types}), met by {spec}, is not in BUILDS"
        kinds = {"float", "bf16" if spec.endswith(":bf16") else "int8" if "int8" in spec else "float"}
        assert kinds & set(table[module, source, name, types]), f"{name} is met by {spec} but serves none of {kinds}"
    built = [(entry, prebuild.made(entry)) for entry in prebuild.BUILDS
             if isinstance(entry, prebuild.IR) and set(entry.serves.split()) & loaded]
    sources = [(entry, source) for entry, source in built if isinstance(source, str)]
    assert len(sources) >= 20
    # (a raced entry is met where its kernels win at load, which the timing decides)
    unmet = [entry.source for entry, source in sources if compile.ir_key(source) not in met["ir"] and not entry.raced]
    assert not unmet, f"BUILDS makes IR kernels no test model met: {unmet}"
    # the C functions (by their addresses in that process): those BUILDS makes are those met
    assert len(met["built"]) >= 2  # (the launcher, (de)quantize's kernels; QOperator's attention where BLAS takes
    # its products: on CPUs with VNNI its kernel is IR)
    assert {address for *_, address in met["cfuncs"]} == set(met["built"]), met["cfuncs"]


LOAD_AND_RUN = """
import sys, time
import numpy as np
from numba.core import event
import sparsejit
from sparsejit.kernels import compile, prebuild

compiled = event.RecordingListener()
event.register("numba:compile", compiled)
m = sparsejit.load(sys.argv[1], num_threads=2)
mask = np.ones((2, 21), np.int64)
mask[1, 13:] = 0
ids = (np.arange(42).reshape(2, 21) % 50 + 2).astype(np.int64)
feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
outs = m.run({n: feeds[n] for n in m.input_names})
np.savez(sys.argv[2], *outs)
drivers = {entry.name for entry in prebuild.DRIVERS}
names = {ev.data["dispatcher"].py_func.__name__ for _, ev in compiled.buffer if ev.is_start}
built = {compile.ir_key(s) for e in prebuild.BUILDS if isinstance(e, prebuild.IR) and isinstance(s := prebuild.made(e), str)}
print("helper", "none" if prebuild._helper is None else prebuild.wait(300))
print("drivers compiled", len(names & drivers))
print("built IR kernels met", len({key for key, _ in compile.ir_met} & built),
      "compiled", len({key for key, fresh in compile.ir_met if fresh} & built))
"""


def test_a_load_with_the_helper_gives_what_one_without_gives(tmp_path):
    """On an empty cache, a load with the helper beside it (which exits 0 and marks its
    kinds done) gives the outputs of a load without it, bit for bit."""
    model = INT8[0]
    cache = tmp_path / "with"
    first = _python(LOAD_AND_RUN, cache, model, tmp_path / "with.npz", helper=True).split("\n")
    assert first[0] == "helper 0", first
    files = [p.name for p in (cache / "kernels").iterdir()]
    assert all(any(f.startswith(f"prebuilt-{kind}-") for f in files) for kind in ("float", "int8")), files
    _python(LOAD_AND_RUN, tmp_path / "without", model, tmp_path / "without.npz")
    with np.load(tmp_path / "with.npz") as a, np.load(tmp_path / "without.npz") as b:
        assert a.files == b.files
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_the_helper_builds_qoperator_attention_for_every_quantized_attention():
    """A file whose attention is quantized (QOperator's QLinearMatMul, or a QDQ or SparseML
    file's MatMul of two dequantized activations, which runs on the same kernel:
    fuse.qdq_products) has its helper build QOperator attention's kernels ("qoperator");
    one whose attention is float (dynamic quantization's) does not."""
    import sparsejit
    from sparsejit.api import _prebuild_kinds
    from sparsejit.graph import import_onnx

    seen = set()
    for path in INT8:
        graph = import_onnx(path)
        kinds = _prebuild_kinds(graph, "fp32")
        quantized = any(n.op_type == "QAttentionCore" for n in sparsejit.load(path).graph.nodes)
        assert ("qoperator" in kinds) == (quantized or any(n.op_type == "QLinearMatMul" for n in graph.nodes)), \
            (path.name, kinds)
        seen.add((quantized, "QLinearMatMul" in {n.op_type for n in graph.nodes}))
    assert (True, False) in seen and (False, False) in seen, seen


def test_after_the_helper_alone_a_load_compiles_no_driver(tmp_path):
    """The helper alone, on an empty cache, builds every driver a quantized model's load
    and run then need, and the IR kernels of BUILDS they meet: that load compiles none of
    them, and starts no helper (the marks)."""
    cache = tmp_path / "cache"
    done = _python("from sparsejit.kernels import prebuild; prebuild.start(('float', 'int8', 'qoperator')); "
                   "print(prebuild.wait(300))", cache, helper=True)
    assert done.split() == ["0"]
    after = _python(LOAD_AND_RUN, cache, INT8[0], tmp_path / "out.npz", helper=True).split("\n")
    assert after[:2] == ["helper none", "drivers compiled 0"], after
    met, compiled = after[2].split()[-3], after[2].split()[-1]
    assert int(met) >= 10 and compiled == "0", after


def test_the_helper_runs_at_the_idle_scheduling_class(tmp_path):
    """The helper takes no core a load's threads want (the planner times kernels while it
    compiles): its scheduling class is SCHED_IDLE, seen from outside while it works."""
    code = """
import os, time
from sparsejit.kernels import prebuild
prebuild.start(("float",))
time.sleep(1.0)  # (past its first line; on an empty cache it works for seconds more)
print(os.sched_getscheduler(prebuild._helper.pid) == os.SCHED_IDLE, prebuild.wait(300))
"""
    assert _python(code, tmp_path / "cache", helper=True).split() == ["True", "0"]


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""

TRANSPOSE_PAST_A_HELD_LOCK = """
import subprocess, sys
import numpy as np
from sparsejit.kernels import compile, layout

lock = compile.cache_dir() / f"k_{compile.source_key(layout.TRANSPOSE_SOURCE)}.transpose.lock"
holder = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(lock)], stdout=subprocess.PIPE, text=True)
try:
    assert holder.stdout.readline().strip() == "held"
    compile.CLAIM_WAIT_S = 0.5
    a = np.arange(12 * 40, dtype=np.float32).reshape(12, 40)
    out = np.empty((40, 12), np.float32)
    layout._transpose_into(a, out)
    print("equal", bool(np.array_equal(out, a.T)))
finally:
    holder.kill()
"""


def test_a_driver_whose_lock_a_stuck_process_holds_is_compiled_all_the_same(tmp_path):
    """A process holding a driver's lock and never letting go (a helper starved of a core,
    say) delays a load by `CLAIM_WAIT_S`, not for ever: the load compiles the driver
    itself, and it works."""
    out = _python(TRANSPOSE_PAST_A_HELD_LOCK, tmp_path / "cache", HOLD, timeout=300)
    assert out.split() == ["equal", "True"]


THREADS_THEN_FORK = """
import os, sys, threading
import numpy as np
import sparsejit
from sparsejit.kernels import prebuild

ids = (np.arange(42).reshape(2, 21) % 50 + 2).astype(np.int64)
mask = np.ones((2, 21), np.int64)
mask[1, 13:] = 0
outs = {}

def load_and_run(i):
    m = sparsejit.load(sys.argv[1], num_threads=2)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    outs[i] = m.run({n: feeds[n] for n in m.input_names})

threads = [threading.Thread(target=load_and_run, args=(i,)) for i in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
same = all(np.array_equal(a, b) for a, b in zip(outs[0], outs[1]))
pid = os.fork()
if pid == 0:  # the child: not its parent's helper, and a lock it can take
    os.environ["SPARSEJIT_PREBUILD"] = "0"
    prebuild.start(("float",))
    os._exit(0 if prebuild._helper is None and prebuild.wait() is None else 3)
_, status = os.waitpid(pid, 0)
print(len(outs), same, os.waitstatus_to_exitcode(status), prebuild.wait(300))
"""


def test_two_threads_loading_at_once_then_a_fork(tmp_path):
    """Two threads loading a quantized model at once on an empty cache, with the helper
    on, get the same outputs (one helper, the compiles shared through the cache's locks);
    a child forked after has no helper of its parent's and starts none when told not to,
    without hanging on the parent's lock."""
    out = _python(THREADS_THEN_FORK, tmp_path / "cache", INT8[0], helper=True)
    assert out.split() == ["2", "True", "0", "0"], out


def test_builds_skips_what_the_cpu_cannot_run(monkeypatch):
    """What `BUILDS` makes depends on the CPU's features, not its name: without AMX the AMX
    kernels are not built, with AVX2's 8 lanes neither are the int8 sparse kernels (made
    for AVX-512 only), and without AVX-512 VNNI neither is attention's integer product,
    while the rest are made for 8 lanes."""
    from sparsejit.kernels import amx, elementwise

    monkeypatch.setattr(amx, "has_amx", lambda dot="int8": False)
    monkeypatch.setattr(compile, "vector_lanes", lambda: 8)
    monkeypatch.setattr(elementwise, "qattention_products", lambda: "blas")
    # (the LayerNorm's split kernels are gated on the thread count, not on the CPU)
    irs = [e for e in prebuild.BUILDS if isinstance(e, prebuild.IR) and "threads()" not in e.when]
    gated = [e for e in irs if e.when != "True"]
    assert len(gated) >= 7 and all(prebuild.made(e) is None for e in gated)
    made = [prebuild.made(e) for e in irs if e not in gated]
    assert made and all(isinstance(m, str) for m in made)
    assert "<8 x float>" in prebuild.made(next(e for e in irs if "columns_ir(VECTOR_LANES)" in e.source))
