"""The ``"moebalance"`` experts implementation of transformers' ``ExpertsInterface``: SwiGLU experts on
moebalance's kernels, other layouts on a grouped torch path with the module's own gate function."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from moebalance.kernels import expert_ffn, moe_experts
from torch import Tensor, nn

EXPERTS_IMPLEMENTATION = "moebalance"

# ---------------------------------------------------------------------------------------------------------
# the experts implementation (transformers' ExpertsInterface)
# ---------------------------------------------------------------------------------------------------------


def _is_swiglu(experts: nn.Module) -> bool:
    """Concatenated ``[gate; up]`` in ``[E, 2I, H]``, SiLU, no biases: moebalance's kernels compute it."""
    from transformers.integrations import moe as hf_moe

    act = getattr(experts, "act_fn", None)
    return (
        getattr(experts, "has_gate", False)
        and getattr(experts, "is_concatenated", False)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "has_post_expert_norm", False)
        and type(experts)._apply_gate is hf_moe._default_apply_gate
        and act is not None
        and type(act).__name__ in ("SiLUActivation", "SiLU")
    )


def _swiglu_views(gate_up: Tensor, down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_gate, w_up [E, H, I], w_down [E, I, H])`` views of ``gate_up [E, 2I, H]`` and ``down [E, H, I]``."""
    inner = gate_up.shape[1] // 2
    return gate_up[:, :inner].transpose(1, 2), gate_up[:, inner:].transpose(1, 2), down.transpose(1, 2)


def _expert_tensors(experts: nn.Module) -> list[str]:
    """Names of the module's own ``[E, ...]`` expert parameters, in a fixed order."""
    names = [
        n
        for n in ("gate_up_proj", "up_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj", "down_proj_bias")
        if isinstance(getattr(experts, n, None), nn.Parameter)
    ]
    return names


def _linear(x: Tensor, w: Tensor, b: Tensor | None, transposed: bool) -> Tensor:
    y = x @ w if transposed else x @ w.t()
    return y if b is None else y + b


def _generic_ffn(
    experts: nn.Module, names: list[str], xs: Tensor, counts: list[int], weights: tuple[Tensor, ...]
) -> Tensor:
    """``[N, H]``: rows grouped by expert (``counts [E]``) through the module's own expert function."""
    w = dict(zip(names, weights))
    up, up_b = (
        (w.get("gate_up_proj"), w.get("gate_up_proj_bias"))
        if experts.has_gate
        else (w.get("up_proj"), w.get("up_proj_bias"))
    )
    down, down_b = w["down_proj"], w.get("down_proj_bias")
    tr = experts.is_transposed
    parts, start = [], 0
    for e, c in enumerate(counts):
        if c:
            h = _linear(xs[start : start + c], up[e], None if up_b is None else up_b[e], tr)
            h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
            o = _linear(h, down[e], None if down_b is None else down_b[e], tr)
            if experts.has_post_expert_norm:
                o = experts.post_expert_norm(o)
            parts.append(o)
            start += c
    return torch.cat(parts) if parts else xs.new_zeros((0, xs.shape[1]))


def _ffn_for(experts: nn.Module, backend: str):
    """The expert step on rows grouped by expert: ``ffn(x_sorted, counts, weights) -> [N, H]``."""
    names = _expert_tensors(experts)
    if _is_swiglu(experts):

        def ffn(xs: Tensor, counts: list[int], weights: tuple[Tensor, ...]) -> Tensor:
            w = dict(zip(names, weights))
            return expert_ffn(xs, counts, *_swiglu_views(w["gate_up_proj"], w["down_proj"]), backend=backend)

        return ffn
    return lambda xs, counts, weights: _generic_ffn(experts, names, xs, counts, weights)


def _local_experts(experts: nn.Module, x: Tensor, eidx: Tensor, gates: Tensor, backend: str) -> Tensor:
    if _is_swiglu(experts):
        return moe_experts(
            x, eidx, gates.to(torch.float32), *_swiglu_views(experts.gate_up_proj, experts.down_proj), backend=backend
        )
    T, k = eidx.shape
    E = experts.gate_up_proj.shape[0] if experts.has_gate else experts.up_proj.shape[0]
    flat = eidx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E).tolist()
    names = _expert_tensors(experts)
    ys = _generic_ffn(experts, names, x.index_select(0, order // k), counts, tuple(getattr(experts, n) for n in names))
    o = torch.empty_like(ys).index_copy(0, order, ys).view(T, k, x.shape[1])
    return (o.float() * gates.float()[..., None]).sum(1).to(x.dtype)


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts signature: ``[T, H]`` tokens, ``[T, k]`` expert ids and gates -> ``[T, H]``."""
    blk: Any = getattr(self, "_moebalance", None)
    backend = blk.backend if blk is not None else "auto"
    if blk is not None and blk.shards is not None:
        y, loads, Ts, comm = blk.shards.forward(
            self, hidden_states, top_k_index, top_k_weights, _ffn_for(self, backend), blk.name
        )
        blk.finish(torch.as_tensor(loads, dtype=torch.float32, device=hidden_states.device), Ts, comm)
        return y
    y = _local_experts(self, hidden_states, top_k_index, top_k_weights, backend)
    if blk is not None:
        E = blk.num_experts
        loads = torch.bincount(top_k_index.reshape(-1), minlength=E)[:E].float()
        blk.finish(loads, np.array([top_k_index.shape[0]]), None)
    return y


def register_experts_implementation() -> None:
    """Register ``"moebalance"`` in transformers' ``ExpertsInterface`` (done on import of this module)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)


register_experts_implementation()
