"""The shared plan evaluator: device times, ranges, transfers, memory, and every violation it must catch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moebalance as mb
from moebalance import CostModel, PlacementProblem
from moebalance.plan import (
    assignment_from_ranges,
    check_placement,
    device_times,
    makespan,
    peak_memory,
    token_ranges,
    weight_transfers,
)

# E=3, P=2, home [0, 0, 1]; x: expert 0 split 2 home / 1 on device 1, expert 1 all on device 1, expert 2 all
# on device 0 (the last two and the 1-token chunk are foreign)
HOME = [0, 0, 1]
X = np.array([[2, 1], [0, 3], [4, 0]])


_COST = CostModel()


def _problem(cost=_COST, **kw):
    return PlacementProblem([3, 3, 4], 2, home=HOME, cost=cost, **kw)


def test_device_times_hand_computed():
    p = _problem(CostModel(token_time=1, gemm_time=10, weight_time=100, token_transfer_time=1000))
    # device 0: 6 tokens, GEMMs of experts 0 and 2, expert 2 foreign (100) with 4 foreign tokens (4000)
    # device 1: 4 tokens, GEMMs of experts 0 and 1, experts 0 and 1 foreign (200) with 1 + 3 foreign tokens
    assert device_times(p, X).tolist() == [6 + 20 + 100 + 4000, 4 + 20 + 200 + 4000]
    assert makespan(p, X) == 4224.0
    # default model: the makespan is the largest token count
    assert makespan(_problem(), X) == 6.0


def test_ranges_and_transfers_canonical():
    p = _problem()
    assert token_ranges(p, X) == {0: [(0, 0, 2), (1, 2, 3)], 1: [(1, 0, 3)], 2: [(0, 0, 4)]}
    assert weight_transfers(p, X) == [(0, 0, 1), (1, 0, 1), (2, 1, 0)]
    assert np.array_equal(assignment_from_ranges(p, token_ranges(p, X)), X)


def test_check_feasible_extras():
    p = _problem()
    res = mb.check(p, X)  # the public entry point routes placement problems here
    assert res.feasible and res.violations == []
    assert res.objective == 6.0
    assert res.load_ratio == pytest.approx(6 / 5)
    assert res.extras["device_loads"].tolist() == [6, 4]
    assert res.extras["token_ranges"][0] == [(0, 0, 2), (1, 2, 3)]
    assert res.extras["weight_transfers"] == [(0, 0, 1), (1, 0, 1), (2, 1, 0)]
    assert res.loads.tolist() == [3, 3, 4]


@pytest.mark.parametrize(
    "x, needle",
    [
        (np.array([[3, 0], [0, 3], [4, 1]]), "not conserved"),
        (np.array([[4, -1], [0, 3], [4, 0]]), "negative"),
        (np.array([[2.5, 0.5], [0, 3], [4, 0]]), "integer"),
        (np.array([[3, 0], [3, 0]]), "shape"),
        ("plan", "integer array"),
    ],
)
def test_check_catches_bad_plans(x, needle):
    res = check_placement(_problem(), x)
    assert not res.feasible
    assert any(needle in v for v in res.violations), res.violations


def test_check_limits():
    res = check_placement(_problem(max_tokens_per_device=5), X)
    assert not res.feasible and "max_tokens_per_device=5" in res.violations[0]
    res = check_placement(_problem(max_foreign_experts=1, max_tokens_per_device=10), X)
    assert not res.feasible and "max_foreign_experts=1" in res.violations[0]  # device 1 hosts experts 0 and 1
    assert check_placement(_problem(max_tokens_per_device=6, max_foreign_experts=2), X).feasible


def test_float_integral_plan_accepted():
    assert check_placement(_problem(), X.astype(float)).feasible


def test_range_hint_kept_or_flagged():
    p = _problem()
    hint = {0: [(1, 0, 1), (0, 1, 3)], 1: [(1, 0, 3)], 2: [(0, 0, 4)]}  # helper first: another valid tiling
    res = check_placement(p, X, token_ranges_hint=hint)
    assert res.feasible and res.extras["token_ranges"] == hint
    gap = {0: [(1, 0, 1), (0, 2, 3)], 1: [(1, 0, 3)], 2: [(0, 0, 4)]}
    assert not check_placement(p, X, token_ranges_hint=gap).feasible
    wrong = {0: [(0, 0, 3)], 1: [(1, 0, 3)], 2: [(0, 0, 4)]}  # tiles, but disagrees with X
    res = check_placement(p, X, token_ranges_hint=wrong)
    assert not res.feasible and "disagree" in res.violations[0]


def test_peak_memory_hand_computed():
    p = _problem()
    # hidden=2, ffn=3, 1 byte: weights 18 B per expert, activations (2*2 + 3*3) = 13 B per token
    mem = peak_memory(p, X, hidden=2, ffn=3, dtype_bytes=1)
    # device 0: home experts 0, 1 + foreign 2 = 3 copies, 6 tokens; device 1: home 2 + foreign 0, 1, 4 tokens
    assert mem.tolist() == [3 * 18 + 6 * 13, 3 * 18 + 4 * 13]
    assert peak_memory(p, X, hidden=2, ffn=3, dtype_bytes=1, act_bytes_per_token=0).tolist() == [54, 54]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_ranges_tile_and_invert(P, E, data):
    loads = data.draw(st.lists(st.integers(0, 9), min_size=E, max_size=E))
    home = data.draw(st.lists(st.integers(0, P - 1), min_size=E, max_size=E))
    p = PlacementProblem(loads, P, home=home)
    rng = np.random.default_rng(data.draw(st.integers(0, 10**6)))
    x = np.zeros((E, P), dtype=np.int64)
    for e, L in enumerate(loads):
        x[e] = rng.multinomial(L, np.ones(P) / P)
    res = check_placement(p, x)
    assert res.feasible
    for e, rs in res.extras["token_ranges"].items():
        assert rs[0][1] == 0 and rs[-1][2] == loads[e]
        assert all(a[2] == b[1] for a, b in zip(rs, rs[1:]))
        if x[e, home[e]] > 0:
            assert rs[0][0] == home[e]
    assert np.array_equal(assignment_from_ranges(p, res.extras["token_ranges"]), x)
    foreign = np.arange(P)[None, :] != np.array(home)[:, None]
    assert len(res.extras["weight_transfers"]) == int(((x > 0) & foreign).sum())
