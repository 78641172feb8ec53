"""Plots a reader can read: one style per curve, the legend outside the data, plain numbers on log axes.

- :func:`style` gives curve ``i`` its own marker, line style and colour, so curves that coincide stay
  distinguishable (a marker of one shows through the line of another);
- :func:`finish` puts one legend for the whole figure to the right of the axes, never over the data, turns the
  ticks of every log axis into plain numbers (0.01, 0.1, 1, 10, 100; 2 and 5 between when the axis spans few
  decades), saves the PNG with the legend included, and closes the figure.

matplotlib is imported by the caller (``matplotlib.use("Agg")`` first).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["style", "finish", "plain_number", "MARKERS", "LINESTYLES"]

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def style(i: int, *, line: bool = True, markevery: Any = None) -> dict[str, Any]:
    """Keyword arguments for ``ax.plot`` of curve ``i``: distinct (marker, line style, colour) for i < 40.

    ``line=False`` draws markers only (points that must not be joined, e.g. sizes that mix two parameters).
    Markers are hollow, so coinciding points of two curves both show.
    """
    kw: dict[str, Any] = {
        "marker": MARKERS[i % len(MARKERS)],
        "color": _COLORS[i % len(_COLORS)],
        "ms": 5,
        "mfc": "none",
        "mew": 1.2,
    }
    if line:
        kw.update(ls=LINESTYLES[(i // len(MARKERS) + i) % len(LINESTYLES)], lw=1.2)
        if markevery is not None:
            kw["markevery"] = markevery
    else:
        kw.update(ls="none")
    return kw


def plain_number(v: float) -> str:
    """A tick label without mathtext: ``0.001``, ``1``, ``100,000``, ``1e-10``, ``1e9``."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if 1e-4 <= abs(v) < 1e7:
        return f"{v:,.10g}"
    mant, _, exp = f"{v:.0e}".partition("e")
    return f"{mant}e{int(exp)}"


def _plain_log_ticks(axis: Any, lo: float, hi: float) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        return
    decades = math.log10(hi / lo) if hi > lo else 0.0
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: plain_number(v)))
    axis.set_minor_formatter(NullFormatter())


def finish(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Legend outside the axes, plain log ticks, save ``path`` (PNG), close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    handles, labels = [], []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_") and lab not in labels:
                handles.append(h)
                labels.append(lab)
        if ax.get_xscale() == "log":
            _plain_log_ticks(ax.xaxis, *sorted(ax.get_xlim()))
        if ax.get_yscale() == "log":
            _plain_log_ticks(ax.yaxis, *sorted(ax.get_ylim()))
    fig.tight_layout()
    if handles:
        fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.98), fontsize=8, frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # the box grows to take the legend in
    plt.close(fig)
    return path
