"""The drop-in for DeepSeek EPLB's ``eplb.rebalance_experts``: any replication method behind EPLB's signature."""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import as_int
from .problem import ReplicationProblem, _weight_shape

__all__ = ["rebalance_experts"]


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    method: str = "eplb",
    old_phy2log: Any = None,
    max_moves: int | None = None,
    time_limit: float | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Drop-in for DeepSeek EPLB's ``eplb.rebalance_experts``: ``(phy2log, log2phy, logcnt)``.

    Args:
      weight: ``[L, E]`` load statistics (numpy array or torch tensor; ``[E]`` is taken as one layer).
      num_replicas: physical slots per layer, a multiple of ``num_gpus``.
      num_groups, num_nodes, num_gpus: as EPLB: the hierarchical policy (groups packed to nodes, replicas
        within a node) when ``num_groups % num_nodes == 0``, else the global one.
      method: any replication method (``moebalance.available_methods("replication")``); ``"eplb"`` is our
        own implementation of DeepSeek's algorithm, with identical outputs on tie-free inputs.
      old_phy2log, max_moves: the plan in place and the most replicas copied per layer (migration-aware
        methods such as ``eplb+`` and ``migrate`` honour them).
      time_limit, **options: passed to :func:`moebalance.solve`.

    Returns:
      ``phy2log [L, R]``, ``log2phy [L, E, X]`` (-1 padded), ``logcnt [L, E]``: numpy int64 for numpy input;
      torch int64 on ``weight``'s device for torch input.

    Raises :class:`moebalance.errors.ArgumentError` (both a ValueError and an AssertionError, as EPLB asserted)
    for bad input and :class:`moebalance.InfeasibleError` when the method returns no
    feasible plan (e.g. ``eplb`` under a ``max_moves`` it cannot meet).
    """
    from ..errors import ArgumentError, InfeasibleError
    from ..registry import solve

    is_torch = type(weight).__module__.startswith("torch")
    try:
        if len(_weight_shape(weight)) == 3:
            raise ValueError("`weight` must be [L, E] for rebalance_experts; use ReplicationProblem for a window")
        groups = as_int(num_groups, "num_groups", minimum=1)
        nodes = as_int(num_nodes, "num_nodes", minimum=1)
        hierarchical = groups % nodes == 0
        problem = ReplicationProblem(
            weight,
            num_replicas,
            num_groups=groups if hierarchical else 1,
            num_nodes=nodes if hierarchical else 1,
            num_gpus=num_gpus,
            old_phy2log=old_phy2log,
            max_moves=max_moves,
        )
    except ArgumentError:
        raise
    except ValueError as exc:  # EPLB asserted its arguments: callers may catch AssertionError
        raise ArgumentError(str(exc)) from None
    try:
        sol: Any = solve(problem, method, time_limit=time_limit, **options)
    except InfeasibleError:
        raise
    except ArgumentError:
        raise
    except ValueError as exc:  # an unknown method or option, a bad time limit
        raise ArgumentError(str(exc)) from None
    if not sol.feasible:
        hint = ""
        if problem.max_moves is not None:
            from ..solvers.replication_eplb import BUDGET_METHODS

            hint = f"; under max_moves, {BUDGET_METHODS} honour the budget"
        raise InfeasibleError(f"method {sol.method!r} returned no feasible plan ({sol.status}): {sol.message}{hint}")
    assert isinstance(sol, problem.solution_type)  # what solve returns for the family
    out = (sol.phy2log, sol.log2phy, sol.logcnt)
    if is_torch:
        import torch

        return tuple(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int64, device=weight.device) for x in out)  # type: ignore[return-value]
    return out
