"""solve(), the registry, option checking and the shared check's downgrades."""

import numpy as np
import pytest

import moebalance as mb
from moebalance import RoutingProblem, Solution, Status, solve
from moebalance.registry import _REGISTRY, register


@pytest.fixture
def problem():
    return RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), 1, capacity=2)


@pytest.fixture
def fake_methods():
    names = []

    def add(name, **kw):
        names.append(name)
        return register("routing", name, **kw)

    yield add
    for n in names:
        _REGISTRY[RoutingProblem].pop(n, None)


def test_unknown_method_lists_valid_ones(problem):
    with pytest.raises(ValueError, match=r"unknown `method` 'nope'.*mcf"):
        solve(problem, "nope")


def test_unknown_option_lists_valid_ones(problem):
    with pytest.raises(ValueError, match=r"unknown option.*'maxcost'.*valid options: .*max_cost"):
        solve(problem, "mcf", maxcost=3)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon"])
def test_bad_time_limit(problem, bad):
    with pytest.raises(ValueError, match="time_limit"):
        solve(problem, "mcf", time_limit=bad)


def test_bad_problem_type():
    with pytest.raises(ValueError, match="problem"):
        solve(np.zeros((2, 2)), "mcf")


def test_auto_picks_an_exact_method(problem):
    sol = solve(problem)
    assert sol.method == "fast" and sol.status == Status.OPTIMAL  # fast is the auto default (issue 13)


def test_claimed_optimal_but_infeasible_is_downgraded(problem, fake_methods):
    @fake_methods("liar")
    def liar(p, *, time_limit=None):
        return Solution("liar", Status.OPTIMAL, objective=99.0, bound=99.0,
                        assignment=np.array([[0], [0], [0]]))  # expert 0 takes 3 > capacity 2

    sol = solve(problem, "liar")
    assert sol.status == Status.INFEASIBLE
    assert "over capacity" in sol.message
    assert sol.objective == pytest.approx(0.9 + 0.8 + 0.3)  # recomputed, not the claimed 99
    assert sol.gap is None


def test_claimed_optimal_with_distant_bound_is_downgraded(problem, fake_methods):
    @fake_methods("boaster")
    def boaster(p, *, time_limit=None):
        return Solution("boaster", Status.OPTIMAL, objective=0.0, bound=10.0, assignment=np.array([[1], [1], [0]]))

    sol = solve(problem, "boaster")
    assert sol.status == Status.FEASIBLE and "claimed optimal" in sol.message


def test_malformed_assignments_are_infeasible(problem, fake_methods):
    bad = {"shape": np.array([0, 1, 0]), "range": np.array([[0], [5], [1]]), "float": np.array([[0.0], [1.0], [1.0]])}
    for name, a in bad.items():
        fake_methods(f"bad_{name}")(lambda p, *, time_limit=None, a=a: Solution("x", Status.FEASIBLE, 0.0,
                                                                                 assignment=a))
        sol = solve(problem, f"bad_{name}")
        assert sol.status == Status.INFEASIBLE, name
        assert np.isnan(sol.objective)


def test_backend_exception_becomes_error_status(problem, fake_methods):
    @fake_methods("crash")
    def crash(p, *, time_limit=None):
        raise RuntimeError("segfault-ish")

    sol = solve(problem, "crash")
    assert sol.status == Status.ERROR and "segfault-ish" in sol.message


def test_missing_assignment_is_never_optimal(problem, fake_methods):
    fake_methods("empty")(lambda p, *, time_limit=None: Solution("empty", Status.OPTIMAL, 1.0))
    assert solve(problem, "empty").status == Status.ERROR


def test_solution_fields_and_json(problem):
    sol = solve(problem, "lp")
    d = sol.to_dict()
    for key in ("method", "status", "objective", "bound", "gap", "assignment", "loads", "bias", "wall_time",
                "stats", "message"):
        assert key in d
    import json

    json.dumps(d)
    assert d["status"] == "optimal" and sol.assignment.shape == (3, 1) and sol.loads.tolist() == [2, 1]
    assert sol.wall_time > 0


def test_compare_table(problem):
    table = mb.compare(problem, ["mcf", "greedy", "topk"])
    rows = table.rows()
    assert [r["method"] for r in rows] == ["mcf", "greedy", "topk"]
    assert table.best_bound == pytest.approx(0.9 + 0.8 + 0.7)  # mcf's optimum is the best bound
    assert rows[0]["gap"] == pytest.approx(0.0, abs=1e-9)
    text = str(table)
    assert "mcf" in text and "max/cap" in text
    import json

    assert json.loads(table.to_json())["rows"][0]["method"] == "mcf"


def test_method_info_flags():
    info = mb.method_info("routing", "bip")
    assert info.exact and info.gives_bound and info.backends == ("ortools",)
    assert not mb.method_info("routing", "greedy").exact
