"""``moebalance plot``: one PNG of a user's own problem file and the solution file(s) solved for it.

Panels: the loads before and after (routing: tokens per expert under plain top-k and under each solution, with
the capacity; placement: tokens per device under plain expert parallelism and under each solution, beside the
expert loads), and, when several solutions are given, each one's gap to its own bound and to the best bound of
all of them (the gap ``compare`` prints).

Every solution file (``moebalance solve --json``) is re-checked on the problem with the shared check
(:func:`moebalance.registry.finalize`): the plot shows what the problem says of the assignment, never the
numbers stored beside it. Files are read as JSON (no pickle). matplotlib is imported here, when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["load_solution", "plot_files", "add_plot_command"]

_MAX_SOLUTIONS = 12


def load_solution(problem: Any, path: str | Path) -> Any:
    """The solution in JSON file ``path`` (``moebalance solve --json``), re-checked on ``problem``."""
    from moebalance._validate import MAX_FILE_BYTES
    from moebalance.registry import finalize
    from moebalance.solution import Status

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"solution file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{p.name}: larger than {MAX_FILE_BYTES} bytes")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{p.name}: not a solution JSON file ({type(exc).__name__})") from None
    if not isinstance(d, dict) or "method" not in d or "status" not in d:
        raise ValueError(
            f"{p.name}: not a solution file (expected the keys 'method' and 'status' of `moebalance solve --json`)"
        )
    try:
        status = Status(d["status"])
    except ValueError:
        raise ValueError(f"{p.name}: unknown status {d['status']!r}") from None
    cls = problem.solution_type
    assignment = d.get("assignment")
    if assignment is not None:
        try:
            assignment = np.asarray(assignment, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{p.name}: `assignment` is not an array of numbers") from None
        want = (problem.num_tokens, problem.k) if problem.kind == "routing" else tuple(problem.shape)
        if assignment.shape != want:
            raise ValueError(
                f"{p.name}: this solution is not of this problem: `assignment` has shape "
                f"{assignment.shape}, the problem's answers have shape {want}"
            )
        if np.all(np.isfinite(assignment)) and np.array_equal(assignment, np.round(assignment)):
            assignment = assignment.astype(np.int64)
    kwargs: dict[str, Any] = {}
    if "bias" in cls.family_fields() and d.get("bias") is not None:
        kwargs["bias"] = np.asarray(d["bias"], dtype=np.float64)
    bound = d.get("bound")
    raw = cls(
        method=str(d["method"]),
        status=status,
        bound=None if bound is None else float(bound),
        assignment=assignment,
        stats=dict(d.get("stats") or {}),
        message=str(d.get("message", "")),
        **kwargs,
    )
    try:
        return finalize(problem, raw, method=raw.method, wall_time=float(d.get("wall_time") or 0.0))
    except (TypeError, IndexError) as exc:
        raise ValueError(f"{p.name}: its assignment does not fit the problem ({exc})") from None


def _before_after(
    problem: Any, solutions: Sequence[Any]
) -> tuple[str, str, np.ndarray, list[tuple[str, Any]], float | None]:
    """(x label, y label, loads before, [(label, loads after)], the limit line or None)."""
    if problem.kind == "routing":
        k = problem.k
        top = np.argpartition(-problem.scores, k - 1, axis=1)[:, :k]
        before = np.bincount(top.ravel(), minlength=problem.num_experts)
        after = [(s.method, s.loads) for s in solutions]
        return "expert", "tokens", before, after, float(problem.capacity.max())
    if problem.kind == "placement":
        after = [(s.method, s.device_loads) for s in solutions]
        cap = problem.max_tokens_per_device
        return "device", "tokens computed", problem.native_loads, after, None if cap is None else float(cap)
    raise ValueError(f"`plot` draws routing and placement problems, got kind {problem.kind!r}")


def plot_files(problem_path: str | Path, solution_paths: Sequence[str | Path], out: str | Path) -> Path:
    """Draw ``problem_path`` and its ``solution_paths`` (see the module docstring) into the PNG ``out``."""
    from moebalance.comparison import Comparison
    from moebalance.io import load_problem

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"`out` must end in .png, got {out.name!r}")
    if not solution_paths:
        raise ValueError("give at least one solution file (`moebalance solve PROBLEM --json SOLUTION.json`)")
    if len(solution_paths) > _MAX_SOLUTIONS:
        raise ValueError(f"at most {_MAX_SOLUTIONS} solution files, got {len(solution_paths)}")
    problem = load_problem(problem_path)
    solutions = [load_solution(problem, p) for p in solution_paths]
    xlabel, ylabel, before, after, limit = _before_after(problem, solutions)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._plotting import finish, style

    several = len(solutions) > 1
    panels = 1 + (problem.kind == "placement") + several
    fig, grid = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False)
    axes = list(grid[0])
    ax = axes.pop(0)
    x = np.arange(len(before))
    ax.plot(
        x, before, label="before: " + ("plain top-k" if problem.kind == "routing" else "plain EP (home)"), **style(0)
    )
    for i, (label, loads) in enumerate(after, start=1):
        if loads is None:
            continue
        ax.plot(x, np.asarray(loads), label=f"after: {label}", **style(i))
    if limit is not None:
        ax.axhline(
            limit, color="k", lw=0.8, ls=":", label="capacity" if problem.kind == "routing" else "max tokens per device"
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} per {xlabel}")
    if problem.kind == "placement":
        ax = axes.pop(0)
        loads = problem.expert_loads
        ax.bar(np.arange(len(loads)), loads, color="#7f7f7f", width=0.9)
        ax.set_xlabel("expert")
        ax.set_ylabel("tokens")
        ax.set_title("expert loads (the problem)")
    if several:
        ax = axes.pop(0)
        table = Comparison(problem, solutions)
        names = [s.method for s in solutions]
        own = [s.gap if s.gap is not None else math.nan for s in solutions]
        best = [g if g is not None else math.nan for g in (table.gap_of(s) for s in solutions)]
        w = 0.4
        pos = np.arange(len(names))
        ax.bar(pos - w / 2, own, w, label="gap to its own bound", color="#1f77b4")
        ax.bar(pos + w / 2, best, w, label="gap to the best bound of all", color="#ff7f0e")
        for i, s in enumerate(solutions):  # the values as text: a gap of 0 draws no bar
            if not s.feasible:
                ax.annotate("no feasible answer", (i, 0), rotation=90, ha="center", va="bottom", fontsize=8)
                continue
            for x_, g, what in ((i - w / 2, own[i], "no own bound"), (i + w / 2, best[i], "-")):
                ax.annotate(
                    what if math.isnan(g) else f"{g:.2g}",
                    (x_, 0 if math.isnan(g) else g),
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(pos, names, rotation=30, ha="right")
        ax.set_ylabel("relative gap")
        ax.set_title("solver gaps")
    fig.suptitle(repr(problem)[:110], fontsize=9)
    fig.tight_layout()
    return finish(fig, out)


def _cmd_plot(args: Any) -> int:
    from moebalance.cli import check_output_path

    out = check_output_path(args.out, "--out", (".png",))
    path = plot_files(args.problem, args.solutions, out)
    print(f"wrote {path}")
    return 0


def add_plot_command(subparsers: Any) -> Any:
    """Add the ``plot`` subcommand to an argparse ``subparsers``; it sets ``func`` to run it (returns 0)."""
    p = subparsers.add_parser(
        "plot",
        help="draw a problem file and its solution file(s): loads before and after, solver gaps",
        description="Draw a problem file and the solution file(s) solved for it (`moebalance solve PROBLEM "
        "--json SOL.json`) into one PNG: loads per expert (routing) or per device (placement) before "
        "and after, and, with several solutions, each one's gap to its own bound and to the best "
        "bound of all. Every solution is re-checked on the problem.",
    )
    p.add_argument("problem", help="problem file (.npz or .json)")
    p.add_argument(
        "solutions", nargs="+", metavar="SOLUTION", help="solution JSON file(s) of `moebalance solve --json`"
    )
    p.add_argument(
        "--out",
        "-o",
        default="moebalance_plot.png",
        help="the PNG to write (default moebalance_plot.png in the current directory)",
    )
    p.set_defaults(func=_cmd_plot)
    return p
