"""The placement constructor never declares a feasible problem infeasible.

It keeps only proven necessary conditions; on random tight instances an independent MILP (scipy's HiGHS,
written here from the problem's definition) must find no plan whenever the constructor raises."""

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from moebalance import InfeasibleError, PlacementProblem


def independent_feasible(loads, P, home, C, F):
    """Is there an integer plan x [E, P] >= 0 with rows = loads, columns <= C, foreign experts per device <= F?"""
    loads = np.asarray(loads)
    E = loads.shape[0]
    n = E * P
    # variables: x (n, integer) then y (n, binary); x <= load_e * y
    A, lo, hi = [], [], []
    for e in range(E):
        row = np.zeros(2 * n)
        row[e * P : (e + 1) * P] = 1
        A.append(row)
        lo.append(loads[e])
        hi.append(loads[e])
    for p in range(P):
        row = np.zeros(2 * n)
        row[p:n:P] = 1
        A.append(row)
        lo.append(-np.inf)
        hi.append(C)
        row = np.zeros(2 * n)
        for e in range(E):
            if home[e] != p:
                row[n + e * P + p] = 1
        A.append(row)
        lo.append(-np.inf)
        hi.append(F)
    for i in range(n):
        row = np.zeros(2 * n)
        row[i] = 1
        row[n + i] = -loads[i // P]
        A.append(row)
        lo.append(-np.inf)
        hi.append(0)
    res = milp(
        np.zeros(2 * n),
        constraints=LinearConstraint(np.array(A), lo, hi),
        integrality=np.ones(2 * n),
        bounds=Bounds(0, np.concatenate([np.repeat(loads, P), np.ones(n)])),
    )
    return res.status == 0


def test_issue_example_is_feasible():
    # expert 0 as [8, 0, 4] and expert 1 as [2, 10, 0] meet both limits
    p = PlacementProblem([12, 12, 0], 3, max_tokens_per_device=10, max_foreign_experts=1)
    assert independent_feasible([12, 12, 0], 3, [0, 1, 2], 10, 1)
    assert p.max_tokens_per_device == 10


@pytest.mark.parametrize("seed", range(60))
def test_never_refuses_a_feasible_instance(seed):
    rng = np.random.default_rng(seed)
    P = int(rng.integers(2, 4))
    E = P * int(rng.integers(1, 3))
    loads = rng.integers(0, 10, E)
    if rng.random() < 0.5:
        loads[rng.integers(E)] += 15  # a hot expert
    home = np.arange(E) // (E // P)
    total = int(loads.sum())
    C = int(np.ceil(total / P)) + int(rng.integers(0, 3))
    F = int(rng.integers(0, 3))
    try:
        PlacementProblem(loads, P, max_tokens_per_device=C, max_foreign_experts=F)
    except InfeasibleError:
        assert not independent_feasible(loads, P, home, C, F), (loads.tolist(), P, C, F)


def test_the_random_instances_cover_both_outcomes():
    # the property above is only meaningful if some instances are refused and some are not
    raised = feasible = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        P = int(rng.integers(2, 4))
        E = P * int(rng.integers(1, 3))
        loads = rng.integers(0, 10, E)
        if rng.random() < 0.5:
            loads[rng.integers(E)] += 15
        C = int(np.ceil(int(loads.sum()) / P)) + int(rng.integers(0, 3))
        F = int(rng.integers(0, 3))
        feasible += independent_feasible(loads, P, np.arange(E) // (E // P), C, F)
        try:
            PlacementProblem(loads, P, max_tokens_per_device=C, max_foreign_experts=F)
        except InfeasibleError:
            raised += 1
    assert raised >= 5 and feasible >= 20
