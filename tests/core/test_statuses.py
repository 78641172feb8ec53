"""Statuses say what happened.

A stopped solver's infeasible incumbent is dropped and the status stays `time_limit` (never `infeasible`);
a bound on the wrong side of the check's objective is dropped as invalid; a family name is not a problem."""

import numpy as np
import pytest

from moebalance import PlacementProblem, RoutingProblem, Status, solve
from moebalance.registry import _REGISTRY, register
from moebalance.solution import PlacementSolution, RoutingSolution


@pytest.fixture
def p():
    return RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), 1, capacity=2)


@pytest.fixture
def fake():
    added = []

    def add(family, name):
        added.append((family, name))
        return register(family, name)

    yield add
    for family, name in added:
        _REGISTRY[family].pop(name, None)


@pytest.mark.parametrize("family", ["routing", "placement", RoutingProblem])
def test_solve_on_a_family_name_is_a_value_error(family):
    with pytest.raises(ValueError, match="`problem` must be a problem object"):
        solve(family, "mcf")


def test_time_limit_with_infeasible_incumbent_stays_time_limit(p, fake):
    @fake(RoutingProblem, "_stopped")
    def stopped(prob, *, time_limit=None):
        return RoutingSolution("x", Status.TIME_LIMIT, assignment=np.array([[0], [0], [0]]), bound=2.0)

    sol = solve(p, "_stopped")
    assert sol.status == Status.TIME_LIMIT
    assert sol.assignment is None and not sol.feasible and np.isnan(sol.objective)
    assert "dropped" in sol.message and "over capacity" in sol.message


def test_feasible_claim_that_fails_the_check_is_infeasible(p, fake):
    @fake(RoutingProblem, "_bad")
    def bad(prob, *, time_limit=None):
        return RoutingSolution("x", Status.FEASIBLE, assignment=np.array([[0], [0], [0]]))

    assert solve(p, "_bad").status == Status.INFEASIBLE


def test_bound_on_the_wrong_side_is_dropped(p, fake):
    # the optimum is 0.9 + 0.8 + 0.7 = 2.4; an "upper bound" of 1.0 is below a feasible answer
    @fake(RoutingProblem, "_lowbound")
    def low(prob, *, time_limit=None):
        return RoutingSolution("x", Status.OPTIMAL, assignment=np.array([[0], [0], [1]]), bound=1.0)

    sol = solve(p, "_lowbound")
    assert sol.objective == pytest.approx(2.4)
    assert sol.bound is None and sol.status == Status.FEASIBLE and "invalid" in sol.message
    assert sol.stats["invalid_bound"] == 1.0


def test_placement_lower_bound_above_objective_is_dropped(fake):
    q = PlacementProblem([4, 4], 2)

    @fake(PlacementProblem, "_highbound")
    def high(prob, *, time_limit=None):
        return PlacementSolution("x", Status.OPTIMAL, assignment=np.array([[4, 0], [0, 4]]), bound=5.0)

    sol = solve(q, "_highbound")
    assert sol.objective == 4.0 and sol.bound is None and sol.status == Status.FEASIBLE


def test_results_are_typed_per_family(p):
    r = solve(p, "mcf")
    assert type(r) is RoutingSolution and r.feasible and r.loads.tolist() == [2, 1]
    q = solve(PlacementProblem([4, 4, 0, 0], 2), "ep")
    assert type(q) is PlacementSolution and q.feasible and q.device_loads.tolist() == [8, 0]
    assert not hasattr(r, "token_ranges") and not hasattr(q, "bias")
    assert "feasible" not in r.stats


def test_a_back_end_value_error_is_status_error_not_bad_input(p, fake):
    import json

    @fake(RoutingProblem, "_backend_valueerror")
    def crashes(prob, *, time_limit=None):
        json.loads("{not json")  # a ValueError raised inside a library, as cvxpy's "Cannot unpack" is
        return None

    sol = solve(p, "_backend_valueerror")
    assert sol.status == Status.ERROR and "back-end" in sol.message


def test_our_own_option_validation_stays_a_value_error(p):
    with pytest.raises(ValueError, match="max_cost"):
        solve(p, "mcf", max_cost=-1)
