"""Plain torch references of every Triton kernel in ``moebalance.kernels.ops``, with the same signatures.

They are the oracles of the kernel tests and read top to bottom: per-expert loops over ``offsets`` (a host sync),
fp32 arithmetic, outputs rounded to the input dtype like the kernels do. The CPU path users run is
:func:`moebalance.kernels.experts.moe_experts` with ``backend="torch"``, which is differentiable through torch's
own autograd; the routing helpers at the top are shared with it.

Shapes: P = T * k pairs (pair id ``t * k + j``), E experts, H hidden, F ffn; see ``_triton_moe`` for the layout
of ``sorted_idx``, ``offsets`` and the row-tile table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "sort_by_expert",
    "routing_metadata",
    "block_table",
    "gate_up",
    "down",
    "combine",
    "combine_bwd",
    "down_bwd",
    "dx",
    "expert_dw",
]


def _bins(eidx: Tensor, num_experts: int) -> Tensor:
    """``[P]`` expert of each pair, with dropped pairs (ids outside ``[0, E)``) mapped to bin E."""
    flat = eidx.reshape(-1).long()
    return torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)


def sort_by_expert(eidx: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """``sorted_idx [P]`` int32 (stable: token order inside an expert, dropped pairs last) and ``offsets [E+1]``."""
    bins = _bins(eidx, num_experts)
    sorted_idx = torch.sort(bins, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=eidx.device)
    counts.scatter_add_(0, bins, torch.ones_like(bins, dtype=torch.int32))
    offsets = torch.cat([counts.new_zeros(1), counts[:num_experts].cumsum(0).to(torch.int32)])
    return sorted_idx, offsets


def block_table(counts: Tensor, rows: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets ``[E+1]`` and the row-tile table (``-1`` past the last tile) of per-expert ``counts [E]``."""
    E = counts.numel()
    c = counts.long().cpu().tolist()
    offsets = torch.tensor([0] + torch.tensor(c).cumsum(0).tolist(), dtype=torch.int32)
    n = -(-rows // block_m) + E
    block_expert = torch.full((n,), -1, dtype=torch.int32)
    block_start = torch.zeros(n, dtype=torch.int32)
    b = 0
    for e in range(E):
        for start in range(int(offsets[e]), int(offsets[e + 1]), block_m):
            block_expert[b], block_start[b] = e, start
            b += 1
    dev = counts.device
    return offsets.to(dev), block_expert.to(dev), block_start.to(dev)


def routing_metadata(eidx: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sorted_idx, offsets = sort_by_expert(eidx, num_experts)
    _, block_expert, block_start = block_table(offsets.diff(), eidx.numel(), block_m)
    return sorted_idx, offsets, block_expert, block_start


def _segments(offsets: Tensor):
    o = offsets.cpu().tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1)]


def gate_up(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    sorted_idx: Tensor,
    offsets: Tensor,
    block_expert: Tensor,
    block_start: Tensor,
    top_k: int,
    block_m: int,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    P, F_ = sorted_idx.numel(), w_gate.shape[2]
    g = torch.zeros(P, F_, dtype=torch.float32, device=x.device)
    u = torch.zeros_like(g)
    tok = sorted_idx.long() // top_k
    for e, s, t in _segments(offsets):
        xs = x[tok[s:t]].float()
        g[s:t] = xs @ w_gate[e].float()
        u[s:t] = xs @ w_up[e].float()
    h = (F.silu(g) * u).to(x.dtype)
    if not save:
        return h, x.new_empty(0), x.new_empty(0)
    return h, g.to(x.dtype), u.to(x.dtype)


def down(
    h: Tensor,
    w_down: Tensor,
    sorted_idx: Tensor,
    offsets: Tensor,
    block_expert: Tensor,
    block_start: Tensor,
    block_m: int,
) -> Tensor:
    o = torch.zeros(sorted_idx.numel(), w_down.shape[2], dtype=torch.float32, device=h.device)
    for e, s, t in _segments(offsets):
        o[sorted_idx[s:t].long()] = h[s:t].float() @ w_down[e].float()
    return o.to(h.dtype)


def combine(o: Tensor, weights: Tensor | None, eidx: Tensor, num_experts: int) -> Tensor:
    T, k = eidx.shape
    keep = (eidx >= 0) & (eidx < num_experts)
    w = torch.ones(T, k, device=o.device) if weights is None else weights.float()
    w = torch.where(keep, w, 0.0)
    rows = torch.where(keep[..., None], o.view(T, k, o.shape[1]).float(), 0.0)
    return (rows * w[..., None]).sum(1).to(o.dtype)


def combine_bwd(dy: Tensor, o: Tensor, eidx: Tensor, num_experts: int) -> Tensor:
    T, k = eidx.shape
    keep = (eidx >= 0) & (eidx < num_experts)
    dots = (dy.float()[:, None, :] * o.view(T, k, o.shape[1]).float()).sum(-1)
    return torch.where(keep, dots, 0.0)


def down_bwd(
    dy: Tensor,
    weights: Tensor | None,
    w_down: Tensor,
    g: Tensor,
    u: Tensor,
    sorted_idx: Tensor,
    offsets: Tensor,
    block_expert: Tensor,
    block_start: Tensor,
    top_k: int,
    block_m: int,
) -> tuple[Tensor, Tensor]:
    P, F_ = g.shape
    dh = torch.zeros(P, F_, dtype=torch.float32, device=dy.device)
    pair = sorted_idx.long()
    w = torch.ones(P, device=dy.device) if weights is None else weights.reshape(-1).float()
    for e, s, t in _segments(offsets):
        dh[s:t] = (dy[pair[s:t] // top_k].float() @ w_down[e].float().T) * w[pair[s:t], None]
    gf, uf = g.float(), u.float()
    sg = torch.sigmoid(gf)
    dg = dh * uf * sg * (1 + gf * (1 - sg))
    du = dh * gf * sg
    return dg.to(g.dtype), du.to(u.dtype)


def dx(
    dg: Tensor,
    du: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    sorted_idx: Tensor,
    offsets: Tensor,
    block_expert: Tensor,
    block_start: Tensor,
    block_m: int,
) -> Tensor:
    out = torch.zeros(sorted_idx.numel(), w_gate.shape[1], dtype=torch.float32, device=dg.device)
    for e, s, t in _segments(offsets):
        out[sorted_idx[s:t].long()] = dg[s:t].float() @ w_gate[e].float().T + du[s:t].float() @ w_up[e].float().T
    return out.to(dg.dtype)


def expert_dw(
    a: Tensor,
    b: Tensor,
    sorted_idx: Tensor,
    scale: Tensor | None,
    offsets: Tensor,
    top_k: int,
    a_gather: bool,
    b_gather: bool,
) -> Tensor:
    E = offsets.numel() - 1
    out = torch.zeros(E, a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    pair = sorted_idx.long()
    for e, s, t in _segments(offsets):
        r = torch.arange(s, t, device=a.device)
        ar = pair[s:t] // top_k if a_gather else r
        br = pair[s:t] // top_k if b_gather else r
        bm = b[br].float()
        if scale is not None:
            bm = bm * scale.reshape(-1)[pair[s:t]].float()[:, None]
        out[e] = a[ar].float().T @ bm
    return out.to(a.dtype)
