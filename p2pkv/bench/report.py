"""How the benches report: percentiles, aligned text tables and line plots.

Every ``p2pkv bench`` module prints through :func:`table` and takes its statistics from
:func:`pct` and :func:`median`; plots need matplotlib (optional: without it, none is drawn).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


def pct(xs: Iterable[float], p: float) -> float:
    """The ``p`` quantile (0..1) of ``xs`` as the nearest sample at or above it (NaN when
    there is none)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def median(xs: Iterable[float]) -> float:
    """The median of ``xs`` (NaN when there is none)."""
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    width: int = 0
    """Characters the column takes (0: as many as each value needs, for a last column)."""
    fmt: str = ""
    """The values' format spec after alignment and width, e.g. ``.3f`` or ``.0%``."""
    align: str = ">"


def table(columns: Sequence[Column], rows: Iterable[Sequence[object]], *, sep: str = " ",
          header: bool = True) -> str:
    """``rows`` as aligned text, under a line of the columns' headers unless ``header`` is
    false (rows that continue a table printed before)."""
    def line(values: Iterable[object], fmts: Iterable[str]) -> str:
        return sep.join(format(v, f"{c.align}{c.width or ''}{f}")
                        for c, v, f in zip(columns, values, fmts)).rstrip()

    out = [line((c.header for c in columns), ("" for _ in columns))] if header else []
    out += [line(row, (c.fmt for c in columns)) for row in rows]
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Panel:
    """One plot of a figure: a line per ``name: (xs, ys)``."""

    series: dict[str, tuple[Sequence[float], Sequence[float]]]
    xlabel: str
    ylabel: str
    log_x: bool = False
    """Log x axis, ticks at the xs given."""
    log_y: bool = False
    title: str = ""
    styles: dict[str, str] = field(default_factory=dict)
    """Matplotlib format strings per series name (``"C0--"``: colour 0, dashed); default:
    matplotlib's colour cycle, solid."""
    legend: bool = True


def plot_panels(path: Path, panels: Sequence[Panel], *, size: tuple[float, float] = (6, 4)
                ) -> bool:
    """``panels`` side by side, saved as a PNG at ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(size[0] * len(panels), size[1]),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, panel.styles.get(name, "-"), marker="o", label=name)
        if panel.log_x:
            ticks = sorted({x for xs, _ in panel.series.values() for x in xs})
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        if panel.log_y:
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(FormatStrFormatter("%g"))  # 0.5, not 5x10^-1
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if panel.legend:
            ax.legend(fontsize=8)
        if panel.title:
            ax.set_title(panel.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_lines(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
               xlabel: str, ylabel: str, title: str, log_y: bool = False) -> None:
    """One line per ``name: (xs, ys)``, saved as a PNG at ``path``."""
    if plot_panels(path, [Panel(series, xlabel, ylabel, log_y=log_y, title=title)]):
        print(f"wrote {path}")
    else:
        print("matplotlib not installed: no plot")
