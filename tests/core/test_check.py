import numpy as np
import pytest

from moebalance import RoutingProblem, check, solve
from moebalance.routing import bias_reproduces, check_routing, routing_dual_bound


@pytest.fixture
def p():
    return RoutingProblem(np.array([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0]]), 2, capacity=[1, 2, 1])


def test_feasible(p):
    r = check_routing(p, np.array([[0, 1], [1, 2]]))
    assert r.feasible and r.objective == 3 + 2 + 3 + 2 and r.loads.tolist() == [1, 2, 1]
    assert r.load_ratio == 1.0


def test_duplicate_expert(p):
    r = check(p, np.array([[0, 0], [1, 2]]))
    assert not r.feasible and "same expert twice" in r.violations[0]


def test_over_capacity(p):
    r = check(p, np.array([[0, 1], [0, 1]]))
    assert not r.feasible and "over capacity" in r.violations[0] and r.load_ratio == 2.0


def test_out_of_range_and_shape(p):
    assert not check(p, np.array([[0, 3], [1, 2]])).feasible
    assert not check(p, np.array([[-1, 1], [1, 2]])).feasible
    assert not check(p, np.array([[0, 1]])).feasible


def test_non_problem():
    with pytest.raises(ValueError, match="problem"):
        check("routing", np.zeros((1, 1)))


def test_dual_bound_is_valid_for_any_price():
    rng = np.random.default_rng(0)
    p = RoutingProblem(rng.random((50, 6)), 2)
    opt = solve(p, "mcf").objective
    for _ in range(20):
        q = rng.normal(size=6)  # negative prices are clipped: still a valid bound
        assert routing_dual_bound(p, q) >= opt - 1e-9


def test_bias_reproduces_counts_tokens(p):
    a = np.array([[0, 1], [1, 2]])
    assert bias_reproduces(p, a, np.zeros(3)) == 1.0
    assert bias_reproduces(p, a, np.array([0.0, 5.0, 0.0])) == 0.0
