"""The compiled CPU loops of the price-based routing (:mod:`moebalance.solvers._routing_loops`) against the tensor
and numpy versions they stand in for: the same capacity-respecting assignment (``capacity_topk``), the same
tie-broken scores (``tie_break``) and, through them, the same prices of a training step
(``BIPBalancer.update``), bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from moebalance.solvers import _routing_loops as loops_mod
from moebalance.solvers import balancers as balancers_mod
from moebalance.solvers import routing_prices
from moebalance.solvers.balancers import BIPBalancer
from moebalance.solvers.routing_prices import capacity_topk, has_compiled_loops, tie_break

from moebalance.routing import expert_capacity


def test_the_compiled_loops_are_there():
    """numba is a dependency: on the CPU the training step must take the compiled path (not fall back)."""
    assert has_compiled_loops()


def _tensor_version(monkeypatch):
    """Run what follows without the compiled loops (the tensor and numpy versions)."""
    monkeypatch.setattr(routing_prices, "_loops", lambda: {})
    monkeypatch.setattr(balancers_mod, "has_compiled_loops", lambda: False)


def _batch(rng, T, E, k, masked):
    """Skewed continuous scores (no two equal in a row, but for -inf): a quarter of the experts hot."""
    x = rng.standard_normal((T, E))
    x[:, : max(1, E // 4)] += rng.uniform(0.5, 3.0)
    if masked:  # DeepSeek-V3's unchosen groups: -inf, at least k + 1 experts left to every token
        off = rng.random((T, E)) < 0.4
        for t in range(T):
            off[t, rng.choice(E, size=min(E, k + 1), replace=False)] = False
        x[off] = -np.inf
    return x


def test_compiled_assignment_is_the_tensor_version(monkeypatch):
    """Random skewed batches, float32 and float64, with and without -inf, capacity factors 1 (an exact fit
    when E divides T k: tokens are left short and repaired) to 1.5: the same experts in the same order."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(160):
        T, E = int(rng.integers(8, 300)), int(rng.integers(3, 40))
        k = int(rng.integers(1, min(E - 1, 8) + 1))
        factor = float(rng.choice([1.0, 1.0, 1.1, 1.5]))
        dtype = np.float32 if i % 2 else np.float64
        cap = expert_capacity(T, k, E, factor)
        if cap >= T:
            continue
        cases.append((torch.from_numpy(_batch(rng, T, E, k, masked=i % 3 == 0).astype(dtype)), k, cap))
    compiled = [capacity_topk(c, k, cap) for c, k, cap in cases]
    _tensor_version(monkeypatch)
    for (c, k, cap), got in zip(cases, compiled):
        assert torch.equal(got, capacity_topk(c, k, cap)), (tuple(c.shape), k, cap)
    assert len(cases) > 100


def test_every_stage_is_compared(monkeypatch):
    """The cases above go through every stage: the plain top-k, rounds of proposals and the repair of short
    tokens (counted on the loop's Python form, which the compiled one is built from: the same answers)."""
    calls = {"repair": 0}
    repair = loops_mod._repair

    def counting(*a):
        calls["repair"] += 1
        return repair(*a)

    run = loops_mod.loops()["capacity_assign"]  # compiled before the count is put in (it keeps its own)
    monkeypatch.setattr(loops_mod, "_repair", counting)
    rng = np.random.default_rng(1)
    rounds = []
    for i in range(60):
        T, E, k = int(rng.integers(8, 60)), int(rng.integers(3, 9)), 2
        c = _batch(rng, T, E, k, masked=False) if i % 4 else rng.random((T, E))  # skewed, or balanced enough
        cap = expert_capacity(T, k, E, 1.0 if i % 4 else 2.0)
        if cap >= T:
            continue
        th = np.partition(c, E - 1 - k, axis=1)[:, E - 1 - k]
        py, nb = np.empty((T, k), dtype=np.int64), np.empty((T, k), dtype=np.int64)
        rounds.append(loops_mod.capacity_assign(c, th, k, cap, E, py))
        run(c, th, k, cap, E, nb)
        assert np.array_equal(py, nb)
    assert -1 in rounds and max(rounds) >= 2 and calls["repair"] > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64])
@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
def test_compiled_tie_break_is_the_vectorised_one(monkeypatch, dtype, scale):
    """numpy arrays and CPU tensors of any dtype, any scale, repeated rows: the same float64 values."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((257, 13)) * (100 if dtype == np.int64 else 3 if dtype == np.float16 else scale)
    x[100:140] = x[99]  # a repeated token
    x = x.astype(dtype)
    inputs = [x, torch.from_numpy(x)] if dtype != np.float16 else [torch.from_numpy(x)]
    compiled = [tie_break(a) for a in inputs]
    _tensor_version(monkeypatch)
    for a, got in zip(inputs, compiled):
        want = tie_break(a)
        assert type(got) is type(want) and got.dtype == want.dtype
        assert np.array_equal(np.asarray(got), np.asarray(want))
    assert len(np.unique(np.asarray(compiled[0])[100:140, 0])) == 40  # the repeated rows made distinct


def test_tie_break_of_nan_scores_is_unchanged(monkeypatch):
    """NaN or inf: the compiled loop declines and the vectorised code gives its answer, all NaN (every caller
    checks finiteness first: this is only what tie_break itself does)."""
    x = np.random.default_rng(3).random((4, 3))
    x[1, 2] = np.nan
    y = x.copy()
    y[2, 0] = np.inf
    got = [tie_break(a) for a in (x, y, torch.from_numpy(y))]
    _tensor_version(monkeypatch)
    for a, out in zip((x, y, torch.from_numpy(y)), got):
        assert np.array_equal(np.asarray(out), np.asarray(tie_break(a)), equal_nan=True)
    assert np.isnan(got[0]).all()  # the batch's span is NaN: every offset is


@pytest.mark.parametrize("T,E,k,factor", [(512, 8, 2, 1.0), (512, 64, 8, 1.0), (300, 16, 3, 1.25), (7, 5, 2, 1.0)])
def test_training_step_prices_are_the_general_paths(monkeypatch, T, E, k, factor):
    """BIPBalancer.update on CPU tensors (a training step: compiled tie-break, numpy sweeps on kept arrays)
    gives the general path's float32 prices bit for bit, batch after batch from the warm start, also when
    the batch size changes (new arrays) and on a batch of repeated tokens."""
    g = torch.Generator().manual_seed(T + E)
    batches = []
    for i in range(5):
        n = T if i != 3 else T // 2 + 1
        logit = torch.randn(n, E, generator=g) * 2
        logit[:, :2] += 3
        batches.append(logit.softmax(-1))
    batches.append(batches[0][:1].expand(T, E).contiguous())
    fast, general = BIPBalancer(E, k, capacity_factor=factor), BIPBalancer(E, k, capacity_factor=factor)
    got = [fast.update(b).clone() for b in batches]
    _tensor_version(monkeypatch)
    for b, q in zip(batches, got):
        want = general.update(b)
        assert q.dtype == want.dtype == torch.float32 and torch.equal(q, want)
    assert float(got[-2].abs().max()) > 0  # prices were needed


def test_training_step_prices_refuse_nan_before_any_sweep():
    b = BIPBalancer(8, 2)
    ok = torch.rand(64, 8)
    q = b.update(ok).clone()
    for bad in (float("nan"), float("inf")):
        x = ok.clone()
        x[3, 5] = bad
        with pytest.raises(ValueError, match="`scores` must be finite"):
            b.update(x)
        assert torch.equal(b.bias, q)  # the prices are kept
