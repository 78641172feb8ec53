"""Routing heuristics: plain top-k (the unbalanced baseline) and the capacity-aware greedy."""

from __future__ import annotations

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import chosen_to_assignment, greedy_fill

__all__ = ["solve_topk", "solve_greedy"]


@register(
    "routing",
    "topk",
    gives_bound=True,
    deterministic=True,
    supports_time_limit=False,
    description="plain top-k ignoring capacity (unbalanced baseline)",
)
def solve_topk(problem, *, time_limit=None) -> RoutingSolution:
    """Plain top-k of the scores, ignoring capacity.

    Its objective is an upper bound on the capacitated optimum (it drops the capacity constraints), so it is
    reported as ``bound``; when an expert is over capacity the shared check marks the answer infeasible.
    """
    s = problem.scores
    k = problem.k
    idx = np.sort(np.argpartition(-s, k - 1, axis=1)[:, :k], axis=1).astype(np.int64)
    bound = float(np.take_along_axis(s, idx, axis=1).sum())
    return RoutingSolution(
        method="topk",
        status=Status.FEASIBLE,
        objective=float("nan"),
        bound=bound,
        assignment=idx,
        bias=np.zeros(problem.num_experts),
        message="top-k without capacity (its objective bounds the optimum)",
    )


@register(
    "routing",
    "greedy",
    deterministic=True,
    supports_time_limit=False,
    description="capacity-aware greedy: best scores first, overflow to next-best",
    per_step=True,
)
def solve_greedy(problem, *, time_limit=None) -> RoutingSolution:
    """Capacity-aware greedy: tokens propose their best experts, each expert keeps its highest-scored
    proposals up to capacity, and rejected tokens overflow to their next-best expert with room."""
    T, E = problem.shape
    chosen = np.zeros((T, E), dtype=bool)
    room = problem.capacity.copy()
    need = np.full(T, problem.k, dtype=np.int64)
    greedy_fill(problem.scores, chosen, room, need)
    left = int(need.sum())
    if left:
        return RoutingSolution(
            method="greedy",
            status=Status.ERROR,
            objective=float("nan"),
            message=f"greedy could not place {left} token slot(s): every expert with room was "
            f"already taken by those tokens",
        )
    return RoutingSolution(
        method="greedy",
        status=Status.FEASIBLE,
        objective=float("nan"),
        assignment=chosen_to_assignment(chosen, problem.k),
    )
