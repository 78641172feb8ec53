"""Exact routing as a min-cost flow with OR-Tools' ``SimpleMinCostFlow``.

Network: source tokens (supply k each) -> experts (one arc per token-expert pair, capacity 1, cost = quantised
``1 - normalised score``) -> sink (capacity ``capacity[e]``). Integral capacities give an integral optimal
flow, which is an optimal routing of the quantised scores.

Steps: :func:`build` (problem -> arc arrays), :func:`run` (arrays -> OR-Tools status and flows),
:func:`to_solution` (flows -> our answer, status from :data:`._status.MIN_COST_FLOW`).

Precision: OR-Tools needs integer costs. Scores are normalised (:class:`._routing_common.RoutingScale`:
shifted per token, which changes no optimum since each token sends exactly k units, and divided by the
largest range) and scaled to integers of at most ``max_cost`` (default 2**30); the rounding error is at most
``0.5 / max_cost`` per normalised score, so the reported bound adds ``T * k / max_cost`` (normalised units).
The back-end has no time limit; under ``time_limit`` a large network runs in a child process that the
deadline stops (see :mod:`._isolate`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Adapter, Option
from moebalance.registry import register_adapter
from moebalance.solution import RoutingSolution, Status

from ._routing_common import RoutingScale, certify_prices, drive
from ._status import MIN_COST_FLOW

__all__ = ["MinCostFlow", "solve_mcf", "build", "run", "to_solution"]


def build(problem: Any, *, max_cost: int = 2**30) -> dict[str, Any]:
    """Arc arrays of the network (``tail, head, capacity, cost`` over ``T * E + E`` arcs) and node supplies."""
    scale = RoutingScale(problem.scores, problem.k)
    T, E = problem.shape
    k = problem.k
    ints = np.rint(scale.normalise(problem.scores) * max_cost).astype(np.int64)
    tail = np.concatenate([np.repeat(np.arange(T, dtype=np.int32), E), np.arange(T, T + E, dtype=np.int32)])
    head = np.concatenate([np.tile(np.arange(T, T + E, dtype=np.int32), T), np.full(E, T + E, dtype=np.int32)])
    cap = np.concatenate([np.ones(T * E, dtype=np.int64), np.minimum(problem.capacity, T).astype(np.int64)])
    cost = np.concatenate([(max_cost - ints).ravel(), np.zeros(E, dtype=np.int64)])
    supplies = np.zeros(T + E + 1, dtype=np.int64)
    supplies[:T] = k
    supplies[T + E] = -T * k
    return {
        "tail": tail,
        "head": head,
        "capacity": cap,
        "cost": cost,
        "supplies": supplies,
        "T": T,
        "E": E,
        "max_cost": int(max_cost),
    }


def run(model: dict[str, Any], time_limit: float | None = None) -> dict[str, Any]:
    """Solve the network (no back-end time limit): ``{"code", "flows" [T, E]}``."""
    from ortools.graph.python import min_cost_flow

    smcf = min_cost_flow.SimpleMinCostFlow()
    smcf.add_arcs_with_capacity_and_unit_cost(model["tail"], model["head"], model["capacity"], model["cost"])
    smcf.set_nodes_supplies(np.arange(model["supplies"].size, dtype=np.int32), model["supplies"])
    code = smcf.solve()
    T, E = model["T"], model["E"]
    flows = smcf.flows(np.arange(T * E)).reshape(T, E) if code == smcf.OPTIMAL else None
    out: dict[str, Any] = {"code": MIN_COST_FLOW.name(code)}
    if flows is not None:
        out["flows"] = np.asarray(flows, dtype=np.int64)
    return out


def job(problem: Any, *, time_limit: float | None = None, max_cost: int) -> dict[str, Any]:
    """build + run (in this process or a child; the back-end has no time limit of its own)."""
    return run(build(problem, max_cost=int(max_cost)))


def to_solution(
    problem: Any, raw: dict[str, Any], time_limit: float | None = None, *, max_cost: int = 2**30
) -> RoutingSolution:
    """Our answer from :func:`run`'s output."""
    code = raw["code"]
    flows = raw.get("flows")
    status = MIN_COST_FLOW.translate(code, time_limit=time_limit, has_solution=flows is not None)
    scale = RoutingScale(problem.scores, problem.k)
    stats = {"backend_status": code, "max_cost": int(max_cost), "score_resolution": scale.unit / max_cost}
    if status != Status.OPTIMAL or flows is None:  # (translate gives OPTIMAL only with flows)
        return RoutingSolution(
            method="mcf",
            status=Status.ERROR if status == Status.INFEASIBLE else status,
            objective=float("nan"),
            stats=stats,
            message=f"OR-Tools min-cost flow returned {code}",
        )
    T, E = problem.shape
    k = problem.k
    assignment = np.sort(np.argsort(-flows, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    value = float(np.take_along_axis(scale.normalise(problem.scores), assignment, axis=1).sum())
    bound = scale.upper(value, allowance=T * k / max_cost)
    bias = certify_prices(problem.scores, assignment, tol=2.0 * scale.unit / max_cost)
    return RoutingSolution(
        method="mcf",
        status=Status.OPTIMAL,
        objective=float("nan"),
        bound=bound,
        assignment=assignment,
        bias=bias,
        stats=stats,
        message=f"optimal min-cost flow (score resolution {scale.unit / max_cost:.2e})",
    )


@register_adapter
class MinCostFlow(Adapter):
    """Exact routing by min-cost flow (OR-Tools): :func:`build` -> :func:`run` -> :func:`to_solution`. The
    back-end has no time limit of its own; under ``time_limit`` a large network runs in a child process the
    deadline stops (greedy answer then)."""

    family = "routing"
    name = "mcf"
    description = "exact min-cost flow (OR-Tools SimpleMinCostFlow)"
    exact = True
    gives_bound = True
    deterministic = True
    supports_time_limit = True
    isolated = True
    REQUIRED_MODULES = ("ortools",)
    STATUS_MAP = MIN_COST_FLOW
    OPTIONS = {
        "max_cost": Option("int in [1, 2**40]", "integer cost scale: score resolution is 1 / max_cost of the range"),
    }

    # its options are its own keywords (the registry checks them against OPTIONS): narrower than the base's **options
    def solve(  # type: ignore[override]
        self, problem: Any, *, time_limit: float | None = None, max_cost: int = 2**30
    ) -> RoutingSolution:
        t0 = time.perf_counter()
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, np.integer)) or not 1 <= max_cost <= 2**40:
            raise ValueError(f"`max_cost` must be an integer in [1, 2**40], got {max_cost!r}")
        return drive(
            self.name,
            problem,
            job,
            {"max_cost": int(max_cost)},
            time_limit=time_limit,
            start=t0,
            to_solution=lambda p, raw, tl: to_solution(p, raw, tl, max_cost=int(max_cost)),
        )


def solve_mcf(problem: Any, *, time_limit: float | None = None, **options: Any) -> RoutingSolution:
    """:meth:`MinCostFlow.solve` (options and their defaults: :class:`MinCostFlow`); unchecked, as every
    adapter's own solve: ``moebalance.solve(problem, "mcf")`` runs the shared check."""
    return _MCF.solve(problem, time_limit=time_limit, **options)


_MCF = MinCostFlow()
