"""``eplb+`` and ``migrate``: local search on replication plans (ours).

- ``eplb+`` starts from EPLB's plan and improves it with swaps and re-splits (``_replication_search``): better
  packing and better replica counts, never worse than ``eplb`` (every accepted move lowers the objective or
  keeps it). A window ``[B, L, E]`` is optimised for its own objective (the mean over batches), not for the
  summed loads. With an old plan, the GPUs are relabelled to keep as many replicas in place as possible (loads
  unchanged); with ``max_moves``, the search from EPLB's plan runs only where that plan meets the budget, a
  search from the old plan runs under the budget, and each layer keeps the better of the two.
- ``migrate``: the fast migration heuristic: the same search started from ``old_phy2log``, every accepted
  move within ``max_moves`` (unlimited without it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.replication import ReplicationProblem, ReplicationSolution, count_moves, gpu_loads
from moebalance.solution import Status

from ._replication_search import local_search, relabel_gpus
from ._replication_search import relink as path_relink
from .replication_eplb import eplb_for

__all__ = ["solve_eplb_plus", "solve_migrate", "improve"]


def _layer_objective(problem: ReplicationProblem, phy2log: np.ndarray) -> np.ndarray:
    return gpu_loads(problem.weight, phy2log, problem.num_gpus).max(axis=2).mean(axis=0)  # [L]


def improve(
    problem: ReplicationProblem,
    start: np.ndarray,
    *,
    budget: bool = True,
    max_rounds: int = 10_000,
    deadline: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Local search from ``start [L, R]`` under the problem's constraints (the move budget if ``budget``)."""
    W = np.transpose(problem.weight, (1, 0, 2))  # [L, B, E]
    return local_search(
        W,
        start,
        problem.num_gpus,
        num_groups=problem.num_groups,
        num_nodes=problem.num_nodes,
        old=problem.old_phy2log if budget else None,
        max_moves=problem.max_moves if budget else None,
        max_rounds=max_rounds,
        deadline=deadline,
    )


def _check_rounds(max_rounds: Any) -> int:
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, (int, np.integer)) or max_rounds < 0:
        raise ValueError(f"`max_rounds` must be a non-negative integer, got {max_rounds!r}")
    return int(max_rounds)


def _deadline(time_limit: float | None) -> float | None:
    return None if time_limit is None else time.perf_counter() + time_limit


@register(
    ReplicationProblem,
    "eplb+",
    supports_time_limit=True,
    description="EPLB then local search (swaps, re-splits of replica counts), never worse than eplb; "
    "window-aware and migration-aware",
    per_step=True,
    options={
        "max_rounds": Option("int >= 0", "local-search rounds (0: EPLB relabelled)"),
        "starts": Option(
            "sequence of float", "further starts: replica counts ceil(load / (theta * mean GPU load)) for each theta"
        ),
        "relink": Option("bool", "under a move budget, also walk from the old plan towards the unconstrained plan"),
    },
)
def solve_eplb_plus(
    problem: ReplicationProblem,
    *,
    time_limit: float | None = None,
    max_rounds: int = 10_000,
    starts: Any = (),
    relink: bool = True,
) -> ReplicationSolution:
    """EPLB's plan improved by local search; ``max_rounds`` caps the search rounds (0: EPLB relabelled);
    ``starts``: further starts whose replica counts are ``ceil(load / (theta * mean GPU load))`` for each
    theta (then EPLB's greedy for the slots left), searched too (without a move budget); ``relink``: under a
    move budget, also walk from the old plan towards the unconstrained plan (path relinking), then search."""
    relink_target = bool(relink)
    max_rounds = _check_rounds(max_rounds)
    try:
        starts = tuple(float(t) for t in starts)
    except (TypeError, ValueError):
        raise ValueError(f"`starts` must be a sequence of positive numbers, got {starts!r}") from None
    if not all(np.isfinite(t) and t > 0 for t in starts):
        raise ValueError(f"`starts` must be a sequence of positive numbers, got {starts!r}")
    deadline = _deadline(time_limit)
    E, G = problem.num_experts, problem.num_gpus
    start, _ = eplb_for(problem)
    old = problem.old_phy2log
    if old is not None:
        start = relabel_gpus(start, old, E, G, problem.num_nodes)
    stats: dict[str, Any] = {}
    if problem.max_moves is None:
        plan, st = improve(problem, start, budget=False, max_rounds=max_rounds, deadline=deadline)
        best = _layer_objective(problem, plan)
        for theta in starts:  # other replica counts, each searched; every layer keeps its best plan
            if deadline is not None and time.perf_counter() > deadline:
                break
            p2, _ = improve(
                problem, eplb_for(problem, theta=theta)[0], budget=False, max_rounds=max_rounds, deadline=deadline
            )
            obj = _layer_objective(problem, p2)
            better = obj < best * (1 - 1e-12)
            plan = np.where(better[:, None], p2, plan)
            best = np.minimum(best, obj)
            st[f"layers_from_theta_{theta}"] = int(better.sum())
        if old is not None:
            plan = relabel_gpus(plan, old, E, G, problem.num_nodes)
        stats.update(st)
    else:
        assert old is not None  # max_moves needs old_phy2log (ReplicationProblem checks)
        within = count_moves(old, start, E, G) <= problem.max_moves
        plan, st = improve(problem, old, max_rounds=max_rounds, deadline=deadline)
        stats.update({f"from_old_{k}": v for k, v in st.items()})
        if within.any():
            p2, st2 = improve(problem, start, max_rounds=max_rounds, deadline=deadline)
            stats.update({f"from_eplb_{k}": v for k, v in st2.items()})
            better = within & (_layer_objective(problem, p2) < _layer_objective(problem, plan))
            plan = np.where(better[:, None], p2, plan)
        stats["layers_from_eplb"] = int(within.sum())
        if relink_target and not within.all() and problem.max_moves > 0:
            # path relinking: walk from the old plan towards the unconstrained eplb+ plan within the budget
            free, _ = improve(problem, start, budget=False, max_rounds=max_rounds, deadline=deadline)
            free = relabel_gpus(free, old, E, G, problem.num_nodes)
            W = np.transpose(problem.weight, (1, 0, 2))
            mid = path_relink(
                W,
                old,
                free,
                G,
                num_groups=problem.num_groups,
                num_nodes=problem.num_nodes,
                old=old,
                max_moves=problem.max_moves,
                deadline=deadline,
            )
            p3, _ = improve(problem, mid, max_rounds=max_rounds, deadline=deadline)
            better = _layer_objective(problem, p3) < _layer_objective(problem, plan) * (1 - 1e-12)
            plan = np.where(better[:, None], p3, plan)
            stats["layers_from_relinking"] = int(better.sum())
    timed_out = deadline is not None and time.perf_counter() > deadline
    status = Status.TIME_LIMIT if timed_out else Status.FEASIBLE
    return ReplicationSolution(
        method="eplb+",
        status=status,
        assignment=plan,
        stats=stats,
        message="EPLB + local search" + (" (stopped by the time limit)" if timed_out else ""),
    )


@register(
    ReplicationProblem,
    "migrate",
    supports_time_limit=True,
    requires=("old_phy2log",),
    description="fast migration heuristic: local search from old_phy2log within max_moves per layer",
    per_step=True,
    options={
        "max_rounds": Option("int >= 0", "local-search rounds"),
    },
)
def solve_migrate(
    problem: ReplicationProblem, *, time_limit: float | None = None, max_rounds: int = 10_000
) -> ReplicationSolution:
    """Local search from the old plan, each accepted move within the per-layer move budget."""
    max_rounds = _check_rounds(max_rounds)
    if problem.old_phy2log is None:
        raise ValueError("method 'migrate' needs `old_phy2log` (the plan in place) on the problem")
    deadline = _deadline(time_limit)
    plan, st = improve(problem, problem.old_phy2log, max_rounds=max_rounds, deadline=deadline)
    timed_out = deadline is not None and time.perf_counter() > deadline
    return ReplicationSolution(
        method="migrate",
        status=Status.TIME_LIMIT if timed_out else Status.FEASIBLE,
        assignment=plan,
        stats=st,
        message="local search from the old plan",
    )
