"""The routing LP relaxation with scipy's HiGHS: an upper bound, duals and the bias.

The constraint matrix (token rows with sum_e x = k, expert rows with sum_t x <= capacity) is the incidence
matrix of a bipartite graph, hence totally unimodular: a vertex optimum is integral, so the LP usually *is*
the exact answer. We verify integrality and report it in ``stats['integral']`` (and the largest distance of
any x from an integer in ``stats['max_fractionality']``); the bias is minus the capacity rows' marginals.
"""

from __future__ import annotations

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import chosen_to_assignment

__all__ = ["solve_lp", "routing_lp_matrices"]

INTEGRALITY_TOL = 1e-6


def routing_lp_matrices(problem):
    """Sparse ``A_eq`` [T, T*E] (token rows) and ``A_ub`` [E, T*E] (capacity rows) over x flattened row-major."""
    import scipy.sparse as sp

    T, E = problem.shape
    a_eq = sp.kron(sp.eye(T, format="csr"), np.ones((1, E)), format="csr")
    a_ub = sp.kron(np.ones((1, T)), sp.eye(E, format="csr"), format="csr")
    return a_eq, a_ub


@register("routing", "lp", gives_bound=True, backends=("scipy",), options={"highs_method": "highs"},
          description="LP relaxation with scipy HiGHS (bound, duals, bias; integral by total unimodularity)")
def solve_lp(problem, *, time_limit=None, highs_method="highs") -> RoutingSolution:
    """LP relaxation (scipy ``linprog``, HiGHS). ``highs_method``: "highs", "highs-ds" or "highs-ipm"."""
    from scipy.optimize import linprog

    if highs_method not in ("highs", "highs-ds", "highs-ipm"):
        raise ValueError(f"`highs_method` must be 'highs', 'highs-ds' or 'highs-ipm', got {highs_method!r}")
    T, E = problem.shape
    a_eq, a_ub = routing_lp_matrices(problem)
    options = {} if time_limit is None else {"time_limit": float(time_limit)}
    res = linprog(-problem.scores.ravel(), A_ub=a_ub, b_ub=np.minimum(problem.capacity, T), A_eq=a_eq,
                  b_eq=np.full(T, problem.k), bounds=(0, 1), method=highs_method, options=options)
    stats = {"backend_status": int(res.status), "backend_message": res.message, "iterations": int(res.nit)}
    if res.status == 1 and res.x is None:
        return RoutingSolution(method="lp", status=Status.TIME_LIMIT, objective=float("nan"), stats=stats,
                        message=f"HiGHS stopped: {res.message}")
    if res.status not in (0, 1) or res.x is None:
        return RoutingSolution(method="lp", status=Status.ERROR, objective=float("nan"), stats=stats,
                        message=f"HiGHS failed: {res.message}")
    x = res.x.reshape(T, E)
    frac = float(np.abs(x - np.rint(x)).max())
    stats["max_fractionality"] = frac
    stats["integral"] = frac <= INTEGRALITY_TOL
    assignment = chosen_to_assignment(x, problem.k)
    if res.status == 1:
        return RoutingSolution(method="lp", status=Status.TIME_LIMIT, objective=float("nan"), assignment=assignment,
                        stats=stats, message=f"HiGHS stopped: {res.message}")
    bias = np.maximum(-np.asarray(res.ineqlin.marginals), 0.0)
    status = Status.OPTIMAL if stats["integral"] else Status.FEASIBLE
    msg = "LP optimum is integral (total unimodularity), hence optimal for the binary program" \
        if stats["integral"] else f"LP optimum is fractional (max {frac:.3g}); assignment rounded by top-k of x"
    return RoutingSolution(method="lp", status=status, objective=float("nan"), bound=float(-res.fun),
                    assignment=assignment, bias=bias, stats=stats, message=msg)
