"""``MoELayer`` with balancer "bip" routes each training batch within the experts' capacities
(``enforce_capacity=True``, the default, as in the transformers integration), where the plain top-k of the
same prices overflows; ``enforce_capacity=False`` keeps the plain top-k."""

from __future__ import annotations

import pytest
import torch
from moebalance.integrations.torch import MoEConfig, MoELayer, route

from moebalance.routing import expert_capacity

E, K, H = 8, 2, 12


def _skewed_layer(**kw) -> tuple[MoELayer, torch.Tensor]:
    """A layer whose router sends almost every token to experts 0 and 1, and a batch of 256 tokens."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden=H, ffn=16, num_experts=E, top_k=K, balancer="bip", backend="torch", **kw))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, H, generator=g) * 0.3
    x[:, 0] += 3.0
    with torch.no_grad():
        layer.router.weight.mul_(0.1)
        layer.router.weight[:2, 0] += 4.0
    return layer, x


def _loads(eidx: torch.Tensor) -> torch.Tensor:
    return torch.bincount(eidx.reshape(-1), minlength=E)


def test_bip_routes_within_capacity_where_plain_topk_of_its_prices_overflows():
    layer, x = _skewed_layer()
    layer.train()
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    T = x.shape[0]
    cap = expert_capacity(T, K, E, 1.0)
    loads = layer.last_stats.loads
    assert float(loads.sum()) == T * K  # dropless: every token keeps k experts
    assert float(loads.max()) <= cap
    # the same prices (fitted on this batch before routing it) with the plain top-k overflow
    with torch.no_grad():
        plain, _, _ = route(layer.router(x), K, bias=layer.bias)
    assert int(_loads(plain).max()) > cap
    assert float(layer.bias.abs().sum()) > 0  # the batch was priced
    # outputs and gradients flow through the capacity-routed experts
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in (("x", xr), ("router", layer.router.weight), ("w_gate", layer.w_gate), ("w_down", layer.w_down)):
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name
    # every expert that was used gets a gradient, and at most `cap` tokens' worth of load each
    used = loads > 0
    assert bool((layer.w_down.grad.abs().sum((1, 2)) > 0)[used].all())


def test_bip_capacity_respects_the_capacity_factor_and_distinct_experts():
    layer, x = _skewed_layer(capacity_factor=1.25)
    layer.train()
    y = layer(x)
    cap = expert_capacity(x.shape[0], K, E, 1.25)
    assert float(layer.last_stats.loads.max()) <= cap
    assert int(layer.last_stats.dropped) == 0  # within capacity: nothing for apply_capacity to drop
    assert y.shape == x.shape


def test_enforce_capacity_false_is_the_plain_topk_of_the_batch_prices():
    layer, x = _skewed_layer(enforce_capacity=False)
    layer.train()
    layer(x)
    with torch.no_grad():
        plain, _, _ = route(layer.router(x), K, bias=layer.bias)
    assert torch.equal(layer.last_stats.loads, _loads(plain).float())
    assert float(layer.last_stats.loads.max()) > expert_capacity(x.shape[0], K, E, 1.0)


def test_same_prices_either_way_and_eval_routes_by_plain_topk():
    """The option changes the routing only: the prices fitted are the same; in eval no capacity is imposed."""
    a, x = _skewed_layer()
    b, _ = _skewed_layer(enforce_capacity=False)
    a.train()
    b.train()
    a(x)
    b(x)
    assert torch.equal(a.bias, b.bias)
    a.eval()
    b.eval()
    with torch.no_grad():
        a(x)
        b(x)
    assert torch.equal(a.last_stats.loads, b.last_stats.loads)


def test_enforce_capacity_must_be_a_bool():
    with pytest.raises(ValueError, match="enforce_capacity"):
        MoEConfig(hidden=H, ffn=16, num_experts=E, top_k=K, balancer="bip", enforce_capacity=1)
