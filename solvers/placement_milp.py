"""``milp`` (alias ``bip``): the exact placement MILP with OR-Tools' SCIP back-end.

    minimise T
    s.t.  sum_p x[e, p] = load[e]                          every expert with tokens
          x[e, p] <= M_e y[e, p]                           M_e = min(load[e], max_tokens_per_device)
          sum_e a[e, p] x[e, p] + b[e, p] y[e, p] <= T     every device (the cost model)
          sum_e x[e, p] <= max_tokens_per_device           (if set)
          sum_{e foreign to p} y[e, p] <= max_foreign_experts   (if set)
          x integer >= 0, y binary

SCIP takes float coefficients directly (CP-SAT would need them scaled to integers). The model starts from the
``llep+`` plan as a hint, and its makespan ``U`` tightens every big-M to ``min(load, cap, (U - b) / a)`` (valid:
an optimal plan never has a device above ``U``). ``time_limit`` is passed to SCIP (minus the time spent
building); a run stopped by it reports status ``time_limit`` with SCIP's best bound, and the hint plan if SCIP
found nothing better.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from ._interrupt import interruptible
from ._placement_model import build_model, incumbent, round_plan

__all__ = ["solve_milp"]


@register("placement", "milp", exact=True, gives_bound=True, backends=("ortools",), aliases=("bip",),
          options={"mip_gap": 1e-7, "hint": True, "threads": 1},
          description="exact MILP (OR-Tools SCIP): optimal plan and proven bound")
def solve_milp(problem: Any, *, time_limit: float | None = None, mip_gap: float = 1e-7, hint: bool = True,
               threads: int = 1) -> PlacementSolution:
    """Exact MILP with SCIP; ``mip_gap`` is SCIP's relative stopping gap, ``hint`` warm-starts from llep+."""
    from ortools.linear_solver import pywraplp

    t0 = time.perf_counter()
    if not (isinstance(mip_gap, (int, float)) and 0 <= mip_gap < 1):
        raise ValueError(f"`mip_gap` must be a number in [0, 1), got {mip_gap!r}")
    hint_x, upper = incumbent(problem) if hint else (None, None)
    m = build_model(problem, upper)
    A, P = m.a.shape
    if A == 0:
        return PlacementSolution(method="milp", status=Status.OPTIMAL, objective=float("nan"), bound=0.0,
                        assignment=np.zeros(problem.shape, dtype=np.int64))
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        raise RuntimeError("OR-Tools was built without SCIP")
    inf = solver.infinity()
    Mcap = np.minimum(m.M, m.loads[:, None]).astype(np.int64).tolist()
    x = [[solver.IntVar(0, Mcap[i][p], "") for p in range(P)] for i in range(A)]
    y = [[solver.BoolVar("") for _ in range(P)] for i in range(A)]
    integral = m.integral_times()
    T = solver.IntVar(0, inf, "T") if integral else solver.NumVar(0, inf, "T")
    a, b = m.a.tolist(), m.b.tolist()
    for i in range(A):
        row = solver.Constraint(float(m.loads[i]), float(m.loads[i]))
        for p in range(P):
            row.SetCoefficient(x[i][p], 1.0)
            link = solver.Constraint(-inf, 0.0)
            link.SetCoefficient(x[i][p], 1.0)
            link.SetCoefficient(y[i][p], -float(Mcap[i][p]))
    for p in range(P):
        row = solver.Constraint(-inf, 0.0)
        row.SetCoefficient(T, -1.0)
        for i in range(A):
            row.SetCoefficient(x[i][p], a[i][p])
            if b[i][p]:
                row.SetCoefficient(y[i][p], b[i][p])
        if m.C is not None:
            cap = solver.Constraint(-inf, float(m.C))
            for i in range(A):
                cap.SetCoefficient(x[i][p], 1.0)
        if m.F is not None:
            fr = solver.Constraint(-inf, float(m.F))
            for i in range(A):
                if m.foreign[i, p]:
                    fr.SetCoefficient(y[i][p], 1.0)
    solver.Minimize(T)
    if hint_x is not None:
        hx = hint_x[m.active]
        if np.isfinite(upper):
            hv = hx.ravel().astype(float).tolist()
            hy = (hx > 0).ravel().astype(float).tolist()
            t_hint = float(((m.a * hx).sum(axis=0) + (m.b * (hx > 0)).sum(axis=0)).max())
            if integral:
                t_hint = float(np.ceil(t_hint - 1e-9))
            solver.SetHint([v for r in x for v in r] + [v for r in y for v in r] + [T], hv + hy + [t_hint])
        else:
            hint_x = None
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, float(mip_gap))
    solver.SetNumThreads(int(threads))
    if time_limit is not None:
        left = time_limit - (time.perf_counter() - t0)
        if left <= 0:
            return _fallback(problem, m, hint_x, None, "time limit reached while building the model")
        solver.SetTimeLimit(max(1, int(left * 1000)))
    solver.SetSolverSpecificParametersAsString("misc/catchctrlc = FALSE\n")  # Ctrl-C reaches interruptible
    with interruptible(solver.InterruptSolve):
        code = solver.Solve(params)
    stats = {"scip_status": int(code), "nodes": int(solver.nodes()), "integral_objective": integral}
    if code == pywraplp.Solver.INFEASIBLE:
        return PlacementSolution(method="milp", status=Status.INFEASIBLE, objective=float("nan"), stats=stats,
                        message="SCIP proved the limits admit no plan")
    bound = solver.Objective().BestBound() * m.unit
    if code in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        xs = np.array([[v.solution_value() for v in r] for r in x])
        xa = np.rint(xs).astype(np.int64)
        if not np.array_equal(xa.sum(axis=1), m.loads):
            xa = round_plan(m, xs)
        xf = np.zeros(problem.shape, dtype=np.int64)
        xf[m.active] = xa
        status = Status.OPTIMAL if code == pywraplp.Solver.OPTIMAL else Status.TIME_LIMIT
        if code == pywraplp.Solver.FEASIBLE and time_limit is None:
            status = Status.FEASIBLE
        return PlacementSolution(method="milp", status=status, objective=float("nan"), bound=bound, assignment=xf,
                        stats=stats, message=f"SCIP {'optimal' if status == Status.OPTIMAL else 'stopped'}")
    if code == pywraplp.Solver.NOT_SOLVED and time_limit is not None:
        return _fallback(problem, m, hint_x, bound, "SCIP found no plan within the time limit", stats)
    return PlacementSolution(method="milp", status=Status.ERROR, objective=float("nan"), stats=stats,
                    message=f"SCIP returned status {code}")


def _fallback(problem: Any, m: Any, hint_x: np.ndarray | None, bound: float | None, msg: str,
              stats: dict | None = None) -> PlacementSolution:
    if hint_x is None:
        return PlacementSolution(method="milp", status=Status.TIME_LIMIT, objective=float("nan"), bound=bound,
                        stats=stats or {}, message=msg)
    return PlacementSolution(method="milp", status=Status.TIME_LIMIT, objective=float("nan"), bound=bound,
                    assignment=hint_x, stats=stats or {}, message=msg + "; returning the llep+ warm start")
