"""Gap arithmetic. An exact match has gap 0 (also at 0 = 0), the gap is scale free and
defined for negative objectives, and the floor is relative to the problem's own magnitude."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moebalance import RoutingProblem, Status, solve
from moebalance.solution import GAP_FLOOR, relative_gap


@pytest.mark.parametrize("method", ["mcf", "bip", "mip", "lp"])
def test_zero_equals_zero_is_optimal(method):
    # the only feasible answer sends the token to expert 2, worth 0: objective 0 = bound 0
    p = RoutingProblem([[2.0, 0.0, 0.0]], 1, capacity=[0, 0, 1])
    sol = solve(p, method)
    assert sol.objective == 0.0
    assert sol.status == Status.OPTIMAL, sol.message
    assert sol.gap <= 1e-6  # within the solver's resolution, not the relative gap of 1 seen before


def test_negative_objective_gap():
    p = RoutingProblem(-np.array([[3.0, 1.0], [2.0, 5.0]]), 1, capacity=1)
    sol = solve(p, "mcf")
    assert sol.objective == -3.0 and sol.status == Status.OPTIMAL and sol.gap == pytest.approx(0.0, abs=1e-12)
    assert relative_gap(-2.0, -3.0, 10.0) == pytest.approx(1 / 3)


def test_gap_uses_the_larger_magnitude_and_the_floor():
    assert relative_gap(0.0, 0.0, 0.0) == 0.0
    assert relative_gap(1.0, 1.0, 1.0) == 0.0
    assert relative_gap(2.0, 1.0, 1.0) == pytest.approx(0.5)
    assert relative_gap(1.0, 2.0, 1.0) == pytest.approx(0.5)
    # near zero the floor (GAP_FLOOR * scale) keeps the gap finite and small for a tiny absolute miss
    assert relative_gap(1e-12, 0.0, 1.0) == pytest.approx(1e-12 / GAP_FLOOR)
    assert GAP_FLOOR * 1.0 > 1e-12
    assert math.isfinite(relative_gap(1e-300, 0.0, 0.0))


def _value():
    # magnitudes where floats scale exactly: the floor never drops below the smallest normal float
    return st.one_of(st.just(0.0), st.floats(1e-200, 1e6), st.floats(-1e6, -1e-200))


@given(_value(), _value(), st.floats(1e-12, 1e12))
def test_gap_is_scale_free(b, o, a):
    g = relative_gap(b, o, abs(b) + abs(o))
    ga = relative_gap(a * b, a * o, a * (abs(b) + abs(o)))
    assert 0.0 <= g <= 2.0
    assert ga == pytest.approx(g, rel=1e-9, abs=1e-12)


def test_claimed_optimal_without_bound_is_not_optimal():
    from moebalance.registry import _REGISTRY, register
    from moebalance.solution import RoutingSolution

    @register(RoutingProblem, "_nobound_liar", exact=True)
    def liar(p, *, time_limit=None):
        return RoutingSolution("x", Status.OPTIMAL, assignment=np.array([[2]]))

    try:
        sol = solve(RoutingProblem([[2.0, 0.0, 0.0]], 1, capacity=[0, 0, 1]), "_nobound_liar")
        assert sol.status == Status.FEASIBLE and "no valid bound" in sol.message
    finally:
        _REGISTRY[RoutingProblem].pop("_nobound_liar")
