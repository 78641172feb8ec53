import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moebalance.solvers.balancers import BIPBalancer, LossFreeBalancer

from moebalance.generate import routing_scores


def maxvio(loads):
    loads = np.asarray(loads, dtype=float)
    return (loads.max() - loads.mean()) / loads.mean()


def stream(steps, T=512, E=16, seed=0):
    for _ in range(steps):
        yield routing_scores(T, E, kind="hot", imbalance=1.0, hot_experts=2, seed=seed)  # same skew each batch


def test_loss_free_sign_rule_in_price_convention():
    b = LossFreeBalancer(4, 1, rate=0.5)
    q = b.update(np.array([10, 0, 5, 5]))
    assert q.tolist() == [0.5, -0.5, 0.0, 0.0]  # overloaded expert dearer, underloaded cheaper


@pytest.mark.parametrize("make", [lambda: LossFreeBalancer(16, 2, rate=1e-2), lambda: BIPBalancer(16, 2)])
def test_maxvio_falls(make):
    b = make()
    vios = []
    for s in stream(40):
        vios.append(maxvio(b.loads(s)))
        b.update(s)
    assert vios[-1] < 0.5 * vios[0]


def test_bip_balances_in_one_batch():
    s = routing_scores(1024, 16, kind="zipf", imbalance=1.5, seed=1)
    b = BIPBalancer(16, 2, iterations=8)
    before = maxvio(b.loads(s))
    b.update(s)
    assert maxvio(b.loads(s)) < 0.2 < before


@pytest.mark.parametrize("cls", [LossFreeBalancer, BIPBalancer])
def test_torch_matches_numpy(cls):
    s = routing_scores(256, 8, kind="zipf", seed=2)
    bn, bt = cls(8, 2), cls(8, 2)
    for _ in range(3):
        qn = bn.update(s)
        qt = bt.update(torch.tensor(s, dtype=torch.float32))
    assert isinstance(qt, torch.Tensor) and qt.dtype == torch.float32
    assert np.allclose(qn, qt.numpy(), atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="k"):
        LossFreeBalancer(4, 5)
    with pytest.raises(ValueError, match="rate"):
        LossFreeBalancer(4, 1, rate=-1)
    with pytest.raises(ValueError, match="scores"):
        BIPBalancer(4, 1).update(np.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        LossFreeBalancer(4, 1).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="non-negative"):
        LossFreeBalancer(4, 1).update(np.array([1, -1, 0, 0]))


def test_reset_and_k_equals_e():
    b = BIPBalancer(4, 4)
    assert np.all(b.update(np.random.default_rng(0).random((8, 4))) == 0)
    lf = LossFreeBalancer(4, 1)
    lf.update(np.array([3, 0, 0, 1]))
    lf.reset()
    assert np.all(lf.bias == 0)


def test_bias_setter_numpy_and_torch():
    b = BIPBalancer(4, 1)
    b.bias = np.array([0.1, 0.0, 0.2, 0.0])
    assert b.bias.tolist() == [0.1, 0.0, 0.2, 0.0]
    b.bias = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert isinstance(b.bias, torch.Tensor) and b.bias.dtype == torch.float32
    with pytest.raises(ValueError, match="bias"):
        b.bias = np.zeros(3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_balancers_refuse_non_finite_input(bad, lib):
    loads = np.array([3.0, bad, 1.0, 0.0])
    scores = np.random.default_rng(0).random((16, 4))
    scores[2, 1] = bad
    if lib == "torch":
        loads, scores = torch.tensor(loads), torch.tensor(scores, dtype=torch.float32)
    lf = LossFreeBalancer(4, 1)
    before = np.array(lf.bias, dtype=float).copy()
    with pytest.raises(ValueError, match="loads"):
        lf.update(loads)
    with pytest.raises(ValueError, match="scores"):
        lf.update(scores)
    with pytest.raises(ValueError, match="scores"):
        BIPBalancer(4, 1).update(scores)
    with pytest.raises(ValueError, match="bias"):
        lf.bias = loads
    assert np.all(np.isfinite(np.asarray(lf.bias))) and np.array_equal(np.asarray(lf.bias, dtype=float), before)
    lf.update(np.array([3.0, 0.0, 1.0, 0.0]))  # still usable: the refused input left no trace
    assert np.all(np.isfinite(lf.bias))


def test_bip_torch_step_is_the_numpy_step_and_needs_no_sync():
    """The torch path runs the same price iteration (one implementation), with a fixed budget."""
    from moebalance.solvers.routing_prices import price_iteration

    s = routing_scores(512, 16, kind="zipf", imbalance=1.5, seed=3)
    qn, _ = price_iteration(s, 2, 64, 6, stop_when_fixed=False)  # c = 512 * 2 / 16
    qt, done = price_iteration(torch.tensor(s, dtype=torch.float64), 2, 64, 6)
    assert done == 6 and isinstance(qt, torch.Tensor)
    assert np.allclose(qn, qt.numpy(), rtol=0, atol=1e-12)
    # the balancer's step: prices of the tie-broken scores, the same in both libraries
    from moebalance.solvers.routing_prices import tie_break

    qs, _ = price_iteration(tie_break(s), 2, 64, 6, stop_when_fixed=False)
    qst, _ = price_iteration(tie_break(torch.tensor(s)), 2, 64, 6)
    assert np.allclose(qs, qst.numpy(), rtol=0, atol=1e-12)
    b = BIPBalancer(16, 2, iterations=6)
    qb = b.update(torch.tensor(s, dtype=torch.float32))
    assert np.allclose(qb.numpy(), qs, atol=1e-5)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bip_certificate_off_the_hot_path(lib):
    s = routing_scores(1024, 16, kind="zipf", imbalance=1.5, seed=4)
    x = torch.tensor(s, dtype=torch.float32) if lib == "torch" else s
    b = BIPBalancer(16, 2, iterations=1)
    assert b.certificate() is None
    gaps = []
    for it in (1, 2, 30):
        b.iterations = it
        b.reset()
        b.update(x)
        cert = b.certificate()
        assert cert["bound"] >= cert["optimum"] - 1e-6 * abs(cert["optimum"])  # a valid bound
        gaps.append(cert["gap"])
    # the exact optimum is the one mcf finds on the same batch and capacity
    from moebalance import RoutingProblem, solve

    xs = np.asarray(x, dtype=np.float64) if lib == "numpy" else x.double().numpy()
    opt = solve(RoutingProblem(xs, 2, capacity=int(cert["capacity"])), "mcf").objective
    assert cert["optimum"] == pytest.approx(opt, rel=1e-9)
    assert gaps[-1] <= gaps[0] + 1e-12 and gaps[-1] < 1e-2


def test_bip_certificate_names_a_failed_exact_solve(monkeypatch):
    # fast returns no assignment when an invariant of its compiled loops breaks: the certificate says so
    # instead of failing inside numpy
    import moebalance.solvers.routing_fast as routing_fast

    b = BIPBalancer(8, 2, iterations=1)
    b.update(routing_scores(64, 8, kind="zipf", imbalance=1.0, seed=1))
    monkeypatch.setattr(routing_fast, "fast_route", lambda *a, **kw: (None, np.zeros(8), {"failed": "a broken path"}))
    with pytest.raises(RuntimeError, match="a broken path"):
        b.certificate()


def test_layer_bip_balancer_uses_the_tensor_path_on_cpu():
    """The layer's bip balancer runs the tensor-only price step (the GPU code path) on CPU tensors."""
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden=16, ffn=32, num_experts=8, top_k=2, balancer="bip"))
    layer.train()
    x = torch.randn(256, 16)
    layer(x)
    assert isinstance(layer.balancer.bias, torch.Tensor)
    cert = layer.balancer.certificate()
    assert cert is not None and cert["bound"] >= cert["optimum"] - 1e-6 * abs(cert["optimum"])


@pytest.mark.gpu
def test_bip_step_on_gpu_never_synchronises():
    s = torch.tensor(routing_scores(8192, 64, kind="zipf", seed=5), device="cuda", dtype=torch.float32)
    b = BIPBalancer(64, 8, iterations=4)
    b.update(s)  # first call moves the state to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            q = b.update(s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert q.device.type == "cuda"
    cert = b.certificate()  # off the hot path: synchronises, solves exactly on the CPU
    assert cert["gap"] >= -1e-6


def test_torch_price_iteration_with_per_expert_capacities_matches_numpy():
    from moebalance.solvers.routing_prices import dual_bound, price_iteration

    s = routing_scores(300, 6, kind="zipf", imbalance=1.5, seed=6)
    cap = np.array([40, 400, 120, 0, 300, 90])  # one closed, two free (>= T) experts
    qn, _ = price_iteration(s, 2, cap, 5, stop_when_fixed=False)
    qt, _ = price_iteration(torch.tensor(s), 2, cap, 5)
    assert np.allclose(qn, qt.numpy(), rtol=0, atol=1e-12)
    assert qn[1] == qn[4] == 0.0
    assert float(dual_bound(torch.tensor(s), 2, cap, qt)) == pytest.approx(dual_bound(s, 2, cap, qn), rel=1e-12)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_ties_are_broken_so_prices_can_split_repeated_tokens(lib):
    """Integer scores (massive ties): the tie-broken prices route far closer to capacity than plain ones, and
    last_overflow counts the pairs over capacity of the batch routed with the new prices."""
    from moebalance.solvers.routing_prices import price_iteration

    from moebalance.routing import expert_capacity

    rng = np.random.default_rng(0)
    T, E, k = 4096, 16, 2
    s = rng.integers(0, 3, (T, E)).astype(np.float64)
    cap = expert_capacity(T, k, E, 1.0)
    x = torch.tensor(s) if lib == "torch" else s
    b = BIPBalancer(E, k)
    b.update(x)
    loads = np.asarray(b.loads(x))
    assert int(b.last_overflow) == int(np.maximum(loads - cap, 0).sum())
    q_plain, _ = price_iteration(s, k, cap, 4, stop_when_fixed=False)
    plain = np.bincount(np.argsort(-(s - q_plain), axis=1, kind="stable")[:, :k].ravel(), minlength=E)
    assert loads.max() < cap + 0.5 * (plain.max() - cap)
    # the offsets are deterministic and tiny: the same scores give the same prices, distinct choices stay
    b2 = BIPBalancer(E, k)
    b2.update(x)
    assert np.array_equal(np.asarray(b.bias), np.asarray(b2.bias))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BIPBalancer(2**40, 2), "num_experts"),
        (lambda: BIPBalancer(True, 1), "num_experts"),
        (lambda: BIPBalancer(8, 2.5), "k"),
        (lambda: BIPBalancer(8, 0), "k"),
        (lambda: BIPBalancer(8, 9), "k"),
        (lambda: BIPBalancer(8, 2, capacity_factor=float("nan")), "capacity_factor"),
        (lambda: BIPBalancer(8, 2, capacity_factor=-1.0), "capacity_factor"),
        (lambda: BIPBalancer(8, 2, capacity_factor=True), "capacity_factor"),
        (lambda: BIPBalancer(8, 2, capacity_factor="1"), "capacity_factor"),
        (lambda: BIPBalancer(8, 2, iterations=0), "iterations"),
        (lambda: BIPBalancer(8, 2, iterations=1.5), "iterations"),
        (lambda: LossFreeBalancer(8, 2, rate=float("inf")), "rate"),
        (lambda: LossFreeBalancer(8, 2, rate=True), "rate"),
        (lambda: LossFreeBalancer("8", 2), "num_experts"),
    ],
)
def test_constructors_refuse_bad_arguments_by_name(make, match):
    with pytest.raises(ValueError, match=f"`{match}`"):
        make()


def test_update_refuses_wrong_dtypes_and_shapes():
    with pytest.raises(ValueError, match="scores"):
        BIPBalancer(4, 1).update(np.array([["a"] * 4] * 3))
    with pytest.raises(ValueError, match="scores"):
        BIPBalancer(4, 1).update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="loads"):
        LossFreeBalancer(4, 1).update(np.array(["1", "2", "3", "4"]))


def test_certificate_below_capacity_factor_one_says_why():
    s = routing_scores(256, 8, kind="zipf", seed=7)
    b = BIPBalancer(8, 2, capacity_factor=0.5)
    b.update(s)  # prices still work below 1 (they push load off the dearest experts)
    assert np.all(np.isfinite(b.bias))
    with pytest.raises(ValueError, match="capacity_factor.*do not fit"):
        b.certificate()


@pytest.mark.parametrize("balancer", ["loss_free", "bip", "bip_lagged"])
def test_layer_prices_are_in_state_dict_and_come_back(balancer):
    """The layer's only balancer state is its persistent `bias` buffer: a fresh layer loading the state dict
    routes the same, and a meta-built layer materialised with to_empty + reset_parameters starts at zero."""
    from moebalance.integrations.torch import MoEConfig, MoELayer

    cfg = dict(hidden=16, ffn=16, num_experts=8, top_k=2, balancer=balancer, bias_update_rate=0.05, backend="torch")
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(**cfg))
    with torch.no_grad():
        layer.router.weight[0] += 1.0
    layer.train()
    for i in range(3):
        layer(torch.randn(128, 16, generator=torch.Generator().manual_seed(i)) + 0.5)
    assert float(layer.bias.abs().max()) > 0 and "bias" in layer.state_dict()
    layer.eval()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
    other = MoELayer(MoEConfig(**cfg))
    other.load_state_dict(layer.state_dict())
    other.eval()
    assert torch.equal(other(x), layer(x)) and torch.equal(other.bias, layer.bias)
    lazy = MoELayer(MoEConfig(**cfg), device="meta")
    lazy.to_empty(device="cpu")
    lazy.reset_parameters()
    assert torch.equal(lazy.bias, torch.zeros(8))
    assert MoEConfig(**cfg).balancer_name == balancer


def _check_capacity_topk(s, k, cap, idx):
    T, E = s.shape
    assert idx.shape == (T, k)
    srt = idx.sort(1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())  # k distinct experts per token
    assert int(torch.bincount(idx.reshape(-1), minlength=E).max()) <= cap


@pytest.mark.parametrize("T,E,k", [(512, 16, 2), (512, 64, 8), (1000, 16, 8), (96, 8, 3), (7, 7, 2)])
def test_capacity_topk_holds_capacity_and_never_beats_the_exact_optimum(T, E, k):
    """Skewed scores: at most ceil(T k / E) tokens per expert (exact fit when E divides T k), k distinct per
    token, and a routing score no higher than the exact capacitated optimum (method fast) -- and close to it."""
    from moebalance.solvers.routing_fast import fast_route
    from moebalance.solvers.routing_prices import capacity_topk

    from moebalance.routing import expert_capacity

    s = routing_scores(T, E, kind="zipf", imbalance=1.0, seed=T + E)
    cap = expert_capacity(T, k, E, 1.0)
    idx = capacity_topk(torch.tensor(s), k, cap)
    _check_capacity_topk(s, k, cap, idx)
    assert int(np.bincount(np.argsort(-s, 1)[:, :k].ravel(), minlength=E).max()) > cap  # not vacuous
    got = float(np.take_along_axis(s, idx.numpy(), 1).sum())
    a, _, _ = fast_route(s, k, np.full(E, cap))
    best = float(np.take_along_axis(s, a, 1).sum())
    assert got <= best * (1 + 1e-9) + 1e-9
    assert got >= 0.9 * best


def test_capacity_topk_is_the_plain_topk_when_it_fits_and_raises_a_too_small_capacity():
    from moebalance.solvers.routing_prices import capacity_topk

    s = torch.rand(64, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(capacity_topk(s, 2, 64), torch.topk(s, 2, 1).indices)  # capacity >= T: no constraint
    loads = torch.bincount(torch.topk(s, 2, 1).indices.reshape(-1), minlength=8)
    assert torch.equal(capacity_topk(s, 2, int(loads.max())), torch.topk(s, 2, 1).indices)
    idx = capacity_topk(s, 2, 1)  # 64 x 2 pairs cannot fit 8 x 1: raised to ceil(128 / 8) = 16
    _check_capacity_topk(s.numpy(), 2, 16, idx)


@pytest.mark.parametrize("scale", [1e-12, 1.0, 1e12])
@pytest.mark.parametrize("shift", [0.0, 1e6])
def test_capacity_topk_holds_on_ties_at_any_scale(scale, shift):
    """4096 identical tokens, E=16, k=2: every expert takes exactly 512 (plain top-k: 4096 on two experts);
    a repeated-token batch at any scale and shift, and the all-equal batch."""
    from moebalance.solvers.routing_prices import capacity_topk

    row = torch.tensor(routing_scores(1, 16, kind="zipf", imbalance=1.0, seed=3)[0], dtype=torch.float64)
    for s in (row.expand(4096, 16) * scale + shift, torch.full((4096, 16), scale)):
        idx = capacity_topk(s, 2, 512)
        _check_capacity_topk(s.numpy(), 2, 512, idx)
        assert torch.equal(torch.bincount(idx.reshape(-1), minlength=16), torch.full((16,), 512))


def test_capacity_topk_keeps_to_the_allowed_experts():
    """-inf marks experts a token may not take (DeepSeek-V3's unchosen groups): honoured when capacity
    allows; a token with fewer than k allowed experts still gets k distinct ones."""
    from moebalance.solvers.routing_prices import capacity_topk

    g = torch.Generator().manual_seed(1)
    s = torch.rand(400, 8, generator=g, dtype=torch.float64)
    allowed = torch.zeros(400, 8, dtype=torch.bool)
    allowed[:, :4] = True  # experts 0-3 for everyone, 4-7 for the second half only
    allowed[200:, 4:] = True
    c = s.masked_fill(~allowed, float("-inf"))
    idx = capacity_topk(c, 2, 100)
    _check_capacity_topk(s.numpy(), 2, 100, idx)
    assert bool(allowed.gather(1, idx).all())
    c = c.clone()
    c[0, 1:] = float("-inf")  # one allowed expert only
    idx = capacity_topk(c, 2, 100)
    assert idx[0, 0] == 0 and idx[0, 1] != 0


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_bip_route_keeps_the_capacity_after_its_prices(lib):
    """BIPBalancer.route: the batch's experts with the fitted prices, within capacity (the prices alone
    overload an expert on this skewed batch after 4 sweeps)."""
    s = routing_scores(2048, 16, kind="hot", imbalance=1.0, hot_experts=2, seed=4)
    x = torch.tensor(s, dtype=torch.float32) if lib == "torch" else s
    b = BIPBalancer(16, 2)
    b.update(x)
    assert b.last_overflow > 0
    idx = b.route(x)
    assert type(idx).__module__.startswith(lib)
    idx = np.asarray(idx)
    assert idx.shape == (2048, 2) and bool((idx[:, 0] != idx[:, 1]).all())
    assert np.bincount(idx.ravel(), minlength=16).max() <= 256


@pytest.mark.property
@settings(deadline=None, max_examples=40)
@given(
    T=st.integers(1, 300),
    E=st.integers(2, 24),
    k=st.integers(1, 6),
    slack=st.floats(1.0, 1.5),
    scale=st.sampled_from([1e-12, 1e-3, 1.0, 1e6, 1e12]),
    shift=st.sampled_from([0.0, 1.0, -1e3]),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
    compiled=st.booleans(),
)
def test_capacity_topk_property(T, E, k, slack, scale, shift, ties, seed, compiled):
    """Any batch, scale, shift, ties, on the CPU's compiled loop and the tensor version: k distinct experts per
    token, none over capacity (capacity at least ceil(T k / E)), and, when its plain top-k already fits, that
    top-k (on ties the compiled loop takes the lower expert, the tensor version torch.topk's order)."""
    from unittest import mock

    from moebalance.solvers import routing_prices
    from moebalance.solvers.routing_prices import capacity_topk, has_compiled_loops

    from moebalance.routing import expert_capacity

    compiled = compiled and has_compiled_loops()
    k = min(k, E)
    rng = np.random.default_rng(seed)
    s = rng.random((T, E)) ** 3
    if ties:
        s = np.round(s * 4) / 4
    c = torch.tensor(s * scale + shift)
    cap = expert_capacity(T, k, E, slack)
    with mock.patch.object(routing_prices, "_loops", routing_prices._loops if compiled else dict):
        idx = capacity_topk(c, k, cap)
    assert idx.shape == (T, k)
    srt = idx.sort(1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())
    assert int(torch.bincount(idx.reshape(-1), minlength=E).max()) <= max(cap, -(-T * k // E))
    if compiled:  # the larger score first, the lower expert among equal ones
        plain = torch.from_numpy(np.argsort(-c.numpy(), axis=1, kind="stable")[:, :k])
    else:
        plain = torch.topk(c, k, 1).indices
    if int(torch.bincount(plain.reshape(-1), minlength=E).max()) <= cap:  # its own top-k
        assert torch.equal(c.gather(1, idx).sort(1).values, c.gather(1, plain).sort(1).values)
