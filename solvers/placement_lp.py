"""``lp``: the LP relaxation of the placement MILP (scipy HiGHS), a lower bound for every gap;
``lp-cvxpy``: the same relaxation written with explicit ``y`` variables in cvxpy, as a cross-check.

Relaxation: ``y[e, p]`` in [0, 1]. At an LP optimum ``y = x / M_e`` (``y`` only costs), so ``lp`` substitutes it
and keeps only ``x``; ``lp-cvxpy`` keeps ``y`` and the linking rows ``x <= M y``. Both return the bound and a
plan rounded from the LP's ``x`` (status ``feasible``: a rounded relaxation is not proven optimal).

Steps of ``lp``: :func:`build` (normalised model -> ``linprog`` arguments), :func:`run` (-> status name, x, value),
:func:`lp_bound_highs` (-> our status and the lower bound in the problem's units, via
:data:`._status.SCIPY_HIGHS` and :func:`._placement_model.lower_bound`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from ._cvxpy import import_cvxpy
from ._placement_model import PlacementModel, build_model, incumbent, lower_bound, round_plan, run_isolated
from ._status import CVXPY, SCIPY_HIGHS

__all__ = ["lp_bound_highs", "build", "run", "solve_lp", "solve_lp_cvxpy", "lp_inprocess", "lp_cvxpy_inprocess"]


def _full_plan(problem: Any, model: PlacementModel, xa: np.ndarray) -> np.ndarray:
    x = np.zeros(problem.shape, dtype=np.int64)
    x[model.active] = round_plan(model, xa)
    return x


def _model(problem: Any, tighten: bool) -> PlacementModel:
    return build_model(problem, incumbent(problem)[1] if tighten else None)


def build(m: PlacementModel) -> dict[str, Any]:
    """``linprog`` arguments of the x-only relaxation of model ``m`` (columns ``x[i, p]`` at ``i * P + p``, then
    T), in the model's normalised time unit."""
    from scipy.sparse import coo_matrix, vstack

    A, P = m.a.shape
    n = A * P
    Mx = np.where(m.M > 0, m.M, 1.0)  # x is fixed at 0 where M = 0
    coef = m.a + m.b / Mx  # device time per token once y = x / M
    cols = np.arange(n)
    rows_i = np.repeat(np.arange(A), P)
    rows_p = np.tile(np.arange(P), A)
    # device time rows: sum_i coef[i, p] x[i, p] - T <= 0
    time_rows = coo_matrix(
        (
            np.concatenate([coef.ravel(), -np.ones(P)]),
            (np.concatenate([rows_p, np.arange(P)]), np.concatenate([cols, np.full(P, n)])),
        ),
        shape=(P, n + 1),
    )
    ub_blocks, ub_rhs = [time_rows], [np.zeros(P)]
    if m.C is not None:
        ub_blocks.append(coo_matrix((np.ones(n), (rows_p, cols)), shape=(P, n + 1)))
        ub_rhs.append(np.full(P, float(m.C)))
    if m.F is not None:
        fw = (m.foreign / Mx).ravel()
        ub_blocks.append(coo_matrix((fw, (rows_p, cols)), shape=(P, n + 1)))
        ub_rhs.append(np.full(P, float(m.F)))
    A_eq = coo_matrix((np.ones(n), (rows_i, cols)), shape=(A, n + 1))
    c = np.zeros(n + 1)
    c[n] = 1.0
    bounds = np.zeros((n + 1, 2))
    bounds[:n, 1] = np.minimum(m.M, np.float64(m.loads.max())).ravel()
    bounds[n] = (0.0, np.inf)
    return {
        "c": c,
        "A_ub": vstack(ub_blocks).tocsr(),
        "b_ub": np.concatenate(ub_rhs),
        "A_eq": A_eq.tocsr(),
        "b_eq": m.loads.astype(np.float64),
        "bounds": bounds,
        "method": "highs",
        "shape": (A, P),
    }


def run(model: dict[str, Any], time_limit: float | None = None) -> dict[str, Any]:
    """Solve: ``{"code", "message", "x" [A, P] and "value" (normalised) when solved}``."""
    from scipy.optimize import linprog

    kw = {k: v for k, v in model.items() if k != "shape"}
    options: dict[str, Any] = {"presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = linprog(**kw, options=options)
    out: dict[str, Any] = {"code": SCIPY_HIGHS.name(res.status), "message": str(res.message)}
    if res.status == 0 and res.x is not None:
        A, P = model["shape"]
        out["x"] = res.x[: A * P].reshape(A, P)
        out["value"] = float(res.fun)
    return out


def lp_bound_highs(
    problem: Any, time_limit: float | None = None, *, tighten: bool = True, model: PlacementModel | None = None
) -> tuple[str, float | None, np.ndarray | None, str]:
    """Solve the x-only relaxation with HiGHS: (status, bound in the problem's time unit, ``[A, P]`` x, message)."""
    m = model if model is not None else _model(problem, tighten)
    A, P = m.a.shape
    if A == 0:
        return "optimal", 0.0, np.zeros((0, P)), "no tokens"
    raw = run(build(m), time_limit)
    ours = SCIPY_HIGHS.translate(raw["code"], time_limit=time_limit, has_solution="x" in raw)
    if ours == Status.OPTIMAL:
        return "optimal", lower_bound(m, raw["value"]), raw["x"], raw["message"]
    return ours.value, None, None, raw["message"]


@register(
    "placement",
    "lp",
    gives_bound=True,
    deterministic=True,
    supports_time_limit=True,
    backends=("scipy",),
    description="LP relaxation (scipy HiGHS): lower bound on the makespan, plus a rounded plan",
    isolated=True,
    status_map=SCIPY_HIGHS,
    options={
        "tighten": Option("bool", "tighten the big-M bounds with the llep+ makespan"),
    },
)
def solve_lp(problem: Any, *, time_limit: float | None = None, tighten: bool = True) -> PlacementSolution:
    """LP relaxation with HiGHS: the bound and a plan rounded from the LP's x (under ``time_limit`` a large
    model runs in a child process the deadline stops)."""
    return run_isolated(
        "lp",
        lp_inprocess,
        problem,
        {"tighten": bool(tighten)},
        time_limit=time_limit,
        start=time.perf_counter(),
    )


def lp_inprocess(problem: Any, *, time_limit: float | None = None, tighten: bool) -> PlacementSolution:
    """:func:`solve_lp` in this process (its options given in full: their defaults are :func:`solve_lp`'s)."""
    t0 = time.perf_counter()
    m = _model(problem, bool(tighten))
    if time_limit is not None:
        time_limit = max(1e-3, time_limit - (time.perf_counter() - t0))
    status, bound, xa, msg = lp_bound_highs(problem, time_limit, model=m)
    if status == "optimal":
        assert xa is not None  # lp_bound_highs returns the values with "optimal"
        x = _full_plan(problem, m, xa)
        return PlacementSolution(
            method="lp",
            status=Status.FEASIBLE,
            objective=float("nan"),
            bound=bound,
            assignment=x,
            stats={"lp_status": status, "incumbent": m.upper},
            message="rounded LP relaxation",
        )
    st = Status(status) if status in ("infeasible", "time_limit") else Status.ERROR
    return PlacementSolution(
        method="lp", status=st, objective=float("nan"), stats={"lp_status": status}, message=str(msg)
    )


@register(
    "placement",
    "lp-cvxpy",
    gives_bound=True,
    deterministic=True,
    supports_time_limit=True,
    backends=("cvxpy",),
    description="the same LP relaxation in cvxpy with explicit y (cross-check of `lp`)",
    isolated=True,
    status_map=CVXPY,
    options={
        "solver": Option("str | None", "the cvxpy solver (default HIGHS when installed)"),
        "tighten": Option("bool", "tighten the big-M bounds with the llep+ makespan"),
    },
)
def solve_lp_cvxpy(
    problem: Any, *, time_limit: float | None = None, solver: str | None = None, tighten: bool = True
) -> PlacementSolution:
    """LP relaxation written with explicit ``y`` and ``x <= M y``, solved through cvxpy (HiGHS when installed;
    under ``time_limit`` a large model runs in a child process the deadline stops)."""
    if solver is not None:
        _, installed = import_cvxpy()
        if solver not in installed:
            raise ValueError(f"`solver` {solver!r} is not installed for cvxpy; installed: {', '.join(installed)}")
    return run_isolated(
        "lp-cvxpy",
        lp_cvxpy_inprocess,
        problem,
        {"solver": solver, "tighten": bool(tighten)},
        time_limit=time_limit,
        start=time.perf_counter(),
    )


def lp_cvxpy_inprocess(
    problem: Any, *, time_limit: float | None = None, solver: str | None, tighten: bool
) -> PlacementSolution:
    """:func:`solve_lp_cvxpy` in this process."""
    import warnings

    cp, installed = import_cvxpy()

    t0 = time.perf_counter()
    m = _model(problem, bool(tighten))
    A, P = m.a.shape
    if A == 0:
        return PlacementSolution(
            method="lp-cvxpy",
            status=Status.FEASIBLE,
            objective=float("nan"),
            bound=0.0,
            assignment=np.zeros(problem.shape, dtype=np.int64),
        )
    x = cp.Variable((A, P), nonneg=True)
    y = cp.Variable((A, P), nonneg=True)
    T = cp.Variable()
    dev_time = cp.sum(cp.multiply(m.a, x), axis=0) + cp.sum(cp.multiply(m.b, y), axis=0)
    cons = [cp.sum(x, axis=1) == m.loads, x <= cp.multiply(m.M, y), y <= 1, dev_time <= T]
    if m.C is not None:
        cons.append(cp.sum(x, axis=0) <= m.C)
    if m.F is not None:
        cons.append(cp.sum(cp.multiply(m.foreign.astype(float), y), axis=0) <= m.F)
    prob = cp.Problem(cp.Minimize(T), cons)
    if solver is None:
        solver = "HIGHS" if "HIGHS" in installed else None
    kwargs: dict[str, Any] = {}
    if time_limit is not None and solver == "HIGHS":
        kwargs["time_limit"] = max(1e-3, float(time_limit) - (time.perf_counter() - t0))
    with warnings.catch_warnings():  # cvxpy warns on inaccurate answers; the status says it
        warnings.simplefilter("ignore")
        prob.solve(solver=solver, **kwargs)
    ours = CVXPY.translate(prob.status, time_limit=time_limit, has_solution=x.value is not None)
    if ours == Status.OPTIMAL:
        xf = np.zeros(problem.shape, dtype=np.int64)
        xf[m.active] = round_plan(m, x.value)
        return PlacementSolution(
            method="lp-cvxpy",
            status=Status.FEASIBLE,
            objective=float("nan"),
            bound=lower_bound(m, prob.value),
            assignment=xf,
            stats={"cvxpy_status": prob.status, "cvxpy_solver": prob.solver_stats.solver_name},
            message="rounded LP relaxation (cvxpy)",
        )
    # an inaccurate or interrupted LP proves no bound and its x is no plan
    st = ours if ours in (Status.INFEASIBLE, Status.TIME_LIMIT) else Status.ERROR
    if time_limit is not None and time.perf_counter() - t0 >= time_limit:
        st = Status.TIME_LIMIT
    return PlacementSolution(
        method="lp-cvxpy",
        status=st,
        objective=float("nan"),
        stats={"cvxpy_status": prob.status},
        message=f"cvxpy status {prob.status}",
    )
