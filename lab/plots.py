"""Matplotlib plots next to JSON results (Agg backend, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def line_plot(rows: list[dict], x: str, y: str, series: str, path: str | Path, title: str,
              logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple]] = defaultdict(list)
    for r in rows:
        groups[str(r[series])].append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, pts in groups.items():
        pts.sort()
        if len(pts) == 1:
            ax.axhline(pts[0][1], linestyle="--", label=name, color="k")
        else:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
