"""Exact routing as a min-cost flow with OR-Tools' ``SimpleMinCostFlow``.

Network: source tokens (supply k each) -> experts (one arc per token-expert pair, capacity 1, cost = quantised
``rowmax - score``) -> sink (capacity ``capacity[e]``). Integral capacities give an integral optimal flow,
which is an optimal routing of the quantised scores.

Precision: OR-Tools needs integer costs. Scores are shifted per token (each token sends exactly k units, so
this changes no optimum) and scaled to integers of at most ``max_cost`` (default 2**30); the rounding error
is at most ``0.5 / scale`` per score, so the reported bound adds ``T * k / scale`` to the objective.
"""

from __future__ import annotations

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import integer_scores, prices_from_assignment

__all__ = ["solve_mcf"]


@register("routing", "mcf", exact=True, gives_bound=True, backends=("ortools",),
          options={"max_cost": 2**30}, description="exact min-cost flow (OR-Tools SimpleMinCostFlow)")
def solve_mcf(problem, *, time_limit=None, max_cost=2**30) -> RoutingSolution:
    """Exact routing by min-cost flow (OR-Tools). ``time_limit`` is not supported by the back-end: the solve
    runs to completion and ``stats['time_limit_supported']`` is False."""
    from ortools.graph.python import min_cost_flow

    if not isinstance(max_cost, (int, np.integer)) or not 1 <= max_cost <= 2**40:
        raise ValueError(f"`max_cost` must be an integer in [1, 2**40], got {max_cost!r}")
    s = problem.scores
    T, E = s.shape
    k = problem.k
    ints, rowmin, scale = integer_scores(s, int(max_cost))
    cost = int(max_cost) - ints  # maximise score == minimise (max - score)
    src = np.repeat(np.arange(T, dtype=np.int32), E)
    dst = np.tile(np.arange(T, T + E, dtype=np.int32), T)
    sink = T + E
    smcf = min_cost_flow.SimpleMinCostFlow()
    smcf.add_arcs_with_capacity_and_unit_cost(src, dst, np.ones(T * E, dtype=np.int64), cost.ravel())
    smcf.add_arcs_with_capacity_and_unit_cost(
        np.arange(T, T + E, dtype=np.int32), np.full(E, sink, dtype=np.int32),
        np.minimum(problem.capacity, T).astype(np.int64), np.zeros(E, dtype=np.int64))
    supplies = np.zeros(T + E + 1, dtype=np.int64)
    supplies[:T] = k
    supplies[sink] = -T * k
    smcf.set_nodes_supplies(np.arange(T + E + 1, dtype=np.int32), supplies)
    status = smcf.solve()
    stats = {"backend_status": str(status), "scale": scale, "max_cost": int(max_cost),
             "time_limit_supported": False}
    if status != smcf.OPTIMAL:
        return RoutingSolution(method="mcf", status=Status.ERROR, objective=float("nan"), stats=stats,
                        message=f"OR-Tools min-cost flow returned {status}")
    flows = smcf.flows(np.arange(T * E)).reshape(T, E)
    assignment = np.sort(np.argsort(-flows, axis=1, kind="stable")[:, :k], axis=1).astype(np.int64)
    objective = float(np.take_along_axis(s, assignment, axis=1).sum())
    bound = objective + T * k / scale
    bias = prices_from_assignment(s, assignment, tol=2.0 / scale)
    return RoutingSolution(method="mcf", status=Status.OPTIMAL, objective=objective, bound=bound,
                    assignment=assignment, bias=bias, stats=stats,
                    message=f"optimal min-cost flow (score resolution {1 / scale:.2e})")
