"""`sparsejit inspect --plot`: time and density per kernel, grouped by encoder block.

One bar per kernel the model runs: layers computed by one grouped kernel (BERT's Q, K
and V) are one bar with the group's time, named after its members. Bars are coloured by
kernel (the legend counts them), the blocks are shaded and labelled under the axis, and
the title carries the run's settings. Needs matplotlib (`pip install 'sparsejit[plot]'`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COLOURS = {"sparse": "tab:green", "sparse-bf16": "tab:olive", "dense": "tab:gray", "dense-bf16": "tab:brown", "int8": "tab:purple"}
LABELS = {"sparse": "sparse kernel", "sparse-bf16": "bf16 sparse kernel", "dense": "dense GEMM", "dense-bf16": "bf16 dense GEMM", "int8": "INT8 kernel"}
BLOCK = re.compile(r"(?:^|[/._])(?:layer|layers|block|blocks|h)[/._]?(\d+)(?=[/._]|$)")
_OPS = {"MatMul", "Gemm", "Add", "MatMulInteger", "QLinearMatMul"}


@dataclass
class Bar:
    label: str
    block: str       # "block N", or "" outside the encoder blocks
    kernel: str
    density: float   # kept weights / all, over the kernel's layers
    ms: float


def split_block(name: str) -> tuple[str, str, str]:
    """(the name up to its last encoder-block segment and the separator after it, e.g.
    "encoder/layer.3/"; that block's number; the rest), or ("", "", name) outside the blocks."""
    m = None
    for m in BLOCK.finditer(name):
        pass
    return (name[:m.end() + 1], m.group(1), name[m.end() + 1:]) if m else ("", "", name)


def _parts(name: str) -> tuple[str, list[str]]:
    """(block label, the name's segments after the block, without a trailing op name)."""
    _, block, rest = split_block(name)
    segs = [s for s in rest.split("/") if s]
    if segs and segs[-1] in _OPS | {f"{op}_{i}" for op in _OPS for i in range(4)}:
        segs = segs[:-1]
    if not block:
        segs = segs[-2:]
    return (f"block {block}" if block else ""), segs or [name]


def bars(rows: list[dict]) -> list[Bar]:
    """One Bar per kernel from `inspect`'s layer rows (cli.layer_rows)."""
    members: dict[int, list[dict]] = {}
    for r in rows:
        members.setdefault(r["time_in"], []).append(r)
    out = []
    for lead, group in members.items():
        block, segs = _parts(rows[lead]["name"])
        if len(group) > 1:
            segs = [*segs[:-1], "+".join(_parts(r["name"])[1][-1] for r in group)]
        size = sum(r["in"] * r["out"] for r in group)
        density = sum(r["density"] * r["in"] * r["out"] for r in group) / max(size, 1)
        out.append(Bar("/".join(segs), block, rows[lead]["kernel"], density, rows[lead]["ms"] or 0.0))
    return out


def plot_layers(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bs = bars(rows)
    x = list(range(len(bs)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(7.0, 0.24 * len(bs) + 2.5), 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [1, 2]})
    colours = [COLOURS.get(b.kernel, "tab:blue") for b in bs]
    top.bar(x, [b.density for b in bs], color=colours)
    top.set_ylabel("density\n(weights kept)")
    top.set_ylim(0, 1.05)
    bottom.bar(x, [b.ms for b in bs], color=colours)
    bottom.set_ylabel("ms per run")
    _shade_blocks(bs, (top, bottom))
    bottom.set_xticks(x, [b.label for b in bs], rotation=90, fontsize=7)
    counts: dict[str, int] = {}
    for b in bs:
        counts[b.kernel] = counts.get(b.kernel, 0) + 1
    grouped = sum(1 for b in bs if "+" in b.label)
    handles = [Patch(color=COLOURS.get(k, "tab:blue"), label=f"{LABELS.get(k, k)} ({n})") for k, n in counts.items()]
    top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
               title="one bar per kernel" + (f"; {grouped} grouped (a+b+c)" if grouped else ""), title_fontsize=8)
    top.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shade_blocks(bs: list[Bar], axes) -> None:
    """Alternate shading behind each encoder block, its name under the axis."""
    start = 0
    for i in range(1, len(bs) + 1):
        if i < len(bs) and bs[i].block == bs[start].block:
            continue
        if bs[start].block:
            for ax in axes:
                if (int(bs[start].block.split()[-1]) % 2) == 0:
                    ax.axvspan(start - 0.5, i - 0.5, color="0.93", zorder=0)
            axes[-1].annotate(bs[start].block, xy=((start + i - 1) / 2, 1.0), xycoords=("data", "axes fraction"),
                              ha="center", va="bottom", fontsize=7, color="0.35")
        start = i
