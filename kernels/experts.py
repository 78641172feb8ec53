"""The expert computation of an MoE layer on one device, differentiable, on two back-ends.

- ``backend="triton"``: the custom ops of :mod:`moebalance.kernels.ops` wrapped in one ``autograd.Function``
  (forward: routing metadata -> gathered gate/up GEMM with SwiGLU -> down GEMM -> combine; backward: gate
  gradient, dW of the three weights, dX). ``torch.compile`` traces it through the ops' fake implementations.
- ``backend="torch"``: real torch code users run on CPU, differentiated by torch's autograd. It sorts the
  pairs by expert and runs each projection as one ``torch._grouped_mm`` where torch has it for the dtype and
  device (``torch_impl="grouped_mm"``), otherwise as a loop over experts (``torch_impl="loop"``, what the LLEP
  reference code does).
- ``backend="auto"``: Triton on CUDA tensors when triton is installed, torch otherwise.

Weights: ``w_gate``, ``w_up`` ``[E, hidden, ffn]``, ``w_down`` ``[E, ffn, hidden]``; the expert function is
``f_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

__all__ = [
    "moe_experts",
    "expert_ffn",
    "combine_pairs",
    "resolve_backend",
    "grouped_mm_available",
    "BACKENDS",
    "TORCH_IMPLS",
]

BACKENDS = ("auto", "triton", "torch")
TORCH_IMPLS = ("auto", "grouped_mm", "loop")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete back-end ("triton" or "torch") for tensors on ``device``; ValueError if it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if backend == "triton":
        if not _triton_installed():
            raise ValueError("`backend`='triton' needs the triton package; use backend='torch'")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"`backend`='triton' needs CUDA tensors (got {device}); on CPU use backend='torch', or set "
                "TRITON_INTERPRET=1 before the first Triton call to run the kernels in Triton's interpreter"
            )
    return backend


def _default_block_m(device: torch.device) -> int:
    return 16 if device.type != "cuda" else 64


def grouped_mm_available(a: Tensor, w: Tensor) -> bool:
    """Whether ``torch._grouped_mm(a [N, K], w [E, K, M])`` runs for these dtypes, strides and device."""
    if not hasattr(torch, "_grouped_mm") or a.dtype != w.dtype:
        return False
    item = a.element_size()
    if (a.shape[1] * item) % 16 or (w.shape[2] * item) % 16:
        return False  # torch wants 16-byte aligned row strides
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:
        return False  # eager CPU runs fp32/fp16, but the op's shape function (what compile traces) wants bf16
    return a.device.type == "cpu" and a.dtype in (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------------
# argument checks shared by both entry points
# ---------------------------------------------------------------------------------------------------------


def _check_weights(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, x_name: str) -> None:
    for name, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if not isinstance(t, Tensor) or t.ndim != 3:
            raise ValueError(f"`{name}` must be a 3-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"`{name}` must have `{x_name}`'s dtype and device ({x.dtype}, {x.device}), got {t.dtype} on {t.device}"
            )
    E, H, F_ = w_gate.shape
    if tuple(w_up.shape) != (E, H, F_):
        raise ValueError(f"`w_up` must have w_gate's shape {(E, H, F_)}, got {tuple(w_up.shape)}")
    if tuple(w_down.shape) != (E, F_, H):
        raise ValueError(f"`w_down` must have shape [E, ffn, hidden] = {(E, F_, H)}, got {tuple(w_down.shape)}")
    if x.ndim != 2 or x.shape[1] != H:
        raise ValueError(f"`{x_name}` must have shape [N, hidden={H}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"`{x_name}` must be a floating-point tensor, got {x.dtype}")


# ---------------------------------------------------------------------------------------------------------
# Triton path
# ---------------------------------------------------------------------------------------------------------


class _TritonExperts(torch.autograd.Function):
    """y = combine(gates, down(gate_up(x))) over the routing metadata; ``eidx`` None means rows are already
    grouped by expert (no gather, no combine: output row r is row r's expert output)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        gates: Tensor | None,
        w_gate: Tensor,
        w_up: Tensor,
        w_down: Tensor,
        eidx: Tensor | None,
        sorted_idx: Tensor,
        offsets: Tensor,
        block_expert: Tensor,
        block_start: Tensor,
        block_m: int,
        save: bool,
    ) -> Tensor:
        k = 1 if eidx is None else eidx.shape[1]
        meta = (sorted_idx, offsets, block_expert, block_start)
        h, g, u = ops.gate_up(x, w_gate, w_up, *meta, k, block_m, save)
        o = ops.down(h, w_down, *meta, block_m)
        y = o if eidx is None else ops.combine(o, gates, eidx, w_gate.shape[0])
        if save:
            ctx.save_for_backward(x, gates, w_gate, w_up, w_down, eidx, *meta, h, g, u, o)
        ctx.block_m = block_m
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        x, gates, w_gate, w_up, w_down, eidx, sorted_idx, offsets, block_expert, block_start, h, g, u, o = (
            ctx.saved_tensors
        )
        need_x, need_gates, need_wg, need_wu, need_wd = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        E, bm = w_gate.shape[0], ctx.block_m
        k = 1 if eidx is None else eidx.shape[1]
        meta = (sorted_idx, offsets, block_expert, block_start)
        dx = dgates = dwg = dwu = dwd = None
        if need_gates and gates is not None:
            dgates = ops.combine_bwd(dy, o, eidx, E).to(gates.dtype)
        if need_wd:
            dwd = ops.expert_dw(h, dy, sorted_idx, gates, offsets, k, False, eidx is not None)
        if need_x or need_wg or need_wu:
            dg, du = ops.down_bwd(dy, gates, w_down, g, u, *meta, k, bm)
            if need_wg:
                dwg = ops.expert_dw(x, dg, sorted_idx, None, offsets, k, eidx is not None, False)
            if need_wu:
                dwu = ops.expert_dw(x, du, sorted_idx, None, offsets, k, eidx is not None, False)
            if need_x:
                dxp = ops.dx(dg, du, w_gate, w_up, *meta, bm)
                dx = dxp if eidx is None else ops.combine(dxp, None, eidx, E)
        return dx, dgates, dwg, dwu, dwd, None, None, None, None, None, None, None


def _needs_save(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _triton_experts(x, eidx, gates, w_gate, w_up, w_down, block_m):
    E = w_gate.shape[0]
    meta = ops.routing_metadata(eidx, E, block_m)
    save = _needs_save(x, gates, w_gate, w_up, w_down)
    return _TritonExperts.apply(
        x.contiguous(), gates.contiguous(), w_gate, w_up, w_down, eidx.contiguous(), *meta, block_m, save
    )


def _triton_ffn(x_sorted, counts, w_gate, w_up, w_down, block_m):
    N = x_sorted.shape[0]
    offsets, block_expert, block_start = ops.block_table(counts, N, block_m)
    sorted_idx = torch.arange(N, dtype=torch.int32, device=x_sorted.device)
    save = _needs_save(x_sorted, w_gate, w_up, w_down)
    return _TritonExperts.apply(
        x_sorted.contiguous(),
        None,
        w_gate,
        w_up,
        w_down,
        None,
        sorted_idx,
        offsets,
        block_expert,
        block_start,
        block_m,
        save,
    )


# ---------------------------------------------------------------------------------------------------------
# torch path
# ---------------------------------------------------------------------------------------------------------


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``torch._grouped_mm``'s backward rejects
    the stride-0 gradient that e.g. ``out.sum().backward()`` produces."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return g.contiguous()


def _grouped(a: Tensor, w: Tensor, offsets: Tensor, impl: str) -> Tensor:
    """``[N, M]``: rows ``offsets[e]:offsets[e+1]`` of ``a [N, K]`` times ``w[e] [K, M]``.

    Rows past ``offsets[E]`` (dropped pairs) are computed with the last expert (grouped_mm: its group is
    stretched to the end so no output row is left undefined) or set to zero (loop); callers mask them out.
    """
    N = a.shape[0]
    if impl == "grouped_mm":
        ends = torch.cat([offsets[1:-1], offsets.new_full((1,), N)]).to(torch.int32)
        return _ContiguousGrad.apply(torch._grouped_mm(a, w, offs=ends))
    bounds = offsets.tolist()
    # split the stacked weight once: indexing w[e] per expert would make backward build a full [E, K, M]
    # zero gradient per expert (E times the memory traffic); unbind's backward stacks the E slices once
    ws = w.unbind(0)
    parts = [a[bounds[e] : bounds[e + 1]] @ ws[e] for e in range(len(ws)) if bounds[e + 1] > bounds[e]]
    parts.append(a.new_zeros(N - bounds[-1], w.shape[2]))
    return torch.cat(parts)


def _torch_impl(impl: str, a: Tensor, w_gate: Tensor, w_down: Tensor) -> str:
    if impl not in TORCH_IMPLS:
        raise ValueError(f"`torch_impl` must be one of {TORCH_IMPLS}, got {impl!r}")
    ok = grouped_mm_available(a, w_gate) and grouped_mm_available(a.new_empty(0, w_down.shape[1]), w_down)
    if impl == "auto":
        return "grouped_mm" if ok else "loop"
    if impl == "grouped_mm" and not ok:
        raise ValueError(
            f"`torch_impl`='grouped_mm' is not available for {a.dtype} on {a.device} with these "
            "shapes (torch needs torch._grouped_mm and 16-byte aligned rows)"
        )
    return impl


def _ffn_sorted(xs: Tensor, offsets: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, impl: str) -> Tensor:
    h = F.silu(_grouped(xs, w_gate, offsets, impl)) * _grouped(xs, w_up, offsets, impl)
    return _grouped(h, w_down, offsets, impl)


def _torch_experts(x, eidx, gates, w_gate, w_up, w_down, impl):
    T, k = eidx.shape
    E = w_gate.shape[0]
    sorted_idx, offsets = reference.sort_by_expert(eidx, E)
    pair = sorted_idx.long()
    o_sorted = _ffn_sorted(x.index_select(0, pair // k), offsets, w_gate, w_up, w_down, impl)
    inverse = torch.empty_like(pair)
    inverse[pair] = torch.arange(pair.numel(), device=pair.device)
    o = o_sorted.index_select(0, inverse).view(T, k, w_down.shape[2])
    return combine_pairs(o, eidx, gates, E).to(x.dtype)


def combine_pairs(o: Tensor, eidx: Tensor, gates: Tensor, num_experts: int) -> Tensor:
    """``[T, hidden]`` float32: ``sum_j gates[t, j] * o[t, j]`` over the kept pairs (ids in ``[0, E)``).

    ``o`` ``[T, k, hidden]`` expert outputs per pair (rows of dropped pairs may hold anything: they are masked,
    not multiplied, so NaN there cannot leak), ``eidx`` ``[T, k]``, ``gates`` ``[T, k]``. The fp32 sum over the
    k pairs is the combine of the single-device layer and of the expert-parallel one.
    """
    keep = (eidx >= 0) & (eidx < num_experts)
    o = torch.where(keep[..., None], o.float(), 0.0)
    w = torch.where(keep, gates.float(), 0.0)
    return (o * w[..., None]).sum(1)


# ---------------------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------------------


def moe_experts(
    x: Tensor,
    eidx: Tensor,
    gates: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    backend: str = "auto",
    block_m: int | None = None,
    torch_impl: str = "auto",
) -> Tensor:
    """``y [T, hidden]`` = sum over j of ``gates[t, j] * f_{eidx[t, j]}(x[t])``, differentiable in x, gates and
    the three weights.

    Args:
      x: ``[T, hidden]`` tokens.
      eidx: ``[T, k]`` integer expert of each token's j-th choice; an id outside ``[0, E)`` drops that pair
        (it contributes nothing and gets no gradient).
      gates: ``[T, k]`` gate values (float32 recommended; their gradient comes back in their dtype).
      w_gate, w_up: ``[E, hidden, ffn]``; w_down: ``[E, ffn, hidden]``; same dtype and device as x.
      backend: "auto" | "triton" | "torch" (see the module docstring).
      block_m: rows per GEMM tile of the Triton path (a power of two >= 16; default 64 on CUDA, 16 on CPU).
      torch_impl: "auto" | "grouped_mm" | "loop", the torch path's grouped matmul.
    """
    _check_weights(x, w_gate, w_up, w_down, "x")
    if not isinstance(eidx, Tensor) or eidx.ndim != 2 or eidx.shape[0] != x.shape[0]:
        raise ValueError(f"`eidx` must be a [T={x.shape[0]}, k] tensor, got {getattr(eidx, 'shape', type(eidx))}")
    if eidx.dtype.is_floating_point or eidx.dtype == torch.bool or eidx.is_complex():
        raise ValueError(f"`eidx` must be an integer tensor, got {eidx.dtype}")
    if not isinstance(gates, Tensor) or tuple(gates.shape) != tuple(eidx.shape) or not gates.is_floating_point():
        raise ValueError(
            f"`gates` must be a float tensor of eidx's shape {tuple(eidx.shape)}, "
            f"got {getattr(gates, 'shape', type(gates))}"
        )
    be = resolve_backend(backend, x.device)
    if be == "torch":
        return _torch_experts(x, eidx, gates, w_gate, w_up, w_down, _torch_impl(torch_impl, x, w_gate, w_down))
    return _triton_experts(x, eidx, gates, w_gate, w_up, w_down, _block_m(block_m, x.device))


def expert_ffn(
    x_sorted: Tensor,
    counts: Tensor | Sequence[int],
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    *,
    backend: str = "auto",
    block_m: int | None = None,
    torch_impl: str = "auto",
) -> Tensor:
    """``[N, hidden]``: row r of ``x_sorted`` through its expert's FFN, for rows already grouped by expert.

    Expert e owns rows ``sum(counts[:e]) : sum(counts[:e+1])``; the counts must add up to N (checked when they
    are a list or a CPU tensor; on the GPU that check would cost a host sync, so it is the caller's promise).
    Differentiable in x_sorted and the three weights; this is the per-device expert step of expert parallelism.

    Args:
      x_sorted: ``[N, hidden]``.
      counts: ``[E]`` non-negative integers (tensor on any device, or a sequence of ints).
      w_gate, w_up: ``[E, hidden, ffn]``; w_down: ``[E, ffn, hidden]``.
      backend, block_m, torch_impl: as in :func:`moe_experts`.
    """
    _check_weights(x_sorted, w_gate, w_up, w_down, "x_sorted")
    E, N = w_gate.shape[0], x_sorted.shape[0]
    if not isinstance(counts, Tensor):
        counts = torch.as_tensor(list(counts), dtype=torch.int64)
    if counts.ndim != 1 or counts.numel() != E or counts.is_floating_point():
        raise ValueError(f"`counts` must be [E={E}] integers, got {counts.dtype} of shape {tuple(counts.shape)}")
    if counts.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool((counts < 0).any()) or int(counts.sum()) != N:
            raise ValueError(f"`counts` must be non-negative and add up to x_sorted's {N} rows, got {counts.tolist()}")
    counts = counts.to(x_sorted.device)
    be = resolve_backend(backend, x_sorted.device)
    if be == "torch":
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return _ffn_sorted(x_sorted, offsets, w_gate, w_up, w_down, _torch_impl(torch_impl, x_sorted, w_gate, w_down))
    return _triton_ffn(x_sorted, counts, w_gate, w_up, w_down, _block_m(block_m, x_sorted.device))


def _block_m(block_m: int | None, device: torch.device) -> int:
    if block_m is None:
        return _default_block_m(device)
    if not isinstance(block_m, int) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"`block_m` must be a power of two >= 16, got {block_m!r}")
    return block_m
