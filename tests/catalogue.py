"""A catalogue of tiny routing problems with brute-force optima, shared by every routing solver test."""

from __future__ import annotations

import itertools
import math

import numpy as np

from moebalance import RoutingProblem


def brute_force_routing(problem: RoutingProblem) -> float:
    """The optimum by enumerating every k-subset per token (tiny problems only); -inf when infeasible."""
    T, E = problem.shape
    subsets = [np.array(c) for c in itertools.combinations(range(E), problem.k)]
    best = -np.inf

    def rec(t: int, loads: np.ndarray, value: float) -> None:
        nonlocal best
        if t == T:
            best = max(best, value)
            return
        for c in subsets:
            if np.all(loads[c] < problem.capacity[c]):
                loads[c] += 1
                rec(t + 1, loads, value + problem.scores[t, c].sum())
                loads[c] -= 1

    rec(0, np.zeros(E, dtype=np.int64), 0.0)
    return best


def tiny_random_problem(seed: int, T: int, E: int, *, random_capacity: bool = False) -> RoutingProblem:
    """A random routing problem small enough for :func:`brute_force_routing` (at most ~5000 assignments):
    k drawn in [1, E], T cut down to fit, scores on a 0.1 grid so that ties are common; with
    ``random_capacity`` random per-expert capacities, raised until a feasible routing exists."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, E + 1))
    per_token = math.comb(E, k)
    if per_token > 1:
        T = max(1, min(T, int(math.log(5000) / math.log(per_token))))
    cap = None
    if random_capacity:
        cap = rng.integers(0, T + 1, size=E)
        while np.minimum(cap, T).sum() < T * k:
            cap[rng.integers(E)] += 1
    return RoutingProblem(rng.random((T, E)).round(1), k, capacity=cap)


def _cases() -> list[tuple[str, RoutingProblem]]:
    rng = np.random.default_rng(7)
    cases = [
        # everyone wants expert 0 (capacity 2): two tokens must take their second choice
        (
            "hot-expert",
            RoutingProblem([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.0, 0.3], [0.6, 0.3, 0.1]], 1, capacity=2),
        ),
        # all scores tied: any balanced assignment is optimal
        ("all-ties", RoutingProblem(np.ones((4, 3)), 1, capacity=2)),
        # k = E: every token takes every expert
        ("k-equals-E", RoutingProblem(rng.random((3, 3)), 3)),
        # non-uniform capacities, one expert closed
        ("closed-expert", RoutingProblem(rng.random((4, 4)), 2, capacity=[4, 0, 2, 2])),
        # negative scores (logits), k = 2
        ("negative-logits", RoutingProblem(rng.normal(size=(4, 4)), 2, capacity=2)),
        # capacity_factor > 1 leaves slack
        ("slack", RoutingProblem(rng.random((5, 3)), 1, capacity_factor=1.5)),
        # one token
        ("single-token", RoutingProblem([[0.2, 0.5, 0.3]], 2)),
        # tight capacities: sum(capacity) == T * k
        ("tight", RoutingProblem(rng.random((4, 4)) ** 3, 2, capacity=[2, 2, 2, 2])),
    ]
    return cases


CATALOGUE = [(name, p, brute_force_routing(p)) for name, p in _cases()]
