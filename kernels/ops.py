"""The Triton kernels as ``torch.library`` custom ops (namespace ``moebalance``), each with a fake implementation.

The fake (meta) implementations give output shapes and dtypes only, so ``torch.compile`` traces through the ops
without running them. The real implementations import the Triton launchers lazily (``_triton_moe``), so this
module imports without triton and without a GPU. Shapes (P = T * k pairs, E experts, H hidden, F ffn):

  routing_metadata(eidx [T, k], E, block_m) -> sorted_idx [P], offsets [E+1], block_expert [B], block_start [B]
  block_table(counts [E], rows, block_m) -> offsets [E+1], block_expert [B], block_start [B]
  gate_up(x [T, H], w_gate, w_up [E, H, F], ...) -> h, g, u [P, F] (sorted rows; g, u empty unless save)
  down(h [P, F], w_down [E, F, H], ...) -> o [P, H] (pair rows)
  combine(o [P, H], weights [T, k] | None, eidx [T, k], E) -> y [T, H]
  combine_bwd(dy [T, H], o [P, H], eidx, E) -> dweights [T, k] float32
  down_bwd(dy [T, H], weights | None, w_down, g, u, ...) -> dg, du [P, F]
  dx(dg, du [P, F], w_gate, w_up, ...) -> dx_pairs [P, H]
  expert_dw(a [*, M], b [*, N], sorted_idx, scale | None, offsets, ...) -> [E, M, N]
with B = ceil(P / block_m) + E row tiles. See ``_triton_moe`` for the layout of the metadata.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "routing_metadata",
    "block_table",
    "gate_up",
    "down",
    "combine",
    "combine_bwd",
    "down_bwd",
    "dx",
    "expert_dw",
    "num_blocks",
]


def _k():
    from . import _triton_moe

    return _triton_moe


def num_blocks(rows: int, num_experts: int, block_m: int) -> int:
    """Length of the row-tile table: an upper bound on ``sum_e ceil(count_e / block_m)``, known without a sync."""
    return math.ceil(rows / block_m) + num_experts


def _i32(n: int, like: Tensor) -> Tensor:
    return torch.empty(n, dtype=torch.int32, device=like.device)


@torch.library.custom_op("moebalance::routing_metadata", mutates_args=())
def routing_metadata(eidx: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(_k().routing_metadata(eidx, num_experts, block_m))


@routing_metadata.register_fake
def _(eidx, num_experts, block_m):
    P = eidx.numel()
    B = num_blocks(P, num_experts, block_m)
    return _i32(P, eidx), _i32(num_experts + 1, eidx), _i32(B, eidx), _i32(B, eidx)


@torch.library.custom_op("moebalance::block_table", mutates_args=())
def block_table(counts: Tensor, rows: int, block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_k().block_table(counts, rows, block_m))


@block_table.register_fake
def _(counts, rows, block_m):
    E = counts.numel()
    B = num_blocks(rows, E, block_m)
    return _i32(E + 1, counts), _i32(B, counts), _i32(B, counts)


@torch.library.custom_op("moebalance::gate_up", mutates_args=())
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
    return tuple(_k().gate_up(x, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, top_k, block_m, save))


@gate_up.register_fake
def _(x, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, top_k, block_m, save):
    P, F = sorted_idx.shape[0], w_gate.shape[2]
    saved = (P, F) if save else (0,)
    return x.new_empty(P, F), x.new_empty(saved), x.new_empty(saved)


@torch.library.custom_op("moebalance::down", mutates_args=())
def down(
    h: Tensor,
    w_down: Tensor,
    sorted_idx: Tensor,
    offsets: Tensor,
    block_expert: Tensor,
    block_start: Tensor,
    block_m: int,
) -> Tensor:
    return _k().down(h, w_down, sorted_idx, offsets, block_expert, block_start, block_m)


@down.register_fake
def _(h, w_down, sorted_idx, offsets, block_expert, block_start, block_m):
    return h.new_empty(sorted_idx.shape[0], w_down.shape[2])


@torch.library.custom_op("moebalance::combine", mutates_args=())
def combine(o: Tensor, weights: Tensor | None, eidx: Tensor, num_experts: int) -> Tensor:
    return _k().combine(o, weights, eidx, num_experts)


@combine.register_fake
def _(o, weights, eidx, num_experts):
    return o.new_empty(eidx.shape[0], o.shape[1])


@torch.library.custom_op("moebalance::combine_bwd", mutates_args=())
def combine_bwd(dy: Tensor, o: Tensor, eidx: Tensor, num_experts: int) -> Tensor:
    return _k().combine_bwd(dy, o, eidx, num_experts)


@combine_bwd.register_fake
def _(dy, o, eidx, num_experts):
    return dy.new_empty(eidx.shape, dtype=torch.float32)


@torch.library.custom_op("moebalance::down_bwd", mutates_args=())
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
    return tuple(
        _k().down_bwd(dy, weights, w_down, g, u, sorted_idx, offsets, block_expert, block_start, top_k, block_m)
    )


@down_bwd.register_fake
def _(dy, weights, w_down, g, u, sorted_idx, offsets, block_expert, block_start, top_k, block_m):
    return torch.empty_like(g), torch.empty_like(u)


@torch.library.custom_op("moebalance::dx", mutates_args=())
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
    return _k().dx(dg, du, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, block_m)


@dx.register_fake
def _(dg, du, w_gate, w_up, sorted_idx, offsets, block_expert, block_start, block_m):
    return dg.new_empty(sorted_idx.shape[0], w_gate.shape[1])


@torch.library.custom_op("moebalance::expert_dw", mutates_args=())
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
    return _k().expert_dw(a, b, sorted_idx, scale, offsets, top_k, a_gather, b_gather)


@expert_dw.register_fake
def _(a, b, sorted_idx, scale, offsets, top_k, a_gather, b_gather):
    return a.new_empty(offsets.shape[0] - 1, a.shape[1], b.shape[1])
