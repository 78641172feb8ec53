"""Routing inside transformers' MoE blocks: finding the blocks, each router kind's rule (scores, top-k with a
selection price, gates), the patched router forward, and the probe that checks a router follows its rule."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ROUTER_NAMES = ("gate", "router")

# ---------------------------------------------------------------------------------------------------------
# routing: each architecture's rule with a selection price
# ---------------------------------------------------------------------------------------------------------


def _router_kind(router: nn.Module) -> str | None:
    w = getattr(router, "weight", None)
    if not isinstance(w, Tensor) or w.ndim != 2 or not isinstance(getattr(router, "top_k", None), int):
        return None
    if isinstance(getattr(router, "e_score_correction_bias", None), Tensor) and hasattr(router, "num_group"):
        return "grouped_sigmoid"  # DeepSeek-V3
    if isinstance(getattr(router, "bias", None), Tensor) and not hasattr(router, "norm_topk_prob"):
        return "softmax_of_topk"  # gpt-oss
    return "softmax"  # Mixtral, Qwen2/3-MoE, OLMoE


def _scores(kind: str, router: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, scores [T, E] float32 that the price is subtracted from, probs [T, E] for the aux loss)``."""
    if kind == "grouped_sigmoid":
        logits = F.linear(h.float(), router.weight.float())
        scores = logits.sigmoid()
        return logits, scores, scores / (scores.sum(-1, keepdim=True) + 1e-20)
    logits = F.linear(h, router.weight, router.bias) if kind == "softmax_of_topk" else F.linear(h, router.weight)
    probs = torch.softmax(logits.float(), dim=-1)
    return logits, probs, probs


def _topk(choice: Tensor, k: int, capacity: Any) -> Tensor:
    """``[T, k]`` column ids: the top-k of ``choice [T, N]``, or with ``capacity = (capacity_factor, group)``
    at most ``ceil(capacity_factor * T * k / N)`` rows per column
    (:func:`~moebalance.solvers.routing_prices.capacity_topk`, k distinct columns per row still). With a
    process ``group`` (expert parallelism) T is the global batch: every rank assigns every rank's rows alike
    and keeps its own."""
    if capacity is None:
        return torch.topk(choice, k, dim=-1).indices
    from moebalance.solvers.routing_prices import capacity_topk

    from moebalance.routing import expert_capacity

    factor, group = capacity
    if group is None:
        return capacity_topk(choice, k, expert_capacity(choice.shape[0], k, choice.shape[1], factor))
    import torch.distributed as dist

    rows, sizes = _gather_rows(choice.detach(), group, sizes=True)
    start = sum(sizes[: dist.get_rank(group)])
    cap = expert_capacity(rows.shape[0], k, rows.shape[1], factor)
    return capacity_topk(rows, k, cap)[start : start + choice.shape[0]].to(choice.device)


def _host_loops(choice: Tensor, capacity: Any) -> dict:
    """The compiled CPU loops for DeepSeek-V3's groups under capacity on this rank alone (a float32 / float64
    CPU batch; {} otherwise: the tensor expressions run). Only indices come out of them: no gradient is lost."""
    if capacity is None or capacity[1] is not None or choice.device.type != "cpu":
        return {}
    if choice.dtype not in (torch.float32, torch.float64):
        return {}
    from moebalance.solvers.routing_prices import _loops

    return _loops()


def _select(
    kind: str, router: nn.Module, logits: Tensor, scores: Tensor, q: Tensor, capacity: Any = None
) -> tuple[Tensor, Tensor]:
    """``(gates [T, k], eidx [T, k])``: the architecture's top-k of ``scores - q`` (``q [E]`` float32); with
    ``capacity`` (``(capacity_factor, process group or None)``, see :func:`_topk`) each expert takes at most its
    capacity of the tokens -- and DeepSeek-V3's groups theirs, ``topk_group`` of ``num_group`` per token, so
    the experts' capacities fit inside the chosen groups (the gates are the router's own either way)."""
    k, E = router.top_k, router.weight.shape[0]
    if kind == "grouped_sigmoid":
        choice = scores - q
        G = router.num_group
        host = _host_loops(choice, capacity)
        if host:  # a training step on the CPU: the same values in two compiled calls instead of eleven ops
            c = np.ascontiguousarray(choice.detach().numpy())
            group_scores = torch.from_numpy(np.empty((c.shape[0], G), dtype=c.dtype))
            host["group_top2_sums"](c, G, group_scores.numpy())
        else:
            group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        if capacity is None:
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        else:
            group_idx = _topk(group_scores, router.topk_group, capacity)
        if host:
            choice = torch.from_numpy(np.empty_like(c))
            host["keep_groups"](c, G, np.ascontiguousarray(group_idx.numpy()), choice.numpy())
        else:
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        eidx = torch.topk(choice, k=k, dim=-1, sorted=False)[1] if capacity is None else _topk(choice, k, capacity)
        gates = scores.gather(1, eidx)
        if router.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return gates * router.routed_scaling_factor, eidx
    eidx = _topk(scores - q, k, capacity)
    if kind == "softmax_of_topk":
        return torch.softmax(logits.gather(1, eidx), dim=1, dtype=logits.dtype), eidx
    gates = scores.gather(1, eidx)
    if getattr(router, "norm_topk_prob", True):
        gates = gates / gates.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):
        gates = gates.to(logits.dtype)
    return gates, eidx


def _route(kind: str, router: nn.Module, h: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(logits, gates [T, k], eidx [T, k], scores [T, E] for the balancer, probs [T, E] for the aux loss)``.

    ``q`` ``[E]`` float32: the price subtracted from ``scores`` before top-k.
    """
    logits, scores, probs = _scores(kind, router, h)
    gates, eidx = _select(kind, router, logits, scores, q)
    return logits, gates, eidx, scores, probs


def _probs_of(kind: str, logits: Tensor) -> Tensor:
    """``[T, E]`` router probabilities (the aux loss's P) from the router's logits."""
    if kind == "grouped_sigmoid":
        s = logits.float().sigmoid()
        return s / (s.sum(-1, keepdim=True) + 1e-20)
    return torch.softmax(logits.float(), dim=-1)


def _router_forward(self: nn.Module, hidden_states: Tensor):
    """The patched router: the original (balancer "none", or eval mode with ``eval_prices="none"``) or the
    priced rule; "bip" in training first refits the price on this batch (global under expert parallelism) and,
    with ``enforce_capacity``, gives each expert at most its capacity of this rank's tokens."""
    blk: Any = self._moebalance
    h = hidden_states.reshape(-1, blk.hidden)
    # inside backward this is gradient checkpointing's recompute: route with the price of the original
    # forward (the balancer has stepped since) and record nothing, so the recompute matches the forward
    blk.recompute = torch._C._current_graph_task_id() != -1
    if blk.balancer_name == "none" or (not self.training and blk.eval_prices == "none"):
        logits, gates, eidx = type(self).forward(self, hidden_states)
        blk.pending = (None, _probs_of(blk.kind, logits))
        return logits, gates, eidx
    logits, scores, probs = _scores(blk.kind, self, h)
    if not blk.recompute:
        if blk.balancer_name == "bip" and self.training:
            blk.fit_price(scores.detach())  # the paper's order: prices of this batch, then its top-k
        blk.used_price = blk.price().clone()
    capacity = None
    if blk.balancer_name == "bip" and self.training and blk.enforce_capacity:
        capacity = (blk.capacity_factor, blk.group)  # under expert parallelism: the global batch's
    gates, eidx = _select(blk.kind, self, logits, scores, blk.used_price, capacity)
    blk.pending = (scores.detach(), probs)
    return logits, gates, eidx


def _gather_rows(x: Tensor, group: Any, sizes: bool = False) -> Any:
    """Every rank's ``[T_r, E]`` rows, rank-major (a collective; gloo: through the host, NCCL: on the device);
    with ``sizes``, ``(rows, [T_r per rank])``."""
    import torch.distributed as dist

    P = dist.get_world_size(group)
    dev = x.device
    y = x.float() if dist.get_backend(group) == "nccl" else x.float().cpu()
    n = torch.tensor([y.shape[0]], dtype=torch.int64, device=y.device)
    ns = [torch.zeros_like(n) for _ in range(P)]
    dist.all_gather(ns, n, group=group)
    counts = [int(v) for v in ns]
    y = F.pad(y, (0, 0, 0, max(counts) - y.shape[0]))
    got = [torch.empty_like(y) for _ in range(P)]
    dist.all_gather(got, y, group=group)
    rows = torch.cat([g[:t] for g, t in zip(got, counts)]).to(dev)
    return (rows, counts) if sizes else rows


# ---------------------------------------------------------------------------------------------------------
# finding the blocks
# ---------------------------------------------------------------------------------------------------------


def _fits_experts(m: Any) -> bool:
    if not isinstance(m, nn.Module) or not hasattr(m, "has_gate") or not hasattr(m, "is_transposed"):
        return False  # not a @use_experts_implementation module
    up = getattr(m, "gate_up_proj" if m.has_gate else "up_proj", None)
    down = getattr(m, "down_proj", None)
    return (
        isinstance(up, Tensor)
        and isinstance(down, Tensor)
        and up.ndim == 3
        and down.ndim == 3
        and up.shape[0] == down.shape[0]
    )


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module]]:
    found, unfit = [], []
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        router = next((getattr(mod, a) for a in _ROUTER_NAMES if isinstance(getattr(mod, a, None), nn.Module)), None)
        if (
            _fits_experts(experts)
            and router is not None
            and _router_kind(router) is not None
            and router.weight.shape[0] == experts.down_proj.shape[0]
        ):
            found.append((name, mod, router, experts))
        else:
            unfit.append(type(mod).__name__)
    if not found:
        what = (
            f"its MoE block(s) {sorted(set(unfit))} do not fit the pattern"
            if unfit
            else "it has no module with an `experts` child"
        )
        raise ValueError(
            f"`model` ({type(model).__name__}) has no supported MoE block: {what}. moebalance supports blocks "
            "with an `experts` module decorated by transformers' @use_experts_implementation (3-D "
            "gate_up_proj/down_proj tensors) and a top-k router `gate` or `router` with a [E, hidden] weight "
            "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V3 and blocks like theirs)"
        )
    if unfit:
        raise ValueError(
            f"`model` ({type(model).__name__}) mixes supported MoE blocks with unsupported ones {sorted(set(unfit))}"
        )
    return found


def _check_router(kind: str, router: nn.Module, cache: dict) -> None:
    """Our rule with price 0 must pick the router's own experts and gates on a probe batch."""
    cls = type(router)
    if router.weight.is_meta:  # a model built under torch.device("meta"): no values to probe yet
        return
    if cls in cache:
        if cache[cls]:
            raise ValueError(cache[cls])
        return
    g = torch.Generator().manual_seed(0)
    h = torch.randn(64, router.weight.shape[1], generator=g).to(router.weight)
    with torch.no_grad():
        _, w0, i0 = cls.forward(router, h)
        q = (
            -router.e_score_correction_bias.float()
            if kind == "grouped_sigmoid"
            else torch.zeros(router.weight.shape[0], device=router.weight.device)
        )
        _, w1, i1, _, _ = _route(kind, router, h, q)
    s0, o0 = torch.sort(i0, dim=-1)
    s1, o1 = torch.sort(i1, dim=-1)
    ok = torch.equal(s0, s1) and torch.allclose(
        w0.float().gather(1, o0), w1.float().gather(1, o1), rtol=1e-3, atol=1e-6
    )
    cache[cls] = (
        ""
        if ok
        else (
            f"router class {cls.__name__} does not follow the {kind!r} routing rule that "
            "moebalance reimplements (its experts or gates differ on a probe batch); use "
            "balancer='none' for this model, or add its rule to moebalance"
        )
    )
    if cache[cls]:
        raise ValueError(cache[cls])
