"""A catalogue of tiny placement problems with brute-force optima, shared by every placement solver test (the
placement twin of ``tests/catalogue.py``)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from moebalance import CostModel, PlacementProblem
from moebalance.plan import device_times


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        prev, out = -1, []
        for c in cuts:
            out.append(c - prev - 1)
            prev = c
        out.append(total + parts - 2 - prev)
        yield out


def brute_force_placement(p: PlacementProblem) -> float:
    """Optimal makespan by enumerating every integer plan (tiny instances only)."""
    E, P = p.shape
    rows = [list(_compositions(int(L), P)) for L in p.expert_loads]
    best = math.inf
    for combo in itertools.product(*rows):
        x = np.array(combo, dtype=np.int64)
        if p.max_tokens_per_device is not None and x.sum(axis=0).max() > p.max_tokens_per_device:
            continue
        if p.max_foreign_experts is not None:
            foreign = (x > 0) & (np.arange(P)[None, :] != p.home[:, None])
            if foreign.sum(axis=0).max() > p.max_foreign_experts:
                continue
        best = min(best, float(device_times(p, x).max()))
    return best


PLACEMENT_CATALOGUE = {
    "tokens-only": PlacementProblem([4, 1, 0, 3], 2, min_chunk=1, imbalance_threshold=None),
    "gemm+weight": PlacementProblem([5, 1, 1, 0, 2, 0], 3, cost=CostModel(1, 2, 3, 0), min_chunk=1),
    "transfer": PlacementProblem(
        [6, 2, 1, 1], 2, cost=CostModel(1, 0.5, 2.5, 0.25), min_chunk=1, imbalance_threshold=None
    ),
    "limits": PlacementProblem(
        [5, 3, 0, 0, 1, 1],
        3,
        cost=CostModel(1, 1, 1, 0),
        max_tokens_per_device=4,
        max_foreign_experts=1,
        min_chunk=1,
        imbalance_threshold=None,
    ),
    "custom-home": PlacementProblem([3, 3, 2], 2, home=[1, 1, 0], cost=CostModel(1, 0, 4, 0), min_chunk=1),
    "weights-dominate": PlacementProblem(
        [6, 0, 0, 0], 4, cost=CostModel(1, 0, 5, 0), min_chunk=1, imbalance_threshold=None
    ),
}


# name -> optimal makespan
PLACEMENT_OPTIMA = {name: brute_force_placement(p) for name, p in PLACEMENT_CATALOGUE.items()}
