"""The LLEP planner object of the expert-parallel hot path.

``LLEPPlanner`` (built once, planned per step, cheap invariant check) against the paper-loop transcription
``llep_plan_reference`` and against ``solve(PlacementProblem, "llep")`` (which runs the same code plus the shared
check); ``llep+`` likewise; the runtime's ``PlacementPlanner`` against ``solve`` for ep / llep / llep+, its fallback and
its refusal; and the cheap check catching every kind of broken plan the full check catches.
"""

from __future__ import annotations

import numpy as np
import pytest
from moebalance.solvers.placement_llep import LLEPPlanner, plan_to_assignment
from moebalance.solvers.placement_llep_plus import llep_plus_plan

from moebalance import CostModel, PlacementProblem, check, solve

from ..oracles.llep_reference import llep_plan_reference


def _instances(n: int = 40, seed: int = 0):
    """Random skewed loads, with and without a home map, fallback threshold and min_chunk; scaled up to 1e12."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        P = int(rng.choice([1, 2, 3, 4, 8]))
        E = P * int(rng.integers(1, 6))
        loads = rng.zipf(1.6, size=E).astype(np.int64) * int(rng.integers(1, 50))
        loads[rng.random(E) < 0.2] = 0
        if i % 5 == 4:
            loads = loads * 10 ** int(rng.integers(3, 11))  # large token counts: integer arithmetic stays exact
        home = rng.integers(0, P, size=E) if i % 3 == 0 else None
        kw = {
            "alpha": float(rng.choice([1.0, 1.1, 1.5])),
            "min_chunk": int(rng.choice([0, 1, 16, 1024])),
            "imbalance_threshold": None if i % 2 else 1.3,
        }
        yield loads, P, home, kw


def test_planner_equals_the_paper_loop_and_solve():
    n = 0
    for loads, P, home, kw in _instances():
        planner = LLEPPlanner(len(loads), P, home=home, **kw)
        plan = planner.plan(loads)
        ref = llep_plan_reference(loads, P, home, **kw)
        assert plan.token_ranges == ref.token_ranges
        assert plan.weight_transfers == ref.weight_transfers
        assert list(plan.device_loads) == list(ref.device_loads)
        assert np.array_equal(plan.assignment, plan_to_assignment(ref, loads, planner.home))
        assert np.array_equal(plan.assignment.sum(axis=0), plan.device_loads)
        assert planner.invariant_violations(loads, plan.assignment) == []
        # solve(p, "llep") runs the same planner: same assignment and ranges, and the shared check accepts it
        problem = PlacementProblem(loads, P, home=home, **kw)
        sol = solve(problem, "llep")
        assert sol.feasible and np.array_equal(sol.assignment, plan.assignment)
        assert sol.token_ranges == {e: [tuple(r) for r in rs] for e, rs in plan.token_ranges.items() if rs}
        # the copies: each (expert, dst) once, sorted, the same set the shared evaluator derives
        assert plan.copies() == sorted(sol.weight_transfers, key=lambda t: (t[0], t[2]))
        n += int(bool(plan.weight_transfers))
    assert n >= 10  # enough instances really spilled


def test_planner_is_reusable_across_steps():
    """One planner, many steps: each plan equals a fresh planner's (no state leaks between steps)."""
    rng = np.random.default_rng(3)
    planner = LLEPPlanner(16, 4, min_chunk=2, imbalance_threshold=None)
    for _ in range(10):
        loads = rng.integers(0, 100, size=16)
        loads[rng.integers(16)] += 500
        assert (
            planner.plan(loads).token_ranges
            == LLEPPlanner(16, 4, min_chunk=2, imbalance_threshold=None).plan(loads).token_ranges
        )


def test_llep_plus_planner_equals_solve():
    cost = CostModel(token_time=1.0, gemm_time=5.0, weight_time=20.0)
    for loads, P, home, kw in _instances(20, seed=1):
        problem = PlacementProblem(loads, P, home=home, cost=cost, **kw)
        sol = solve(problem, "llep+")
        x, plan, moves, timed_out = llep_plus_plan(LLEPPlanner.for_problem(problem), loads)
        assert sol.feasible and not timed_out
        assert np.array_equal(sol.assignment, x)
        assert sol.objective <= solve(problem, "llep").objective + 1e-9  # the search never makes it worse


@pytest.mark.parametrize(
    "corrupt, needle",
    [
        (lambda x: x.__setitem__((0, 0), x[0, 0] - 1), "not covered"),
        (lambda x: (x.__setitem__((0, 0), -1), x.__setitem__((0, 1), x[0, 1] + x[0, 0] + 1 + 1)), "negative"),
        (lambda x: x.__setitem__((1, 1), x[1, 1] + 3), "not covered"),
    ],
)
def test_cheap_check_catches_broken_plans(corrupt, needle):
    loads = np.array([40, 5, 3, 2])
    planner = LLEPPlanner(4, 2, min_chunk=1, imbalance_threshold=None)
    x = planner.plan(loads).assignment.copy()
    corrupt(x)
    bad = planner.invariant_violations(loads, x)
    assert any(needle in b for b in bad), bad
    assert not check(PlacementProblem(loads, 2, min_chunk=1, imbalance_threshold=None), x).feasible


def test_cheap_check_enforces_the_limits():
    loads = np.array([40, 0, 0, 0, 4, 4])
    x = np.array([[20, 10, 10], [0] * 3, [0] * 3, [0] * 3, [0, 4, 0], [0, 0, 4]])
    assert LLEPPlanner(6, 3, max_tokens_per_device=20).invariant_violations(loads, x) == []
    over = LLEPPlanner(6, 3, max_tokens_per_device=13).invariant_violations(loads, x)
    assert any("max_tokens_per_device=13" in b for b in over)
    x2 = x.copy()
    x2[0] = [18, 11, 11]
    x2[4] = [1, 3, 0]
    foreign = LLEPPlanner(6, 3, max_foreign_experts=1).invariant_violations(loads, x2)
    assert any("max_foreign_experts=1" in b for b in foreign), foreign
    assert not check(PlacementProblem(loads, 3, max_foreign_experts=1), x2).feasible


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_experts": 0, "num_devices": 1}, "num_experts"),
        ({"num_experts": 4, "num_devices": True}, "num_devices"),
        ({"num_experts": 5, "num_devices": 2}, "num_experts"),
        ({"num_experts": 4, "num_devices": 2, "home": [0, 1, 2, 0]}, "home"),
        ({"num_experts": 4, "num_devices": 2, "alpha": float("nan")}, "alpha"),
        ({"num_experts": 4, "num_devices": 2, "min_chunk": -1}, "min_chunk"),
        ({"num_experts": 4, "num_devices": 2, "imbalance_threshold": 0}, "imbalance_threshold"),
        ({"num_experts": 4, "num_devices": 2, "max_tokens_per_device": 1.5}, "max_tokens_per_device"),
        ({"num_experts": 4, "num_devices": 2, "cost": {"token_time": 1}}, "cost"),
    ],
)
def test_planner_refuses_bad_structure(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        LLEPPlanner(**kwargs)


@pytest.mark.parametrize(
    "loads", [[1, 2, 3], [1, -2, 3, 4], [1.5, 2, 3, 4], [np.nan, 1, 1, 1], [[1, 2, 3, 4]], [2**61, 2**61, 2**61, 2**61]]
)
def test_planner_refuses_bad_loads(loads):
    with pytest.raises(ValueError, match="`expert_loads`"):
        LLEPPlanner(4, 2).plan(np.asarray(loads))


# --- the layer's planner (no process group needed) ------------------------------------------------------


class _StepPlanner:
    """The runtime's planner on one simulated rank of four (every method here is deterministic: no broadcast)."""

    def __init__(self, method, problem_opts, solve_opts):
        import types

        from moebalance.integrations.ep import ExpertParallelError, PlacementPlanner

        self.planner = PlacementPlanner(method, 8, 4, problem_opts, solve_opts)
        self.comm = types.SimpleNamespace(rank=0, world=4, error=ExpertParallelError)

    def plan(self, loads):
        p = self.planner.plan(self.comm, loads)
        return p.assignment, p.weight_transfers, p.used, p.status, p.message


def _step_planner(method, problem_opts, solve_opts=None):
    return _StepPlanner(method, problem_opts, solve_opts or {})


def _copies(x, home):
    rows, cols = np.nonzero(x > 0)
    foreign = cols != home[rows]
    return [(e, int(home[e]), d) for e, d in zip(rows[foreign].tolist(), cols[foreign].tolist())]


@pytest.mark.parametrize(
    "method, solve_opts",
    [("ep", {}), ("llep", {}), ("llep", {"fallback": False}), ("llep+", {}), ("llep+", {"max_moves": 2})],
)
def test_layer_planner_equals_solve(method, solve_opts):
    rng = np.random.default_rng(5)
    opts = {"min_chunk": 4, "cost": CostModel(gemm_time=3.0)}
    sp = _step_planner(method, opts, solve_opts)
    for _ in range(8):
        loads = rng.integers(0, 40, size=8)
        loads[rng.integers(8)] += int(rng.integers(0, 400))
        x, copies, used, status, msg = sp.plan(loads)
        sol = solve(PlacementProblem(loads, 4, **opts), method, **solve_opts)
        assert used == method and status.value == "feasible" and sol.feasible
        assert np.array_equal(x, sol.assignment)
        assert copies == _copies(np.asarray(sol.assignment), np.arange(8) // 2)
        assert copies == sorted(sol.weight_transfers, key=lambda t: (t[0], t[2]))


def test_layer_planner_falls_back_and_refuses():
    from moebalance.integrations.distributed import ExpertParallelError

    # ep breaks max_tokens_per_device on a skewed step; llep (its capacity capped by the limit) keeps it
    sp = _step_planner("ep", {"min_chunk": 1, "max_tokens_per_device": 60, "imbalance_threshold": None})
    loads = np.array([100, 10, 10, 10, 10, 10, 10, 10])
    x, copies, used, status, msg = sp.plan(loads)
    assert used == "llep" and "fell back to llep" in msg
    assert x.sum(axis=0).max() <= 60 and np.array_equal(x.sum(axis=1), loads) and copies
    # nothing can respect max_foreign_experts=0 with an overloaded home: a clear error, not a wrong plan
    sp = _step_planner(
        "llep", {"min_chunk": 1, "max_tokens_per_device": 60, "max_foreign_experts": 0, "imbalance_threshold": None}
    )
    with pytest.raises(ExpertParallelError, match="no usable plan"):
        sp.plan(np.array([200, 0, 0, 0, 0, 0, 0, 0]))


def test_hot_path_benchmark_compares_equal_plans():
    """benchmarks/hot_path.py sections 1-2 on one round: every timed pair computes the same plan (the script
    asserts it: solve vs planner vs the authors' loop, the layer's old path vs the planner object)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "hot_path.py"
    spec = importlib.util.spec_from_file_location("hot_path_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.bench_solve(1)
    assert [(r["E"], r["P"]) for r in rows] == mod.SOLVE_SIZES
    assert all(r["spilled_chunks"] > 0 for r in rows)  # the skewed loads really exercise the spill cases
    layer = mod.bench_layer(1)
    assert {(r["E"], r["P"]) for r in layer} == {(e, p) for e in mod.LAYER_E for p in mod.LAYER_P}
    assert all(r["copies"] > 0 for r in layer)
