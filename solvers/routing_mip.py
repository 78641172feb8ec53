"""The exact binary program through OR-Tools' MIP interface (pywraplp: SCIP by default, or HiGHS / CBC)."""

from __future__ import annotations

import time

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._interrupt import interruptible
from ._routing_common import prices_from_assignment

__all__ = ["solve_mip"]

_BACKENDS = ("SCIP", "HIGHS", "CBC")


@register("routing", "mip", exact=True, gives_bound=True, backends=("ortools",), options={"backend": "SCIP"},
          description="exact binary program with OR-Tools MIP (SCIP, HiGHS or CBC)")
def solve_mip(problem, *, time_limit=None, backend="SCIP") -> RoutingSolution:
    """Exact BIP through ``pywraplp``; ``backend`` is "SCIP" (default), "HIGHS" or "CBC"."""
    from ortools.linear_solver import pywraplp

    if backend not in _BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    t0 = time.perf_counter()
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        return RoutingSolution(method="mip", status=Status.ERROR, objective=float("nan"),
                        message=f"OR-Tools was built without the {backend} back-end")
    s = problem.scores
    T, E = s.shape
    k = problem.k
    x = [[solver.BoolVar(f"x{t}_{e}") for e in range(E)] for t in range(T)]
    for t in range(T):
        solver.Add(solver.Sum(x[t]) == k)
    cap = np.minimum(problem.capacity, T)
    for e in range(E):
        if cap[e] < T:
            solver.Add(solver.Sum([x[t][e] for t in range(T)]) <= int(cap[e]))
    obj = solver.Objective()
    for t in range(T):
        for e in range(E):
            obj.SetCoefficient(x[t][e], float(s[t, e]))
    obj.SetMaximization()
    if time_limit is not None:
        # the limit covers model building too; SCIP also gets it as its own parameter, which it checks
        # inside presolve and the root LP (SetTimeLimit alone was seen to overrun 60 s by minutes)
        left = max(0.05, time_limit - (time.perf_counter() - t0))
        solver.SetTimeLimit(int(max(1, round(1000 * left))))
        if backend == "SCIP":
            solver.SetSolverSpecificParametersAsString(f"limits/time = {left:.3f}\n")
    if backend == "SCIP":  # Ctrl-C reaches interruptible instead of SCIP's own handler
        solver.SetSolverSpecificParametersAsString(
            (f"limits/time = {left:.3f}\n" if time_limit is not None else "") + "misc/catchctrlc = FALSE\n")
    with interruptible(solver.InterruptSolve):
        code = solver.Solve()
    names = {solver.OPTIMAL: "OPTIMAL", solver.FEASIBLE: "FEASIBLE", solver.INFEASIBLE: "INFEASIBLE",
             solver.UNBOUNDED: "UNBOUNDED", solver.ABNORMAL: "ABNORMAL", solver.NOT_SOLVED: "NOT_SOLVED"}
    stats = {"backend": backend, "backend_status": names.get(code, str(code)), "nodes": solver.nodes()}
    if code not in (solver.OPTIMAL, solver.FEASIBLE):
        status = Status.TIME_LIMIT if code == solver.NOT_SOLVED and time_limit is not None else Status.ERROR
        return RoutingSolution(method="mip", status=status, objective=float("nan"), stats=stats,
                        message=f"{backend}: {stats['backend_status']}")
    vals = np.array([[x[t][e].solution_value() for e in range(E)] for t in range(T)])
    assignment = np.sort(np.argsort(-vals, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    try:
        bound = float(obj.BestBound())
    except Exception:  # some back-ends do not report a bound
        bound = None
    if code == solver.OPTIMAL:
        status, msg = Status.OPTIMAL, f"{backend} proved optimality"
        span = float(np.abs(s).max()) or 1.0
        bias = prices_from_assignment(s, assignment, tol=1e-9 * span)
    else:
        status = Status.TIME_LIMIT if time_limit is not None else Status.FEASIBLE
        msg, bias = f"{backend} stopped with a feasible answer", None
    return RoutingSolution(method="mip", status=status, objective=float("nan"), bound=bound, assignment=assignment,
                    bias=bias, stats=stats, message=msg)
