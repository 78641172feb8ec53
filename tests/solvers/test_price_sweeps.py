"""The torch price sweeps (:func:`~moebalance.solvers.routing_prices.price_iteration` on tensors) against a
reference written with full sorts: every sweep selects exact order statistics, so the prices agree bit for bit
(float32 and float64, uniform and per-expert capacities, warm starts, ties)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from moebalance.solvers.routing_prices import price_iteration, tie_break


def _sorted_sweeps(s: torch.Tensor, k: int, cap: np.ndarray, iterations: int, q: torch.Tensor) -> torch.Tensor:
    T, E = s.shape
    cap = np.minimum(cap, T)
    for _ in range(iterations):
        p = torch.sort(s - q, dim=1, descending=True).values[:, k]
        col = torch.sort(s - p[:, None], dim=0, descending=True).values  # [T, E]
        q = torch.stack([col[int(cap[e]), e].clamp_min(0.0) if cap[e] < T else s.new_zeros(()) for e in range(E)])
    return q


CASES = list(itertools.product([(512, 8, 2), (300, 16, 3), (64, 5, 1), (128, 64, 8)], ["soft", "ties", "same"], [0, 1]))


@pytest.mark.parametrize("shape,kind,seed", CASES)
def test_torch_sweeps_match_sorted_reference(shape, kind, seed):
    T, E, k = shape
    g = torch.Generator().manual_seed(seed)
    if kind == "soft":
        logit = torch.randn(T, E, generator=g) * 3
        logit[:, :2] += 4
        s = logit.softmax(-1)
    elif kind == "ties":
        s = torch.randint(0, 3, (T, E), generator=g).float()
    else:
        s = torch.rand(1, E, generator=g).expand(T, E).contiguous()
    for dtype in (torch.float32, torch.float64):
        x = s.to(dtype) if seed == 0 else tie_break(s).to(dtype)
        uniform = int(np.ceil(T * k / E))
        per_expert = np.random.default_rng(seed).integers(1, T + 2, E)
        for cap in (uniform, per_expert):
            q0 = torch.rand(E, generator=g, dtype=dtype) * 0.05
            for it in (1, 4):
                got, done = price_iteration(x, k, cap, it, q0, stop_when_fixed=False)
                want = _sorted_sweeps(x, k, np.broadcast_to(np.asarray(cap), (E,)), it, q0)
                assert done == it and got.dtype == dtype
                assert torch.equal(got, want), (dtype, cap, it)
