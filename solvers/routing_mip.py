"""The exact binary program through OR-Tools' MIP interface (pywraplp: SCIP by default, or HiGHS / CBC).

Steps: :func:`build` (problem -> ``pywraplp.Solver`` loaded from an ``MPModelProto`` that OR-Tools'
model builder fills from a scipy sparse matrix in one call), :func:`run` (-> status, values, bound, as an
``MPSolutionResponse``), :func:`to_solution` (-> our answer; status from :data:`._status.PYWRAPLP`).

Scale: the back-end sees normalised scores in [0, 1] (:class:`._routing_common.RoutingScale`); the objective
and bound are mapped back, the bound raised by ``BOUND_TOL * T * k`` normalised units for the back-end's
tolerances (it was seen 37% off with raw scores near 1e-9). Time: under ``time_limit`` a large model runs in a
child process that the deadline stops (SCIP overran a 1 s limit by 1.7 s at 4096x64, HiGHS by 9 s).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._interrupt import interruptible
from ._routing_common import RoutingScale, certify_prices, drive
from ._status import PYWRAPLP

__all__ = ["solve_mip", "build", "run", "to_solution", "routing_matrix", "BACKENDS"]

BACKENDS = ("SCIP", "HIGHS", "CBC")
# allowance on the back-end's bound, per token slot, in normalised score units (its feasibility tolerances)
BOUND_TOL = 1e-6


def routing_matrix(problem: Any) -> tuple[Any, np.ndarray, np.ndarray]:
    """``(A [T + E', T * E] csr, lower, upper)``: token rows ``sum_e x = k``, then a capacity row per expert
    whose capacity is below T (variable ``t * E + e`` is x[t, e])."""
    import scipy.sparse as sp

    T, E = problem.shape
    cap = np.minimum(problem.capacity, T)
    tight = np.flatnonzero(cap < T)
    rows = sp.kron(sp.eye(T, format="csr"), np.ones((1, E)), format="csr")
    cols = sp.kron(np.ones((1, T)), sp.eye(E, format="csr")[tight], format="csr")
    A = sp.vstack([rows, cols], format="csr").astype(np.float64)
    lower = np.concatenate([np.full(T, float(problem.k)), np.full(tight.size, -np.inf)])
    upper = np.concatenate([np.full(T, float(problem.k)), cap[tight].astype(np.float64)])
    return A, lower, upper


def build(problem: Any, *, backend: str = "SCIP") -> Any:
    """A ``pywraplp.Solver`` of ``backend`` holding the binary program on normalised scores (maximised)."""
    from ortools.linear_solver import pywraplp
    from ortools.linear_solver.python import model_builder_helper as mbh

    T, E = problem.shape
    n = T * E
    scale = RoutingScale(problem.scores, problem.k)
    A, lower, upper = routing_matrix(problem)
    # Any: OR-Tools' stub spells the float arrays of fill_model_from_sparse_data ndarray[float64, ...], which no
    # array matches
    helper: Any = mbh.ModelBuilderHelper()
    helper.fill_model_from_sparse_data(
        np.zeros(n), np.ones(n), scale.normalise(problem.scores).ravel(), lower, upper, A
    )
    for i in range(n):
        helper.set_var_integrality(i, True)
    helper.set_maximize(True)
    solver = pywraplp.Solver.CreateSolver(backend)
    if solver is None:
        raise RuntimeError(f"OR-Tools was built without the {backend} back-end")
    err = solver.LoadModelFromProto(mbh.to_mpmodel_proto(helper))
    if err:
        raise RuntimeError(f"{backend} rejected the model: {err}")
    solver.SuppressOutput()
    return solver


def run(solver: Any, time_limit: float | None = None) -> dict[str, Any]:
    """Solve: ``{"code", "x" [T * E] (when a solution exists), "bound", "nodes"}``."""
    from ortools.linear_solver import linear_solver_pb2

    params = "misc/catchctrlc = FALSE\n" if solver.SolverVersion().startswith("SCIP") else ""
    if time_limit is not None:
        solver.SetTimeLimit(int(max(1, round(1000 * time_limit))))
        if params:  # SCIP also checks its own parameter inside presolve and the root LP
            params += f"limits/time = {max(0.01, time_limit):.3f}\n"
    if params:
        solver.SetSolverSpecificParametersAsString(params)
    with interruptible(solver.InterruptSolve):
        solver.Solve()
    resp = linear_solver_pb2.MPSolutionResponse()
    solver.FillSolutionResponseProto(resp)
    out: dict[str, Any] = {"code": PYWRAPLP.name(resp.status), "nodes": int(solver.nodes())}
    if len(resp.variable_value):
        out["x"] = np.asarray(resp.variable_value, dtype=np.float64)
        out["bound"] = float(resp.best_objective_bound)
    return out


def job(problem: Any, *, time_limit: float | None = None, backend: str) -> dict[str, Any]:
    """build + run (in this process or a child), ``time_limit`` what is left for the back-end."""
    return run(build(problem, backend=backend), time_limit)


def to_solution(
    problem: Any, raw: dict[str, Any], time_limit: float | None = None, *, backend: str = "SCIP"
) -> RoutingSolution:
    """Our answer from :func:`run`'s output."""
    T, E = problem.shape
    k = problem.k
    x = raw.get("x")
    status = PYWRAPLP.translate(raw["code"], time_limit=time_limit, has_solution=x is not None)
    stats = {"backend": backend, "backend_status": raw["code"], "nodes": raw.get("nodes")}
    if status == Status.INFEASIBLE:
        status = Status.ERROR  # a routing problem is feasible by construction
    if x is None:
        return RoutingSolution(
            method="mip", status=status, objective=float("nan"), stats=stats, message=f"{backend}: {raw['code']}"
        )
    scale = RoutingScale(problem.scores, k)
    vals = np.asarray(x).reshape(T, E)
    assignment = np.sort(np.argsort(-vals, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    bound = raw.get("bound")
    if bound is not None and np.isfinite(bound):
        bound = scale.upper(bound, allowance=BOUND_TOL * T * k)
    else:
        bound = None
    if status == Status.OPTIMAL:
        msg = f"{backend} proved optimality"
        bias = certify_prices(problem.scores, assignment, tol=1e-9 * scale.unit)
    else:
        msg, bias = f"{backend} stopped ({raw['code']}) with a feasible answer", None
    return RoutingSolution(
        method="mip",
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
    "mip",
    exact=True,
    gives_bound=True,
    deterministic=False,
    supports_time_limit=True,
    backends=("ortools",),
    description="exact binary program with OR-Tools MIP (SCIP, HiGHS or CBC)",
    interruptible=True,
    isolated=True,
    status_map=PYWRAPLP,
    options={
        "backend": Option("str", "the OR-Tools MIP back-end: SCIP, HIGHS or CBC"),
    },
)
def solve_mip(problem: Any, *, time_limit: float | None = None, backend: str = "SCIP") -> RoutingSolution:
    """Exact BIP through ``pywraplp``; ``backend`` is "SCIP" (default), "HIGHS" or "CBC"."""
    t0 = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return drive(
        "mip",
        problem,
        job,
        {"backend": backend},
        time_limit=time_limit,
        start=t0,
        guard=lambda stop: interruptible(stop),  # this module's: the interrupt tests watch it
        to_solution=lambda p, raw, tl: to_solution(p, raw, tl, backend=backend),
    )
