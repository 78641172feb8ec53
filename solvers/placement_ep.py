"""``ep``: standard expert parallelism, every expert's tokens computed on its home device."""

from __future__ import annotations

from typing import Any

import numpy as np

from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

__all__ = ["ep_assignment", "solve_ep"]


def ep_assignment(problem: Any) -> np.ndarray:
    """``[E, P]`` plan with ``x[e, home[e]] = load[e]`` and nothing else."""
    E, P = problem.shape
    x = np.zeros((E, P), dtype=np.int64)
    x[np.arange(E), problem.home] = problem.expert_loads
    return x


@register(
    "placement",
    "ep",
    deterministic=True,
    supports_time_limit=False,
    description="standard expert parallelism: every token on its expert's home device",
    per_step=True,
)
def solve_ep(problem: Any, *, time_limit: float | None = None) -> PlacementSolution:
    """Standard expert parallelism (the baseline every speedup is measured against)."""
    return PlacementSolution(
        method="ep", status=Status.FEASIBLE, objective=float("nan"), assignment=ep_assignment(problem)
    )
