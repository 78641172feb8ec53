"""``dual`` after issue 13: one price iteration, early stop on its certified gap, warm start, bias contract."""

import numpy as np
import pytest

from moebalance import RoutingProblem, Status, solve
from moebalance.check import bias_reproduces, routing_dual_bound
from moebalance.generate import routing_problem


@pytest.mark.parametrize("seed", range(4))
def test_bias_reproduces_or_is_withheld(seed):
    p = routing_problem(800, 16, 2, kind="zipf", imbalance=1.0 + seed * 0.5, seed=seed)
    d = solve(p, "dual")
    assert d.feasible
    q = d.stats["certificate_bias"]
    assert routing_dual_bound(p, q) >= solve(p, "fast").objective - 1e-9  # the certificate is valid
    if d.bias is not None:
        assert bias_reproduces(p, d.assignment, d.bias) == 1.0
    else:
        assert d.stats["repaired_slots"] > 0


def test_early_stop_on_certified_gap():
    p = routing_problem(2000, 32, 4, kind="zipf", seed=1)
    loose = solve(p, "dual", gap_tol=1e-2)
    tight = solve(p, "dual", gap_tol=0.0, iterations=64)
    opt = solve(p, "fast").objective
    assert loose.stats["iterations"] <= tight.stats["iterations"]
    assert loose.stats["certified_gap"] <= 1e-2 or loose.stats["iterations"] == 50
    # the certified gap is honest: bound >= optimum >= objective
    for d in (loose, tight):
        assert d.bound >= opt - 1e-9 and d.objective <= opt + 1e-9
        assert (d.bound - d.objective) / d.bound <= d.stats["certified_gap"] + 1e-12


def test_warm_start_and_validation():
    s = routing_problem(4000, 16, 2, kind="zipf", imbalance=1.5, seed=2).scores
    p1, p2 = RoutingProblem(s[:2000], 2), RoutingProblem(s[2000:], 2)
    q = solve(p1, "fast").bias
    opt = solve(p2, "fast").objective
    warm = solve(p2, "dual", warm_start=q, iterations=0)
    cold = solve(p2, "dual", iterations=0)
    # the previous batch's prices already certify this batch within 1%; zero prices (plain top-k) do not
    assert opt <= warm.bound < cold.bound
    assert (warm.bound - opt) / opt < 1e-2 < (cold.bound - opt) / opt
    assert warm.feasible and warm.status in (Status.FEASIBLE, Status.OPTIMAL)
    with pytest.raises(ValueError, match="gap_tol"):
        solve(p2, "dual", gap_tol=-1)
    with pytest.raises(ValueError, match="warm_start"):
        solve(p2, "dual", warm_start=[1.0])
