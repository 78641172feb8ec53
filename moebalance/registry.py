"""The method registry and ``solve``: one entry point per problem kind (after scipy's ``linprog(method=...)``)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import time
from typing import Any, Callable

import numpy as np

from .check import bias_reproduces, check, routing_dual_bound
from .solution import Solution, Status

__all__ = ["SolverInfo", "register", "solve", "available_methods", "method_info", "DEFAULTS"]

# relative tolerance under which a claimed optimum must agree with its own bound
OPTIMALITY_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class SolverInfo:
    """What a method is: its problem kind, whether it is exact or gives a bound, which back-end it needs."""

    kind: str
    name: str
    func: Callable[..., Solution]
    exact: bool = False
    gives_bound: bool = False
    backends: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    description: str = ""

    def is_installed(self) -> bool:
        """True when every back-end module this method needs can be imported (checked without importing)."""
        return all(importlib.util.find_spec(b) is not None for b in self.backends)


_REGISTRY: dict[str, dict[str, SolverInfo]] = {}
_ALIASES: dict[str, dict[str, str]] = {}
# preference order for method="auto": the first installed one wins
DEFAULTS: dict[str, tuple[str, ...]] = {"routing": ("fast", "mcf", "lp", "greedy"), "placement": ("llep",)}
# (available_methods lists exact methods first, then those giving a bound, then the rest, defaults first)


def register(kind: str, name: str, *, exact: bool = False, gives_bound: bool = False,
             backends: tuple[str, ...] = (), options: dict[str, Any] | None = None,
             aliases: tuple[str, ...] = (), description: str = "") -> Callable:
    """Decorator: add ``func(problem, *, time_limit, **options) -> Solution`` to the registry of ``kind``.

    ``options`` maps each accepted option to its default; ``solve`` rejects any other option by name.
    """

    def deco(func: Callable[..., Solution]) -> Callable[..., Solution]:
        info = SolverInfo(kind, name, func, exact, gives_bound, tuple(backends), dict(options or {}),
                          description or ((func.__doc__ or "").strip().splitlines() or [""])[0])
        _REGISTRY.setdefault(kind, {})[name] = info
        for alias in aliases:
            _ALIASES.setdefault(kind, {})[alias] = name
        return func

    return deco


def _load_solvers() -> None:
    importlib.import_module("moebalance.solvers")


def _kind_of(problem_or_kind: Any) -> str:
    kind = problem_or_kind if isinstance(problem_or_kind, str) else getattr(problem_or_kind, "kind", None)
    if kind not in ("routing", "placement"):
        raise ValueError(
            f"`problem` must be a RoutingProblem, a PlacementProblem or a kind name, got {problem_or_kind!r}"
        )
    return kind


def available_methods(problem: Any, *, installed_only: bool = True) -> list[str]:
    """Names of the methods for this problem (or kind), those whose back-ends are installed by default."""
    _load_solvers()
    kind = _kind_of(problem)
    infos = sorted(_REGISTRY.get(kind, {}).values(), key=lambda i: (not i.exact, not i.gives_bound, _rank(i)))
    return [i.name for i in infos if i.is_installed() or not installed_only]


def _rank(info: SolverInfo) -> int:
    order = DEFAULTS.get(info.kind, ())
    return order.index(info.name) if info.name in order else len(order)


def method_info(problem: Any, method: str) -> SolverInfo:
    """The :class:`SolverInfo` of ``method`` (aliases allowed); ValueError naming the valid methods."""
    _load_solvers()
    kind = _kind_of(problem)
    table = _REGISTRY.get(kind, {})
    if method == "auto":
        for name in DEFAULTS.get(kind, ()):
            if name in table and table[name].is_installed():
                return table[name]
        raise ValueError(f"no installed method for {kind} problems; install ortools or scipy")
    name = _ALIASES.get(kind, {}).get(method, method)
    if name not in table:
        valid = sorted(list(table) + list(_ALIASES.get(kind, {})))
        raise ValueError(f"unknown `method` {method!r} for {kind} problems; valid methods: {', '.join(valid)}")
    info = table[name]
    if not info.is_installed():
        raise ValueError(f"`method` {name!r} needs {', '.join(info.backends)}, which is not installed")
    return info


def solve(problem: Any, method: str = "auto", *, time_limit: float | None = None, **options: Any) -> Solution:
    """Solve ``problem`` with ``method`` and return a checked :class:`Solution`.

    Args:
      problem: a :class:`RoutingProblem` or :class:`PlacementProblem`.
      method: a registry name (``available_methods(problem)``) or "auto".
      time_limit: seconds, or None. Methods with a back-end limit pass it on; iterative heuristics stop
        early; a run that hit the limit has status ``time_limit``.
      **options: method-specific options; unknown ones raise ValueError listing the valid ones.

    Every answer goes through :func:`moebalance.check`: the objective and loads are recomputed, a violated
    constraint turns the status into ``infeasible``, and a claimed optimum that disagrees with its own bound
    is downgraded to ``feasible``.
    """
    info = method_info(problem, method)
    if time_limit is not None:
        try:
            time_limit = float(time_limit)
        except (TypeError, ValueError):
            raise ValueError(f"`time_limit` must be a positive number of seconds, got {time_limit!r}") from None
        if not (time_limit > 0 and math.isfinite(time_limit)):
            raise ValueError(f"`time_limit` must be a positive number of seconds, got {time_limit!r}")
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(sorted(info.options)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {info.name!r}; "
                         f"valid options: {valid}")
    opts = {**info.options, **options}
    t0 = time.perf_counter()
    try:
        raw = info.func(problem, time_limit=time_limit, **opts)
    except ValueError:
        raise
    except Exception as exc:  # a back-end failure becomes a status, never a traceback
        raw = Solution(method=info.name, status=Status.ERROR, objective=float("nan"),
                       message=f"{type(exc).__name__}: {exc}")
    wall = time.perf_counter() - t0
    return finalize(problem, raw.replace(method=info.name, wall_time=wall))


def finalize(problem: Any, sol: Solution) -> Solution:
    """Run the shared check on ``sol`` and fill objective, loads, gap and status from it."""
    stats = dict(sol.stats)
    status = sol.status
    message = sol.message
    bound = sol.bound
    extras: dict[str, Any] = {}
    if sol.assignment is None:
        objective, loads = float("nan"), None
        stats["feasible"] = False
        if status in (Status.OPTIMAL, Status.FEASIBLE):
            status, message = Status.ERROR, (message + "; " if message else "") + "no assignment returned"
    else:
        res = check(problem, sol.assignment, token_ranges=sol.token_ranges)
        objective, loads = res.objective, res.loads
        stats["feasible"] = res.feasible
        stats["load_ratio"] = res.load_ratio
        extras = res.extras
        if not res.feasible:
            stats["violations"] = res.violations
            if status != Status.ERROR:
                status = Status.INFEASIBLE
            message = (message + "; " if message else "") + "; ".join(res.violations)
    if problem.kind == "routing" and sol.bias is not None and sol.assignment is not None and loads is not None:
        dual = routing_dual_bound(problem, sol.bias)
        stats["dual_bound"] = dual
        stats["bias_reproduces"] = bias_reproduces(problem, np.asarray(sol.assignment), sol.bias)
        bound = dual if bound is None else min(bound, dual)
    gap = None
    if bound is not None and math.isfinite(objective) and stats.get("feasible"):
        gap = abs(bound - objective) / max(abs(bound), 1e-12)
        if status == Status.OPTIMAL and gap > OPTIMALITY_TOL:
            status = Status.FEASIBLE
            message = (message + "; " if message else "") + f"claimed optimal but gap to bound is {gap:.3g}"
    return sol.replace(status=status, objective=objective, loads=loads, bound=bound, gap=gap, stats=stats,
                       message=message, **extras)
