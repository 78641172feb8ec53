"""The exact binary program with OR-Tools CP-SAT.

Precision: CP-SAT takes integer objective coefficients. Scores are shifted per token (no optimum changes:
every token takes exactly k experts) and scaled so the largest becomes ``1 / precision`` (default 1e8); the
rounding error is at most ``0.5 / scale`` per score, so the reported bound adds ``T * k / scale`` to CP-SAT's
bound and an answer CP-SAT proves optimal is optimal for the float scores to within that amount.
"""

from __future__ import annotations

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._interrupt import interruptible
from ._routing_common import integer_scores, prices_from_assignment

__all__ = ["solve_bip"]


@register("routing", "bip", exact=True, gives_bound=True, backends=("ortools",),
          options={"precision": 1e-8, "workers": 0},
          description="exact binary program with OR-Tools CP-SAT")
def solve_bip(problem, *, time_limit=None, precision=1e-8, workers=0) -> RoutingSolution:
    """Exact BIP with CP-SAT. ``precision``: score resolution relative to the score range; ``workers``: CP-SAT
    search workers (0 = CP-SAT's default)."""
    from ortools.sat.python import cp_model

    if not (isinstance(precision, float) and 0 < precision <= 1e-2):
        raise ValueError(f"`precision` must be a float in (0, 1e-2], got {precision!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`workers` must be a non-negative integer, got {workers!r}")
    s = problem.scores
    T, E = s.shape
    k = problem.k
    ints, rowmin, scale = integer_scores(s, int(round(1 / precision)))
    m = cp_model.CpModel()
    x = [[m.new_bool_var(f"x{t}_{e}") for e in range(E)] for t in range(T)]
    for t in range(T):
        m.add(cp_model.LinearExpr.sum(x[t]) == k)
    cap = np.minimum(problem.capacity, T)
    for e in range(E):
        if cap[e] < T:
            m.add(cp_model.LinearExpr.sum([x[t][e] for t in range(T)]) <= int(cap[e]))
    flat = [v for row in x for v in row]
    m.maximize(cp_model.LinearExpr.weighted_sum(flat, ints.ravel().tolist()))
    solver = cp_model.CpSolver()
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    if workers:
        solver.parameters.num_workers = workers
    solver.parameters.catch_sigint_signal = False  # Ctrl-C reaches interruptible, which stops the search
    with interruptible(solver.stop_search):
        code = solver.solve(m)
    stats = {"backend_status": solver.status_name(code), "scale": scale, "precision": precision,
             "branches": solver.num_branches, "backend_wall_time": solver.wall_time}
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        status = Status.TIME_LIMIT if code == cp_model.UNKNOWN and time_limit is not None else Status.ERROR
        return RoutingSolution(method="bip", status=status, objective=float("nan"), stats=stats,
                        message=f"CP-SAT: {solver.status_name(code)}")
    vals = np.array([solver.boolean_value(v) for v in flat], dtype=bool).reshape(T, E)
    assignment = np.sort(np.argsort(~vals, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    bound = solver.best_objective_bound / scale + k * float(rowmin.sum()) + T * k / scale
    if code == cp_model.OPTIMAL:
        status, msg = Status.OPTIMAL, "CP-SAT proved optimality"
    else:
        status = Status.TIME_LIMIT if time_limit is not None else Status.FEASIBLE
        msg = "CP-SAT stopped at the time limit with a feasible answer"
    bias = prices_from_assignment(s, assignment, tol=2.0 / scale) if status == Status.OPTIMAL else None
    return RoutingSolution(method="bip", status=status, objective=float("nan"), bound=float(bound),
                    assignment=assignment, bias=bias, stats=stats, message=msg)
