"""Side-by-side comparison of methods on one problem, with every gap measured to the best bound of all."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from .registry import available_methods, check_options, check_time_limit, method_info, solve
from .solution import Solution, relative_gap

__all__ = ["Comparison", "compare"]


class Comparison:
    """The table ``compare`` returns: one row per method.

    Columns: method, status, objective, bound (the method's own), gap (to the best bound of all methods),
    load_ratio (the family's own ratio, named by the problem's ``load_ratio_label``), wall_time (s; without a
    one-time engine load, which ``engine_load_s`` holds and the printed table names below the rows).
    ``print(table)`` shows it; ``rows()`` and ``to_json()`` export it; ``solutions`` keeps each Solution.
    """

    columns = ("method", "status", "objective", "bound", "gap", "load_ratio", "wall_time", "engine_load_s")

    def __init__(self, problem: Any, solutions: list[Solution]):
        self.problem = problem
        self.solutions = solutions
        self.sense = problem.sense
        bounds = [s.bound for s in solutions if s.bound is not None and math.isfinite(s.bound)]
        if bounds:
            self.best_bound: float | None = min(bounds) if self.sense == "max" else max(bounds)
        else:
            self.best_bound = None

    def gap_of(self, sol: Solution) -> float | None:
        if self.best_bound is None or not sol.feasible or not math.isfinite(sol.objective):
            return None
        return relative_gap(self.best_bound, sol.objective, self.problem.objective_scale())

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for s in self.solutions:
            out.append(
                {
                    "method": s.method,
                    "status": s.status.value,
                    "objective": s.objective if math.isfinite(s.objective) else None,
                    "bound": s.bound,
                    "gap": self.gap_of(s),
                    "load_ratio": s.stats.get("load_ratio"),
                    # a one-time engine load (e.g. fast's compiled loops) is shown apart, not in the method's time
                    "wall_time": s.wall_time - float(s.stats.get("engine_load_s", 0.0)),
                    "engine_load_s": s.stats.get("engine_load_s"),
                }
            )
        return out

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps({"problem": repr(self.problem), "best_bound": self.best_bound, "rows": self.rows()}, **kwargs)

    def __str__(self) -> str:
        ratio_name = getattr(self.problem, "load_ratio_label", "load ratio")
        head = ["method", "status", "objective", "bound", "gap", ratio_name, "time (s)"]
        body = []
        for r in self.rows():
            body.append(
                [
                    r["method"],
                    r["status"],
                    _fmt(r["objective"], ".8g"),
                    _fmt(r["bound"], ".8g"),
                    _fmt(r["gap"], ".2e"),
                    _fmt(r["load_ratio"], ".3f"),
                    _fmt(r["wall_time"], ".4f"),
                ]
            )
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
        lines = [
            repr(self.problem),
            f"best bound: {_fmt(self.best_bound, '.8g')} (gap is measured to it)",
            "  ".join(h.ljust(w) for h, w in zip(head, widths)),
            "  ".join("-" * w for w in widths),
        ]
        lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
        loads = [f"{r['method']} {r['engine_load_s']:.2f} s" for r in self.rows() if r["engine_load_s"]]
        if loads:
            lines.append(f"one-time engine load, not in the times: {', '.join(loads)}")
        return "\n".join(lines)

    __repr__ = __str__


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def compare(
    problem: Any,
    methods: Iterable[str] | str | None = None,
    *,
    time_limit: float | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
) -> Comparison:
    """Solve ``problem`` with each method (default: every installed one that can solve it) and tabulate them.

    ``methods``: one method name, an iterable of names, or None. ``options`` maps a method name to its options;
    ``time_limit`` applies to every method. Everything is checked as :func:`~moebalance.solve` checks it (the
    problem, every name, option and the time limit), before the first method runs; a name given twice or a
    method that cannot solve the problem is a ValueError naming ``methods``.
    """
    if isinstance(problem, (str, type)):
        from .family import all_families

        classes = ", ".join(f.problem.__name__ for f in all_families().values())
        raise ValueError(f"`problem` must be a problem object, not {problem!r:.80}; build one first ({classes})")
    if methods is None:
        names = available_methods(problem)
    elif isinstance(methods, str):
        names = [methods]
    elif isinstance(methods, (bytes, bytearray)):
        raise ValueError(f"`methods` must be a method name (str) or a list of names, got {methods!r:.80}")
    else:
        try:
            names = list(methods)
        except TypeError:
            raise ValueError(f"`methods` must be a method name or a list of names, got {methods!r:.80}") from None
        bad = [m for m in names if not isinstance(m, str)]
        if bad:
            raise ValueError(f"`methods` must hold method names (strings), got {bad[0]!r:.80}")
    if not names:
        raise ValueError("`methods` is empty: name at least one method (see available_methods(problem))")
    # every name, option and the time limit are checked before anything is solved
    time_limit = check_time_limit(time_limit)
    infos = [method_info(problem, m) for m in names]
    seen: dict[str, str] = {}
    for m, info in zip(names, infos):
        if info.name in seen:
            raise ValueError(f"`methods` names {info.name!r} twice ({seen[info.name]!r} and {m!r})")
        seen[info.name] = m
    if options is None:
        options = {}
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise ValueError("`options` must map method names to dicts of options, e.g. {'mcf': {'max_cost': 3}}")
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"`options` names method(s) not compared: {', '.join(map(repr, unknown))}")
    for m, info in zip(names, infos):
        check_options(info, options.get(m, {}))
    it: Iterable[str] = names
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(names, desc="methods", leave=False)
    sols = [solve(problem, m, time_limit=time_limit, **options.get(m, {})) for m in it]
    return Comparison(problem, sols)
