"""The routing family's file schema (read and written by :mod:`moebalance.io`).

kind      "routing" (files without ``kind`` are routing problems: the first files had none)
scores    [T, E] numbers
k         int
capacity  optional: an int or [E] ints (omit to use capacity_factor)
capacity_factor  optional number (default 1.0); when given with ``capacity`` it must produce that capacity
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..family import ARRAY_OF_FLOATS, ARRAY_OF_INTS
from .problem import RoutingProblem

__all__ = ["to_dict", "from_dict", "SOLUTION_FIELDS", "KEYS"]

KEYS = {"kind", "scores", "k", "capacity", "capacity_factor"}

# how a saved RoutingSolution's own fields are read back
SOLUTION_FIELDS = {"loads": ARRAY_OF_INTS, "bias": ARRAY_OF_FLOATS}


def to_dict(problem: RoutingProblem) -> dict[str, Any]:
    """The file schema of ``problem``: its ``to_dict()`` plus the ``capacity_factor`` the capacity came from."""
    d = dict(problem.to_dict())
    cf = problem.capacity_factor
    if cf is not None:
        d["capacity_factor"] = float(cf)
    return d


def from_dict(d: dict[str, Any]) -> RoutingProblem:
    """Inverse of :func:`to_dict`; ValueError naming a missing, unknown or inconsistent key."""
    missing = [key for key in ("scores", "k") if key not in d]
    if missing:
        raise ValueError(f"routing problem lacks key(s) {', '.join(missing)}")
    unknown = set(d) - KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(KEYS))}")
    capacity, cf = d.get("capacity"), d.get("capacity_factor", 1.0)
    if capacity is not None and "capacity_factor" in d and cf is not None:
        # written by save_problem: the capacity came from the factor; rebuild it so and check it agrees
        problem = RoutingProblem(d["scores"], d["k"], capacity_factor=cf)
        given = np.asarray(capacity)
        fits = given.dtype != object and given.ndim <= 1 and given.size in (1, problem.num_experts)
        if not fits or not np.array_equal(problem.capacity, np.broadcast_to(given, problem.capacity.shape)):
            raise ValueError(f"`capacity` disagrees with `capacity_factor`={cf!r}")
        return problem
    return RoutingProblem(d["scores"], d["k"], capacity=capacity, capacity_factor=1.0 if cf is None else cf)
