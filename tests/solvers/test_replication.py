"""Replication family: EPLB against hand-worked cases and the reference transcription, exact methods against
brute force, lp <= optimum <= heuristics, migration limits, scale invariance, bad input, numpy/torch types."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

import moebalance as mb
from moebalance import InfeasibleError, Status
from moebalance.replication import ReplicationProblem, count_moves, gpu_loads, layer_bounds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = [600, 560, 120, 120, 20, 10, 10, 10]


def _reference():
    from tests.oracles import eplb_reference

    return eplb_reference


# ---- hand-worked EPLB ---------------------------------------------------------------------------------------
def test_published_example_eplb_232_and_optimum_196_67():
    p = ReplicationProblem(EXAMPLE, 16, num_gpus=8)
    s = mb.solve(p, "eplb")
    # by hand: 8 redundant slots go 600,560,600,560,600,560,600,560 (120 < 600/5, 112 < 560/5 stop there), so
    # counts 5,5,1,...; 16 items of 120 x6 (600/5 and the two 120s), 112 x5, 20, 10 x3 packed heaviest-first
    # onto the lightest of 8 two-slot GPUs: 120+112 = 232 on the busiest
    assert s.logcnt.tolist() == [[5, 5, 1, 1, 1, 1, 1, 1]]
    assert s.objective == pytest.approx(232.0)
    assert s.feasible and s.status == Status.FEASIBLE
    # the even-split optimum: 600 in 4 (150), 560 in 3 (186.67) with a 10 beside one of them
    m = mb.solve(p, "milp", time_limit=60)
    assert m.status == Status.OPTIMAL
    assert m.objective == pytest.approx(590 / 3)
    # (tests/solvers/test_placement_solvers.py brute-forces the same optimum over all replica counts)


def test_deepseek_readme_example():
    # the output printed in deepseek-ai/EPLB's README
    w = np.array(
        [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86], [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
    )
    phy2log, log2phy, logcnt = mb.rebalance_experts(w, 16, 4, 2, 8)
    assert phy2log.tolist() == [
        [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
        [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
    ]
    assert logcnt.sum(axis=1).tolist() == [16, 16]
    for l in range(2):
        for e in range(12):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == logcnt[l, e] and np.all(phy2log[l, slots] == e)


@pytest.mark.parametrize("hier", [False, True])
def test_eplb_identical_to_transcription(hier):
    ref = _reference()
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7 + hier)
    n = 0
    for _ in range(40):
        E = int(rng.choice([8, 16, 24, 32, 48]))
        G = int(rng.choice([4, 8]))
        nodes, groups = (2, int(rng.choice([2, 4, 8]))) if hier else (1, 1)
        if E % groups or G % nodes:
            continue
        S = int(rng.integers(-(-E // G), -(-E // G) + 3))
        L = int(rng.integers(1, 4))
        w = rng.permutation(10**6)[: L * E].reshape(L, E) + 1  # distinct: tie-free
        ours = mb.rebalance_experts(w, S * G, groups, nodes, G)
        stable = ref.rebalance_experts(torch.tensor(w), S * G, groups, nodes, G, stable=True)
        for a, b in zip(stable, ours):
            np.testing.assert_array_equal(a.numpy(), b)
        # the untouched reference: same phy2log and logcnt; log2phy lists the same slots per expert (the
        # order of one expert's equal-load replicas follows torch's unstable sort)
        orig = ref.rebalance_experts(torch.tensor(w), S * G, groups, nodes, G)
        np.testing.assert_array_equal(orig[0].numpy(), ours[0])
        np.testing.assert_array_equal(orig[2].numpy(), ours[2])
        np.testing.assert_array_equal(np.sort(orig[1].numpy(), axis=2), np.sort(ours[1], axis=2))
        n += 1
    assert n >= 15


def test_drop_in_numpy_and_torch_types():
    torch = pytest.importorskip("torch")
    w = np.random.default_rng(0).integers(1, 100, (3, 16))
    out_np = mb.rebalance_experts(w, 24, 4, 2, 4)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.int64 for x in out_np)
    out_t = mb.rebalance_experts(torch.tensor(w, dtype=torch.float32), 24, 4, 2, 4)
    assert all(
        isinstance(x, torch.Tensor) and x.dtype == torch.int64 and x.device == torch.device("cpu") for x in out_t
    )
    for a, b in zip(out_np, out_t):
        np.testing.assert_array_equal(a, b.numpy())
    # groups not divisible by nodes: the global policy
    g = mb.rebalance_experts(w, 24, 3 * 0 + 1, 2, 4)
    assert g[0].shape == (3, 24)
    # any method of the family can be named
    plus = mb.rebalance_experts(w, 24, 4, 2, 4, method="eplb+")
    p = ReplicationProblem(w, 24, num_gpus=4, num_groups=4, num_nodes=2)
    assert p.evaluate(plus[0]).objective <= p.evaluate(out_np[0]).objective + 1e-9


# ---- exact methods against brute force ------------------------------------------------------------------------
def _brute_force(p: ReplicationProblem) -> float:
    """Optimum by enumeration: every multiset of R experts covering all, every split into GPUs of S slots."""
    B, L, E = p.shape
    R, G, S = p.num_replicas, p.num_gpus, p.slots_per_gpu
    total = 0.0
    for l in range(L):
        best = math.inf
        for combo in itertools.combinations_with_replacement(range(E), R - E):
            items = np.concatenate([np.arange(E), np.array(combo, dtype=np.int64)])
            best = min(best, _best_packing(p, l, np.sort(items), G, S))
        total += best
    return total


def _best_packing(p, l, items, G, S):
    best = math.inf
    seen = set()

    def rec(rest, gpus):
        nonlocal best
        if not rest:
            plan = np.concatenate(gpus)[None]
            ev = ReplicationProblem(
                p.weight[:, l : l + 1],
                p.num_replicas,
                num_gpus=p.num_gpus,
                num_groups=p.num_groups,
                num_nodes=p.num_nodes,
            ).evaluate(plan)
            if ev.feasible:
                best = min(best, ev.objective)
            return
        first = rest[0]
        for others in itertools.combinations(range(1, len(rest)), S - 1):
            gpu = (first,) + tuple(rest[i] for i in others)
            left = [rest[i] for i in range(1, len(rest)) if i not in others]
            if (tuple(map(tuple, gpus)), gpu) in seen:
                continue
            seen.add((tuple(map(tuple, gpus)), gpu))
            rec(left, gpus + [np.array(gpu)])

    rec(list(items), [])
    return best


SMALL = [
    dict(w=[[9, 5, 3, 1]], R=6, G=3),
    dict(w=[[7, 7, 2, 1], [1, 30, 2, 2]], R=6, G=2),
    dict(w=[[40, 3, 3, 2, 1, 1]], R=8, G=4),
    dict(w=[[5, 1, 8, 2]], R=6, G=2, groups=2, nodes=2),
    dict(w=[[[9, 1, 4, 2]], [[1, 9, 2, 4]]], R=6, G=3),  # a window of two batches
]


@pytest.mark.parametrize("case", range(len(SMALL)))
def test_exact_methods_match_brute_force_and_relations(case):
    c = SMALL[case]
    p = ReplicationProblem(
        np.array(c["w"], dtype=float),
        c["R"],
        num_gpus=c["G"],
        num_groups=c.get("groups", 1),
        num_nodes=c.get("nodes", 1),
    )
    opt = _brute_force(p) if not p.window else _brute_force_window(p)
    m = mb.solve(p, "milp", time_limit=60)
    assert m.status == Status.OPTIMAL and m.objective == pytest.approx(opt, rel=1e-9)
    lp = mb.solve(p, "lp")
    assert lp.bound is not None and lp.bound <= opt * (1 + 1e-9)
    for method in ("eplb", "eplb+"):
        s = mb.solve(p, method)
        assert s.feasible and s.objective >= opt * (1 - 1e-9)
        assert s.bound is not None and s.bound <= opt * (1 + 1e-9)
        assert s.gap is not None and s.gap >= 0
    assert mb.solve(p, "eplb+").objective <= mb.solve(p, "eplb").objective * (1 + 1e-12)


def _brute_force_window(p):
    # a window couples the batches through one plan: enumerate plans, score each on every batch
    B, L, E = p.shape
    R = p.num_replicas
    best = math.inf
    for combo in itertools.combinations_with_replacement(range(E), R - E):
        items = list(np.sort(np.concatenate([np.arange(E), np.array(combo, dtype=np.int64)])))
        for perm in set(itertools.permutations(items)):
            ev = p.evaluate(np.array(perm)[None])
            best = min(best, ev.objective)
    return best


def test_milp_migration_matches_brute_force():
    w = np.array([[12.0, 7, 3, 1]])
    old = np.array([[3, 2, 1, 0, 0, 0]])  # GPU0: 3 2 1, GPU1: 0 0 0
    for budget in (0, 1, 2):
        p = ReplicationProblem(w, 6, num_gpus=2, old_phy2log=old, max_moves=budget)
        best = math.inf
        for combo in itertools.combinations_with_replacement(range(4), 2):
            for perm in set(itertools.permutations([0, 1, 2, 3, *combo])):
                ev = p.evaluate(np.array(perm)[None])
                if ev.feasible:
                    best = min(best, ev.objective)
        m = mb.solve(p, "milp", time_limit=60)
        assert m.status == Status.OPTIMAL and m.objective == pytest.approx(best)
        for method in ("eplb+", "migrate"):
            s = mb.solve(p, method)
            assert s.feasible and s.moves.max() <= budget and s.objective >= best - 1e-9


# ---- migration ---------------------------------------------------------------------------------------------------
def test_migration_limits_respected_and_moves_counted():
    rng = np.random.default_rng(11)
    w_old = rng.integers(1, 1000, (4, 32)).astype(float)
    w_new = rng.integers(1, 1000, (4, 32)).astype(float)
    w_new[:, 5] *= 20
    old = mb.solve(ReplicationProblem(w_old, 40, num_gpus=8), "eplb").assignment
    stay = ReplicationProblem(w_new, 40, num_gpus=8).evaluate(old).objective
    prev = math.inf
    for budget in (0, 2, 4, 8, 40):
        p = ReplicationProblem(w_new, 40, num_gpus=8, old_phy2log=old, max_moves=budget)
        for method in ("eplb+", "migrate"):
            s = mb.solve(p, method)
            assert s.feasible, s.message
            assert np.all(s.moves <= budget)
            np.testing.assert_array_equal(s.moves, count_moves(old, s.assignment, 32, 8))
            assert s.objective <= stay + 1e-9
        if budget == 0:
            assert s.objective == pytest.approx(stay)
        cur = mb.solve(p, "eplb+").objective
        assert cur <= prev * (1 + 1e-9) or budget == 0
        prev = cur
    # a plan over the budget is reported infeasible, never optimal
    p = ReplicationProblem(w_new, 40, num_gpus=8, old_phy2log=old, max_moves=0)
    s = mb.solve(p, "eplb")
    assert s.status == Status.INFEASIBLE and not s.feasible
    with pytest.raises(InfeasibleError):
        mb.rebalance_experts(w_new, 40, 1, 1, 8, old_phy2log=old, max_moves=0)
    # the moves formula on a hand case: old GPU0 {0,1}, GPU1 {2,3}; new GPU0 {0,0}, GPU1 {1,2,}
    assert count_moves(np.array([[0, 1, 2, 3]]), np.array([[0, 0, 1, 2]]), 4, 2).tolist() == [2]


# ---- scale invariance ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("a", [1e-12, 1e-6, 1.0, 1e6, 1e12])
def test_scale_invariance(a):
    rng = np.random.default_rng(5)
    w = rng.integers(1, 1000, (3, 16)).astype(float)
    base = {m: mb.solve(ReplicationProblem(w, 24, num_gpus=4), m) for m in ("eplb", "eplb+", "lp")}
    p = ReplicationProblem(w * a, 24, num_gpus=4)
    for m, b in base.items():
        s = mb.solve(p, m)
        assert s.status == b.status
        assert s.objective == pytest.approx(a * b.objective, rel=1e-9)
        assert s.bound == pytest.approx(a * b.bound, rel=1e-6)
        assert s.bound <= s.objective * (1 + 1e-9)
        if m != "lp":
            np.testing.assert_array_equal(s.assignment, b.assignment)


def test_layer_bounds_hand_cases():
    # no replicas (R == E): items fixed. 10,9,8,7,1,1,1,1 on 4 GPUs x 2 slots: mean 9.5; among the 5 largest
    # two share a GPU (7 + 1 = 8); the largest shares its GPU with at least the smallest (10 + 1 = 11): bound 11,
    # which the best pairing 10+1, 9+1, ... reaches
    p = ReplicationProblem([10, 9, 8, 7, 1, 1, 1, 1], 8, num_gpus=4)
    assert layer_bounds(p)[0] == pytest.approx(11.0)
    assert mb.solve(p, "eplb+").objective == pytest.approx(11.0)
    # 10,10,10,10,1,1 on 3 GPUs x 2: two of the four 10s share a GPU, so 20 (the mean is 14): bound = optimum
    q = ReplicationProblem([10, 10, 10, 10, 1, 1], 6, num_gpus=3)
    assert layer_bounds(q)[0] == pytest.approx(20.0)
    assert mb.solve(q, "eplb").objective == pytest.approx(20.0)
    # D'Hondt: one expert of 100 and three of 1 on 2 GPUs x 3 slots: counts 3,1,1,1 -> 33.3 per replica
    q = ReplicationProblem([100, 1, 1, 1], 6, num_gpus=2)
    assert layer_bounds(q)[0] == pytest.approx(max(103 / 2, 100 / 3))


# ---- dispatch -------------------------------------------------------------------------------------------------------
def test_dispatch_lp_optimal_and_never_worse_than_even():
    from moebalance.solvers.replication_lp import dispatch

    rng = np.random.default_rng(2)
    w = rng.integers(1, 100, (3, 8)).astype(float)
    plan = mb.solve(ReplicationProblem(rng.integers(1, 100, (3, 8)), 12, num_gpus=4), "eplb").assignment
    share, loads, mx = dispatch(w, plan, 4)
    even = gpu_loads(w[None], plan, 4)[0]
    assert np.all(mx <= even.max(axis=1) + 1e-9)
    for l in range(3):
        np.testing.assert_allclose(np.bincount(plan[l], weights=share[l], minlength=8), w[l])
        assert np.all(share[l] >= -1e-12)
        # no split beats the mean GPU load, and the LP reaches max(mean, what a lone replica forces)
        assert mx[l] >= w[l].sum() / 4 - 1e-9
    # a hand case: expert 0 (12 tokens) on GPUs 0 and 1, expert 1 (4) on GPU 1: best split 8 | 4+4
    share, loads, mx = dispatch(np.array([[12.0, 4.0]]), np.array([[0, 0, 1, 0]]), 2)
    assert mx[0] == pytest.approx(8.0)


# ---- bad input -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(weight=[[1, 2, 3]], num_replicas=4, num_gpus=3), "num_replicas"),  # not a multiple of G
        (dict(weight=[[1, 2, 3, 4]], num_replicas=2, num_gpus=2), "num_replicas"),  # R < E
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, num_groups=3), "num_groups"),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=3, num_nodes=2), "num_gpus"),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, num_groups=1, num_nodes=2), "num_groups"),
        (dict(weight=[[1, float("nan"), 3, 4]], num_replicas=4, num_gpus=2), "weight"),
        (dict(weight=[[1, -2, 3, 4]], num_replicas=4, num_gpus=2), "weight"),
        (dict(weight=[[[[1]]]], num_replicas=4, num_gpus=2), "weight"),
        (dict(weight=[["a", "b"]], num_replicas=4, num_gpus=2), "weight"),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, old_phy2log=[[0, 1, 2]]), "old_phy2log"),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, old_phy2log=[[0, 1, 2, 2]]), "old_phy2log"),
        (
            dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, old_phy2log=[[0, 1, 2, 3]], max_moves=-1),
            "max_moves",
        ),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4, num_gpus=2, max_moves=1), "max_moves"),
        (dict(weight=[[1, 2, 3, 4]], num_replicas=4.5, num_gpus=2), "num_replicas"),
        (dict(weight=[[1e308, 1e308, 3, 4]], num_replicas=4, num_gpus=2), "weight"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ReplicationProblem(kwargs.pop("weight"), **kwargs)


def test_bad_method_and_options():
    p = ReplicationProblem([[1, 2, 3, 4]], 4, num_gpus=2)
    with pytest.raises(ValueError, match="method"):
        mb.solve(p, "nope")
    with pytest.raises(ValueError, match="max_rounds"):
        mb.solve(p, "eplb+", max_rounds=-1)
    with pytest.raises(ValueError, match="old_phy2log"):
        mb.solve(p, "migrate")
    with pytest.raises(ValueError, match="mip_gap"):
        mb.solve(p, "milp", mip_gap=3)
    with pytest.raises(ValueError, match="num_replicas"):
        mb.rebalance_experts(np.ones((2, 4)), 5, 1, 1, 2)


def test_evaluate_rejects_malformed_plans_and_round_trip():
    p = ReplicationProblem([[5, 1, 8, 2]], 6, num_gpus=2, num_groups=2, num_nodes=2)
    assert not p.evaluate(np.array([[0, 1, 2, 3, 0, 1]])).feasible  # group {0,1} split over both nodes
    assert not p.evaluate(np.array([[0, 0, 0, 2, 3, 2]])).feasible  # expert 1 missing
    assert not p.evaluate(np.array([[0, 1, 2]])).feasible  # wrong shape
    assert not p.evaluate(np.array([[0.0, 1, 0, 2, 3, 2]])).feasible  # not integers
    ok = p.evaluate(np.array([[0, 1, 0, 2, 3, 2]]))
    assert ok.feasible and ok.objective == pytest.approx(max(2.5 + 1 + 2.5, 4 + 2 + 4))
    q = ReplicationProblem.from_dict(p.to_dict())
    assert q.evaluate(np.array([[0, 1, 0, 2, 3, 2]])).objective == ok.objective
    with pytest.raises(ValueError, match="kind"):
        ReplicationProblem.from_dict({**p.to_dict(), "kind": "routing"})


# ---- time limits, compare, interrupts ---------------------------------------------------------------------------
def test_time_limits_statuses_and_compare():
    rng = np.random.default_rng(0)
    p = ReplicationProblem(rng.integers(1, 1000, (2, 64)), 80, num_gpus=8)
    s = mb.solve(p, "milp", time_limit=1.0)  # a spent limit: tests/solvers/test_time_limits.py (fake clock)
    assert s.status in (Status.TIME_LIMIT, Status.OPTIMAL) and s.feasible
    assert s.bound <= s.objective * (1 + 1e-9)
    quick = mb.solve(p, "eplb+", time_limit=1e-4)
    assert quick.feasible and quick.status in (Status.TIME_LIMIT, Status.FEASIBLE)
    assert quick.objective <= mb.solve(p, "eplb").objective * (1 + 1e-12)
    table = mb.compare(p, ["eplb", "eplb+", "lp"])
    assert "eplb+" in str(table)


def test_keyboard_interrupt_propagates(monkeypatch):
    import moebalance.solvers.replication_eplb_plus as plus

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plus, "local_search", boom)
    with pytest.raises(KeyboardInterrupt):
        mb.solve(ReplicationProblem([[5, 3, 2, 1]], 6, num_gpus=2), "eplb+")


def test_window_objective_is_mean_over_batches():
    w = np.array([[[9.0, 1, 4, 2]], [[1.0, 9, 2, 4]]])  # [B=2, L=1, E=4]
    p = ReplicationProblem(w, 6, num_gpus=3)
    plan = np.array([[0, 1, 2, 3, 0, 1]])
    per_batch = [ReplicationProblem(w[b], 6, num_gpus=3).evaluate(plan).objective for b in range(2)]
    assert p.evaluate(plan).objective == pytest.approx(np.mean(per_batch))
    assert p.window and p.evaluate(plan).fields["gpu_loads"].shape == (1, 3)
