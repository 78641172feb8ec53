"""``milp`` (alias ``bip``): the exact placement MILP with OR-Tools' SCIP back-end.

    minimise T
    s.t.  sum_p x[e, p] = load[e]                          every expert with tokens
          x[e, p] <= M_e y[e, p]                           M_e = min(load[e], max_tokens_per_device)
          sum_e a[e, p] x[e, p] + b[e, p] y[e, p] <= T     every device (the cost model)
          sum_e x[e, p] <= max_tokens_per_device           (if set)
          sum_{e foreign to p} y[e, p] <= max_foreign_experts   (if set)
          x integer >= 0, y binary

Steps: :func:`build` (problem -> ``pywraplp.Solver`` loaded from an ``MPModelProto`` that OR-Tools' model
builder fills from one scipy sparse matrix), :func:`run` (-> status, values, bound), :func:`to_solution`
(-> our answer; status from :data:`._status.PYWRAPLP`).

The model starts from the ``llep+`` plan as a hint, and its makespan ``U`` tightens every big-M to
``min(load, cap, (U - b) / a)`` (valid: an optimal plan never has a device above ``U``). Costs are divided by
:func:`._placement_model.time_unit`, so SCIP sees the same model at every scale of the cost model; its bound
is mapped back with :func:`._placement_model.lower_bound`. ``time_limit`` covers the incumbent search and the
build (the clock is checked between steps) and is passed to SCIP for the rest; a run stopped by it reports
``time_limit`` with SCIP's best bound, and the hint plan if SCIP found nothing better.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from ._interrupt import interruptible
from ._placement_model import PlacementModel, build_model, incumbent, lower_bound, round_plan, run_isolated
from ._status import PYWRAPLP

__all__ = ["solve_milp", "milp_inprocess", "milp_matrix", "build", "run", "to_solution"]


def milp_matrix(m: PlacementModel) -> dict[str, Any]:
    """Columns ``x`` (A*P, row-major), ``y`` (A*P), ``T``; rows: loads, links, device times, capacities,
    foreign limits. Returns the csr matrix, row and column bounds, objective, integrality and ``integral``
    (device times are integers in the model's unit, so T can be integer)."""
    import scipy.sparse as sp

    A, P = m.a.shape
    n = A * P
    Mcap = np.minimum(m.M, m.loads[:, None]).astype(np.float64).ravel()
    X, Y, TT = np.arange(n), n + np.arange(n), 2 * n
    ii = np.repeat(np.arange(A), P)
    pp = np.tile(np.arange(P), A)
    rows, cols, vals, lo, up = [], [], [], [], []
    r0 = 0

    def block(r, c, v, nrows, lower, upper):
        nonlocal r0
        rows.append(r + r0)
        cols.append(c)
        vals.append(v)
        lo.append(np.broadcast_to(lower, nrows))
        up.append(np.broadcast_to(upper, nrows))
        r0 += nrows

    block(ii, X, np.ones(n), A, m.loads.astype(np.float64), m.loads.astype(np.float64))
    block(
        np.concatenate([np.arange(n), np.arange(n)]),
        np.concatenate([X, Y]),
        np.concatenate([np.ones(n), -Mcap]),
        n,
        -np.inf,
        0.0,
    )
    bmask = m.b.ravel() != 0
    block(
        np.concatenate([pp, pp[bmask], np.arange(P)]),
        np.concatenate([X, Y[bmask], np.full(P, TT)]),
        np.concatenate([m.a.ravel(), m.b.ravel()[bmask], -np.ones(P)]),
        P,
        -np.inf,
        0.0,
    )
    if m.C is not None:
        block(pp, X, np.ones(n), P, -np.inf, float(m.C))
    if m.F is not None:
        fmask = m.foreign.ravel()
        block(pp[fmask], Y[fmask], np.ones(int(fmask.sum())), P, -np.inf, float(m.F))
    matrix = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r0, 2 * n + 1))
    obj = np.zeros(2 * n + 1)
    obj[TT] = 1.0
    return {
        "matrix": matrix,
        "row_lower": np.concatenate(lo).astype(np.float64),
        "row_upper": np.concatenate(up).astype(np.float64),
        "col_lower": np.zeros(2 * n + 1),
        "col_upper": np.concatenate([Mcap, np.ones(n), [np.inf]]),
        "objective": obj,
        "integral": m.integral_times(),
    }


def build(
    m: PlacementModel, *, hint_x: np.ndarray | None = None, mip_gap: float = 1e-7, threads: int = 1
) -> dict[str, Any]:
    """``{"solver": a SCIP pywraplp.Solver, ...}`` holding the MILP of model ``m`` (``hint_x`` ``[A, P]``: a
    warm start)."""
    from ortools.linear_solver import pywraplp
    from ortools.linear_solver.python import model_builder_helper as mbh

    d = milp_matrix(m)
    n = m.a.size
    helper = mbh.ModelBuilderHelper()
    helper.fill_model_from_sparse_data(
        d["col_lower"], d["col_upper"], d["objective"], d["row_lower"], d["row_upper"], d["matrix"]
    )
    for i in range(2 * n + (1 if d["integral"] else 0)):
        helper.set_var_integrality(i, True)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    if solver is None:
        raise RuntimeError("OR-Tools was built without SCIP")
    err = solver.LoadModelFromProto(mbh.to_mpmodel_proto(helper))
    if err:
        raise RuntimeError(f"SCIP rejected the model: {err}")
    solver.SuppressOutput()
    solver.SetNumThreads(int(threads))
    if hint_x is not None:
        hx = np.asarray(hint_x, dtype=np.float64)
        t_hint = float(((m.a * hx).sum(axis=0) + (m.b * (hx > 0)).sum(axis=0)).max())
        if d["integral"]:
            t_hint = float(np.ceil(t_hint - 1e-9))
        values = np.concatenate([hx.ravel(), (hx > 0).ravel().astype(np.float64), [t_hint]])
        solver.SetHint(solver.variables(), values.tolist())
    return {"solver": solver, "mip_gap": float(mip_gap), "integral": d["integral"], "shape": m.a.shape}


def run(model: dict[str, Any], time_limit: float | None = None) -> dict[str, Any]:
    """Solve: ``{"code", "x" [A, P] (when a solution exists), "bound" (normalised), "nodes"}``."""
    from ortools.linear_solver import linear_solver_pb2, pywraplp

    info, solver = model, model["solver"]
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, info["mip_gap"])
    scip = "misc/catchctrlc = FALSE\n"  # Ctrl-C reaches interruptible
    if time_limit is not None:
        solver.SetTimeLimit(max(1, int(time_limit * 1000)))
        scip += f"limits/time = {max(0.01, time_limit):.3f}\n"
    solver.SetSolverSpecificParametersAsString(scip)
    with interruptible(solver.InterruptSolve):
        solver.Solve(params)
    resp = linear_solver_pb2.MPSolutionResponse()
    solver.FillSolutionResponseProto(resp)
    out: dict[str, Any] = {
        "code": PYWRAPLP.name(resp.status),
        "nodes": int(solver.nodes()),
        "integral": info["integral"],
    }
    if resp.HasField("best_objective_bound") and np.isfinite(resp.best_objective_bound):
        out["bound"] = float(resp.best_objective_bound)
    A, P = info["shape"]
    if len(resp.variable_value):
        out["x"] = np.asarray(resp.variable_value, dtype=np.float64)[: A * P].reshape(A, P)
    return out


def to_solution(
    problem: Any,
    m: PlacementModel,
    raw: dict[str, Any],
    time_limit: float | None = None,
    *,
    hint_x: np.ndarray | None = None,
) -> PlacementSolution:
    """Our answer from :func:`run`'s output (``hint_x``: the full ``[E, P]`` warm start, returned when SCIP
    has nothing better under a time limit)."""
    xs = raw.get("x")
    status = PYWRAPLP.translate(raw["code"], time_limit=time_limit, has_solution=xs is not None)
    stats = {"backend_status": raw["code"], "nodes": raw.get("nodes"), "integral_objective": raw.get("integral")}
    bound = lower_bound(m, raw["bound"], integral=bool(raw.get("integral"))) if "bound" in raw else None
    if status == Status.INFEASIBLE:
        return PlacementSolution(
            method="milp",
            status=Status.INFEASIBLE,
            objective=float("nan"),
            stats=stats,
            message="SCIP proved the limits admit no plan",
        )
    if xs is None:
        msg = f"SCIP: {raw['code']}"
        if status == Status.TIME_LIMIT and hint_x is not None:
            return PlacementSolution(
                method="milp",
                status=status,
                objective=float("nan"),
                bound=bound,
                assignment=hint_x,
                stats=stats,
                message=msg + "; returning the llep+ warm start",
            )
        return PlacementSolution(
            method="milp", status=status, objective=float("nan"), bound=bound, stats=stats, message=msg
        )
    xa = np.rint(xs).astype(np.int64)
    if not np.array_equal(xa.sum(axis=1), m.loads) or xa.min() < 0:
        xa = round_plan(m, xs)
    xf = np.zeros(problem.shape, dtype=np.int64)
    xf[m.active] = xa
    return PlacementSolution(
        method="milp",
        status=status,
        objective=float("nan"),
        bound=bound,
        assignment=xf,
        stats=stats,
        message=f"SCIP {'optimal' if status == Status.OPTIMAL else raw['code']}",
    )


@register(
    "placement",
    "milp",
    exact=True,
    gives_bound=True,
    deterministic=False,
    supports_time_limit=True,
    backends=("ortools",),
    aliases=("bip",),
    description="exact MILP (OR-Tools SCIP): optimal plan and proven bound",
    interruptible=True,
    isolated=True,
    status_map=PYWRAPLP,
    options={
        "mip_gap": Option("float in [0, 1)", "SCIP's relative stopping gap"),
        "hint": Option("bool", "warm-start SCIP from the llep+ plan"),
        "threads": Option("int >= 1", "SCIP threads"),
    },
)
def solve_milp(
    problem: Any, *, time_limit: float | None = None, mip_gap: float = 1e-7, hint: bool = True, threads: int = 1
) -> PlacementSolution:
    """Exact MILP with SCIP; ``mip_gap`` is SCIP's relative stopping gap, ``hint`` warm-starts from llep+.
    Under ``time_limit`` a large model runs in a child process that the deadline stops."""
    t0 = time.perf_counter()
    if isinstance(mip_gap, bool) or not (isinstance(mip_gap, (int, float)) and 0 <= mip_gap < 1):
        raise ValueError(f"`mip_gap` must be a number in [0, 1), got {mip_gap!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive integer, got {threads!r}")
    return run_isolated(
        "milp",
        milp_inprocess,
        problem,
        {"mip_gap": float(mip_gap), "hint": bool(hint), "threads": int(threads)},
        time_limit=time_limit,
        start=t0,
    )


def milp_inprocess(
    problem: Any, *, time_limit: float | None = None, mip_gap: float, hint: bool, threads: int
) -> PlacementSolution:
    """:func:`solve_milp` in this process: the clock is checked between the steps, SCIP gets what is left."""
    t0 = time.perf_counter()

    def left() -> float | None:
        return None if time_limit is None else time_limit - (time.perf_counter() - t0)

    hint_x, upper = incumbent(problem) if hint else (None, None)
    if hint_x is not None and upper is not None and not np.isfinite(upper):  # (both are set, or neither)
        hint_x = None
    m = build_model(problem, upper)
    if m.a.shape[0] == 0:
        return PlacementSolution(
            method="milp",
            status=Status.OPTIMAL,
            objective=float("nan"),
            bound=0.0,
            assignment=np.zeros(problem.shape, dtype=np.int64),
        )
    rest = left()
    if rest is not None and rest <= 0:
        return _stopped(problem, hint_x, "time limit reached before the model was built")
    model = build(m, hint_x=None if hint_x is None else hint_x[m.active], mip_gap=mip_gap, threads=threads)
    rest = left()
    if rest is not None and rest <= 0.01:
        return _stopped(problem, hint_x, "time limit reached while building the model")
    raw = run(model, rest)
    return to_solution(problem, m, raw, time_limit, hint_x=hint_x)


def _stopped(problem: Any, hint_x: np.ndarray | None, msg: str) -> PlacementSolution:
    if hint_x is None:
        return PlacementSolution(method="milp", status=Status.TIME_LIMIT, objective=float("nan"), message=msg)
    return PlacementSolution(
        method="milp",
        status=Status.TIME_LIMIT,
        objective=float("nan"),
        assignment=hint_x,
        message=msg + "; returning the llep+ warm start",
    )
