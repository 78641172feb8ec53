"""The routing LP relaxation through cvxpy: an independent cross-check of ``lp`` (other modelling layer,
other default solver).

Steps: :func:`build` (problem -> ``cvxpy.Problem`` on normalised scores), :func:`run` (-> cvxpy status,
x, value, duals), :func:`to_solution` (-> our answer; status from :data:`._status.CVXPY`). An answer that is
not a solved LP (``user_limit``, ``optimal_inaccurate``) has no bound, and its iterate is repaired into a
feasible assignment (:func:`._routing_common.repair`) or dropped, never returned as it is (an interrupted
iterate's top-k breaks capacity). Scale: the LP sees scores in [0, 1] (raw scores near 1e-6 were seen 0.2%
off). Time: under ``time_limit`` a large model is built and solved in a child process that the deadline stops.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._cvxpy import import_cvxpy
from ._routing_common import RoutingScale, certify_prices, chosen_to_assignment, drive, repair
from ._status import CVXPY

__all__ = ["solve_cvxpy", "build", "run", "to_solution"]

BOUND_TOL = 1e-6


def _pick_solver(solver: str | None) -> str:
    """HIGHS when highspy is installed (checked without importing cvxpy: a child process may do the solve),
    else CLARABEL; a named solver is checked against cvxpy's installed ones."""
    import importlib.util

    if solver is None:
        return "HIGHS" if importlib.util.find_spec("highspy") is not None else "CLARABEL"
    _, installed = import_cvxpy()
    if solver not in installed:
        raise ValueError(f"`solver` {solver!r} is not installed for cvxpy; installed: {', '.join(installed)}")
    return solver


def build(problem: Any) -> tuple[Any, Any, Any]:
    """``(cvxpy.Problem, x [T, E] variable, capacity constraint)`` maximising the normalised scores."""
    cp, _ = import_cvxpy()
    T, E = problem.shape
    norm = RoutingScale(problem.scores, problem.k).normalise(problem.scores)
    x = cp.Variable((T, E), bounds=[0, 1])
    cap = cp.sum(x, axis=0) <= np.minimum(problem.capacity, T)
    prob = cp.Problem(cp.Maximize(cp.sum(cp.multiply(norm, x))), [cp.sum(x, axis=1) == problem.k, cap])
    return prob, x, cap


def run(model: tuple[Any, Any, Any], time_limit: float | None = None, *, solver: str = "HIGHS") -> dict[str, Any]:
    """Solve: ``{"code", "x" (when cvxpy has a value), "value" and "duals" (when solved)}``."""
    import warnings

    prob, x, cap = model
    kwargs: dict[str, Any] = {}
    if time_limit is not None and solver in ("HIGHS", "CLARABEL"):
        kwargs["time_limit"] = float(time_limit)
    with warnings.catch_warnings():  # cvxpy warns on inaccurate answers; the status says it
        warnings.simplefilter("ignore")
        prob.solve(solver=solver, **kwargs)
    out: dict[str, Any] = {"code": str(prob.status), "solver": solver}
    if x.value is not None:
        out["x"] = np.asarray(x.value, dtype=np.float64)
    if prob.status == "optimal" and prob.value is not None:
        out["value"] = float(prob.value)
        if cap.dual_value is not None:
            out["duals"] = np.asarray(cap.dual_value, dtype=np.float64).ravel()
    return out


def job(problem: Any, *, time_limit: float | None = None, solver: str | None) -> dict[str, Any]:
    """build + run (in this process or a child), ``time_limit`` what is left for the back-end."""
    return run(build(problem), time_limit, solver=_pick_solver(solver))


def to_solution(problem: Any, raw: dict[str, Any], time_limit: float | None = None) -> RoutingSolution:
    """Our answer from :func:`run`'s output."""
    T, E = problem.shape
    k = problem.k
    x = raw.get("x")
    code = raw["code"]
    status = CVXPY.translate(code, time_limit=time_limit, has_solution=x is not None)
    stats: dict[str, Any] = {"backend_status": code, "solver": raw.get("solver")}
    if status == Status.INFEASIBLE:
        status = Status.ERROR  # a routing problem is feasible by construction
    if x is None:
        return RoutingSolution(
            method="cvxpy", status=status, objective=float("nan"), stats=stats, message=f"cvxpy status {code}"
        )
    scale = RoutingScale(problem.scores, k)
    xv = np.asarray(x).reshape(T, E)
    frac = float(np.abs(xv - np.rint(xv)).max())
    stats["max_fractionality"] = frac
    stats["integral"] = frac <= 1e-6
    solved = "value" in raw
    assignment = chosen_to_assignment(xv, k) if solved and stats["integral"] else None
    if assignment is None:
        assignment = repair(problem.scores, xv, k, problem.capacity)
        stats["repaired"] = True
    if solved:
        bound = scale.upper(raw["value"], allowance=BOUND_TOL * T * k)
        if status == Status.OPTIMAL and not stats["integral"]:
            status = Status.FEASIBLE  # a fractional (interior) optimum: rounding is not proven optimal
    else:
        bound = None  # an interrupted or inaccurate LP value proves nothing
        if status == Status.OPTIMAL:
            status = Status.FEASIBLE
    bias = None
    if assignment is not None:
        bias = certify_prices(problem.scores, assignment, tol=1e-9 * scale.unit)
        if bias is None and "duals" in raw:
            bias = np.maximum(raw["duals"], 0.0) * scale.unit
    if assignment is None and status in (Status.OPTIMAL, Status.FEASIBLE):
        status = Status.ERROR
    return RoutingSolution(
        method="cvxpy",
        status=status,
        objective=float("nan"),
        bound=bound,
        assignment=assignment,
        bias=bias,
        stats=stats,
        message=f"cvxpy/{raw.get('solver')}: {code}, max fractionality {frac:.2g}"
        + ("; iterate repaired to a feasible assignment" if stats.get("repaired") else ""),
    )


@register(
    "routing",
    "cvxpy",
    gives_bound=True,
    deterministic=True,
    supports_time_limit=True,
    backends=("cvxpy",),
    description="LP relaxation through cvxpy (cross-check of lp)",
    isolated=True,
    status_map=CVXPY,
    options={
        "solver": Option("str | None", "the cvxpy solver (default HIGHS when installed, else CLARABEL)"),
    },
)
def solve_cvxpy(problem: Any, *, time_limit: float | None = None, solver: str | None = None) -> RoutingSolution:
    """LP relaxation with cvxpy; ``solver`` defaults to HIGHS when installed, else CLARABEL."""
    t0 = time.perf_counter()
    solver = _pick_solver(solver)
    return drive(
        "cvxpy",
        problem,
        job,
        {"solver": solver},
        time_limit=time_limit,
        start=t0,
        to_solution=to_solution,
    )
