"""Honest statuses and the adapter steps: one status table per back-end, each
mapping every status the back-end can return; the adapter steps build -> run -> to_solution one by one."""

from __future__ import annotations

import numpy as np
import pytest
from moebalance.solvers import _status
from moebalance.solvers._status import CPSAT, CVXPY, HIGHS, MIN_COST_FLOW, PYWRAPLP, SCIPY_HIGHS, TABLES

import moebalance as mb
from moebalance import RoutingProblem, Status, solve
from moebalance.generate import routing_problem

OURS = set(Status)


def _backend_names(table):
    """Every status name the back-end itself defines, read from its own enum."""
    if table is HIGHS:
        import highspy

        return set(highspy.HighsModelStatus.__members__)
    if table is CPSAT:
        from ortools.sat import cp_model_pb2

        return set(cp_model_pb2.CpSolverStatus.keys())
    if table is PYWRAPLP:
        from ortools.linear_solver import linear_solver_pb2

        return set(linear_solver_pb2.MPSolverResponseStatus.keys())
    if table is MIN_COST_FLOW:
        from ortools.graph.python import min_cost_flow

        return set(min_cost_flow.SimpleMinCostFlow.Status.__members__)
    if table is CVXPY:
        import cvxpy.settings as s

        return set(s.SOLUTION_PRESENT + s.INF_OR_UNB + s.ERROR)
    if table is SCIPY_HIGHS:  # scipy documents 0..4 for linprog and milp
        return {SCIPY_HIGHS.name(c) for c in range(5)}
    raise AssertionError(table)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_backend_status_maps_to_one_of_ours(name):
    table = TABLES[name]
    names = _backend_names(table)
    assert names, name
    assert set(table.table) == names, (sorted(names - set(table.table)), sorted(set(table.table) - names))
    for n in names:
        assert table.lookup(n) in OURS


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_accepts_enum_members_and_integers(name):
    table = TABLES[name]
    if table is HIGHS:
        import highspy

        for member in highspy.HighsModelStatus.__members__.values():
            assert table.name(member) == member.name and table.name(int(member)) == member.name
    elif table is CPSAT:
        from ortools.sat.python import cp_model

        assert table.name(cp_model.OPTIMAL) == "OPTIMAL" and table.name(cp_model.UNKNOWN) == "UNKNOWN"
    elif table is PYWRAPLP:
        from ortools.linear_solver import pywraplp

        # pywraplp's ResultStatus integers are the response enum's values
        for attr in ("OPTIMAL", "FEASIBLE", "INFEASIBLE", "UNBOUNDED", "ABNORMAL", "MODEL_INVALID", "NOT_SOLVED"):
            assert table.name(getattr(pywraplp.Solver, attr)) == "MPSOLVER_" + attr
    elif table is MIN_COST_FLOW:
        from ortools.graph.python import min_cost_flow

        assert table.name(min_cost_flow.SimpleMinCostFlow.OPTIMAL) == "OPTIMAL"
    assert table.lookup("no such status") == Status.ERROR
    assert table.lookup(12345) == Status.ERROR


def test_translate_applies_what_the_adapter_knows():
    # stopped early: time_limit under a limit; without one, feasible with an answer, error without
    assert CPSAT.translate("FEASIBLE", time_limit=1.0, has_solution=True) == Status.TIME_LIMIT
    assert CPSAT.translate("UNKNOWN", time_limit=1.0, has_solution=False) == Status.TIME_LIMIT
    assert CPSAT.translate("FEASIBLE", time_limit=None, has_solution=True) == Status.FEASIBLE
    assert CPSAT.translate("UNKNOWN", time_limit=None, has_solution=False) == Status.ERROR
    # an answer promised but missing is an error, never optimal
    assert PYWRAPLP.translate("MPSOLVER_OPTIMAL", time_limit=None, has_solution=False) == Status.ERROR
    assert CVXPY.translate("optimal_inaccurate", time_limit=None, has_solution=True) == Status.FEASIBLE
    assert SCIPY_HIGHS.translate(1, time_limit=0.5, has_solution=False) == Status.TIME_LIMIT
    assert HIGHS.translate("kTimeLimit", time_limit=0.5, has_solution=True) == Status.TIME_LIMIT


def test_status_module_declares_its_tables():
    assert set(_status.__all__) >= {
        "StatusTable",
        "HIGHS",
        "SCIPY_HIGHS",
        "CPSAT",
        "PYWRAPLP",
        "MIN_COST_FLOW",
        "CVXPY",
        "TABLES",
    }


# the adapter steps one by one ---------------------------------------------------------------------------

ADAPTERS = ["routing_flow", "routing_bip", "routing_mip", "routing_lp", "routing_cvxpy"]


@pytest.mark.parametrize("module", ADAPTERS)
def test_routing_adapter_steps_build_run_to_solution(module):
    import importlib

    mod = importlib.import_module(f"moebalance.solvers.{module}")
    p = routing_problem(40, 6, 2, kind="hot", imbalance=2.0, seed=1)
    ref = solve(p, "mcf")
    model = mod.build(p)
    raw = mod.run(model)
    assert isinstance(raw["code"], str)
    sol = mod.to_solution(p, raw)
    assert sol.status == Status.OPTIMAL, sol
    assert sol.bound >= ref.objective - 1e-9
    checked = mb.registry.finalize(p, sol)
    assert checked.feasible and checked.objective == pytest.approx(ref.objective, rel=1e-12)


def test_interrupted_cvxpy_iterate_is_repaired_or_dropped_never_infeasible():
    """Seen: cvxpy built an assignment from an interrupted iterate and the check called it infeasible."""
    from moebalance.solvers import routing_cvxpy

    p = RoutingProblem(np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.7, 0.0, 0.3], [0.6, 0.3, 0.1]]), 1, capacity=2)
    # an interrupted iterate that puts every token on expert 0 (over its capacity 2)
    x = np.array([[0.9, 0.1, 0.0]] * 4)
    raw = {"code": "user_limit", "x": x, "solver": "HIGHS"}
    sol = mb.registry.finalize(p, routing_cvxpy.to_solution(p, raw, time_limit=1.0))
    assert sol.status == Status.TIME_LIMIT
    assert sol.bound is None  # an interrupted LP proves nothing
    assert sol.assignment is None or sol.feasible
    assert sol.feasible and sol.loads.max() <= 2  # this one repairs


@pytest.mark.parametrize(
    "module, raw",
    [
        ("routing_bip", {"code": "INFEASIBLE", "bound": 0.0}),
        ("routing_mip", {"code": "MPSOLVER_INFEASIBLE"}),
        ("routing_lp", {"code": "infeasible", "message": "x"}),
        ("routing_cvxpy", {"code": "infeasible"}),
        ("routing_flow", {"code": "INFEASIBLE"}),
    ],
)
def test_backend_infeasible_on_a_feasible_routing_problem_is_an_error(module, raw):
    import importlib

    mod = importlib.import_module(f"moebalance.solvers.{module}")
    p = routing_problem(8, 4, 2, seed=0)  # feasible by construction
    sol = mod.to_solution(p, raw)
    assert sol.status == Status.ERROR


@pytest.mark.parametrize("family", ["routing", "placement"])
def test_capability_flags_on_every_method(family):
    for name in mb.available_methods(family):
        info = mb.method_info(family, name)
        for flag in ("exact", "gives_bound", "deterministic", "supports_time_limit"):
            assert isinstance(getattr(info, flag), bool), (name, flag)
        assert isinstance(info.backends, tuple)
        if info.exact:
            assert info.gives_bound, name


def test_placement_adapter_steps_build_run_to_solution():
    from moebalance.solvers import placement_lp, placement_milp
    from moebalance.solvers._placement_model import build_model

    from moebalance import CostModel, PlacementProblem

    from ..catalogue_placement import brute_force_placement as brute_force

    p = PlacementProblem([5, 1, 1, 0, 2, 0], 3, cost=CostModel(1, 2, 3, 0), min_chunk=1)
    opt = brute_force(p)
    m = build_model(p)
    raw = placement_milp.run(placement_milp.build(m))
    assert raw["code"] == "MPSOLVER_OPTIMAL"
    sol = mb.registry.finalize(p, placement_milp.to_solution(p, m, raw))
    assert sol.status == Status.OPTIMAL and sol.objective == pytest.approx(opt) and sol.bound <= opt + 1e-9
    lp = placement_lp.run(placement_lp.build(m))
    assert lp["code"] == "optimal" and lp["value"] * m.unit <= opt + 1e-9
