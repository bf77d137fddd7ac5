"""Choosing a Linear layer's kernel: sparse or dense, and the sparse kernel's K-chunk.

- by rule where the density makes the answer clear: dense with no zeros or above
  `DENSE_ABOVE` stored density, sparse at or below `SPARSE_BELOW`;
- from a saved plan (the cache's for this model and machine, or the user's plan file)
  for a layer whose pattern is the one the plan was made for;
- by measurement in between: both kernels timed over `PROBE_TOKENS` tokens, in
  interleaved rounds, on the first layer of each kind (`timing.race`).
The K-chunk is measured, or taken from the saved plan. `kernels="sparse"` or `"dense"`
forces the kernel. Under bf16, a measurement times the float32 sparse kernel beside
bf16's sparse one and takes the faster ("sparse-fp32" in the plan).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numba
import numpy as np

from .kernels.amx import has_amx
from .kernels.layout import feature_major_empty
from .kernels.linear import DenseLinear, Pattern, SparseLinear
from .timing import race

log = logging.getLogger("sparsejit")

KERNEL_CHOICES = ("auto", "sparse", "dense")
# What the Linear layers and attention compute in: "bf16" runs them on the bfloat16 kernels
# (kernels/bf16.py) where the CPU has AVX512-BF16 and a weight's pairs pay (plan.pairs_worth).
PRECISIONS = ("fp32", "bf16")
# Tokens the kernels are timed over: one sequence of 128, BERT's common case.
PROBE_TOKENS = 128
# Rounds of race_layers (two kernels of one layer, e.g. VNNI's and AMX's) over
# PROBE_TOKENS: more than race's usual 9, the two being close (bench/README.md, ninth
# session). Over more tokens, proportionally fewer, at least 5: longer calls vary less.
RACE_ROUNDS = 15
# Stored-weight density above which "auto" takes the dense kernel without timing: the
# sparse kernel's rate per nonzero is at most about half the dense GEMM's, so it cannot
# win there (and timing it on a nearly dense weight held several compressed copies).
DENSE_ABOVE = 0.75
# ... and at or below which it takes the sparse kernel without timing the dense one: at
# a quarter of the weights the sparse kernel does about a quarter of the work at half
# the rate, clearly faster. Only densities in between are decided by timing.
SPARSE_BELOW = 0.25

# A decision's sparse kernels: the precision's own, and, under bf16, the float32 one, timed
# beside it (bf16's dot products are slower than float32's FMAs on some CPUs: bench/README.md,
# twenty-fourth session).
SPARSE_KINDS = ("sparse", "sparse-fp32")

# The saved kernels a forced policy keeps.
_FORCED = {"sparse": SPARSE_KINDS, "dense": ("dense",)}

# Where AMX's dense kernel may win only with many tokens (each weight tile reused across
# them), a layer's sparse kernel and AMX's are also timed at these token counts, and the
# layer runs the sparse kernel under the first count at which AMX won, AMX's from it
# (ByTokens; bf16's float layers here, plan._int8_choice's int8 ones).
MANY_TOKENS = (384, 1024)
# ... and AMX is taken where its time is under this fraction of the sparse kernel's:
# closer than that is within the timing's noise (bench/README.md, ninth session), and the
# sparse kernels keep their FFN handovers.
AMX_CLEARLY = 0.9
# Under bf16 with AMX, over PROBE_TOKENS tokens a sparse kernel is taken only where its time
# is under this fraction of the AMX layer's. A layer timed alone pays, per call, for each
# launch's wake of the threads and for packing x, which AMX's layer makes two launches of
# and a taped model's stretch does not pay (FFN2 is handed its pair rows): in the model,
# AMX's tiles ran layers far faster than their times alone said (bench/README.md,
# thirty-ninth session).
TILES_CLEARLY = 0.5

# How a layer's kernel was decided, as `LayerPlan.decided_by` says it.
DECIDERS = ("rule", "measured", "forced", "plan file", "cached plan")


@dataclass(frozen=True)
class Choice:
    """A Linear layer's kernel and K-chunk (None: all inputs at once), and how and why."""

    kernel: str
    k_chunk: int | None
    decided_by: str
    why: str
    timings_ms: dict = field(default_factory=dict)
    reused: bool = False
    at: int | None = None  # a sparse kernel's: from this many tokens on, the dense one (AMX's)

    def saved(self, pattern: Pattern) -> dict:
        """The plan entry: the decision and the pattern it was made for."""
        return {"kernel": self.kernel, "k_chunk": self.k_chunk, "decided_by": self.decided_by, "why": self.why,
                "in": pattern.in_features, "out": pattern.out_features, "block": pattern.block,
                "stored": pattern.stored, "nnz": pattern.nnz, **({"at": self.at} if self.at is not None else {})}


def _fits(entry: dict, pattern: Pattern) -> bool:
    """Whether a saved entry was made for this pattern, and names a kernel that can run it."""
    try:
        same = (entry["in"], entry["out"], entry["block"], entry["stored"], entry["nnz"]) == \
            (pattern.in_features, pattern.out_features, pattern.block, pattern.stored, pattern.nnz)
        chunk, at = entry["k_chunk"], entry.get("at")
        runnable = entry["kernel"] == "dense" or (entry["kernel"] in SPARSE_KINDS and (
            chunk is None or (isinstance(chunk, int) and 0 < chunk and chunk % pattern.block == 0)))
        return same and runnable and (at is None or (type(at) is int and at > 0 and entry["kernel"] != "dense"))
    except (KeyError, TypeError):
        return False


class Chooser:
    """Decides every Linear layer's kernel (see the module docstring), and collects the
    decisions as a plan to save.

    `saved` is a plan's layers (`saved_plans.read_plan`) and `saved_by` what to call
    decisions taken from it. Measurements are kept per kind of layer (shape, block,
    density to 1%, epilogue, threads) for the rest of this load: BERT-base's 73 layers
    are 4 kinds at one sparsity."""

    def __init__(self, kernels: str = "auto", saved: dict | None = None, saved_by: str = "cached plan",
                 precision: str = "fp32"):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.kernels = kernels
        self.precision = precision
        self.saved = saved or {}
        self.saved_by = saved_by
        self.kinds: dict[tuple, dict] = {}
        # bf16 with AMX: the dense kernel multiplies tiles, far faster per multiply-add than
        # any vector kernel, so it is timed against the sparse one at every density
        self.tiles = precision == "bf16" and kernels == "auto" and has_amx("bf16")
        self.decisions: dict[str, dict] = {}  # the plan to save, by layer name
        self.rng = np.random.default_rng(0)

    def rule(self, pattern: Pattern) -> tuple[str | None, str, str]:
        """(kernel or None to measure, decided_by, why) from the policy and the density alone."""
        size = pattern.in_features * pattern.out_features
        if self.kernels == "dense":
            return "dense", "forced", "forced dense"
        if self.precision == "bf16" and self.kernels == "auto" and (pattern.stored > SPARSE_BELOW * size or self.tiles):
            # the bf16 sparse kernel stores pairs, half the instructions per weight of the
            # float32 one: it may win on dense weights too, so it is timed against the bf16 GEMM
            # (on AMX tiles, timed at any density)
            return None, "measured", ""
        if pattern.nnz == size:
            return "dense", "rule", "no zeros to skip"
        if self.kernels == "sparse":
            return "sparse", "forced", "forced sparse"
        density = pattern.stored / size
        if density > DENSE_ABOVE:
            return "dense", "rule", (f"stored density {density:.3f} > {DENSE_ABOVE}: the dense kernel is faster "
                                     "(the sparse one runs at most about half its FLOP rate), not timed")
        if density <= SPARSE_BELOW:
            return "sparse", "rule", f"stored density {density:.3f} <= {SPARSE_BELOW}: sparse, dense not timed"
        return None, "measured", ""

    def decide(self, name: str, pattern: Pattern, act: str, residual: bool, sparse: Callable[[], SparseLinear],
               dense: Callable[[], DenseLinear], fp32: Callable[[], SparseLinear] | None = None) -> Choice:
        """The decision for one layer; `sparse()` and `dense()` build its kernels when a
        measurement needs them, and `fp32()`, where given, the float32 sparse kernel, timed
        beside the precision's own where that is not it ("sparse-fp32" where it is faster)."""
        kernel, by, why = self.rule(pattern)
        entry = self.saved.get(name)
        if entry is not None and kernel != "dense" and not _fits(entry, pattern):
            (log.warning if self.saved_by == "plan file" else log.debug)(
                "%s: the %s's entry for layer %r was made for another weight pattern; deciding afresh",
                name, self.saved_by, name)
        if kernel == "dense" or (entry is not None and not _fits(entry, pattern)) or \
                (by == "forced" and entry is not None and entry["kernel"] not in _FORCED[kernel]):
            entry = None
        if entry is not None:  # kept as it was saved, with how it was first decided
            self.decisions[name] = entry
            return Choice(entry["kernel"], entry["k_chunk"], self.saved_by,
                          f"{self.saved_by}, first {entry.get('decided_by')}: {entry.get('why', '')}",
                          at=entry.get("at"))
        if kernel == "dense":
            d = Choice("dense", None, by, why)
        else:
            d = self.measure(pattern, act, residual, kernel is None, (sparse, fp32), dense, by, why)
            if self.tiles and d.kernel in SPARSE_KINDS:
                d = self.many_tokens(d, pattern, act, residual, sparse if d.kernel == "sparse" else fp32, dense)
        self.decisions[name] = d.saved(pattern)
        return d

    def measure(self, pattern: Pattern, act: str, residual: bool, against_dense: bool, sparse: tuple,
                dense: Callable[[], DenseLinear], by: str, why: str) -> Choice:
        """`sparse`: (the precision's sparse kernel's builder, the float32 one's or None)."""
        own, fp32 = sparse
        key = (self.kernels, self.precision, pattern.in_features, pattern.out_features, pattern.block,
               round(pattern.density, 2), act, residual, against_dense, numba.get_num_threads())
        t, reused = self.kinds.get(key), key in self.kinds
        if t is None:
            layer = own()  # (where it is the float32 kernel, it is not timed twice)
            t = self.kinds[key] = self.time_kernels(layer, dense() if against_dense else None, residual,
                                                    fp32() if fp32 and layer.kind != "sparse" else None)
        chunk = t["k_chunk"] if t["k_chunk"] < pattern.in_features else None
        chunked = f" in K-chunks of {chunk}" if chunk else ""
        source = "an earlier layer like it" if reused else "this layer"
        names = t["labels"]
        timed = f"measured on {source} over {PROBE_TOKENS} tokens: {names['kernel']} {t['sparse']:.3f} ms{chunked}"
        if "own" in t:
            timed += f" (its {names['own']} {t['own']:.3f} ms)"
        if against_dense:
            bar = TILES_CLEARLY if self.tiles else 1.0
            kernel = t["kernel"] if t["sparse"] < bar * t["dense"] else "dense"
            rule = f" (a sparse kernel under {bar} of its time taken)" if self.tiles else ""
            return Choice(kernel, chunk, "measured", f"{timed}, {names['dense']} {t['dense']:.3f} ms{rule}", t,
                          reused)
        return Choice(t["kernel"], chunk, by, f"{why}; K-chunk {timed}", t, reused)

    def many_tokens(self, d: Choice, pattern: Pattern, act: str, residual: bool,
                    sparse: Callable[[], SparseLinear], dense: Callable[[], DenseLinear]) -> Choice:
        """`d`, a sparse kernel faster than AMX's dense one over PROBE_TOKENS tokens, with
        `at` set where AMX's is clearly faster (AMX_CLEARLY) over one of MANY_TOKENS: the
        first such count."""
        layer = functools.cache(lambda: sparse().with_chunk(d.k_chunk))  # (built only if timed)
        kind = ("tiles", pattern.in_features, pattern.out_features, pattern.block, round(pattern.density, 2), act,
                residual, d.kernel, d.k_chunk)
        said = []
        for n in MANY_TOKENS:
            _, ms, _ = self.race_layers(kind, {"sparse": layer, "dense": dense}, pattern.in_features,
                                        pattern.out_features, residual, n)
            said.append(f"{n} tokens {ms['sparse']:.3f} against {ms['dense']:.3f} ms")
            if ms["dense"] < AMX_CLEARLY * ms["sparse"]:
                return replace(d, at=n, why=f"{d.why}; from {n} tokens {label(dense())} ({', '.join(said)})",
                               timings_ms={**d.timings_ms, n: ms})
        return replace(d, why=f"{d.why}; also at {', '.join(said)}")

    def time_kernels(self, sparse: SparseLinear, dense: DenseLinear | None, residual: bool,
                     fp32: SparseLinear | None = None) -> dict:
        """Times the dense kernel (when given) and the sparse one at each K-chunk size, and
        the float32 sparse one (when given) likewise: the faster sparse kernel is t["kernel"];
        t["labels"] names the kernels (the faster sparse one, the dense one, the precision's own)."""
        # Feature-major and line-aligned, as the kernels read activations in a model: no
        # transposes in the timings, and no vector loads split across cache lines.
        x = self._probe(sparse.in_features)
        r = self._probe(sparse.out_features) if residual else None
        kinds = {"sparse": sparse} if fp32 is None else {"sparse": sparse, "sparse-fp32": fp32}
        variants = {(kind, c): layer.with_chunk(c) for kind, layer in kinds.items() for c in chunk_candidates(layer)}
        fns = {key: (lambda v=v: v(x, r)) for key, v in variants.items()}
        if dense is not None:
            fns["dense"] = lambda: dense(x, r)
        ms = race(fns, rounds=9)
        dense_ms = ms.pop("dense", None)
        few = self._few_tokens(variants, sparse.in_features, sparse.out_features, residual)
        best = {kind: pick_chunk({c: v for (k, c), v in ms.items() if k == kind},
                                 {c: v for (k, c), v in few.items() if k == kind}) for kind in kinds}
        kernel = min(kinds, key=lambda kind: ms[kind, best[kind]])
        t = {"kernel": kernel, "chunks": {c: v for (k, c), v in ms.items() if k == kernel},
             "labels": {"kernel": label(kinds[kernel]), "dense": label(dense), "own": label(sparse)},
             "k_chunk": best[kernel]}
        t["sparse"] = t["chunks"][t["k_chunk"]]
        if kernel != "sparse":  # (the precision's own, slower)
            t["own"] = ms["sparse", best["sparse"]]
        if dense is not None:
            t["dense"] = dense_ms
        return t

    def _few_tokens(self, variants: dict, in_features: int, out_features: int, residual: bool) -> dict:
        """{(kind, chunk): ms} of time_kernels' variants over FEW_TOKENS tokens."""
        x = self._probe(in_features, FEW_TOKENS)
        r = self._probe(out_features, FEW_TOKENS) if residual else None
        return race({key: (lambda v=v: v(x, r)) for key, v in variants.items()}, rounds=9)

    def race_layers(self, kind: tuple, layers: dict[str, Callable[[], object]], in_features: int, out_features: int,
                    residual: bool, tokens: int = PROBE_TOKENS) -> tuple[str, dict, bool]:
        """The fastest of `layers` (name → a function giving the layer) over `tokens`
        tokens, timed on the first layer of each `kind` of this load: (its name, {name: ms},
        whether an earlier layer's timing was reused)."""
        key = ("race", *kind, tokens, numba.get_num_threads())
        reused = key in self.kinds
        if not reused:
            x = self._probe(in_features, tokens)
            r = self._probe(out_features, tokens) if residual else None
            # (longer calls over more tokens vary less, and cost the load more: fewer rounds)
            rounds = max(5, RACE_ROUNDS * PROBE_TOKENS // max(tokens, PROBE_TOKENS))
            self.kinds[key] = race({name: (lambda f=f: f()(x, r)) for name, f in layers.items()}, rounds=rounds)
        ms = self.kinds[key]
        return min(ms, key=ms.get), ms, reused

    def _probe(self, features: int, tokens: int = PROBE_TOKENS) -> np.ndarray:
        xt = feature_major_empty(features, tokens)
        xt[:] = self.rng.standard_normal(xt.shape, dtype=np.float32)
        return xt.T


def label(layer) -> str:
    """A kernel's name in a decision's reason: its kind, or what says more (AMX)."""
    return getattr(layer, "label", getattr(layer, "kind", ""))


# The K-chunk taken unless another is clearly faster: chunks near the best differ by a few
# percent, less than the timing's noise, and a plan should not follow the noise.
DEFAULT_CHUNK = 128
CLEARLY_FASTER = 0.95
# ... and is no slower than it over this many tokens (a short text), where each row's pass
# over a chunk costs more beside its few products (bench/README.md, thirtieth session).
FEW_TOKENS = 16


def pick_chunk(times: dict[int, float], few: dict[int, float] | None = None) -> int:
    """The K-chunk to use from {chunk: ms} over PROBE_TOKENS tokens: the fastest, or the
    default (128 inputs, or all of them when fewer) unless the fastest beats it by more
    than 5% and, with `few` ({chunk: ms} over FEW_TOKENS), is not over 5% slower there."""
    best = min(times, key=times.get)
    default = min(times, key=lambda c: abs(c - DEFAULT_CHUNK))
    faster = times[best] < CLEARLY_FASTER * times[default]
    return best if faster and (few is None or CLEARLY_FASTER * few[best] <= few[default]) else default


def chunk_candidates(sparse: SparseLinear) -> list[int]:
    """K-chunk sizes worth timing: all inputs at once, and chunks of 64 to 512 inputs when
    smaller (64 inputs × 128 tokens of xᵀ fill 32 KB of L1; larger chunks suit sparser
    weights, whose rows have few nonzeros in a small chunk)."""
    k, block = sparse.in_features, sparse.pattern.block
    return [k] + [c for c in (64, 128, 256, 512) if c < k and c % block == 0]
