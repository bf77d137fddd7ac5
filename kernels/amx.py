"""Dense Linear layers on AMX (Intel's Advanced Matrix Extensions): int8 and bfloat16.

The generated kernel is amx_ir.py's; here are the CPU check, the permission the process
needs, the weights' packing into tiles and the layers, which take x and give y exactly as
the int8 and bf16 layers they stand beside (Int8Dense, BF16DenseLinear) do:

- `Int8Amx`: x quantized into 4-block rows (int8.py's quantize kernel, static or dynamic
  scale), `tdpbsud` into i32, Int8Linear's epilogue. Integer sums exact, so its output is
  Int8Dense's bit for bit.
- `BF16AmxLinear`: x packed into bfloat16 pairs (bf16.py's pack kernel), `tdpbf16ps`
  into float32, the bias and epilogues in float32.

Linux keeps AMX's 8 KB of tile data out of a thread's saved state until the process asks
for it: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once, for every thread of
the process. Without it the first tile instruction kills the process (SIGILL), so
`has_amx()` asks, and says no AMX unless both the CPU and the kernel allow it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math

import numpy as np

from .amx_ir import K_TILE, ROWS, SIGNATURE, AmxConfig, amx_ir
from .bf16 import DRIVER_SOURCE as BF16_DRIVER_SOURCE
from .bf16 import from_bf16, pack_ir, packed_pairs, to_bf16
from .compile import compile_ir, host_cpu, load_source, threads
from .int8 import DRIVER_SOURCE as INT8_DRIVER_SOURCE
from .int8 import _quantize_fns, _Quantized, _ReadsBytes, byte_rows
from .ir import with_driver
from .launch import IMPORTS, put_source, run
from .layout import (
    TokenTiles,
    aligned_empty,
    feature_major_empty,
    on_lines,
    token_tiles_for,
    token_tiles_of,
    transposed,
)
from .linear import _NO_RESIDUAL, DenseLinear, TakesOwnX, _bias

SYS_ARCH_PRCTL = 158          # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
FEATURES = {"int8": ("+amx-tile", "+amx-int8"), "bf16": ("+amx-tile", "+amx-bf16")}


@functools.cache
def request_amx() -> bool:
    """Asks Linux to let this process use AMX's tile data; whether it did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def has_amx(dot: str = "int8") -> bool:
    """Whether this CPU has AMX's tiles and `dot` ("int8" or "bf16"), and the process may
    use them (asked for here, once; bf16 attention asks on every call)."""
    features = host_cpu()[1].split(",")
    return all(f in features for f in FEATURES[dot]) and request_amx()


DRIVER_SOURCE = """\
# sparsejit generated kernel: the driver of the AMX kernel
# part c computes output pairs of panels (32 features each) of the m outputs, of each
# member [members[j], members[j + 1]) of a group's weights side by side the share
# [c * n / parts, (c + 1) * n / parts) of its n pairs, `token_tile` tokens at a time so
# that the tokens' rows of xq stay in cache across the part's panels; xq and yt as
# [16-token tiles, rows, 16] (layout.TokenTiles, or a feature-major array seen so)
import numpy as np
from numba import njit

ANY_LAYOUT = ("calls",)  # its arrays compiled for any layout only (compile._any_layout)
""" + IMPORTS + "\n\n" + put_source(SIGNATURE) + """

@njit(nogil=True, cache=True)
def run_amx(launch, part, calls, fn, xq, wa, bias, yt, rt, ntok, token_tile, members, ktiles, masks, offsets, work,
            m):
    r_step = 4 if rt.shape[1] == ntok else 0  # (no residual: a 1 x 1 placeholder, never read)
    parts = calls.shape[0]
    for c in range(parts):
        for t0 in range(0, ntok, token_tile):
            tile = t0 // 16  # (token_tile: a multiple of 32)
            for j in range(members.shape[0] - 1):
                n = members[j + 1] - members[j]
                p0 = members[j] + c * n // parts
                p1 = members[j] + (c + 1) * n // parts
                if p0 < p1:
                    put_amx_panels(calls, c, fn, xq.ctypes.data + tile * xq.strides[0], xq.strides[1] // 4,
                                   wa.ctypes.data, bias.ctypes.data, yt.ctypes.data + tile * yt.strides[0],
                                   yt.strides[1] // 4, rt.ctypes.data + t0 * r_step, rt.strides[0] // 4, ktiles, m,
                                   p0, p1, min(token_tile, ntok - t0), masks.ctypes.data, offsets.ctypes.data,
                                   work.ctypes.data + c * work.strides[0], xq.strides[0] // 4, yt.strides[0] // 4)
    launch_calls(launch, part, calls.ctypes.data, parts, calls.shape[1])
"""

# Tokens per driver step: as many as keep their rows of xq (what the B tiles read, once per
# pair of panels) within this many bytes, in L2 (2 MB per core) beside the thread's weight
# tiles: 128 tokens of a 3072-input bf16 layer, 256 of int8, 512 of a 768-input layer's;
# a multiple of the kernel's 32, at most AMX_TOKEN_TILE (bench/README.md, twenty-fourth session).
AMX_X_BYTES = 768 << 10
AMX_TOKEN_TILE = 512


def token_tile(rows: int) -> int:
    """Tokens per driver step for xq of `rows` rows (i32 each per token)."""
    return max(32, min(AMX_TOKEN_TILE, AMX_X_BYTES // (4 * max(rows, 1)) // 32 * 32))


def tiles_of(weight: np.ndarray, per_row: int) -> np.ndarray:
    """W [in, out] (any element type) as A tiles of Wᵀ [out/16, in/per_row, 16, per_row]:
    zero-padded to whole pairs of 16-feature panels and whole K-tiles. (One strided copy
    from W: transposing first and tiling after would copy the weight twice.)"""
    k, m = weight.shape
    mp, kp = -(-m // (2 * ROWS)) * 2 * ROWS, -(-k // per_row) * per_row
    padded = weight
    if (kp, mp) != (k, m):
        padded = np.zeros((kp, mp), weight.dtype)
        padded[:k, :m] = weight
    return np.ascontiguousarray(padded.reshape(kp // per_row, per_row, mp // ROWS, ROWS).transpose(2, 0, 3, 1))


def untiled(tiles: np.ndarray, k: int, m: int) -> np.ndarray:
    """W [in, out] from tiles_of's tiles."""
    panels, kt, rows, per_row = tiles.shape
    return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3).reshape(panels * rows, kt * per_row).T[:k, :m])


def compressed_tiles(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tiles_of's tiles [panels, K-tiles, 16, per_row] (int8 or bf16 bits) as amx_ir's
    compressed weight: (the nonzero elements, tile after tile and row after row, as bytes;
    per tile row a bit per element, bit i for element i, as uint64 or uint32; per tile the
    byte offset of its first element, as int64)."""
    flat = tiles.reshape(-1)
    nz = flat != 0
    bits = np.packbits(nz, bitorder="little")  # (rows of 64 or 32 elements: whole bytes)
    masks = bits.view(np.uint64 if tiles.shape[-1] == 64 else np.uint32)
    # (the nonzeros' positions, then a take: faster than numpy's boolean select; bench/README.md, sixteenth session)
    where = np.flatnonzero(nz)
    per_tile = ROWS * tiles.shape[-1]
    counts = np.bincount(where // per_tile, minlength=flat.size // per_tile) * tiles.itemsize
    offsets = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return flat[where].view(np.uint8), masks, offsets


def expanded_tiles(values: np.ndarray, masks: np.ndarray, shape: tuple, dtype) -> np.ndarray:
    """compressed_tiles' inverse: the tiles [panels, K-tiles, 16, per_row]."""
    bits = np.unpackbits(masks.view(np.uint8).reshape(-1, shape[-1] // 8), axis=-1, bitorder="little")
    tiles = np.zeros(shape, dtype)
    tiles[bits.reshape(shape).astype(bool)] = values.view(dtype)
    return tiles


# Weights with under this fraction of nonzeros are kept compressed (amx_ir's
# `compressed`: a bit per element and the nonzeros, fewer bytes to stream than the dense
# tiles' byte per element; no slower in the model: bench/README.md, ninth session).
COMPRESS_BELOW = 0.5


def x_rows(in_features: int, dot: str, ntok: int) -> np.ndarray:
    """An uninitialised xq for `dot` ([rows, tokens] of i32, as float32 bits) with its rows
    padded to whole K-tiles, the padded rows zero."""
    per_i32 = 4 if dot == "int8" else 2
    rows = -(-in_features // per_i32)
    xq = feature_major_empty(-(-in_features // K_TILE[dot]) * ROWS, ntok)
    xq[rows:] = 0
    return xq


def can_compress() -> bool:
    """Whether this CPU expands compressed rows in one instruction (AVX512-VBMI2)."""
    return "+avx512vbmi2" in host_cpu()[1].split(",")


# Every layer runs each block's epilogue during the next block's tile products (amx_ir's
# `overlapped`), so that the vector units work beside the tiles. GELU layers alone did
# until the thirty-eighth session, when int8 and bf16 models gained from every layer
# doing it (bench/README.md, eleventh, twenty-fourth and thirty-eighth sessions).
OVERLAPPED = True

NEGATIVE_ZERO = 0x8000  # bfloat16's -0.0

_NONE = np.zeros(1, np.int64)  # the masks and offsets a dense weight's kernel gets


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A copy of a whose data starts on a 64-byte line (numpy's own may start 16 bytes past one)."""
    copy = aligned_empty(a.shape, a.dtype, lasting=True)
    copy[...] = a
    return copy


class _Amx:
    """What both AMX layers share: the weight's tiles (dense, or compressed where few of
    its elements are nonzero), the compiled kernel and its driver."""

    def _build(self, dot: str, tiles: np.ndarray, activation: str, residual: bool, compressed: bool | None,
               requantize: bool = False) -> None:
        if not has_amx(dot):  # (a tile instruction without the permission is a SIGILL)
            raise RuntimeError(f"this CPU or process cannot run AMX {dot} tiles")
        if compressed is None:
            compressed = can_compress() and np.count_nonzero(tiles) < COMPRESS_BELOW * tiles.size
        self.config = AmxConfig(dot, activation, residual, compressed, OVERLAPPED, requantize=requantize)
        self._shape, self._dtype = tiles.shape, tiles.dtype
        self._members = np.array([0, tiles.shape[0] // 2], np.int64)  # (pairs of panels: split_members)
        dense = tiles.reshape(-1).view(np.uint8), _NONE, _NONE
        values, masks, offsets = compressed_tiles(tiles) if compressed else dense
        if not compressed:  # (its tile rows on 64-byte lines: each row of a tile load one line, not two)
            values = _aligned_copy(values)
        # (the masks, of 64 or 32 bits or none, kept as bytes: one type for the driver, one compile)
        self._arrays = values, masks.view(np.uint8), offsets
        self._fn = compile_ir(amx_ir(self.config), SIGNATURE.name)
        self._driver = load_source(DRIVER_SOURCE).run_amx

    @property
    def tiles(self) -> np.ndarray:
        """The weight's tiles [panels, K-tiles, 16, per_row], expanded if stored compressed."""
        values, masks, _ = self._arrays
        if self.config.compressed:
            return expanded_tiles(values, masks, self._shape, self._dtype)
        return values.view(self._dtype).reshape(self._shape)

    def _handover_rows(self, x: np.ndarray | None, given: np.ndarray | None, per: int,
                       tiled: bool) -> tuple[tuple, np.ndarray]:
        """(the tokens' shape, of x or of x's own form `given`; the rows bytes_on or pairs_on
        store y in, `per` outputs to an i32): TokenTiles in whole K-tiles where `tiled`, else
        feature-major [ceil(out / per), tokens]; the inputs past the last output 0, which the
        next layer's padded weights multiply."""
        lead = given.lead if isinstance(given, TokenTiles) else (given if x is None else x).shape[:-1]
        m = self.out_features
        if tiled:
            return lead, token_tiles_for(m, per, lead)
        out = feature_major_empty(-(-m // per), math.prod(lead)).view(np.int32)
        if m % per:
            out[-1] = 0
        return lead, out

    def split_members(self, starts: list[int]) -> None:
        """Where the weight is several layers' side by side (a group's), starting at output
        features `starts`: each part then takes its share of every member's pairs of panels,
        not one range of all of them. So with two threads (which claim the parts from either
        end, launch.WALK_IR) the one computing the first half of Q's heads computes the first
        half of K's and V's too, and the attention over those heads reads them from its own
        core's cache."""
        pairs = self._shape[0] // 2
        self._members = np.array(sorted({min(pairs, s // 32) for s in starts} | {0, pairs}), np.int64)

    def _tiles_run(self, xq: np.ndarray, bias: np.ndarray, yt: np.ndarray, rt: np.ndarray, fn: int | None = None) -> None:
        pairs, ktiles = self._shape[0] // 2, self._shape[1]
        parts = max(1, min(threads(), pairs))
        # (compressed: each thread's pair of panels expanded, 2 KB per K-tile, on 64-byte lines;
        # made per call, as two Python threads may run the layer at once)
        work = aligned_empty((parts, 2 * ktiles * 1024 if self.config.compressed else 64), np.uint8)
        # (xq's i32 rows as float32 bits, as x_rows makes them: one type, one compiled driver)
        ntok = math.prod(yt.lead) if isinstance(yt, TokenTiles) else yt.shape[1]
        step = token_tile(xq.shape[-2] if xq.ndim == 3 else xq.shape[0])
        run(self._driver, SIGNATURE, parts, -(-ntok // step) * (len(self._members) - 1), self._fn if fn is None else fn,
            token_tiles_of(xq).view(np.float32), self._arrays[0], bias, token_tiles_of(yt).view(np.float32), rt, ntok,
            step, self._members, ktiles, *self._arrays[1:], work, self.out_features)


class Int8Amx(_Amx, _ReadsBytes, _Quantized, DenseLinear):
    """A dense int8 layer on AMX tiles (`tdpbsud`): the weight in 16 × 64 tiles of int8,
    x quantized into 4-block rows as for the VNNI kernels, Int8Linear's epilogue, a
    requantized output (`requantize`, as Int8Linear takes it) too: its rows follow the
    epilogue's terms, [bias | scale | correction | output scale | lowest | highest]."""

    kind = "int8"
    label = "int8 (AMX)"

    def __init__(self, weight: np.ndarray, scale, mode: str, x_scale=None, x_zero_point=None, bias=None,
                 activation: str = "none", residual: bool = False, compressed: bool | None = None,
                 requantize: np.ndarray | None = None):
        _Quantized.__init__(self, weight, scale, mode, x_scale, x_zero_point, bias, activation, residual, requantize)
        self._set_vnni_terms(weight)
        self._fns = _quantize_fns()
        self._bytes_fns: dict[bool, int] = {}  # (bytes_on's kernels, by whether the grid is unsigned)
        self._grids: dict[bytes, np.ndarray] = {}  # (bytes_on's terms, by grid: _terms_on)
        self._build("int8", tiles_of(weight, K_TILE["int8"]), activation, residual, compressed, requantize is not None)

    @property
    def source(self) -> str:
        return with_driver(amx_ir(self.config), INT8_DRIVER_SOURCE + "\n" + DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        return untiled(self.tiles, self.in_features, self.out_features)

    def skipped(self, start: int = 0, stop: int | None = None) -> float:
        return 0.0  # every multiply-add done

    def _on_x(self, xq: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._tiles_run(self._whole_tiles(xq), self._kbias, yt, rt)

    def _whole_tiles(self, xq: np.ndarray) -> np.ndarray:
        """xq (rows padded to 16 tokens, as int8.byte_rows gives the LayerNorm's), copied
        into whole K-tiles of rows first where the inputs are not a multiple of 64, or where
        its rows are not on 64-byte lines (each B tile row would straddle two). TokenTiles
        come in whole K-tiles (bytes_on's, layernorm_to_bytes')."""
        if isinstance(xq, TokenTiles):
            return xq
        if xq.shape[0] % ROWS or not on_lines(xq):
            padded = x_rows(self.in_features, "int8", xq.shape[1])
            padded.view(np.int32)[:xq.shape[0]] = xq.view(np.int32)  # (the bits, not the values)
            xq = padded
        return xq

    def bytes_on(self, x: np.ndarray | None, grid: np.ndarray, given: np.ndarray | None = None,
                 tiled: bool = False) -> np.ndarray:
        """y for x [..., in] (or for x's bytes `given`, as plan's _int8_run takes them),
        quantized on `grid` ([scale, zero point, lowest, highest], float32: the next static
        int8 layer's, plan._byte_grid) into the bytes that layer reads, as a LayerNorm hands
        them over (layernorm.layernorm_to_bytes): the token-major view [..., ceil(out/4)]
        of 4-block rows; `tiled`, as TokenTiles in whole K-tiles, for an AMX layer. The
        kernel stores them in its epilogue instead of y (amx_ir's `quant_out`)."""
        if self.residual or self.requantize is not None:
            raise ValueError("an int8 layer with a residual or a requantized output gives no bytes")
        lead, out = self._handover_rows(x, given, 4, tiled)
        n = math.prod(lead)
        if n:
            if given is not None:
                xq = self._whole_tiles(given if isinstance(given, TokenTiles) else byte_rows(given))
                terms = self._kbias
            else:
                xq = x_rows(self.in_features, "int8", n)
                terms = self._quantize_into(transposed(x.reshape(-1, self.in_features)), xq)
            self._tiles_run(xq, self._terms_on(terms, grid), out.view(np.float32), _NO_RESIDUAL,
                            self._quant_fn(bool(grid[2] == 0)))
        return out if tiled else out.T.reshape(lead + (out.shape[0],))

    def _terms_on(self, terms: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """The quant_out kernel's terms: the epilogue's, then the grid; a static layer's made
        once per grid and kept (a taped run's kernels read only memory the tape holds)."""
        if terms is not self._kbias:  # (a dynamic x's, made for this call)
            return np.concatenate([terms, grid])
        key = grid.tobytes()
        if key not in self._grids:
            self._grids[key] = np.concatenate([self._kbias, grid])
        return self._grids[key]

    def _quant_fn(self, unsigned: bool) -> int:
        """The kernel storing the next layer's bytes (amx_ir's quant_out), for a grid whose
        lowest value is 0 (`unsigned`) or any, compiled on first use."""
        if unsigned not in self._bytes_fns:
            cfg = dataclasses.replace(self.config, quant_out=True, unsigned_grid=unsigned)
            self._bytes_fns[unsigned] = compile_ir(amx_ir(cfg), SIGNATURE.name)
        return self._bytes_fns[unsigned]

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        xq = x_rows(self.in_features, "int8", xt.shape[1])
        self._tiles_run(xq, self._quantize_into(xt, xq), yt, rt)


class BF16AmxLinear(_Amx, TakesOwnX, DenseLinear):
    """A dense bf16 layer on AMX tiles (`tdpbf16ps`): the weight rounded to bfloat16 in
    16 × 32 tiles, x packed into bfloat16 pairs, sums in float32, the float32 epilogues.
    It also runs on x's pair rows handed over (`from_quantized`), and can store its output
    as the pair rows the next such layer reads (`pairs_on`)."""

    kind = "dense-bf16"
    label = "dense-bf16 (AMX)"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, activation: str, residual: bool,
                 compressed: bool | None = None):
        k, m = weight.shape
        self.in_features, self.out_features = k, m
        self.bias = _bias(bias, m)
        self.activation, self.residual = activation, residual
        bits = to_bf16(weight)
        # A pruned weight is often -0.0 (a negative weight times a zero mask): held as +0,
        # which makes the same products, so that it counts as a zero the tiles compress.
        bits[bits == NEGATIVE_ZERO] = 0
        self._build("bf16", tiles_of(bits, K_TILE["bf16"]), activation, residual, compressed)

    @property
    def source(self) -> str:
        return with_driver(amx_ir(self.config) + "\n" + pack_ir(), BF16_DRIVER_SOURCE + "\n" + DRIVER_SOURCE)

    def dense_weight(self) -> np.ndarray:
        """W [in, out] as the kernel holds it: bfloat16 values as float32."""
        return from_bf16(untiled(self.tiles, self.in_features, self.out_features))

    def _run(self, xt: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._tiles_run(self._packed(xt), self.bias, yt, rt)

    def _packed(self, xt: np.ndarray) -> TokenTiles:
        """xᵀ packed into pair rows, as TokenTiles in whole K-tiles (the padded rows zero)."""
        xp = token_tiles_for(self.in_features, 2, (xt.shape[1],))
        packed_pairs(xt, xp[:, :-(-self.in_features // 2)])
        return xp

    def _on_x(self, xp: np.ndarray, yt: np.ndarray, rt: np.ndarray) -> None:
        self._tiles_run(self._whole_tiles(xp), self.bias, yt, rt)

    def _whole_tiles(self, xp: np.ndarray) -> np.ndarray:
        """Pair rows handed over ([in/2, tokens], their last high half 0 for odd inputs),
        copied into whole K-tiles of rows, the padded rows zero, where they are not, or
        where the rows are not on 64-byte lines. TokenTiles come in whole K-tiles."""
        if isinstance(xp, TokenTiles):
            return xp
        if xp.shape[0] % ROWS or not on_lines(xp):
            padded = x_rows(self.in_features, "bf16", xp.shape[1])
            padded.view(np.int32)[:xp.shape[0]] = xp.view(np.int32)
            xp = padded
        return xp.view(np.float32)

    def pairs_on(self, x: np.ndarray | None, given: np.ndarray | None = None, tiled: bool = False) -> np.ndarray:
        """y for x [..., in] (or for x's pair rows `given`, as a token-major view or
        TokenTiles) as the pair rows the next bf16 AMX layer reads (bf16.packed_pairs'
        layout, what it would make of y): the token-major view [..., ceil(out/2)] of
        [out/2, tokens] i32 rows; `tiled`, TokenTiles in whole K-tiles. The kernel stores
        them in its epilogue instead of y (amx_ir's `pairs_out`)."""
        if self.residual:
            raise ValueError("a bf16 layer with a residual gives no pair rows")
        lead, out = self._handover_rows(x, given, 2, tiled)
        if math.prod(lead):
            xp = self._packed(transposed(x.reshape(-1, self.in_features))) if given is None else \
                self._whole_tiles(given if isinstance(given, TokenTiles) else byte_rows(given))
            self._tiles_run(xp, self.bias, out.view(np.float32), _NO_RESIDUAL, self._pairs_fn)
        return out if tiled else out.T.reshape(lead + (out.shape[0],))

    @functools.cached_property
    def _pairs_fn(self) -> int:
        return compile_ir(amx_ir(dataclasses.replace(self.config, pairs_out=True)), SIGNATURE.name)
