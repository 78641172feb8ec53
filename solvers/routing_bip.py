"""The exact binary program with OR-Tools CP-SAT.

Steps: :func:`build` (problem -> ``CpModel``, written straight into its proto from numpy arrays),
:func:`run` (model -> CP-SAT status, values, bound), :func:`to_solution` (-> our answer; status from
:data:`._status.CPSAT`).

Precision: CP-SAT takes integer objective coefficients. Scores are normalised
(:class:`._routing_common.RoutingScale`: shifted per token, which changes no optimum since every token takes
exactly k experts, and divided by the largest range) and scaled so that 1 becomes ``1 / precision`` (default
1e8); the rounding error is at most ``precision / 2`` per normalised score, so the reported bound adds
``T * k * precision`` (normalised units) to CP-SAT's bound, and an answer CP-SAT proves optimal is optimal for
the float scores to within that amount.

Time: under ``time_limit`` a large model is built and solved in a child process that the deadline stops
(CP-SAT alone overran a 1 s limit by 0.4-0.7 s at 4096x64 before finding anything).
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
from ._status import CPSAT

__all__ = ["solve_bip", "build", "run", "to_solution"]


def build(problem: Any, *, precision: float = 1e-8) -> Any:
    """The CP-SAT model of ``problem``: variable ``t * E + e`` is x[t, e]; rows, then capacity columns."""
    from ortools.sat.python import cp_model

    T, E = problem.shape
    k = problem.k
    scale = RoutingScale(problem.scores, k)
    ints = np.rint(scale.normalise(problem.scores) / precision).astype(np.int64)
    m = cp_model.CpModel()
    pr = m.proto
    pr.merge_text_format("variables { domain: [0, 1] }\n" * (T * E))
    idx = np.arange(T * E, dtype=np.int64).reshape(T, E)
    ones = [1] * E
    for t in range(T):
        lin = pr.constraints.add().linear
        lin.vars.extend(idx[t].tolist())
        lin.coeffs.extend(ones)
        lin.domain.extend([k, k])
    cap = np.minimum(problem.capacity, T)
    for e in np.flatnonzero(cap < T).tolist():
        lin = pr.constraints.add().linear
        lin.vars.extend(idx[:, e].tolist())
        lin.coeffs.extend([1] * T)
        lin.domain.extend([0, int(cap[e])])
    obj = pr.objective  # CP-SAT minimises: maximise sum(ints * x) as minimise -sum, reported times -1
    obj.vars.extend(idx.ravel().tolist())
    obj.coeffs.extend((-ints).ravel().tolist())
    obj.scaling_factor = -1.0
    return m


def run(model: Any, time_limit: float | None = None, *, workers: int = 0) -> dict[str, Any]:
    """Solve: ``{"code", "x" [n] (when a solution exists), "bound" (integer units)}``."""
    from ortools.sat.python import cp_model

    solver = cp_model.CpSolver()
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = float(time_limit)
    if workers:
        solver.parameters.num_workers = int(workers)
    solver.parameters.catch_sigint_signal = False  # Ctrl-C reaches interruptible, which stops the search
    with interruptible(solver.stop_search):
        code = solver.solve(model)
    name = CPSAT.name(code)
    out: dict[str, Any] = {
        "code": name,
        "bound": float(solver.best_objective_bound),
        "branches": int(solver.num_branches),
        "backend_wall_time": float(solver.wall_time),
    }
    if name in ("OPTIMAL", "FEASIBLE"):
        out["x"] = np.asarray(solver.response_proto.solution, dtype=np.int8)
    return out


def job(problem: Any, *, time_limit: float | None = None, precision: float, workers: int) -> dict[str, Any]:
    """build + run (in this process or a child), ``time_limit`` what is left for CP-SAT."""
    model = build(problem, precision=float(precision))
    return run(model, time_limit, workers=int(workers))


def to_solution(
    problem: Any, raw: dict[str, Any], time_limit: float | None = None, *, precision: float = 1e-8
) -> RoutingSolution:
    """Our answer from :func:`run`'s output."""
    T, E = problem.shape
    k = problem.k
    x = raw.get("x")
    status = CPSAT.translate(raw["code"], time_limit=time_limit, has_solution=x is not None)
    stats = {
        "backend_status": raw["code"],
        "precision": precision,
        "branches": raw.get("branches"),
        "backend_wall_time": raw.get("backend_wall_time"),
    }
    if status == Status.INFEASIBLE:
        status = Status.ERROR  # a routing problem is feasible by construction
    if x is None:
        return RoutingSolution(
            method="bip", status=status, objective=float("nan"), stats=stats, message=f"CP-SAT: {raw['code']}"
        )
    scale = RoutingScale(problem.scores, k)
    vals = np.asarray(x).reshape(T, E).astype(bool)
    assignment = np.sort(np.argsort(~vals, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    bound = scale.upper(raw["bound"] * precision, allowance=T * k * precision)
    if status == Status.OPTIMAL:
        msg = "CP-SAT proved optimality"
        bias = certify_prices(problem.scores, assignment, tol=2.0 * precision * scale.unit)
    else:
        msg, bias = f"CP-SAT stopped ({raw['code']}) with a feasible answer", None
    return RoutingSolution(
        method="bip",
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
    "bip",
    exact=True,
    gives_bound=True,
    deterministic=False,
    supports_time_limit=True,
    backends=("ortools",),
    description="exact binary program with OR-Tools CP-SAT",
    interruptible=True,
    isolated=True,
    status_map=CPSAT,
    options={
        "precision": Option("float in [1e-12, 1e-2]", "score resolution relative to the score range"),
        "workers": Option("int >= 0", "CP-SAT search workers (0: CP-SAT's default)"),
    },
)
def solve_bip(
    problem: Any, *, time_limit: float | None = None, precision: float = 1e-8, workers: int = 0
) -> RoutingSolution:
    """Exact BIP with CP-SAT. ``precision``: score resolution relative to the score range; ``workers``: CP-SAT
    search workers (0 = CP-SAT's default)."""
    t0 = time.perf_counter()
    if not (isinstance(precision, float) and 1e-12 <= precision <= 1e-2):
        raise ValueError(f"`precision` must be a float in [1e-12, 1e-2], got {precision!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"`workers` must be a non-negative integer, got {workers!r}")
    return drive(
        "bip",
        problem,
        job,
        {"precision": float(precision), "workers": int(workers)},
        time_limit=time_limit,
        start=t0,
        guard=lambda stop: interruptible(stop),  # this module's: the interrupt tests watch it
        to_solution=lambda p, raw, tl: to_solution(p, raw, tl, precision=float(precision)),
    )
