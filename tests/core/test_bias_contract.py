"""`Solution.bias` keeps its contract for every method that returns it: top-k of
`scores - bias` reproduces the assignment up to ties. A price that only certifies the bound is kept in
`stats["certificate_price"]`, and its bound still counts."""

import numpy as np
import pytest

import moebalance as mb
from moebalance import RoutingProblem, Status, solve
from moebalance.registry import _REGISTRY, register
from moebalance.routing import bias_reproduces, routing_dual_bound
from moebalance.solution import RoutingSolution


def _instances():
    rng = np.random.default_rng(3)
    out = []
    for T, E, k in [(60, 4, 1), (80, 6, 2), (50, 8, 3)]:
        out.append(RoutingProblem(rng.random((T, E)) ** 3, k, capacity_factor=1.0))
        out.append(RoutingProblem(np.round(rng.random((T, E)), 1), k, capacity_factor=1.2))  # many ties
    return out


@pytest.mark.parametrize("method", mb.available_methods("routing"))
def test_every_returned_bias_reproduces_its_assignment(method):
    for p in _instances():
        sol = solve(p, method, time_limit=10)
        if sol.bias is None or not sol.feasible:
            continue
        # recomputed here, not read from the solution's stats
        assert bias_reproduces(p, sol.assignment, sol.bias) == 1.0, method
        assert sol.bound is not None and sol.bound >= sol.objective - 1e-9 * p.objective_scale()


def test_exact_methods_return_a_reproducing_bias():
    p = _instances()[1]
    for method in ("mcf", "lp"):
        sol = solve(p, method)
        assert sol.status == Status.OPTIMAL and sol.bias is not None


def test_a_non_reproducing_bias_becomes_a_certificate():
    p = RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), 1, capacity=2)
    q = np.array([0.0, 1.0])  # top-1 of scores - q picks expert 0 for every token: not the assignment below

    @register(RoutingProblem, "_badbias")
    def bad(prob, *, time_limit=None):
        return RoutingSolution("x", Status.FEASIBLE, assignment=np.array([[0], [0], [1]]), bias=q)

    try:
        sol = solve(p, "_badbias")
    finally:
        _REGISTRY[RoutingProblem].pop("_badbias")
    assert sol.bias is None and "certificate_price" in sol.stats
    assert np.array_equal(sol.stats["certificate_price"], q)
    assert sol.bound == pytest.approx(routing_dual_bound(p, q))
    assert "reproduces" in sol.message
