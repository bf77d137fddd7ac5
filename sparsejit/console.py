"""The command line's chrome: progress and tables.

With rich installed (`pip install 'sparsejit[cli]'`) and a terminal to draw on, progress
is a rich bar that fits the terminal's width, with elapsed time and an estimate of the
time left, and tables are rich tables whose long names wrap instead of being cut.
Without rich, or when the output goes to a file or a pipe, a step prints one plain line
to stderr (nothing off a terminal) and a table is plain aligned text: whole names,
nothing cut, easy to grep.

    with Steps() as steps:
        steps.start("reading model.onnx")
        steps.start("planning kernels", total=73)
        steps.advance()
    print_table([Column("layer", wrap=True), Column("ms", numeric=True)], rows)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Steps:
    """One progress display for a command's long steps, on stderr: a rich bar per step on
    a terminal with rich, a plain line per step on a terminal without, nothing otherwise.

    `start(description, total=None)` ends the current step and begins the next (a total
    gives a bar with counts and the time left; None, a step of unknown length);
    `advance(n)` counts progress; `note(text)` sets the text after the counts."""

    def __init__(self, enabled: bool | None = None, stream=None):
        self._stream = stream or sys.stderr
        self.enabled = _is_terminal(self._stream) if enabled is None else enabled
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled and rich_available():
            from rich import progress as rp
            from rich.console import Console

            self._progress = rp.Progress(rp.SpinnerColumn(), rp.TextColumn("{task.description}"),
                                         rp.BarColumn(bar_width=24), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
                                         rp.TimeRemainingColumn(), rp.TextColumn("{task.fields[note]}"),
                                         console=Console(file=self._stream), transient=False)
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._finish()
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _finish(self) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[-1]
            total = task.total if task.total is not None else 1
            self._progress.update(self._task, total=total, completed=total)
        self._task = None

    def start(self, description: str, total: int | None = None) -> None:
        if not self.enabled:
            return
        self._finish()
        if self._progress is not None:
            self._task = self._progress.add_task(description, total=total, note="")
        else:
            self._stream.write(f"{description}...\n")
            self._stream.flush()
            self._task = description

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, note=text)

    def layer_callback(self) -> Callable:
        """A `sparsejit.load(progress=...)` callback: a "planning kernels" step over the
        Linear layers, noting how many reused an earlier layer's timing."""
        reused = 0

        def show(done: int, total: int, layer) -> None:
            nonlocal reused
            if done == 1:
                self.start("planning kernels", total=total)
            reused += bool(layer.timing_reused)
            self.advance()
            if reused:
                self.note(f"{reused} timed like an earlier layer")

        return show


@dataclass
class Column:
    header: str
    numeric: bool = False  # right-aligned, never wrapped
    wrap: bool = False     # may wrap onto several lines (names: nothing is cut)


def print_table(columns: Sequence[Column], rows: Sequence[Sequence[str]], stream=None, title: str | None = None,
                footer: Sequence[str] = ()) -> None:
    """A table on `stream` (stdout): rich's on a terminal where rich is installed, else
    plain aligned text. Cells are strings, already formatted; a row that is a string
    instead of cells heads a section (the rows after it, up to the next such line)."""
    stream = stream or sys.stdout
    if _is_terminal(stream) and rich_available():
        _rich_table(columns, rows, stream, title, footer)
        return
    if title:
        stream.write(title + "\n")
    cells = [r for r in rows if not isinstance(r, str)]
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(cells) -> str:
        if isinstance(cells, str):
            return cells
        return " ".join(cell.rjust(w) if c.numeric else cell.ljust(w)
                        for c, w, cell in zip(columns, widths, cells)).rstrip()

    rule = "-" * len(line([c.header for c in columns]))
    stream.write("\n".join([line([c.header for c in columns]), rule, *map(line, rows), rule, *footer]) + "\n")


def _rich_table(columns, rows, stream, title, footer) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(file=stream)
    table = Table(box=box.SIMPLE_HEAD, title=Text(title) if title else None, title_justify="left", pad_edge=False,
                  collapse_padding=True)
    for c in columns:
        table.add_column(c.header, justify="right" if c.numeric else "left", no_wrap=not c.wrap,
                         overflow="fold" if c.wrap else "ellipsis", ratio=1 if c.wrap else None,
                         min_width=16 if c.wrap else None)
    for r in rows:
        if isinstance(r, str):  # a section's line, in the first column that wraps
            at = next((i for i, c in enumerate(columns) if c.wrap), 0)
            table.add_row(*[""] * at, Text(r, style="bold"))
        else:
            table.add_row(*r)
    console.print(table)
    for line in footer:
        console.print(line, highlight=False, markup=False)


def print_text(text: str, stream=None) -> None:
    """A paragraph: wrapped to the terminal's width by rich where it draws, else as is."""
    stream = stream or sys.stdout
    if _is_terminal(stream) and rich_available():
        from rich.console import Console

        Console(file=stream).print(text, highlight=False, markup=False)
    else:
        stream.write(text + "\n")
