"""Hypothesis properties of the replication family: every plan passes the shared check, every bound lies below
the brute-forced optimum, methods relate as documented (eplb+ never worse than eplb, milp optimal), and answers
scale with the loads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import moebalance as mb
from moebalance.replication import ReplicationProblem, count_moves, gpu_loads

METHODS = ("lp", "milp", "eplb", "eplb+", "migrate")


@st.composite
def small_problems(draw):
    """One layer, E <= 3 experts, R <= 6 slots on G GPUs; loads with zeros and ties, at any scale."""
    G = draw(st.sampled_from([1, 2, 3]))
    E = draw(st.integers(1, 3))
    S = draw(st.integers(max(1, -(-E // G)), max(1, 6 // G)))
    assume(G * S >= E)
    w = np.array(draw(st.lists(st.integers(0, 9), min_size=E, max_size=E)), dtype=np.float64)
    scale = 10.0 ** draw(st.integers(-12, 12))
    shift = draw(st.sampled_from([0.0, 0.5]))
    return (w + shift) * scale, G * S, G


def _optimum(w: np.ndarray, R: int, G: int) -> float:
    E = w.size
    best = np.inf
    for plan in itertools.product(range(E), repeat=R):
        a = np.array(plan)[None]
        if np.bincount(a[0], minlength=E).min():
            best = min(best, float(gpu_loads(w[None, None], a, G).max()))
    return best


@pytest.mark.property
@given(small_problems())
def test_every_method_is_valid_and_its_bound_below_the_optimum(case):
    w, R, G = case
    best = _optimum(w, R, G)
    old = (np.arange(R) % w.size)[None]
    sols = {}
    for method in METHODS:
        p = ReplicationProblem(w[None], R, num_gpus=G, old_phy2log=old if method == "migrate" else None)
        sol = mb.solve(p, method, time_limit=30)
        assert sol.feasible and sol.status != "error", (method, sol.message)
        assert np.isfinite(sol.objective)
        assert sol.objective >= best * (1 - 1e-9)
        assert sol.bound is not None and sol.bound <= best * (1 + 1e-9) + 1e-300, (method, sol.bound, best)
        sols[method] = sol
    assert sols["milp"].objective == pytest.approx(best, rel=1e-9, abs=1e-300)
    assert sols["eplb+"].objective <= sols["eplb"].objective * (1 + 1e-12)


@st.composite
def windows(draw):
    B = draw(st.integers(1, 3))
    L = draw(st.integers(1, 3))
    E = draw(st.sampled_from([2, 4, 8]))
    G = draw(st.sampled_from([1, 2, 4]))
    R = G * draw(st.integers(max(1, -(-E // G)), max(1, -(-E // G)) + 3))
    w = np.array(draw(st.lists(st.integers(0, 50), min_size=B * L * E, max_size=B * L * E)), dtype=np.float64).reshape(
        B, L, E
    )
    return w, R, G


@pytest.mark.property
@given(windows(), st.integers(-40, 40))
def test_plans_scale_with_the_loads(case, exponent):
    w, R, G = case
    factor = 2.0**exponent  # exact in binary: the same plans are expected
    for method in ("eplb", "eplb+", "lp"):
        a = mb.solve(ReplicationProblem(w, R, num_gpus=G), method)
        b = mb.solve(ReplicationProblem(w * factor, R, num_gpus=G), method)
        assert a.feasible and b.feasible
        assert b.objective == pytest.approx(a.objective * factor, rel=1e-9, abs=1e-300)
        assert b.bound <= b.objective * (1 + 1e-9) + 1e-300
        if method != "lp":
            assert np.array_equal(a.assignment, b.assignment), method


@pytest.mark.property
@given(windows(), st.integers(0, 4), st.integers(0, 2**32 - 1))
def test_migration_methods_honour_the_move_budget(case, budget, seed):
    w, R, G = case
    L, E = w.shape[1:]
    rng = np.random.default_rng(seed)
    old = np.stack([rng.permutation(np.concatenate([np.arange(E), rng.integers(0, E, R - E)])) for _ in range(L)])
    p = ReplicationProblem(w, R, num_gpus=G, old_phy2log=old, max_moves=budget)
    stay = p.evaluate(old).objective
    for method in ("eplb+", "migrate", "lp"):
        sol = mb.solve(p, method, time_limit=30)
        assert sol.feasible, (method, sol.message)
        assert count_moves(old, sol.assignment, E, G).max() <= budget
        assert sol.objective <= stay * (1 + 1e-12)  # never worse than staying put
        assert sol.bound <= sol.objective * (1 + 1e-9) + 1e-300
