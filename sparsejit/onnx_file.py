"""Read an ONNX file with its large weights memory-mapped instead of parsed.

`onnx.load` materialises every weight twice on the way to numpy (the protobuf message,
then the array): twice the model's size at the peak. This reader walks the
protobuf wire format of ModelProto → GraphProto, hands the graph *without* its large
initializers to onnx, and maps each large tensor's raw bytes from the file as a
read-only numpy array. Pages are read when a weight is first touched (compressed at
load) and can be given back afterwards (`release`), so a sparse model's resident
memory is its compressed weights.

Wire format: https://protobuf.dev/programming-guides/encoding/ — field numbers from
onnx.proto: ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto.dims = 1,
data_type = 2, name = 8, raw_data = 9, data_location = 14.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

MAP_AT_LEAST = 1 << 16  # bytes: smaller tensors are parsed normally

_GRAPH, _INITIALIZER = 7, 5
_DIMS, _DATA_TYPE, _NAME, _RAW_DATA, _DATA_LOCATION = 1, 2, 8, 9, 14


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end, field start) for each field in [start, end)."""
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = _varint(buf, pos)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
            yield num, wire, pos, nxt, field_start
            pos = nxt
        elif wire == 1:
            yield num, wire, pos, pos + 8, field_start
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield num, wire, pos, pos + length, field_start
            pos += length
        elif wire == 5:
            yield num, wire, pos, pos + 4, field_start
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {field_start}")


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _mapped_tensor(buf, path: Path, start: int, end: int) -> tuple[str, np.ndarray] | None:
    """A TensorProto whose data is one raw_data run: (name, array mapped from the file)."""
    name, dims, dtype, raw = None, [], None, None
    for num, wire, a, b, _ in _fields(buf, start, end):
        if num == _NAME:
            name = bytes(buf[a:b]).decode()
        elif num == _DIMS and wire == 0:
            dims.append(_varint(buf, a)[0])
        elif num == _DIMS and wire == 2:
            p = a
            while p < b:
                d, p = _varint(buf, p)
                dims.append(d)
        elif num == _DATA_TYPE:
            dtype = _varint(buf, a)[0]
        elif num == _RAW_DATA:
            raw = (a, b)
        elif num == _DATA_LOCATION and _varint(buf, a)[0] != 0:
            return None  # external data: left to onnx
    if name is None or raw is None or dtype is None:
        return None
    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype))
    if np_dtype.itemsize * int(np.prod(dims, dtype=np.int64)) != raw[1] - raw[0] or np_dtype.byteorder == ">":
        return None
    arr = np.memmap(path, dtype=np_dtype.newbyteorder("<"), mode="r", offset=raw[0], shape=tuple(dims))
    return name, arr


def load_mapped(path: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model without its large inline initializers, and those as mapped arrays."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        top, graph_parts, mapped = [], [], {}
        for num, _, a, b, fs in _fields(buf, 0, len(buf)):
            if num != _GRAPH:
                top.append(bytes(buf[fs:b]))
                continue
            for gnum, _, ga, gb, gfs in _fields(buf, a, b):
                if gnum == _INITIALIZER and gb - ga >= MAP_AT_LEAST:
                    t = _mapped_tensor(buf, path, ga, gb)
                    if t is not None:
                        mapped[t[0]] = t[1]
                        continue
                graph_parts.append(bytes(buf[gfs:gb]))
        graph = b"".join(graph_parts)
        top.append(_encode_varint(_GRAPH << 3 | 2) + _encode_varint(len(graph)) + graph)
    return onnx.ModelProto.FromString(b"".join(top)), mapped


def _mapping(a) -> mmap.mmap | None:
    """The file mapping an array's data lives in, if any (through views and slices)."""
    base = a
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "_mmap", None) or getattr(base, "base", None)
    return base


def is_mapped(a) -> bool:
    return isinstance(a, np.ndarray) and _mapping(a) is not None


def release(a: np.ndarray) -> None:
    """Give a mapped array's resident pages back (they are re-read from the file if touched)."""
    base = _mapping(a)
    if base is not None and hasattr(base, "madvise"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def private_copy(value: np.ndarray, chunk_bytes: int = 8 << 20) -> np.ndarray:
    """A copy of a file-mapped array in the process's own memory, made a slice at a time
    with the mapped pages given back after each (copied whole, the copy and the pages read
    for it were both resident at the load's peak). A loaded model keeps nothing mapped:
    a file truncated or rewritten after `load` would otherwise crash a run (SIGBUS) or
    change what it computes."""
    out = np.empty(value.shape, value.dtype)
    if value.ndim == 0 or value.size == 0:
        out[...] = value
        return out
    step = max(1, chunk_bytes // max(1, value[:1].nbytes))
    for i in range(0, value.shape[0], step):
        out[i:i + step] = value[i:i + step]
        release(value)
    return out


def detach(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`arrays` with every file-mapped one replaced by its `private_copy`."""
    return {k: private_copy(v) if is_mapped(v) else v for k, v in arrays.items()}
