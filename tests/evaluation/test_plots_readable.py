"""Plots a reader can read: curves that coincide stay visible (each its own marker, line
style and colour), the legend sits outside every axes, and log axes carry plain numbers (0.1, 1, 10, never
10^x), for the simulator's, the study's and the report's plots."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from moebalance.evaluation import _plotting, report  # noqa: E402
from moebalance.evaluation.simulate import simulate  # noqa: E402
from moebalance.evaluation.study import plot_study  # noqa: E402
from tests.evaluation.test_report import _placement, _routing  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """Every figure handed to ``_plotting.finish``, inspected after it was saved."""
    seen = []
    real = _plotting.finish

    def spy(fig, path, **kw):
        out = real(fig, path, **kw)
        seen.append(fig)
        return out

    monkeypatch.setattr(_plotting, "finish", spy)
    return seen


def _assert_readable(fig) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the closed figure's canvas is gone: draw it again
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax in axes:
        assert ax.get_legend() is None, "a legend inside the axes covers data"
        styles = [
            (ln.get_marker(), ln.get_linestyle(), ln.get_color())
            for ln in ax.get_lines()
            if not ln.get_label().startswith("_")
        ]
        assert len(styles) == len(set(styles)), f"two curves drawn alike: {styles}"
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
                assert labels, "a log axis without tick labels"
                assert all("$" not in s and "^" not in s for s in labels), labels
                assert all(float(s.replace(",", "")) > 0 for s in labels), labels  # plain numbers
    assert fig.legends, "no legend"
    box = fig.legends[0].get_window_extent(renderer)
    for ax in axes:
        a = ax.get_window_extent(renderer)
        overlap = box.x0 < a.x1 and a.x0 < box.x1 and box.y0 < a.y1 and a.y0 < box.y1
        assert not overlap, "the legend overlaps an axes"


def test_style_gives_every_curve_its_own_look():
    looks = {(s["marker"], s["ls"], s["color"]) for s in (_plotting.style(i) for i in range(40))}
    assert len(looks) == 40
    assert _plotting.style(3, line=False)["ls"] == "none"
    assert _plotting.style(0)["mfc"] == "none"  # hollow: a marker under another shows


def test_plain_numbers():
    assert [_plotting.plain_number(v) for v in (1e-10, 1e-3, 1, 20, 1e5, 1e6, 1e9)] == [
        "1e-10",
        "0.001",
        "1",
        "20",
        "100,000",
        "1,000,000",
        "1e9",
    ]


def test_simulator_plots(tmp_path, figures):
    res = simulate(
        "gpt-oss-20b",
        4,
        256,
        scenarios=["balanced", "30:1", "80:1", "95:1"],
        methods=["llep", "llep+", "eplb", "lp"],
        progress=False,
    )
    paths = res.plot(tmp_path)
    assert len(paths) == len(figures) == 2 and all(p.is_file() for p in paths)
    for fig in figures:
        _assert_readable(fig)


def test_study_plots_keep_coinciding_curves_visible(tmp_path, figures):
    steps = 60
    y = list(np.linspace(3.0, 0.2, steps))
    runs = [
        {"experts": 8, "top_k": 2, "balancer": b, "avg_max_vio": y, "loss": list(np.linspace(5, 2, steps))}
        for b in ("none", "loss_free(u=0.001)", "bip", "bip_same_batch")
    ]  # four identical curves
    result = {"runs": runs, "noise": {"E=8,k=2": {"batch": 0.1}}}
    paths = plot_study(result, tmp_path)
    assert len(paths) == 2 and len(figures) == 2
    for fig in figures:
        _assert_readable(fig)
        lines = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in {r["balancer"] for r in runs}]
        starts = {ln.get_markevery()[0] for ln in lines}
        assert len(lines) == 4 and len(starts) == 4  # markers at different steps: all four show


def test_report_plots(tmp_path, figures):
    data = _routing()
    report._routing_plots(data["instances"], ["mcf", "greedy", "topk"], tmp_path)
    report._placement_plot(_placement()["gap_table"]["summary"], tmp_path)
    assert len(figures) == 2
    for fig in figures:
        _assert_readable(fig)
