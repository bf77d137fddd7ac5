"""Plans kept between loads: the kernel and K-chunk chosen for every Linear layer.

A plan is JSON, one entry per layer (by node name) with the pattern it was made for
(shape, block, stored weights) and the decision (kernel, K-chunk, how it was decided).
The planner reuses an entry only for a layer whose pattern is the same, so a model
pruned again under the same names gets fresh decisions for what changed.

Two places hold plans:
- the cache (`<cache root>/plans/<key>.json`), written after every load and read by the
  next, the key covering the model's structure and layer shapes, the CPU, the thread
  count, the kernel policy and sparsejit's version: the same model on the same machine
  gets the same plan every time, whatever the machine was doing at the next load;
- a file the user names (`load(..., plan="model.plan.json")`): read when it exists,
  written when it does not, to carry a plan between machines or keep it with the model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path

from .graph import Graph
from .kernels.compile import cache_root, discard, host_cpu, private_dir, read_trusted, write_private

log = logging.getLogger("sparsejit")

FORMAT = 1


@functools.cache
def kernels_fingerprint() -> str:
    """The hash of the kernel generators' source and the planner's: a plan holds timings
    of the kernels they made and the decisions the planner drew from them, which a change
    to either (a new register tiling, a new way to choose) makes stale."""
    from . import kernels as package

    h = hashlib.sha256()
    here = Path(__file__).parent
    for path in [*sorted(Path(package.__file__).parent.glob("*.py")), here / "choose.py", here / "plan.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def structure_key(graph: Graph, threads: int, kernels: str, precision: str = "fp32") -> str:
    """What a plan depends on besides the weights' patterns (checked per layer)."""
    from . import __version__

    h = hashlib.sha256(f"sparsejit {__version__} plan format {FORMAT} kernels {kernels_fingerprint()}\n"
                       f"{' '.join(host_cpu())}\nthreads {threads} kernels {kernels} precision {precision}\n".encode())
    for n in graph.nodes:
        layers = n.attrs["members"] if n.op_type == "LinearGroup" else [n] if n.op_type == "Linear" else []
        shapes = [(m.attrs["weight"].shape, m.attrs["activation"], m.attrs["residual"]) for m in layers]
        h.update(f"{n.op_type} {n.name!r} {n.inputs} {n.outputs} {shapes}\n".encode())
    return h.hexdigest()[:32]


def cached_plan_path(key: str) -> Path | None:
    """Where the cache keeps the plan for `key`, or None when the cache cannot be used."""
    plans = cache_root() / "plans"
    return None if private_dir(cache_root()) or private_dir(plans) else plans / f"{key}.json"


def read_plan(path: Path, trusted_only: bool) -> dict | None:
    """The layers of a saved plan ({name: entry}), or None when there is none. A damaged
    plan in the cache is removed; a user's plan file that cannot be read is an error
    naming it."""
    if trusted_only:
        data = read_trusted(path)
        if data is None:
            return None
    else:
        if not path.exists():
            return None
        data = path.read_bytes()
    try:
        plan = json.loads(data)
        if plan.get("format") != FORMAT or not isinstance(plan.get("layers"), dict):
            raise ValueError(f"not a sparsejit plan of format {FORMAT}")
        return plan["layers"]
    except ValueError as e:
        if trusted_only:
            discard(path, f"it is not a readable plan ({e})")
            return None
        raise ValueError(f"{path}: cannot read this plan file: {e}") from e


def write_plan(path: Path, layers: dict, key: str, private: bool) -> None:
    from . import __version__

    cpu, features = host_cpu()
    text = json.dumps({"format": FORMAT, "sparsejit": __version__, "key": key, "cpu": cpu, "features": features,
                       "layers": layers}, indent=1).encode()
    if private:
        write_private(path, text)
    else:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(text)
        os.replace(tmp, path)
