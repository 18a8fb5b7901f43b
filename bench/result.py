"""The one result type of every benchmark: rows (one dict per measured configuration) plus what
they were measured on, written as a markdown table, a JSON list of rows and, optionally, a PNG."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lessserve.lab.output import markdown_table, write_json


@dataclass
class Plot:
    """How the rows are drawn: y against x, one line per value of `series`."""

    x: str
    y: str
    series: str
    title: str
    logx: bool = False


@dataclass
class BenchResult:
    name: str  # "decode", "offload", "serve", "kernels"
    rows: list[dict]
    meta: dict = field(default_factory=dict)  # device, dtype, threads, ...: printed above the table
    columns: list[str] | None = None  # table columns (default: the first row's keys)
    plot: Plot | None = None
    figure: Callable[[list[dict], str | Path], None] | None = None  # a PNG drawn otherwise (plot is None)
    summary: list[dict] = field(default_factory=list)  # derived figures: a second table, not in the JSON
    notes: list[str] = field(default_factory=list)  # lines printed after the tables

    def header(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.meta.items())

    def table(self) -> str:
        return markdown_table(self.rows, self.columns)

    def write(self, json_path: str | Path | None = None, png_path: str | Path | None = None) -> None:
        """JSON: the list of rows; PNG: the plot (when the result has one)."""
        write_json(json_path, self.rows)
        if png_path and self.figure and not self.plot:
            self.figure(self.rows, png_path)
        if png_path and self.plot:
            from lessserve.lab.plots import line_plot

            p = self.plot
            line_plot(self.rows, p.x, p.y, p.series, png_path, p.title, logx=p.logx)

    def show(self) -> None:
        if self.meta:
            print(self.header())
        print(self.table())
        if self.summary:
            print()
            print(markdown_table(self.summary))
        for line in self.notes:
            print(line)
