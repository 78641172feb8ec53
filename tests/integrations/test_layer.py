"""moebalance.integrations.torch: MoEConfig checks, MoELayer against a naive per-token layer (output and the
gradients of x, router weight, w_gate, w_up, w_down) on the Triton and torch back-ends, balancers, statistics,
capacity, and torch.compile.

Without a GPU the Triton back-end runs in Triton's interpreter (fp32, tiny shapes), see tests/moe_testing.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from moebalance.integrations.torch import MoEConfig, MoELayer, apply_capacity, expert_ffn, route  # noqa: E402
from moebalance.kernels import expert_ffn as kernels_expert_ffn  # noqa: E402

from .. import moe_naive  # noqa: E402
from ..moe_testing import DEV, close, exact_fp32  # noqa: F401, I001  (first: TRITON_INTERPRET=1 without a GPU)


def _layer(seed=0, **kw) -> MoELayer:
    cfg = dict(hidden=24, ffn=40, num_experts=5, top_k=2, backend="torch")
    cfg.update(kw)
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(**cfg), device=DEV)


def _twin(layer: MoELayer, backend: str) -> MoELayer:
    c = layer.config
    other = MoELayer(MoEConfig(**{**c.__dict__, "backend": backend}), device=DEV)
    other.load_state_dict(layer.state_dict())
    return other


def _run(layer, x):
    """Output and the gradients of x, router weight, w_gate, w_up, w_down."""
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    y = layer(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype, device=y.device)).view_as(y))
    return [y.detach(), x.grad, layer.router.weight.grad, layer.w_gate.grad, layer.w_up.grad, layer.w_down.grad]


def _naive(layer, x):
    params = [
        t.detach().cpu().double().requires_grad_(True)
        for t in (x, layer.router.weight, layer.w_gate, layer.w_up, layer.w_down)
    ]
    y, eidx, kept, scores = moe_naive.layer_forward(layer.config, *params, layer.bias.cpu().double())
    y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
    return [y.detach()] + [p.grad for p in params], eidx, kept, scores


def _tie_router(layer, rows):
    with torch.no_grad():
        layer.router.weight[list(rows)] = 0.0  # these experts' logits are exactly 0.0: exact score ties


# name -> (config overrides, setup); every case runs on both back-ends against the naive layer
CASES = {
    "softmax_k2": (dict(), None),
    "sigmoid_k1_unnormalised": (dict(router="sigmoid", top_k=1, num_experts=4, normalize_gates=False), None),
    "k_equals_E": (dict(top_k=4, num_experts=4, hidden=20, ffn=18), None),
    "ties_and_an_expert_priced_out": (dict(num_experts=6), "ties"),
    "all_tied_sigmoid": (dict(router="sigmoid", num_experts=6, top_k=3), "all_tied"),
    "capacity_drops": (dict(capacity_factor=0.6, num_experts=4, hidden=20, ffn=36), None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_naive_on_both_backends(name):
    kw, setup = CASES[name]
    layer = _layer(**kw)
    E = layer.config.num_experts
    if setup == "ties":
        _tie_router(layer, (1, 2))
        layer.bias[5] = 10.0  # expert 5 is never chosen: zero tokens
    elif setup == "all_tied":
        _tie_router(layer, range(E))
    x = torch.randn(3, 7, layer.config.hidden, device=DEV)  # 21 tokens, [..., hidden] input
    want, eidx, kept, scores = _naive(layer, x)
    if setup == "all_tied":
        assert (eidx == torch.arange(3)).all()  # ties go to the lower expert index
    for backend in ("torch", "triton"):
        twin = _twin(layer, backend)
        got = _run(twin, x)
        for _what, a, b in zip(("y", "x", "router", "w_gate", "w_up", "w_down"), got, want):
            close(a, b, 1e-4)
        loads = torch.bincount(eidx.reshape(-1), minlength=E).float()
        close(twin.last_stats.loads, loads, 0)
        close(twin.last_stats.max_vio, (loads.max() - loads.mean()) / loads.mean(), 1e-6)
        assert int(twin.last_stats.dropped) == int((kept >= E).sum())
    if name == "capacity_drops":
        assert int((kept >= E).sum()) > 0


def test_route_and_capacity_against_definitions():
    torch.manual_seed(3)
    logits = torch.randn(40, 7)
    logits[:, 4] = logits[:, 2]  # exact ties between experts 2 and 4
    bias = torch.linspace(-0.05, 0.05, 7)
    for router in ("softmax", "sigmoid"):
        for normalize in (True, False):
            eidx, gates, scores = route(logits, 3, router=router, bias=bias, normalize_gates=normalize)
            n_eidx, n_gates, _ = moe_naive.route(logits.double(), 3, router, bias.double(), normalize)
            assert torch.equal(eidx, n_eidx)
            close(gates, n_gates, 1e-6)
            for cf in (0.5, 1.0, 3.0):
                want = moe_naive.capacity_drop(eidx, scores.double(), cf)
                assert torch.equal(apply_capacity(eidx, scores, math.ceil(cf * 40 * 3 / 7 - 1e-9)), want)


def test_aux_loss_value_and_gradient():
    layer = _layer(balancer="aux_loss", aux_loss_coeff=0.1, router="sigmoid")
    x = torch.randn(30, 24, device=DEV)
    layer(x)
    w = layer.router.weight.detach().cpu().double().requires_grad_(True)
    _, eidx, _, scores = moe_naive.layer_forward(
        layer.config,
        x.cpu().double(),
        w,
        layer.w_gate.double().cpu(),
        layer.w_up.double().cpu(),
        layer.w_down.double().cpu(),
        layer.bias.cpu().double(),
    )
    E, k = 5, 2
    f = torch.bincount(eidx.reshape(-1), minlength=E).double() / (30 * k)
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    want = 0.1 * E * (f * p).sum()
    want.backward()
    close(layer.aux_loss, want, 1e-6)
    close(layer.last_stats.aux_loss, want, 1e-6)
    layer.zero_grad()
    layer.aux_loss.backward()
    close(layer.router.weight.grad, w.grad, 1e-6)
    none = _layer(balancer="none")
    none(x)
    assert float(none.aux_loss) == 0.0 and not none.aux_loss.requires_grad
    assert float(none.last_stats.aux_loss) > 0  # the balance measure is reported for every balancer


def test_bias_buffer_updates_only_in_training_without_gradient():
    layer = _layer(balancer="loss_free", bias_update_rate=0.01)
    assert "bias" in layer.state_dict() and not layer.bias.requires_grad
    x = torch.randn(50, 24, device=DEV)
    layer.eval()
    layer(x)
    assert torch.equal(layer.bias, torch.zeros(5, device=DEV))
    layer.train()
    for _ in range(3):
        before = layer.bias.clone()
        layer(x).sum().backward()
        loads = layer.last_stats.loads
        close(layer.bias, before + 0.01 * torch.sign(loads - loads.mean()), 1e-7)
    # a loaded state is where the balancer continues from
    fresh = _layer(balancer="loss_free", bias_update_rate=0.01)
    fresh.load_state_dict(layer.state_dict())
    before = fresh.bias.clone()
    fresh(x)
    close(fresh.bias, before + 0.01 * torch.sign(fresh.last_stats.loads - fresh.last_stats.loads.mean()), 1e-7)


def _skewed_max_vio(balancer: str, steps: int = 48) -> list[float]:
    """MaxVio per training step on a router whose logits for experts 0 and 1 are 1.5 above the others'."""
    layer = _layer(seed=5, hidden=16, ffn=16, num_experts=8, top_k=2, balancer=balancer, bias_update_rate=0.01)
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(16, generator=g)
    out = []
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(8, 16, generator=g) / 4)
        layer.router.weight[:2] += 1.5 * mu / mu.norm() ** 2  # tokens have mean mu: +1.5 logit for experts 0, 1
        for _ in range(steps):
            layer(torch.randn(256, 16, generator=g).to(DEV) + mu.to(DEV))
            out.append(float(layer.last_stats.max_vio))
    return out


def test_balancers_reduce_max_vio_on_a_skewed_router():
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    base = _skewed_max_vio("none")
    assert base[0] > 1.5  # the router is skewed
    assert mean(base[-10:]) > 0.8 * base[0]  # and stays so without a balancer
    for balancer in ("loss_free", "bip_lagged", "bip"):
        vio = _skewed_max_vio(balancer)
        if balancer == "bip":  # priced on the batch before its top-k: balanced from the first batch on
            assert max(vio) < 0.4 * base[0], vio
        else:  # prices of the batches before: the same first batch, bias still zero
            assert vio[0] == pytest.approx(base[0])
        assert mean(vio[-10:]) < 0.4 * base[0], (balancer, vio)


def test_torch_compile_traces_the_layer():
    x = torch.randn(2, 9, 24, device=DEV)
    layer = _layer(balancer="aux_loss")
    want = _run(layer, x)
    # the Triton path through its custom ops' fake implementations: one graph
    triton_layer = _twin(layer, "triton")
    for a, b in zip(_run(torch.compile(triton_layer, fullgraph=True, backend="aot_eager"), x), want):
        close(a, b, 1e-4)
    # torch path in fp32 with a balancer updating in training mode: the per-expert loop reads the group sizes
    # on the host, so the graph breaks there (bf16 below avoids that)
    lf = _layer(balancer="loss_free", bias_update_rate=0.01)
    twin = _twin(lf, "torch")
    y = torch.compile(lf, backend="aot_eager")(x)
    close(y, twin(x), 1e-5)
    close(lf.bias, twin.bias, 1e-7)
    assert lf.bias.abs().sum() > 0


def test_torch_compile_bf16_grouped_mm_is_one_graph():
    """bf16 with torch._grouped_mm: no host sync, so the whole layer (forward and backward) is one graph.

    aot_eager traces exactly what inductor would get; inductor's C++ build itself takes minutes on 2 cores."""
    layer = _layer(hidden=16, ffn=32, num_experts=4, dtype=torch.bfloat16, router="sigmoid")
    x = torch.randn(12, 16, device=DEV, dtype=torch.bfloat16)
    want = _run(layer, x)
    for a, b in zip(_run(torch.compile(layer, fullgraph=True, backend="aot_eager"), x), want):
        close(a, b, 2e-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    layer = _layer(balancer="bip", backend=backend)
    x = torch.randn(0, 24, device=DEV, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 24) and x.grad.shape == (0, 24)
    assert float(layer.last_stats.max_vio) == 0.0 and float(layer.last_stats.loads.sum()) == 0.0
    w = (layer.w_gate, layer.w_up, layer.w_down)
    assert expert_ffn(torch.randn(0, 24, device=DEV), [0] * 5, *w, backend=backend).shape == (0, 24)


def test_expert_ffn_is_exposed():
    assert expert_ffn is kernels_expert_ffn


BAD_CONFIGS = [
    (dict(top_k=6), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(hidden=0), "hidden"),
    (dict(hidden=2.5), "hidden"),
    (dict(hidden=True), "hidden"),
    (dict(ffn=-1), "ffn"),
    (dict(num_experts=0), "num_experts"),
    (dict(router="relu"), "router"),
    (dict(balancer="magic"), "balancer"),
    (dict(backend="cuda"), "backend"),
    (dict(normalize_gates="yes"), "normalize_gates"),
    (dict(bias_update_rate=0.0), "bias_update_rate"),
    (dict(bias_update_rate=float("nan")), "bias_update_rate"),
    (dict(aux_loss_coeff=-1.0), "aux_loss_coeff"),
    (dict(capacity_factor=0), "capacity_factor"),
    (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(dtype="int8"), "dtype"),
    (dict(dtype=torch.int32), "dtype"),
]


@pytest.mark.parametrize("kw,field", BAD_CONFIGS, ids=[f"{f}={list(k.values())[0]!r}" for k, f in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(kw, field):
    base = dict(hidden=8, ffn=8, num_experts=5, top_k=2)
    with pytest.raises(ValueError, match=f"`{field}`"):
        MoEConfig(**{**base, **kw})


def test_bad_layer_input():
    with pytest.raises(ValueError, match="config"):
        MoELayer({"hidden": 8})
    layer = _layer()
    with pytest.raises(ValueError, match="`x`"):
        layer(torch.randn(3, 23, device=DEV))
    assert MoEConfig(hidden=8, ffn=8, num_experts=2, top_k=1, dtype="bf16").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("balancer", ["none", "loss_free", "bip", "aux_loss"])
def test_gpu_layer_triton_matches_torch(dtype, tol, balancer):
    layer = _layer(
        hidden=256,
        ffn=384,
        num_experts=16,
        top_k=4,
        balancer=balancer,
        dtype=dtype,
        capacity_factor=1.25 if balancer == "bip" else None,
    )
    x = torch.randn(4, 250, 256, device="cuda", dtype=dtype)
    ref = _twin(layer, "torch")
    got = _run(_twin(layer, "triton"), x)
    for a, b in zip(got, _run(ref, x)):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0)) < tol


def test_bip_same_batch_balances_the_first_batch():
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.manual_seed(0)
    stats = {}
    for same in (False, True):
        torch.manual_seed(0)
        layer = MoELayer(
            MoEConfig(hidden=16, ffn=16, num_experts=8, top_k=2, balancer="bip", backend="torch", bip_same_batch=same)
        )
        with torch.no_grad():
            layer.router.weight[0] += 2.0  # every token prefers expert 0
        x = torch.randn(512, 16) + 1.0
        layer.train()
        layer(x)
        stats[same] = float(layer.last_stats.max_vio)
    assert stats[True] < 0.3 < stats[False]
    with pytest.raises(ValueError, match="bip_same_batch"):
        MoEConfig(hidden=4, ffn=4, num_experts=4, top_k=1, balancer="loss_free", bip_same_batch=True)
