"""Timing on a shared, noisy machine, and the rows of the benchmark table.

Every figure is a median over timed repeats after warm-up calls (tracing, oneDNN primitive creation,
caches). A figure and its reference are timed *interleaved* (A, B, A, B, ...), so a change of load
on the machine hits both alike and their ratio stays meaningful when the absolute seconds do not.

Each timing also records the share of the machine's cores the process got while it ran (process
CPU seconds / wall seconds / cores): close to 100 % for a compute-bound step on a quiet machine,
lower when other work competed for the cores.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Timing:
    """Median wall seconds of the timed repeats, every repeat's seconds, and the median share of the
    machine's cores the process used during a repeat (0..1)."""

    seconds: float
    all_seconds: list[float]
    cpu_share: float

    def rate(self, work: float) -> float:
        """``work`` units per median second (e.g. images/s for ``work`` = batch size)."""
        return work / self.seconds


def _once(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu / max(wall, 1e-9) / cpu_count()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time several functions alternately: ``warmup`` untimed calls of each, then ``repeats`` rounds
    in which each function is called once. Returns one :class:`Timing` per name.

    A function must block until its work is done (e.g. end with ``.numpy()``).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    walls: dict[str, list[float]] = {name: [] for name in fns}
    shares: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, share = _once(fn)
            walls[name].append(wall)
            shares[name].append(share)
    return {name: Timing(statistics.median(walls[name]), walls[name], statistics.median(shares[name]))
            for name in fns}


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """:func:`interleaved` for one function."""
    return interleaved({"fn": fn}, repeats, warmup)["fn"]


def own_peak_rss_bytes() -> int:
    """Peak resident memory of this process's own address space (``VmHWM``), in bytes; on systems
    without ``/proc``, ``ru_maxrss`` (which may include the parent's memory at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# ---------------------------------------------------------------------------------------------
# Table rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the benchmark table.

    Attributes:
        section: the suite section (``roof``, ``models``, ...).
        figure: what was measured.
        measured: the measured figure, formatted with its unit.
        reference: the reference measured in the same run ("" when none).
        ratio: measured / reference as a number (None when there is no reference or the section
            was skipped); ``ratio_text`` says how to read it.
        target: the target as text ("" when none); ``met``: True/False/None (no target).
        cpu: median share of the machine's cores the process used while the figure was timed.
    """

    section: str
    figure: str
    measured: str
    reference: str = ""
    ratio: float | None = None
    ratio_text: str = ""
    target: str = ""
    met: bool | None = None
    cpu: float | None = None
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        verdict = {True: "met", False: "**not met**", None: ""}[self.met]
        return [self.section, self.figure, self.measured, self.reference or "-",
                self.ratio_text or "-", f"{self.target} {verdict}".strip() or "-",
                "-" if self.cpu is None else f"{self.cpu:.0%}"]


TABLE_HEADER = ["section", "figure", "measured", "reference (same run)", "ratio", "target",
                "CPU used"]


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * 3 + ["---", "---:"]) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def plain_table(rows: list[Row]) -> str:
    """The table as aligned plain text for the terminal."""
    cells = [TABLE_HEADER] + [row.cells() for row in rows]
    widths = [max(len(c[i].replace("**", "")) for c in cells) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c[i].replace("**", "").ljust(widths[i]) for i in range(len(widths)))
                     .rstrip() for c in cells)
