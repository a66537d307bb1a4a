"""The one table printer of ``scripts/bench``: aligned columns, sections, ratios.

A benchmark module's ``run(argv)`` builds a :class:`Table` and returns it;
the dispatcher prints it (several tables of one run print as one report,
under one header). Numbers are formatted here so every benchmark reads alike.

    t = Table("replication", ["workload", "target", ("IOPS", ">")])
    t.add_section("4 KiB random write, iodepth 16")
    t.add_row("", "(a) nbdkit file", fmt_count(105000))
    t.add_note("ratios are IOPS of the row over IOPS of (a)")
    print(t.render())
"""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass
from typing import Sequence

Cell = str | int | float | None


@dataclass
class Column:
    """A column title and its alignment: ``<`` left (text), ``>`` right (numbers)."""

    title: str
    align: str = "<"


class Table:
    """Rows under column headers, with full-width section rows and notes below."""

    def __init__(self, title: str, columns: Sequence[str | tuple[str, str] | Column]):
        """``columns``: titles, (title, align) pairs or :class:`Column` objects."""
        self.title = title
        self.columns: list[Column] = [c if isinstance(c, Column)
                        else Column(*c) if isinstance(c, tuple) else Column(c)
                        for c in columns]
        for c in self.columns:
            if c.align not in ("<", ">"):
                raise ValueError(f"column {c.title!r}: align must be '<' or '>', not {c.align!r}")
        self._rows: list[tuple[str, list[str] | str]] = []
        self.notes: list[str] = []

    def add_row(self, *cells: Cell) -> None:
        """Add a row; None shows as '-', numbers are shown as given (format them first)."""
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: row has {len(cells)} cells, "
                             f"columns are {[c.title for c in self.columns]}")
        self._rows.append(("row", ["-" if c is None else str(c) for c in cells]))

    def add_section(self, title: str) -> None:
        """A full-width label row, e.g. the workload the rows below were measured with."""
        self._rows.append(("section", title))

    def add_note(self, text: str) -> None:
        """A line printed under the table (how to read it, what was skipped and why)."""
        self.notes.append(text)

    @property
    def rows(self) -> list[list[str]]:
        """The data rows as formatted strings (sections left out)."""
        return [r for kind, r in self._rows if kind == "row"]  # type: ignore[misc]

    def render(self) -> str:
        """The table as aligned text."""
        widths = [len(c.title) for c in self.columns]
        for kind, row in self._rows:
            if kind == "row":
                widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
        sep = "  "
        total = sum(widths) + len(sep) * (len(widths) - 1)

        def line(cells: Sequence[str]) -> str:
            return sep.join(f"{cell:{c.align}{w}}" for cell, c, w in
                            zip(cells, self.columns, widths)).rstrip()

        out = [self.title, "=" * max(total, len(self.title)),
               line([c.title for c in self.columns]), "-" * total]
        for kind, row in self._rows:
            if kind == "section":
                out.append(f"[{row}]")
            else:
                out.append(line(row))  # type: ignore[arg-type]
        out.append("-" * total)
        out.extend(f"  {n}" for n in self.notes)
        return "\n".join(out)


def header() -> str:
    """One line saying where and when the numbers were measured."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"Duplex benchmark, {now}, {platform.node()}, Linux {platform.release()}, "
            f"{os.cpu_count()} CPUs; every number below was measured in this run")


def render_report(tables: Sequence[Table]) -> str:
    """Several tables of one run as one report under one header."""
    return "\n\n".join([header(), *(t.render() for t in tables)])


def ratio(num: float | None, den: float | None) -> str | None:
    """``num/den`` as ``0.82x``; None when either side is missing or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return f"{num / den:.2f}x"


def fmt_count(n: float | None) -> str | None:
    """A rate or count: 950, 45.2k, 1.25M."""
    if n is None:
        return None
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    if n >= 1e3:
        return f"{n / 1e3:.2f}k"
    return f"{n:.0f}"


def fmt_mbps(bytes_per_s: float | None) -> str | None:
    """Throughput in MB/s (10^6 bytes, as fio and disk vendors count)."""
    return None if bytes_per_s is None else f"{bytes_per_s / 1e6:.1f}"


def fmt_ns(ns: float | None) -> str | None:
    """A duration given in nanoseconds: 850 ns, 45.3 us, 1.25 ms, 2.10 s."""
    if ns is None:
        return None
    if ns < 1e3:
        return f"{ns:.0f} ns"
    if ns < 1e6:
        return f"{ns / 1e3:.1f} us"
    if ns < 1e9:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1e9:.2f} s"


def fmt_bytes(n: float | None) -> str | None:
    """A size in binary units: 512 B, 4.0 KiB, 38.2 MiB, 1.50 GiB."""
    if n is None:
        return None
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if unit != "GiB" else f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
