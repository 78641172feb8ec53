"""The routing LP relaxation through cvxpy: an independent cross-check of ``lp`` (other modelling layer,
other default solver)."""

from __future__ import annotations

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._cvxpy import import_cvxpy
from ._routing_common import chosen_to_assignment

__all__ = ["solve_cvxpy"]

_STATUS = {"optimal": Status.OPTIMAL, "optimal_inaccurate": Status.FEASIBLE,
           "user_limit": Status.TIME_LIMIT, "infeasible": Status.ERROR, "unbounded": Status.ERROR,
           "infeasible_inaccurate": Status.ERROR, "unbounded_inaccurate": Status.ERROR}


@register("routing", "cvxpy", gives_bound=True, backends=("cvxpy",), options={"solver": None},
          description="LP relaxation through cvxpy (cross-check of lp)")
def solve_cvxpy(problem, *, time_limit=None, solver=None) -> RoutingSolution:
    """LP relaxation with cvxpy; ``solver`` defaults to HIGHS when installed, else CLARABEL."""
    cp, installed = import_cvxpy()
    if solver is None:
        solver = "HIGHS" if "HIGHS" in installed else "CLARABEL"
    if solver not in installed:
        raise ValueError(f"`solver` {solver!r} is not installed for cvxpy; installed: {', '.join(installed)}")
    T, E = problem.shape
    x = cp.Variable((T, E))
    cap = cp.sum(x, axis=0) <= np.minimum(problem.capacity, T)
    cons = [cp.sum(x, axis=1) == problem.k, x >= 0, x <= 1, cap]
    prob = cp.Problem(cp.Maximize(cp.sum(cp.multiply(problem.scores, x))), cons)
    kwargs = {}
    if time_limit is not None and solver == "HIGHS":
        kwargs["time_limit"] = float(time_limit)
    elif time_limit is not None and solver == "CLARABEL":
        kwargs["time_limit"] = float(time_limit)
    prob.solve(solver=solver, **kwargs)
    stats = {"backend_status": prob.status, "solver": solver}
    status = _STATUS.get(prob.status, Status.ERROR)
    if x.value is None:
        return RoutingSolution(method="cvxpy", status=status if status != Status.OPTIMAL else Status.ERROR,
                        objective=float("nan"), stats=stats, message=f"cvxpy status {prob.status}")
    xv = np.asarray(x.value)
    frac = float(np.abs(xv - np.rint(xv)).max())
    stats["max_fractionality"] = frac
    stats["integral"] = frac <= 1e-6
    bias = np.maximum(np.asarray(cap.dual_value, dtype=np.float64).ravel(), 0.0)
    if status == Status.OPTIMAL and not stats["integral"]:
        status = Status.FEASIBLE  # a fractional (interior) optimum: rounding is not proven optimal
    # only a solved LP's value bounds the optimum; an interrupted or inaccurate one proves nothing
    bound = float(prob.value) if prob.status == "optimal" else None
    return RoutingSolution(method="cvxpy", status=status, objective=float("nan"), bound=bound,
                    assignment=chosen_to_assignment(xv, problem.k), bias=bias, stats=stats,
                    message=f"cvxpy/{solver}: {prob.status}, max fractionality {frac:.2g}")
