"""The routing LP relaxation with scipy's HiGHS: an upper bound, duals and the bias.

The constraint matrix (token rows with sum_e x = k, expert rows with sum_t x <= capacity) is the incidence
matrix of a bipartite graph, hence totally unimodular: a vertex optimum is integral, so the LP usually *is*
the exact answer. We verify integrality and report it in ``stats['integral']`` (and the largest distance of
any x from an integer in ``stats['max_fractionality']``); the bias is the exact certificate of the rounded
assignment when one exists, else minus the capacity rows' marginals.

Steps: :func:`build` (problem -> ``linprog`` arguments on normalised scores), :func:`run` (-> status, x,
value, marginals), :func:`to_solution` (-> our answer; status from :data:`._status.SCIPY_HIGHS`). Scale: HiGHS
sees scores in [0, 1] (:class:`._routing_common.RoutingScale`; raw scores near 1e-6 were seen 0.1% off), and
the bound is raised by ``BOUND_TOL * T * k`` normalised units for its tolerances. Time: under ``time_limit`` a
large LP runs in a child process that the deadline stops.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import RoutingScale, certify_prices, chosen_to_assignment, drive, repair
from ._status import SCIPY_HIGHS

__all__ = ["solve_lp", "routing_lp_matrices", "build", "run", "to_solution"]

INTEGRALITY_TOL = 1e-6
BOUND_TOL = 1e-6
METHODS = ("highs", "highs-ds", "highs-ipm")


def routing_lp_matrices(problem: Any) -> tuple[Any, Any]:
    """Sparse ``A_eq`` [T, T*E] (token rows) and ``A_ub`` [E, T*E] (capacity rows) over x flattened row-major."""
    import scipy.sparse as sp

    T, E = problem.shape
    a_eq = sp.kron(sp.eye(T, format="csr"), np.ones((1, E)), format="csr")
    a_ub = sp.kron(np.ones((1, T)), sp.eye(E, format="csr"), format="csr")
    return a_eq, a_ub


def build(problem: Any, *, highs_method: str = "highs") -> dict[str, Any]:
    """Keyword arguments of ``scipy.optimize.linprog`` for the relaxation (minimising minus the normalised
    scores)."""
    T, E = problem.shape
    a_eq, a_ub = routing_lp_matrices(problem)
    scale = RoutingScale(problem.scores, problem.k)
    return {
        "c": -scale.normalise(problem.scores).ravel(),
        "A_ub": a_ub,
        "b_ub": np.minimum(problem.capacity, T).astype(np.float64),
        "A_eq": a_eq,
        "b_eq": np.full(T, float(problem.k)),
        "bounds": (0, 1),
        "method": highs_method,
    }


def run(model: dict[str, Any], time_limit: float | None = None) -> dict[str, Any]:
    """Solve: ``{"code", "x", "value" (normalised, maximised), "marginals" [E], "iterations"}``."""
    from scipy.optimize import linprog

    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    res = linprog(**model, options=options)
    out: dict[str, Any] = {
        "code": SCIPY_HIGHS.name(res.status),
        "message": str(res.message),
        "iterations": int(getattr(res, "nit", 0) or 0),
    }
    if res.x is not None:
        out["x"] = np.asarray(res.x, dtype=np.float64)
    if res.status == 0:
        out["value"] = float(-res.fun)
        out["marginals"] = np.asarray(res.ineqlin.marginals, dtype=np.float64)
    return out


def job(problem: Any, *, time_limit: float | None = None, highs_method: str) -> dict[str, Any]:
    """build + run (in this process or a child), ``time_limit`` what is left for HiGHS."""
    return run(build(problem, highs_method=highs_method), time_limit)


def to_solution(problem: Any, raw: dict[str, Any], time_limit: float | None = None) -> RoutingSolution:
    """Our answer from :func:`run`'s output."""
    T, E = problem.shape
    k = problem.k
    x = raw.get("x")
    status = SCIPY_HIGHS.translate(raw["code"], time_limit=time_limit, has_solution=x is not None)
    stats: dict[str, Any] = {
        "backend_status": raw["code"],
        "backend_message": raw.get("message"),
        "iterations": raw.get("iterations"),
    }
    if status == Status.INFEASIBLE:
        status = Status.ERROR  # a routing problem is feasible by construction
    if x is None or "value" not in raw:
        # an interrupted iterate is no LP answer: its top-k may break capacity, so it is not returned
        return RoutingSolution(
            method="lp", status=status, objective=float("nan"), stats=stats, message=f"HiGHS: {raw.get('message')}"
        )
    scale = RoutingScale(problem.scores, k)
    xv = np.asarray(x).reshape(T, E)
    frac = float(np.abs(xv - np.rint(xv)).max())
    stats["max_fractionality"] = frac
    stats["integral"] = frac <= INTEGRALITY_TOL
    assignment = chosen_to_assignment(xv, k)
    if not stats["integral"]:  # a fractional vertex: round it to a feasible assignment
        repaired = repair(problem.scores, xv, k, problem.capacity)
        if repaired is not None:
            assignment = repaired
    bias = certify_prices(problem.scores, assignment, tol=1e-9 * scale.unit)
    if bias is None:
        bias = np.maximum(-np.asarray(raw["marginals"]), 0.0) * scale.unit
    bound = scale.upper(raw["value"], allowance=BOUND_TOL * T * k)
    status = Status.OPTIMAL if stats["integral"] else Status.FEASIBLE
    msg = (
        "LP optimum is integral (total unimodularity), hence optimal for the binary program"
        if stats["integral"]
        else f"LP optimum is fractional (max {frac:.3g}); assignment rounded by top-k of x"
    )
    return RoutingSolution(
        method="lp",
        status=status,
        objective=float("nan"),
        bound=bound,
        assignment=assignment,
        bias=bias,
        stats=stats,
        message=msg,
    )


@register(
    "routing",
    "lp",
    gives_bound=True,
    deterministic=True,
    supports_time_limit=True,
    backends=("scipy",),
    description="LP relaxation with scipy HiGHS (bound, duals, bias; integral by total unimodularity)",
    isolated=True,
    status_map=SCIPY_HIGHS,
    options={
        "highs_method": Option("str", "scipy's HiGHS method: highs, highs-ds or highs-ipm"),
    },
)
def solve_lp(problem: Any, *, time_limit: float | None = None, highs_method: str = "highs") -> RoutingSolution:
    """LP relaxation (scipy ``linprog``, HiGHS). ``highs_method``: "highs", "highs-ds" or "highs-ipm"."""
    t0 = time.perf_counter()
    if highs_method not in METHODS:
        raise ValueError(f"`highs_method` must be 'highs', 'highs-ds' or 'highs-ipm', got {highs_method!r}")
    return drive(
        "lp",
        problem,
        job,
        {"highs_method": highs_method},
        time_limit=time_limit,
        start=t0,
        to_solution=to_solution,
    )
