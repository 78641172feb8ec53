"""Coefficients shared by the placement LP and MILP (private: no solver registers here).

Costs are divided by a unit (the token time when it is positive, else the largest other cost) so that
back-end tolerances act on numbers of order "tokens", not on seconds of order 1e-8. The unit scales with the
costs (no floor: a floor of 1.0 once let SCIP call a plan optimal at twice the optimum with
``gemm_time=1e-7``), so the back-end model is the same at every scale of the cost model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "PlacementModel",
    "build_model",
    "incumbent",
    "round_plan",
    "time_unit",
    "lower_bound",
    "BOUND_TOL",
    "run_isolated",
    "stopped",
    "normalised_problem",
]

# relative allowance on a back-end's lower bound for its feasibility tolerances (normalised units)
BOUND_TOL = 1e-7


def time_unit(cost: Any) -> float:
    """The unit every device time is divided by: ``token_time`` when positive, else the largest other cost,
    else 1 (all costs zero: every plan has makespan 0)."""
    if cost.token_time > 0:
        return float(cost.token_time)
    rest = max(cost.gemm_time, cost.weight_time, cost.token_transfer_time)
    return float(rest) if rest > 0 else 1.0


def lower_bound(model: PlacementModel, value: float, *, integral: bool = False) -> float:
    """A back-end's lower bound ``value`` (normalised units) in the problem's units, lowered by ``BOUND_TOL``
    relative for its tolerances; with integral device times the optimum is an integer, so the bound rounds up
    to the next one once that allowance is taken."""
    v = float(value)
    low = v - BOUND_TOL * max(1.0, abs(v))
    if integral:
        low = max(low, float(np.ceil(v - 1e-6)))
    return max(0.0, low) * model.unit


@dataclasses.dataclass
class PlacementModel:
    """Normalised data of a placement problem, restricted to the experts with tokens.

    active:  ``[A]`` indices of the experts with load > 0.
    loads:   ``[A]`` their loads.
    M:       ``[A, P]`` big-M of ``x <= M y``: ``min(load, max_tokens_per_device, (U - b) / a)`` where ``U`` is
             the makespan of a known feasible plan (a plan with makespan <= U has ``a x + b <= U`` wherever
             ``x > 0``, so the cut keeps every plan at least as good as the incumbent, the optimum included).
    a:       ``[A, P]`` time per token of expert e on device p (token time, plus transfer time when foreign).
    b:       ``[A, P]`` fixed time when e runs on p (GEMM time, plus weight time when foreign).
    foreign: ``[A, P]`` bool, p is not e's home.
    unit:    the time unit all of the above are divided by.
    upper:   the incumbent makespan ``U`` used (problem units), or None.
    """

    active: np.ndarray
    loads: np.ndarray
    M: np.ndarray
    a: np.ndarray
    b: np.ndarray
    foreign: np.ndarray
    unit: float
    P: int
    C: int | None
    F: int | None
    upper: float | None = None

    def integral_times(self) -> bool:
        """True when every device time is an integer in this unit for integer plans (then T can be integer)."""
        return bool(np.all(self.a == np.round(self.a)) and np.all(self.b == np.round(self.b)))


def build_model(problem: Any, upper: float | None = None) -> PlacementModel:
    """Normalised coefficients of ``problem``; ``upper``, the makespan of a feasible plan, tightens big-M."""
    c = problem.cost
    unit = time_unit(c)
    loads_all = problem.expert_loads
    active = np.flatnonzero(loads_all > 0)
    loads = loads_all[active].astype(np.int64)
    P = problem.num_devices
    foreign = np.ones((active.size, P), dtype=bool)
    foreign[np.arange(active.size), problem.home[active]] = False
    a = (c.token_time + c.token_transfer_time * foreign) / unit
    b = (c.gemm_time + c.weight_time * foreign) / unit
    C = problem.max_tokens_per_device
    M = np.broadcast_to((np.minimum(loads, C) if C is not None else loads)[:, None], a.shape).astype(np.float64)
    if upper is not None and np.isfinite(upper):
        u = upper / unit
        with np.errstate(divide="ignore", invalid="ignore"):
            cut = np.where(a > 0, np.floor((u - b) / a * (1 + 1e-12) + 1e-9), np.where(b <= u, np.inf, 0.0))
        M = np.minimum(M, np.maximum(cut, 0.0))
    return PlacementModel(
        active,
        loads,
        M,
        a,
        b,
        foreign,
        unit,
        P,
        C,
        problem.max_foreign_experts,
        None if upper is None else float(upper),
    )


def normalised_costs(cost: Any) -> tuple[float, float, float, float]:
    """``(token_time, gemm_time, weight_time, token_transfer_time)`` divided by :func:`time_unit` and rounded to
    12 significant digits: bit-identical at every scale of the cost model."""
    unit = time_unit(cost)
    return tuple(
        float(f"{v / unit:.12g}") for v in (cost.token_time, cost.gemm_time, cost.weight_time, cost.token_transfer_time)
    )  # type: ignore[return-value]


def normalised_problem(problem: Any) -> Any:
    """``problem`` with every cost divided by :func:`time_unit` and rounded to 12 significant digits: the same
    plans and constraints, makespans divided by the unit (to within 1e-12). The rounding makes the costs
    bit-identical at every scale, so heuristics run on it (whose ties a last-bit difference can flip) give the
    same plan at every scale of the cost model."""
    from moebalance.placement import PlacementProblem

    unit = time_unit(problem.cost)
    d = problem.to_dict()
    d["cost"] = {name: float(f"{value / unit:.12g}") for name, value in d["cost"].items()}
    return PlacementProblem.from_dict(d)


def incumbent(problem: Any) -> tuple[np.ndarray, float]:
    """An llep+ plan ``[E, P]`` (searched up to ``4 (E + P)`` moves) and its makespan (inf when it breaks a
    limit, so it bounds nothing). The search runs on :func:`normalised_problem`, so the plan (and every cut
    it tightens) does not depend on the scale of the costs."""
    from moebalance.plan import check_placement

    from .placement_llep import llep_for, plan_to_assignment
    from .placement_llep_plus import improve_plan

    E, P = problem.shape
    norm = normalised_problem(problem)
    # a longer search than llep+'s default: a lower incumbent tightens every cut
    x0 = plan_to_assignment(llep_for(norm, spilled_only=True), problem.expert_loads, problem.home)
    x, _, _ = improve_plan(norm, x0, max_moves=4 * (E + P))
    res = check_placement(problem, x)
    return x, (res.objective if res.feasible else float("inf"))


def round_plan(model: PlacementModel, xa: np.ndarray) -> np.ndarray:
    """Integer ``[A, P]`` plan from a fractional one: per expert, floor then hand out the remainder by largest
    fractional part, preferring devices that stay within ``max_tokens_per_device``. Rows keep their loads."""
    xa = np.clip(np.asarray(xa, dtype=np.float64), 0.0, None)
    # rescale rows so they sum to the loads exactly before rounding (solver tolerances)
    sums = xa.sum(axis=1, keepdims=True)
    xa = np.where(sums > 0, xa * (model.loads[:, None] / np.where(sums > 0, sums, 1.0)), 0.0)
    fl = np.floor(xa + 1e-9).astype(np.int64)
    frac = xa - fl
    short = model.loads - fl.sum(axis=1)
    dev = fl.sum(axis=0)
    for i in np.flatnonzero(short > 0):
        order = np.argsort(-frac[i], kind="stable")
        need = int(short[i])
        if model.C is not None:
            # devices with room first, then the rest in fractional order
            room = dev[order] < model.C
            order = np.concatenate([order[room], order[~room]])
        for p in order[:need]:
            fl[i, p] += 1
            dev[p] += 1
    over = fl.sum(axis=1) - model.loads
    for i in np.flatnonzero(over > 0):  # floor + 1e-9 can overshoot by a token
        for _ in range(int(over[i])):
            p = int(np.argmax(fl[i]))
            fl[i, p] -= 1
    return fl


def stopped(problem: Any, method: str) -> Any:
    """What a placement solve stopped by its deadline answers: the llep+ plan (:func:`incumbent`), status
    ``time_limit``."""
    from moebalance.solution import PlacementSolution, Status

    x, _ = incumbent(problem)
    return PlacementSolution(method=method, status=Status.TIME_LIMIT, assignment=x, message="returning the llep+ plan")


def run_isolated(
    method: str,
    func: Callable[..., Any],
    problem: Any,
    options: dict[str, Any],
    *,
    time_limit: float | None,
    start: float,
) -> Any:
    """``func(problem, time_limit=..., **options)`` (a placement solver's in-process solve, returning its
    Solution) under the hard deadline of :func:`._isolate.solve_bounded`: in this process when there is no
    limit or the model is small, else in a child process that the deadline stops; then the answer is the llep+
    plan with status ``time_limit``."""
    from ._isolate import solve_bounded

    E, P = problem.shape
    return solve_bounded(
        method,
        problem,
        func,
        options,
        time_limit=time_limit,
        start=start,
        fallback=lambda: stopped(problem, method),
        cells=E * P,
    )
