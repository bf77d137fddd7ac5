"""One parallel loop for every kernel.

Numba compiles a function with a `prange` loop more slowly than a plain one, and a model
meets a dozen drivers on its first load (bench/README.md, thirteenth session). So the
engine has one such loop, `launch(part, calls, parts, width)`, compiled once as a C
function: it runs row c of `calls` on part c of the threads. A driver is plain
(sequential) Numba code that writes into those rows the calls each part makes
(`put_source`'s function for the kernel's signature), then launches them
(`launch_calls`); `part` is a small LLVM IR function made from the kernel's `Signature`
(`part_ir`) that reads each call's address and arguments from its row and makes the call.

A row of `calls` (int64): the number of calls, then per call the kernel's address and
its arguments, one slot each: pointers and integers as they are, floats as their bits.
The caller makes `calls` (`new_calls`, through `run`): a Numba function that makes an
array compiles more slowly than one that is given it. A kernel called a few times a run,
each call long (QOperator attention's), has its rows filled in Python and launched from
there (`launch_rows`), with no driver to compile; its kernel may be a Numba function
compiled as a C function (`compile.compiled_cfunc`), which reads its arrays through
`pointer`.

A taped run (sparsejit.tape) makes its recorded launches again with `replay`: a stretch
of them in one parallel region (the second loop, `replay_claimed`), where the threads
claim each launch's rows in turn (`claim_walk`).
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .compile import compile_ir, compiled_cfunc, load_source
from .ir import Signature


@intrinsic
def call_part(typingctx, part, row):
    """part(row), both given as integers (in Numba code)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], fnty.args[0])])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64), codegen


@intrinsic
def pointer(typingctx, address):
    """The integer `address` as a void pointer (in Numba code), for `numba.carray`."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    if isinstance(address, types.Integer) and address.bitwidth == 64:
        return types.voidptr(address), codegen
    return None


@intrinsic
def put_call(typingctx, calls, c, kinds, call):
    """Append to row c of `calls` one call (in Numba code): `call` a tuple of the kernel's
    address and its arguments, `kinds` a literal string of a letter per argument (`f` a
    float, stored as its float32 bits; `p`, `i` a pointer or integer, stored as int64).
    Past the row's end (or past the rows) an IndexError, and nothing written. (An
    intrinsic: Numba compiles a driver faster than with the same stores as Numba code, a
    store per slot; bench/README.md, fourteenth session.)"""
    if not (isinstance(calls, types.Array) and calls.ndim == 2 and calls.dtype == types.int64
            and isinstance(c, types.Integer) and isinstance(kinds, types.StringLiteral)
            and isinstance(call, types.BaseTuple) and len(call) == len(kinds.literal_value) + 1
            and all(isinstance(t, (types.Integer, types.Float, types.Boolean)) for t in call)):
        return None
    letters, width = kinds.literal_value, len(call)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        rows = context.make_array(signature.args[0])(context, builder, args[0])
        shape = cgutils.unpack_tuple(builder, rows.shape, 2)
        strides = cgutils.unpack_tuple(builder, rows.strides, 2)
        ci = context.cast(builder, args[1], signature.args[1], types.int64)
        row = builder.add(builder.ptrtoint(rows.data, i64), builder.mul(ci, strides[0]))

        def slot(k):
            return builder.inttoptr(builder.add(row, builder.mul(k, strides[1])), i64.as_pointer())

        n = builder.load(slot(ir.Constant(i64, 0)))
        at = builder.add(builder.mul(n, ir.Constant(i64, width)), ir.Constant(i64, 1))
        past = builder.or_(builder.icmp_unsigned(">=", ci, shape[0]),
                           builder.icmp_signed(">=", builder.add(at, ir.Constant(i64, width - 1)), shape[1]))
        with cgutils.if_unlikely(builder, past):
            context.call_conv.return_user_exc(builder, IndexError,
                                              ("more calls put in a part than its row of calls holds",))
        builder.store(builder.add(n, ir.Constant(i64, 1)), slot(ir.Constant(i64, 0)))
        for i, (v, ty) in enumerate(zip(cgutils.unpack_tuple(builder, args[3], width), signature.args[3])):
            if i and letters[i - 1] == "f":
                v = builder.sext(builder.bitcast(context.cast(builder, v, ty, types.float32), ir.IntType(32)), i64)
            else:
                v = context.cast(builder, v, ty, types.int64)
            builder.store(v, slot(builder.add(at, ir.Constant(i64, i))))
        return context.get_dummy_value()

    return types.void(calls, c, kinds, call), codegen


@intrinsic
def launch_calls(typingctx, launch, part, calls, parts, width):
    """launch(part, calls, parts, width), the launcher given by its address (in Numba code:
    a ctypes function passed to a Numba function is typed in Python on every call, an
    integer in C)."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * 4)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()
    kinds = (launch, part, calls, parts, width)
    if all(isinstance(k, types.Integer) and k.bitwidth == 64 for k in kinds):
        return types.void(*kinds), codegen
    return None


LAUNCH_SOURCE = """\
# sparsejit generated kernel: the engine's one parallel loop
# row c of `calls` (`width` int64 each) is part c's work: a count, then per call a kernel's
# address and arguments; `part` (launch.part_ir) makes the calls of the row it is given
from numba import prange

from sparsejit.kernels.launch import call_part


def launch(part, calls, parts, width):
    # compiled as a C function (launch.launcher), parallel
    for c in prange(parts):
        call_part(part, calls + c * width * 8)
"""

# What a driver source imports. (Numba's cache of a driver holds the code of what it calls:
# a change to these intrinsics must change this line, and so the drivers' text.)
IMPORTS = "from sparsejit.kernels.launch import launch_calls, put_call  # (v3)\n"


def put_source(sig: Signature) -> str:
    """A Numba function `put_<name>(calls, c, fn, <sig's arguments>)` that appends to row
    c of `calls` a call of the kernel at address `fn` (`put_call`: an IndexError past the
    row's end, where a driver would otherwise write past its rows)."""
    args = ", ".join(name for name, _ in sig.args)
    kinds = "".join({"ptr": "p", "i64": "i", "float": "f"}[ty] for _, ty in sig.args)
    return (f"@njit(nogil=True, cache=True, inline=\"always\")  # (inlined: one compile less for its driver)\n"
            f"def put_{sig.name}(calls, c, fn, {args}):\n"
            f"    put_call(calls, c, \"{kinds}\", (fn, {args}))\n")


def address(a: np.ndarray) -> int:
    """a's data address, for a row of calls (ndarray.ctypes.data makes a ctypes object per
    call)."""
    return a.__array_interface__["data"][0]


def new_calls(parts: int, per_part: int, sig: Signature) -> np.ndarray:
    """Rows for `parts` parts of up to `per_part` calls of kernels of signature `sig`."""
    return np.zeros((parts, 1 + per_part * (1 + len(sig.args))), np.int64)


@functools.cache
def launcher() -> int:
    """The address of `launch(part, calls, parts, width)`, for drivers to call
    (`launch_calls`)."""
    return compiled_cfunc(load_source(LAUNCH_SOURCE).launch, "void(int64, int64, int64, int64)",
                          parallel=True, nogil=True).address


@functools.cache
def _python_launcher():
    return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 4)(launcher())


def launch_rows(sig: Signature, calls: np.ndarray, arrays: tuple | None = None) -> None:
    """Make row c of `calls` (`new_calls`, filled in Python) on part c of the threads:
    for a kernel called a few times a run, each call long, which then needs no driver to
    compile. (ctypes lets go of the GIL for the call.) `arrays`: every array the rows'
    calls read or write, by address, for a tape (without them a tape runs the step in
    Python)."""
    _python_launcher()(part(sig), calls.ctypes.data, calls.shape[0], calls.shape[1])
    record = getattr(_recording, "fn", None)
    if record is not None:
        record(part(sig), calls, arrays, None)


def python_between() -> None:
    """Tell a tape being made that the launches just made had Python work between them
    that a replay would not do (a mean summed by numpy, say): the step runs in Python."""
    record = getattr(_recording, "fn", None)
    if record is not None:
        record(0, None, None, None)


def part_ir(sig: Signature) -> str:
    """`void @part(ptr %row)`: each call in the row, `sig`'s kernel at the call's address
    with its arguments from their slots."""
    n = len(sig.args)
    lines = [f"; the calls of one part, kernels of {sig.name}'s signature (launch.part_ir)",
             "define void @part(ptr %row) {", "entry:", "  %n = load i64, ptr %row", "  br label %head",
             "head:", "  %j = phi i64 [ 0, %entry ], [ %next, %body ]", "  %more = icmp slt i64 %j, %n",
             "  br i1 %more, label %body, label %done", "body:",
             f"  %first = mul i64 %j, {n + 1}", "  %at = add i64 %first, 1",
             "  %call = getelementptr i64, ptr %row, i64 %at", "  %fa = load i64, ptr %call",
             "  %f = inttoptr i64 %fa to ptr"]
    passed = []
    for i, (_, ty) in enumerate(sig.args):
        lines += [f"  %s{i}.at = getelementptr i64, ptr %call, i64 {i + 1}", f"  %s{i} = load i64, ptr %s{i}.at"]
        if ty == "ptr":
            lines.append(f"  %a{i} = inttoptr i64 %s{i} to ptr")
        elif ty == "float":
            lines += [f"  %s{i}.b = trunc i64 %s{i} to i32", f"  %a{i} = bitcast i32 %s{i}.b to float"]
        else:
            lines.append(f"  %a{i} = add i64 %s{i}, 0")
        passed.append(f"{ty} %a{i}")
    lines += [f"  call void %f({', '.join(passed)})", "  %next = add i64 %j, 1", "  br label %head",
              "done:", "  ret void", "}", ""]
    return "\n".join(lines)


_parts: dict[str, tuple] = {}  # signature name → (its arguments, its part's address)


def part(sig: Signature) -> int:
    """The address of the compiled `part` for kernels of signature `sig` (looked up by
    name: a Signature's own hash walks all its arguments, on every kernel call)."""
    found = _parts.get(sig.name)
    if found is None:
        found = _parts[sig.name] = (sig.args, compile_ir(part_ir(sig), "part"))
    if found[0] is not sig.args and found[0] != sig.args:
        raise ValueError(f"two kernel signatures named {sig.name!r}")
    return found[1]


# Who is told of this thread's launches while a run is being taped (sparsejit.tape):
# fn(part, calls, args, result), args None for rows filled in Python (launch_rows).
_recording = threading.local()


def record_with(fn) -> None:
    """Tell `fn` of each launch this thread makes (None: stop), and of each check after
    them (`checked`: fn.check(flags, check), where fn has `check`)."""
    _recording.fn = fn


def checked(flags: np.ndarray, check) -> None:
    """check(flags): raises if the launches just made wrote what says their input was
    bad (an id out of range, say) into `flags`, memory of the caller's own outside any
    arena. A taped run (sparsejit.tape), which makes the launches again without their
    caller, is told, and checks the same flags after each replay."""
    record = getattr(getattr(_recording, "fn", None), "check", None)
    if record is not None:
        record(flags, check)
    check(flags)


SERIAL_IR = """\
; sparsejit generated kernel: launch's rows of calls made one after the other on the calling thread
define void @serial_launch(i64 %part, i64 %calls, i64 %parts, i64 %width) {
entry:
  %fp = inttoptr i64 %part to ptr
  %bytes = mul i64 %width, 8
  br label %head
head:
  %c = phi i64 [ 0, %entry ], [ %c1, %body ]
  %more = icmp slt i64 %c, %parts
  br i1 %more, label %body, label %done
body:
  %off = mul i64 %c, %bytes
  %row.a = add i64 %calls, %off
  %row = inttoptr i64 %row.a to ptr
  call void %fp(ptr %row)
  %c1 = add i64 %c, 1
  br label %head
done:
  ret void
}
"""


@functools.cache
def serial_launcher() -> int:
    """The address of a `launch` that makes the rows on the calling thread, in order, with
    no parallel region: for work shorter than starting one (bench/README.md, twenty-eighth
    session)."""
    return compile_ir(SERIAL_IR, "serial_launch")


def run(driver, sig: Signature, parts: int, per_part: int, *args):
    """`driver(launch, part, calls, *args)` with new rows of calls for `parts` parts of up
    to `per_part` calls each of kernels of signature `sig`: what a kernel's Python side
    calls its driver through. (Every driver fills the rows, then launches them once.)
    One part's rows are made on the calling thread (serial_launcher), with no parallel
    region (layout.parts_for gives one part to small work)."""
    calls = new_calls(parts, per_part, sig)
    result = driver(serial_launcher() if parts == 1 else launcher(), part(sig), calls, *args)
    record = getattr(_recording, "fn", None)
    if record is not None:
        record(part(sig), calls, args, result)
    return result


# A taped run's stretch of launches (sparsejit.tape) made again in one parallel region,
# not one region a launch: a region's start costs TBB (a new task arena, its workers
# joining it) as much as a short kernel's part (bench/README.md, twenty-seventh session).
# In the region every thread walks
# the launches in order (`claim_walk`): it claims a launch's parts one at a time (an
# atomic count per launch) and runs each, and once none is left to claim waits until
# every part is done, so that the next launch reads what this one wrote. No part is any
# thread's own: a thread that comes late, or never (TBB may run both iterations of a
# short region one after the other on one thread), leaves its parts to the others; one
# waits only for parts another thread has claimed and is running.
# The first thread into the walk claims each launch's parts from the first on, the second
# from the last back (then the third from the first, ...): two counts in one int64, a part
# claimed while the two sum to under the parts. So where launches in turn split the same
# features into parts (a Linear's output rows, then the LayerNorm over them, then the
# residual add of the next), each thread keeps its end, and reads what it wrote from its
# own core's cache; a late thread's parts are still taken by the other.
CLAIM_SLOTS = 16  # int64 a launch takes in the claims: its claim counts, then 8 on, its done count (lines apart)
BACK = 1 << 32    # a claim from the last part: the claim counts' high half
# Pauses a waiting thread makes before it gives its core away between looks: a part it
# waits for may belong to a thread that lost its core to another process, which a
# spinning thread could be keeping off the other core (bench/contention.py).
SPINS = 3000

WALK_IR = """\
; sparsejit generated kernel: launches [start, stop) of a table (rows: part, calls, rows, width), each
; row of calls claimed by one thread and run by part(row); claims[16 i] counts launch i's claims from
; the first row (low 32 bits) and from the last (high 32 bits), claims[16 i + 8] its finished rows;
; claims[16 start + 1] counts the threads come into the walk: the first claims from the first row,
; the second from the last, and so on in turn; a thread that finds none left waits for the last to
; finish, pausing, and after SPINS pauses giving its core away between looks (sched_yield)
declare void @llvm.x86.sse2.pause()
declare i32 @sched_yield()

define void @claim_walk(i64 %table, i64 %start, i64 %stop, i64 %claims) {
entry:
  %tp = inttoptr i64 %table to ptr
  %cp = inttoptr i64 %claims to ptr
  %come.i = mul i64 %start, 16
  %come.j = add i64 %come.i, 1
  %come.p = getelementptr i64, ptr %cp, i64 %come.j
  %come = atomicrmw add ptr %come.p, i64 1 monotonic
  %odd = and i64 %come, 1
  %back = icmp eq i64 %odd, 1
  %step = select i1 %back, i64 BACK, i64 1
  br label %launch
launch:
  %i = phi i64 [ %start, %entry ], [ %i1, %next ]
  %go = icmp slt i64 %i, %stop
  br i1 %go, label %body, label %exit
body:
  %r = mul i64 %i, 4
  %r0 = getelementptr i64, ptr %tp, i64 %r
  %part.a = load i64, ptr %r0
  %part = inttoptr i64 %part.a to ptr
  %r1 = getelementptr i64, ptr %r0, i64 1
  %calls = load i64, ptr %r1
  %r2 = getelementptr i64, ptr %r0, i64 2
  %rows = load i64, ptr %r2
  %r3 = getelementptr i64, ptr %r0, i64 3
  %width = load i64, ptr %r3
  %bytes = mul i64 %width, 8
  %ci = mul i64 %i, 16
  %claim.p = getelementptr i64, ptr %cp, i64 %ci
  %di = add i64 %ci, 8
  %done.p = getelementptr i64, ptr %cp, i64 %di
  br label %claim
claim:
  %counts = atomicrmw add ptr %claim.p, i64 %step acq_rel
  %front = and i64 %counts, 4294967295
  %behind = lshr i64 %counts, 32
  %taken = add i64 %front, %behind
  %mine = icmp slt i64 %taken, %rows
  %last = sub i64 %rows, 1
  %from.back = sub i64 %last, %behind
  %c = select i1 %back, i64 %from.back, i64 %front
  br i1 %mine, label %run, label %wait
run:
  %off = mul i64 %c, %bytes
  %row.a = add i64 %calls, %off
  %row = inttoptr i64 %row.a to ptr
  call void %part(ptr %row)
  %d = atomicrmw add ptr %done.p, i64 1 release
  br label %claim
wait:
  %spins = phi i64 [ 0, %claim ], [ %spins1, %spun ]
  %n = load atomic i64, ptr %done.p acquire, align 8
  %all = icmp sge i64 %n, %rows
  br i1 %all, label %next, label %spin
spin:
  call void @llvm.x86.sse2.pause()
  %spins1 = add i64 %spins, 1
  %long = icmp sgt i64 %spins1, SPINS
  br i1 %long, label %yield, label %spun
yield:
  %y = call i32 @sched_yield()
  br label %spun
spun:
  br label %wait
next:
  %i1 = add i64 %i, 1
  br label %launch
exit:
  ret void
}
"""

CLAIMED_SOURCE = """\
# sparsejit generated kernel: a stretch of launches made again in one parallel region
from numba import prange

from sparsejit.kernels.launch import launch_calls


def replay_claimed(walk, table, start, stop, claims, workers):
    # compiled as a C function (launch._claimed), parallel; each thread walks the launches
    # (launch_calls calls any C function of four int64 at an address: here the walk)
    for w in prange(workers):
        launch_calls(walk, table, start, stop, claims)
"""


@functools.cache
def _walk() -> int:
    ir_text = WALK_IR.replace("SPINS", str(SPINS)).replace("BACK", str(BACK))
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):  # (x86's spin-wait hint only there)
        ir_text = ir_text.replace("declare void @llvm.x86.sse2.pause()\n", "").replace(
            "  call void @llvm.x86.sse2.pause()\n", "")
    return compile_ir(ir_text, "claim_walk")


@functools.cache
def _serial_walk():
    return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 4)(_walk())


@functools.cache
def _claimed():
    fn = compiled_cfunc(load_source(CLAIMED_SOURCE).replay_claimed, "void(int64, int64, int64, int64, int64, int64)",
                        parallel=True, nogil=True)
    return ctypes.CFUNCTYPE(None, *[ctypes.c_int64] * 6)(fn.address)


def new_claims(launches: int) -> np.ndarray:
    """The claim and done counts `replay` keeps for a table of `launches` launches, each
    launch's on 64-byte lines of their own (a tape's, kept for its replays)."""
    from .layout import aligned_empty  # (layout imports this module)

    claims = aligned_empty((launches * CLAIM_SLOTS,), np.int64, lasting=True)
    claims[:] = 0
    return claims


def replay(table: np.ndarray, start: int, stop: int, claims: np.ndarray) -> None:
    """Launch rows start to stop of `table` (int64 [launches, 4]: part, calls, rows,
    width) in order, each a launch's rows of calls, in one parallel region of the calling
    thread's Numba threads (`claim_walk`), `claims` (new_claims) counting who runs what;
    ctypes lets go of the GIL for the call."""
    claims[start * CLAIM_SLOTS:stop * CLAIM_SLOTS] = 0
    workers = numba.get_num_threads()
    if workers > 1 and stop - start > 1:
        _claimed()(_walk(), address(table), start, stop, address(claims), workers)
    else:
        _serial_walk()(address(table), start, stop, address(claims))
