"""The vectorised shared check of placement plans (the hot path): TokenRanges against a plain loop,
and the sparse check (from a solver's ranges) against the dense one, on random plans and cost models."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from moebalance import CostModel, PlacementProblem
from moebalance.plan import TokenRanges, check_placement


def loop_ranges(x, home):
    """The canonical ranges by a plain loop: home first, then the other devices in increasing order."""
    out = {}
    for e in range(x.shape[0]):
        order = [int(home[e])] + [p for p in range(x.shape[1]) if p != home[e]]
        pos, rs = 0, []
        for p in order:
            if x[e, p] > 0:
                rs.append((p, pos, pos + int(x[e, p])))
                pos += int(x[e, p])
        if rs:
            out[e] = rs
    return out


@st.composite
def plans(draw):
    P = draw(st.integers(1, 5))
    E = P * draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, (E, P)) * (rng.random((E, P)) < 0.4)
    home = np.arange(E) // (E // P)
    x[np.arange(E), home] += rng.integers(0, 8, E)
    cost = CostModel(
        token_time=float(rng.random()),
        gemm_time=float(rng.random()),
        weight_time=float(rng.random()),
        token_transfer_time=float(rng.random()),
    )
    p = PlacementProblem(x.sum(axis=1), P, cost=cost)
    return p, x.astype(np.int64), rng


@given(plans())
def test_from_assignment_matches_the_loop(case):
    p, x, _ = case
    tr = TokenRanges.from_assignment(x, p.home)
    assert tr == loop_ranges(x, p.home)
    assert dict(tr.items()) == loop_ranges(x, p.home)
    assert np.array_equal(tr.counts(*p.shape), x)
    assert tr.validate(x, p.expert_loads) == []


def shuffled_ranges(x, home, rng):
    """A solver's own order: each expert's pieces in a random device order, some split in two."""
    out = {}
    for e in range(x.shape[0]):
        devs = [d for d in rng.permutation(x.shape[1]) if x[e, d] > 0]
        pos, rs = 0, []
        for d in devs:
            n = int(x[e, d])
            if n > 1 and rng.random() < 0.3:
                cut = int(rng.integers(1, n))
                rs += [(int(d), pos, pos + cut), (int(d), pos + cut, pos + n)]
            else:
                rs.append((int(d), pos, pos + n))
            pos += n
        if rs:
            out[e] = rs
    return out


@given(plans())
def test_sparse_check_equals_dense_check(case):
    p, x, rng = case
    hint = shuffled_ranges(x, p.home, rng)
    sparse = check_placement(p, x, token_ranges_hint=hint)
    dense = check_placement(p, x)
    assert sparse.feasible and dense.feasible
    assert sparse.objective == np.float64(dense.objective) or abs(sparse.objective - dense.objective) <= 1e-12 * max(
        1.0, abs(dense.objective)
    )
    assert np.array_equal(sparse.fields["device_loads"], dense.fields["device_loads"])
    assert sparse.fields["weight_transfers"] == dense.fields["weight_transfers"]
    assert sparse.fields["token_ranges"] == hint
    assert sparse.load_ratio == np.float64(dense.load_ratio) or abs(sparse.load_ratio - dense.load_ratio) < 1e-9


@given(plans(), st.integers(0, 4))
def test_broken_ranges_are_caught(case, how):
    p, x, rng = case
    hint = shuffled_ranges(x, p.home, rng)
    if not hint:
        return
    e = sorted(hint)[int(rng.integers(len(hint)))]
    rs = list(hint[e])
    d, s, t = rs[-1]
    if how == 0:
        rs[-1] = (d, s, t + 1)  # covers a token too many
    elif how == 1:
        rs[-1] = (d, s + 1, t) if t - s > 1 else (d, s, s)  # a hole or an empty range
    elif how == 2:
        rs[-1] = ((d + 1) % (p.num_devices + 1), s, t)  # another (or an invalid) device
    elif how == 3:
        del hint[e]  # an expert missing
        rs = None
    else:
        rs = rs[::-1] if len(rs) > 1 else [(d, s, t), (d, t, t + 1)]
    if rs is not None:
        hint[e] = rs
    res = check_placement(p, x, token_ranges_hint=hint)
    assert not res.feasible, (how, hint, x)
    assert "token_ranges" not in res.fields


def test_from_home_with_overrides():
    loads = np.array([5, 0, 7, 3])
    home = np.array([0, 0, 1, 1])
    tr = TokenRanges.from_home(loads, home, overrides={2: [(1, 0, 4), (0, 4, 7)]})
    assert tr == {0: [(0, 0, 5)], 2: [(1, 0, 4), (0, 4, 7)], 3: [(1, 0, 3)]}
    assert 1 not in tr and len(tr) == 3 and list(tr) == [0, 2, 3]
    x = np.array([[5, 0], [0, 0], [3, 4], [0, 3]])
    assert tr.validate(x, loads) == []
