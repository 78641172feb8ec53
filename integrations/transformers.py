"""moebalance inside Hugging Face transformers models: kernels, balancers, load statistics, expert parallelism.

>>> from transformers import AutoModelForCausalLM
>>> from moebalance.integrations import transformers as mbt
>>> model = AutoModelForCausalLM.from_config(mbt.tiny_config("qwen3_moe"))   # or from_pretrained(...)
>>> mbt.enable(model, balancer="loss_free", bias_update_rate=1e-3)
>>> model(input_ids).loss.backward()                      # train as usual: the bias steps after each forward
>>> mbt.load_stats(model)[0].max_vio                      # per MoE layer: loads [E], MaxVio, balancedness

What :func:`enable` does, in place, to every MoE block of the model (a module with an ``experts`` child holding
transformers' 3-D expert tensors ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]`` -- gpt-oss: transposed,
interleaved, with biases -- and a router child ``gate`` or ``router``):

- Experts: the model's experts implementation becomes ``"moebalance"``, registered in transformers'
  ``ExpertsInterface`` when this module is imported, so ``from_pretrained(..., experts_implementation=
  "moebalance")`` selects it as well. SwiGLU experts (concatenated ``[gate; up]``, SiLU, no bias) run on
  :func:`moebalance.kernels.moe_experts` (Triton on CUDA, the torch path on CPU; ``backend``); other layouts
  (gpt-oss's clamped GLU with biases, or any ``_apply_gate``) run a grouped torch path with the module's own
  gate function, so the model computes what it computed before.
- Routing: with ``balancer="none"`` the router's own forward runs unchanged. Otherwise moebalance's per-expert
  price ``q`` (subtracted from the scores before top-k, never touching the gates) is put on each router, with
  the architecture's own rules: softmax top-k routers (Mixtral, Qwen2/3-MoE, OLMoE: ``norm_topk_prob``
  respected) select ``topk(softmax(logits) - q)``; gpt-oss selects ``topk(softmax(logits) - q)`` and gates with
  the softmax over the chosen logits (with q = 0 the same experts as its top-k of logits); DeepSeek-V3 keeps
  its sigmoid scores, its group-limited top-k and ``routed_scaling_factor``, and the price *is* its
  ``e_score_correction_bias`` with the opposite sign (DeepSeek adds the bias to the scores): the balancer
  starts from ``q = -e_score_correction_bias`` and writes ``-q`` back, so a checkpoint saves it natively.
  Other routers are checked against a reimplementation on a probe batch at ``enable`` (ValueError naming the
  router class when they differ). Shared experts (Qwen2-MoE, DeepSeek-V3) are untouched.
- Balancers: "none" | "aux_loss" | "loss_free" | "bip" | "bip_lagged"
  (:class:`~moebalance.solvers.balancers.LossFreeBalancer` with ``bias_update_rate``,
  :class:`~moebalance.solvers.balancers.BIPBalancer` with ``capacity_factor`` and ``bip_iterations``). "bip" is
  arXiv 2502.15451's algorithm: in each training forward the router refits the price on the batch being routed
  (``bip_iterations`` sweeps warm-started from the last price; under expert parallelism on every rank's tokens,
  all-gathered, so the price is identical on every rank) and only then takes its top-k. "loss_free" and
  "bip_lagged" step the price without gradient after each training-mode forward (a batch is routed with the
  prices of the batches before it). In eval mode no price steps: the router uses the trained price
  (``eval_prices="trained"``) or its own rule (``eval_prices="none"``). With
  "aux_loss", :func:`aux_loss` gives the Switch-style loss ``aux_loss_coeff * E * sum_e f_e P_e`` summed over
  the layers, to add to the training loss (the model's own ``output_router_logits`` loss keeps working too).
  Routing is dropless (``capacity_factor`` is only the capacity BIP prices against).
- ``expert_parallel=True``: each block's ``[E, ...]`` expert tensors are cut to this rank's home experts (the
  contiguous block ``e * P // E == rank``) over the ranks of ``group`` (``torch.distributed``, initialised by
  the caller: gloo on CPU, NCCL on GPU), and tokens go to the devices that the ``placement`` method ("ep",
  "llep", "llep+", "eplb", "milp", ...; options ``min_chunk``, ``alpha``, ``imbalance_threshold``,
  ``max_tokens_per_device``, ``max_foreign_experts``, ``cost``, ``time_limit``, ...) chooses from the global
  loads, with moebalance's exchange (:mod:`._hf_ep`). Each rank runs the whole model on its own batch; the
  result, and each expert's gradient, equal the single-process model on the rank-major concatenation of the
  batches. Everything else is replicated: call :func:`allreduce_grads` after backward (or use DDP on the
  non-expert parameters); the expert parameters are new (sharded) tensors, so build the optimizer after
  ``enable``. Balancer steps use the global loads (BIP all-gathers the scores), so the price stays
  identical on every rank.

:func:`load_stats` gives each MoE layer's expert loads of the last forward (global under expert parallelism)
with MaxVio ``(max - mean) / mean`` and balancedness ``mean / max`` (the figure vLLM and SGLang log).
:class:`LoadRecorder` keeps them over many forwards and writes the trace format of :mod:`._hf_trace`
(``loads [B, L, E]``), which :class:`~moebalance.PlacementProblem` and the replication problem read.
:func:`disable` restores the model's routers, experts implementation and (under expert parallelism, a
collective) full expert tensors.

Gradient checkpointing: the recompute inside backward routes with the price of the original forward and
records nothing (no second balancer step), so gradients match the model without checkpointing.

Prices are kept: non-DeepSeek routers hold theirs in a persistent buffer ``moebalance_bias`` (in
``state_dict``, so ``save_pretrained`` and ``load_state_dict`` carry it; the model's own ``init_weights`` zeroes
it, so a model built on the meta device and materialised with ``to_empty`` works), DeepSeek-V3 in its own
``e_score_correction_bias``. :func:`enable` starts from the price the router holds, else from the checkpoint
the model was loaded from (``from_pretrained`` drops the key it does not know; ``enable`` reads it back from
the safetensors files), else zeros (option ``prices``). :func:`disable` keeps them unless
``keep_prices=False``. The exchange synchronises with the host once per layer and step. ``torch.compile``
breaks the graph at the exchange.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebalance.integrations._hf_trace import LoadTrace, read_trace
from moebalance.kernels import BACKENDS, expert_ffn, moe_experts, resolve_backend
from torch import Tensor, nn

__all__ = [
    "enable",
    "disable",
    "load_stats",
    "aux_loss",
    "biases",
    "allreduce_grads",
    "is_enabled",
    "LayerStats",
    "LoadRecorder",
    "LoadTrace",
    "read_trace",
    "tiny_config",
    "register_experts_implementation",
    "EXPERTS_IMPLEMENTATION",
    "BALANCERS",
]

EXPERTS_IMPLEMENTATION = "moebalance"
BALANCERS = ("none", "aux_loss", "loss_free", "bip", "bip_lagged")
_PRICED = ("loss_free", "bip", "bip_lagged")  # balancers whose price steps in training
_BALANCER_OPTIONS = {
    "bias_update_rate": 1e-3,
    "aux_loss_coeff": 1e-2,
    "capacity_factor": 1.0,
    "bip_iterations": 4,
    "prices": "auto",
    "eval_prices": "trained",
}
PRICE_BUFFER = "moebalance_bias"
_ROUTER_NAMES = ("gate", "router")

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
    blk: _Block | None = getattr(self, "_moebalance", None)
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


def _select(kind: str, router: nn.Module, logits: Tensor, scores: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """``(gates [T, k], eidx [T, k])``: the architecture's top-k of ``scores - q`` (``q [E]`` float32)."""
    k, E = router.top_k, router.weight.shape[0]
    if kind == "grouped_sigmoid":
        choice = scores - q
        G = router.num_group
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        eidx = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        gates = scores.gather(1, eidx)
        if router.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        return gates * router.routed_scaling_factor, eidx
    eidx = torch.topk(scores - q, k, dim=-1).indices
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
    priced rule; "bip" in training first refits the price on this batch (global under expert parallelism)."""
    blk: _Block = self._moebalance
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
    gates, eidx = _select(blk.kind, self, logits, scores, blk.used_price)
    blk.pending = (scores.detach(), probs)
    return logits, gates, eidx


def _gather_rows(x: Tensor, group: Any) -> Tensor:
    """Every rank's ``[T_r, E]`` rows, rank-major (a collective; gloo: through the host, NCCL: on the device)."""
    import torch.distributed as dist

    P = dist.get_world_size(group)
    dev = x.device
    y = x.float() if dist.get_backend(group) == "nccl" else x.float().cpu()
    n = torch.tensor([y.shape[0]], dtype=torch.int64, device=y.device)
    ns = [torch.zeros_like(n) for _ in range(P)]
    dist.all_gather(ns, n, group=group)
    sizes = [int(v) for v in ns]
    y = F.pad(y, (0, 0, 0, max(sizes) - y.shape[0]))
    got = [torch.empty_like(y) for _ in range(P)]
    dist.all_gather(got, y, group=group)
    return torch.cat([g[:t] for g, t in zip(got, sizes)]).to(dev)


# ---------------------------------------------------------------------------------------------------------
# per-block state
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LayerStats:
    """One MoE layer's last forward: ``loads [E]`` pairs per expert (global under expert parallelism),
    ``tokens``, ``top_k``, ``max_vio`` = (max - mean) / mean with mean = tokens * top_k / E, ``balancedness`` =
    mean / max (1 = perfect), ``aux_loss`` = ``aux_loss_coeff * E * sum_e f_e P_e`` (a measure for every
    balancer), ``bias [E]`` the current selection price (zeros for "none")."""

    layer: str
    loads: np.ndarray
    tokens: int
    top_k: int
    max_vio: float
    balancedness: float
    aux_loss: float
    bias: np.ndarray


class _Block:
    def __init__(
        self,
        name: str,
        block: nn.Module,
        router: nn.Module,
        experts: nn.Module,
        kind: str | None,
        balancer: str,
        options: dict[str, Any],
        backend: str,
    ):
        self.name, self.block, self.router, self.experts, self.kind = name, block, router, experts, kind
        self.num_experts = E = router.weight.shape[0]
        self.top_k = router.top_k
        self.hidden = router.weight.shape[1]
        self.balancer_name = balancer
        self.backend = backend
        self.aux_coeff = float(options["aux_loss_coeff"])
        self.pending: tuple[Tensor | None, Tensor | None] | None = None
        self.recompute = False
        self.used_price: Tensor | None = None
        self.last: tuple[Tensor, int, Tensor] | None = None  # loads [E], tokens, aux value
        self.aux_loss: Tensor = torch.zeros(())
        self.shards: Any = None
        self.balancer: Any = None
        self.eval_prices = options["eval_prices"]
        self.group: Any = None  # expert parallelism: "bip" prices the global batch over this group
        if balancer == "loss_free":
            from moebalance.solvers.balancers import LossFreeBalancer

            self.balancer = LossFreeBalancer(E, self.top_k, rate=options["bias_update_rate"])
        elif balancer in ("bip", "bip_lagged"):
            from moebalance.solvers.balancers import BIPBalancer

            self.balancer = BIPBalancer(
                E, self.top_k, capacity_factor=options["capacity_factor"], iterations=options["bip_iterations"]
            )
        if kind != "grouped_sigmoid" and balancer != "none" and PRICE_BUFFER not in router._buffers:
            # persistent: the learned price is part of state_dict, save_pretrained and load_state_dict
            router.register_buffer(PRICE_BUFFER, torch.zeros(E, dtype=torch.float32, device=router.weight.device))

    def price(self) -> Tensor:
        """``[E]`` float32 price q (DeepSeek-V3: ``-e_score_correction_bias``)."""
        if self.kind == "grouped_sigmoid":
            return -self.router.e_score_correction_bias.float()
        buf = self.router._buffers.get(PRICE_BUFFER)
        return buf.float() if buf is not None else torch.zeros(self.num_experts, device=self.router.weight.device)

    def fit_price(self, scores: Tensor) -> None:
        """ "bip": refit the price on this batch's ``scores [T, E]`` (every rank's, under expert parallelism, so
        the price is the same on every rank), warm-started from the current price, before its top-k."""
        if self.group is not None:
            scores = _gather_rows(scores, self.group)
        if scores.shape[0] == 0:
            return
        with torch.no_grad():
            self.balancer.bias = self.price()
            self.set_price(self.balancer.update(scores))

    def set_price(self, q: Tensor) -> None:
        with torch.no_grad():
            if self.kind == "grouped_sigmoid":
                self.router.e_score_correction_bias.copy_(-q)
            elif PRICE_BUFFER in self.router._buffers:
                self.router.moebalance_bias.copy_(q)

    def finish(self, loads: Tensor, Ts: np.ndarray, comm: Any) -> None:
        """Stats, aux loss and the balancer step from this forward's global ``loads [E]`` (after the experts)."""
        scores, probs = self.pending if self.pending is not None else (None, None)
        self.pending = None
        E, k = self.num_experts, self.top_k
        T_all = int(Ts.sum())
        f = loads / max(T_all * k, 1)
        if probs is not None:
            share = self.aux_coeff * E * (f * probs.sum(0) / max(T_all, 1)).sum()
        else:
            share = loads.new_zeros(())
        if self.recompute:  # the same autograd ops as the forward, nothing recorded; every rank recomputes
            self.recompute = False  # alike, so skipping the collectives below is symmetric
            self.aux_loss = share if self.balancer_name == "aux_loss" else share.detach() * 0
            return
        total = share.detach()
        if comm is not None and probs is not None:
            total = comm.all_gather("aux loss (stats)", total.reshape(1).cpu().double()).sum().to(loads.device)
        self.aux_loss = share if self.balancer_name == "aux_loss" else share.detach() * 0
        self.last = (loads.detach(), T_all, total)
        if self.balancer is None or self.balancer_name == "bip" or not self.block.training or T_all == 0:
            return  # "bip" priced this batch before routing it
        with torch.no_grad():
            self.balancer.bias = self.price()
            if self.balancer_name == "loss_free":
                new = self.balancer.update(loads)
            else:
                if comm is not None:
                    pad = int(Ts.max()) - scores.shape[0]
                    got = comm.all_gather("bip balancer: scores", F.pad(scores.float(), (0, 0, 0, pad)).cpu())
                    scores = torch.cat([got[r, : Ts[r]] for r in range(len(Ts))]).to(loads.device)
                new = self.balancer.update(scores)
            self.set_price(new)

    def stats(self) -> LayerStats | None:
        if self.last is None:
            return None
        loads, T, aux = self.last
        lo = loads.cpu().double().numpy()
        mean = T * self.top_k / self.num_experts
        mx = float(lo.max()) if lo.size else 0.0
        return LayerStats(
            self.name,
            np.rint(lo).astype(np.int64),
            T,
            self.top_k,
            (mx - mean) / mean if mean > 0 else 0.0,
            mean / mx if mx > 0 else 1.0,
            float(aux),
            self.price().detach().cpu().numpy().astype(np.float64),
        )


class _State:
    def __init__(self, blocks: list[_Block], saved_impl: Any, group: Any, expert_parallel: bool):
        self.blocks, self.saved_impl, self.group, self.expert_parallel = blocks, saved_impl, group, expert_parallel


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


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------


def is_enabled(model: nn.Module) -> bool:
    return getattr(model, "_moebalance", None) is not None


def _state(model: nn.Module) -> _State:
    st = getattr(model, "_moebalance", None)
    if st is None:
        raise ValueError("`model` is not enabled: call moebalance.integrations.transformers.enable(model) first")
    return st


def enable(
    model: nn.Module,
    *,
    balancer: str = "none",
    backend: str = "auto",
    expert_parallel: Any = False,
    group: Any = None,
    placement: str = "ep",
    **options: Any,
) -> nn.Module:
    """Put moebalance on every MoE block of ``model`` (in place; see the module docstring) and return it.

    Args:
      model: a transformers model (``PreTrainedModel``) with Mixtral/Qwen/OLMoE/gpt-oss/DeepSeek-V3-like blocks.
      balancer: "none" | "aux_loss" | "loss_free" | "bip" (prices fitted on each batch before its top-k) |
        "bip_lagged" (prices of the batches before).
      backend: moebalance's kernel back-end, "auto" | "triton" | "torch" (SwiGLU experts; others run in torch).
      expert_parallel: shard the experts over the ranks of ``group`` (torch.distributed must be initialised):
        True, or an :class:`~moebalance.integrations.ep.ExpertParallel` for replicated experts and live
        rebalancing (``ep.maybe_rebalance(model, optimizer)`` after each step).
      group: the process group (None: the default group).
      placement: the placement method of each step ("ep", "llep", "llep+", "eplb", "milp", ...).
      options: balancer options ``bias_update_rate`` (1e-3), ``aux_loss_coeff`` (1e-2), ``capacity_factor``
        (1.0, BIP's capacity), ``bip_iterations`` (4), ``prices`` ("auto": the router's, else the checkpoint's,
        else zeros | "zeros" | a list of [E] prices, one per MoE block), ``eval_prices`` ("trained" | "none":
        the router's own rule in eval mode); with expert_parallel, the placement options
        (``min_chunk``, ``alpha``, ``imbalance_threshold``, ``max_tokens_per_device``, ``max_foreign_experts``,
        ``cost``, ``time_limit`` and the method's own options).

    Raises ValueError (naming the argument, the block class or the router class) before changing anything.
    """
    from moebalance.integrations.distributed import PROBLEM_OPTIONS

    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if is_enabled(model):
        raise ValueError("`model` is already enabled: call disable(model) first")
    if balancer not in BALANCERS:
        raise ValueError(f"`balancer` must be one of {BALANCERS}, got {balancer!r}")
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(expert_parallel, bool):
        from moebalance.integrations._hf_ep import check_expert_parallel

        check_expert_parallel(expert_parallel)
    if not isinstance(placement, str):
        raise ValueError(f"`placement` must be a placement method name, got {placement!r}")
    bal_opts = dict(_BALANCER_OPTIONS)
    place_opts = {}
    for key, value in options.items():
        if key in _BALANCER_OPTIONS:
            bal_opts[key] = value
        elif expert_parallel:
            place_opts[key] = value
        else:
            raise ValueError(
                f"unknown option {key!r}: valid options are {sorted(_BALANCER_OPTIONS)} (and, with "
                "expert_parallel=True, the placement's options)"
            )
    for key in ("bias_update_rate", "capacity_factor"):
        v = bal_opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"`{key}` must be a finite number > 0, got {v!r}")
    v = bal_opts["aux_loss_coeff"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
        raise ValueError(f"`aux_loss_coeff` must be a finite number >= 0, got {v!r}")
    v = bal_opts["bip_iterations"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
        raise ValueError(f"`bip_iterations` must be an integer in [1, 2**20], got {v!r}")
    if bal_opts["eval_prices"] not in ("trained", "none"):
        raise ValueError(f"`eval_prices` must be 'trained' or 'none', got {bal_opts['eval_prices']!r}")
    if not expert_parallel and (placement != "ep" or group is not None):
        raise ValueError("`placement` and `group` need expert_parallel=True")
    if expert_parallel:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "`expert_parallel`=True needs torch.distributed initialised on every rank (e.g. "
                "moebalance.integrations.distributed.init_process_group())"
            )
        if dist.get_rank(group) < 0:
            raise ValueError("this process is not a member of `group`")
    found = _find_blocks(model)
    resolve_backend(backend, found[0][3].down_proj.device)  # e.g. "triton" on CPU: ValueError now
    cache: dict = {}
    kinds = []
    for name, blk, router, experts in found:
        kind = _router_kind(router)
        if balancer != "none":
            _check_router(kind, router, cache)
        kinds.append(kind)
    if not hasattr(model, "set_experts_implementation"):
        raise ValueError(f"`model` ({type(model).__name__}) must be a transformers PreTrainedModel")
    prices = _check_prices(bal_opts["prices"], found)
    problem_opts = {k: v for k, v in place_opts.items() if k in PROBLEM_OPTIONS}
    solve_opts = {k: v for k, v in place_opts.items() if k not in PROBLEM_OPTIONS}
    if expert_parallel:
        from moebalance.integrations._hf_ep import check_placement

        for num_experts in sorted({r.weight.shape[0] for _, _, r, _ in found}):
            check_placement(
                num_experts, dist.get_world_size(group), placement, problem_opts, solve_opts, expert_parallel
            )
    # -- from here on the model changes --
    blocks = []
    for (name, mod, router, experts), kind in zip(found, kinds):
        b = _Block(name, mod, router, experts, kind, balancer, bal_opts, backend)
        if expert_parallel:
            from moebalance.integrations._hf_ep import ExpertShards

            b.shards = ExpertShards(
                experts,
                _expert_tensors(experts),
                b.num_experts,
                group=group,
                placement=placement,
                problem_options=problem_opts,
                solve_options=solve_opts,
                expert_parallel=expert_parallel,
            )
        if expert_parallel:
            b.group = group if group is not None else dist.group.WORLD
        router._moebalance = b
        experts._moebalance = b
        router.forward = types.MethodType(_router_forward, router)
        blocks.append(b)
    _restore_prices(model, blocks, prices)
    _install_price_hooks(model, blocks)
    configs = {id(b.experts.config): b.experts.config for b in blocks}
    saved = [(c, c._experts_implementation) for c in configs.values()]
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    for c in configs.values():  # a model class transformers cannot switch at run time still gets it
        if c._experts_implementation != EXPERTS_IMPLEMENTATION:
            c._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    model._moebalance = _State(blocks, saved, group, expert_parallel)
    return model


def disable(model: nn.Module, *, keep_prices: bool = True) -> nn.Module:
    """Undo :func:`enable`: the routers' own forward, the previous experts implementation, full expert tensors
    (expert parallelism: gathered from every rank, a collective).

    The learned prices are kept by default: DeepSeek-V3's ``e_score_correction_bias`` (the model's own), and
    the other routers' persistent ``moebalance_bias`` buffers, which stay in ``state_dict`` (so
    ``save_pretrained`` keeps them) and which a later :func:`enable` picks up; the disabled model routes with
    its own rule and ignores them. ``keep_prices=False`` removes the buffers (read them with :func:`biases`
    first to keep a copy)."""
    if not isinstance(keep_prices, bool):
        raise ValueError(f"`keep_prices` must be a bool, got {keep_prices!r}")
    st = _state(model)
    for b in st.blocks:
        if b.shards is not None:
            b.shards.unshard(b.experts)
        for m in (b.router, b.experts):
            m.__dict__.pop("_moebalance", None)
        b.router.__dict__.pop("forward", None)
        if not keep_prices and PRICE_BUFFER in b.router._buffers:
            del b.router._buffers[PRICE_BUFFER]
            b.router.__dict__.pop("_moebalance_kept", None)
            handle = b.router.__dict__.pop("_moebalance_load_hook", None)
            if handle is not None:
                handle.remove()
    if not keep_prices:
        for m in model.modules():
            m.__dict__.pop("_init_weights", None) if getattr(m, "_moebalance_init", False) else None
            m.__dict__.pop("_moebalance_init", None)
    for config, impl in st.saved_impl:
        config._experts_implementation_internal = impl
    del model._moebalance
    return model


# ---------------------------------------------------------------------------------------------------------
# the prices in state_dict, checkpoints and delayed init
# ---------------------------------------------------------------------------------------------------------


def _check_prices(prices: Any, found: list) -> Any:
    """``prices``: "auto" | "zeros" | a list of ``[E]`` prices (one per MoE block, as :func:`biases` gives)."""
    if isinstance(prices, str):
        if prices not in ("auto", "zeros"):
            raise ValueError(f"`prices` must be 'auto', 'zeros' or a list of [E] tensors, got {prices!r}")
        return prices
    if not isinstance(prices, (list, tuple)) or len(prices) != len(found):
        raise ValueError(
            f"`prices` must be 'auto', 'zeros' or a list of {len(found)} [E] tensors (one per MoE "
            f"block), got {type(prices).__name__}"
        )
    out = []
    for i, ((_, _, router, _), q) in enumerate(zip(found, prices)):
        E = router.weight.shape[0]
        try:
            t = torch.as_tensor(np.asarray(q.detach().cpu() if isinstance(q, Tensor) else q, dtype=np.float64))
        except (TypeError, ValueError):
            raise ValueError(f"`prices`[{i}] must be a numeric [E={E}] array, got {type(q).__name__}") from None
        if t.shape != (E,) or not bool(torch.isfinite(t).all()):
            raise ValueError(f"`prices`[{i}] must be a finite [E={E}] array, got shape {tuple(t.shape)}")
        out.append(t.float())
    return out


def _checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint directory or of a hub checkpoint already in the cache."""
    import json
    import os

    names = ("model.safetensors.index.json", "model.safetensors")
    found = {}
    for name in names:
        if os.path.isdir(path):
            f = os.path.join(path, name)
            found[name] = f if os.path.isfile(f) else None
        else:
            try:
                from transformers.utils import cached_file

                found[name] = cached_file(
                    path, name, local_files_only=True, _raise_exceptions_for_missing_entries=False
                )
            except Exception:  # not a hub name, or not cached: nothing to restore from
                found[name] = None
    if found[names[0]]:
        with open(found[names[0]]) as fh:
            shards = sorted(set(json.load(fh).get("weight_map", {}).values()))
        return [os.path.join(os.path.dirname(found[names[0]]), f) for f in shards]
    return [found[names[1]]] if found[names[1]] else []


def _checkpoint_prices(model: nn.Module, blocks: list[_Block]) -> dict[int, Tensor]:
    """``{block index: [E] price}`` saved in the checkpoint ``model`` was loaded from (``save_pretrained`` of
    an enabled model), read without pickle; checkpoint names follow transformers' own renaming on save."""
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not path:
        return {}
    files = _checkpoint_files(path)
    if not files:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    want: dict[str, int] = {}
    for i, b in enumerate(blocks):
        key = f"{names[id(b.router)]}.{PRICE_BUFFER}"
        want[key] = i
        try:  # the name save_pretrained wrote (e.g. Mixtral's block_sparse_moe)
            from transformers.core_model_loading import revert_weight_conversion

            for saved in revert_weight_conversion(model, {key: torch.zeros(1)}):
                want[saved] = i
        except Exception:
            pass
    from safetensors import safe_open

    out: dict[int, Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for key in set(fh.keys()) & set(want):
                out[want[key]] = fh.get_tensor(key).float()
    return out


def _restore_prices(model: nn.Module, blocks: list[_Block], prices: Any) -> None:
    """Set each block's starting price: "auto" keeps a price the router already holds (DeepSeek-V3's correction
    bias; a ``moebalance_bias`` loaded by ``load_state_dict`` or kept by :func:`disable`), else the one in the
    checkpoint the model was loaded from, else zeros; "zeros"; or the given list."""
    if isinstance(prices, list):
        for b, q in zip(blocks, prices):
            b.set_price(q.to(b.router.weight.device))
        return
    if prices == "zeros":
        for b in blocks:
            if not b.router.weight.is_meta:
                b.set_price(torch.zeros(b.num_experts, device=b.router.weight.device))
        return
    fresh = [
        b
        for b in blocks
        if b.kind != "grouped_sigmoid"
        and not getattr(b.router, "_moebalance_kept", False)
        and not b.router.weight.is_meta
    ]
    if not fresh:
        return
    saved = _checkpoint_prices(model, blocks)
    for i, b in enumerate(blocks):
        if b in fresh and i in saved:
            q = saved[i]
            if q.shape != (b.num_experts,):
                raise ValueError(
                    f"the checkpoint's `{PRICE_BUFFER}` of {b.name} has shape {tuple(q.shape)}, the "
                    f"router has {b.num_experts} experts"
                )
            b.set_price(q.to(b.router.weight.device))


def _fill_missing_price(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict of a state dict without the price (a checkpoint saved before enable) keeps the price."""
    key = prefix + PRICE_BUFFER
    if key not in state_dict and PRICE_BUFFER in module._buffers:
        state_dict[key] = module._buffers[PRICE_BUFFER].detach().clone()


def _zero_price_init(original: Any) -> Any:
    def _init_weights(module: nn.Module) -> None:
        original(module)
        buf = module._buffers.get(PRICE_BUFFER) if isinstance(module, nn.Module) else None
        if buf is not None:
            from transformers import initialization as hf_init

            hf_init.zeros_(buf)

    return _init_weights


def _install_price_hooks(model: nn.Module, blocks: list[_Block]) -> None:
    """The model's own ``init_weights`` / ``_init_weights`` zero the price buffers (meta device, ``to_empty``);
    ``load_state_dict`` sets them (and keeps them when the state dict predates enable)."""
    for b in blocks:
        if PRICE_BUFFER in b.router._buffers:
            b.router._moebalance_kept = True
            if "_moebalance_load_hook" not in b.router.__dict__:
                b.router._moebalance_load_hook = b.router.register_load_state_dict_pre_hook(_fill_missing_price)
    for m in model.modules():
        if (
            hasattr(type(m), "_init_weights")
            and hasattr(m, "config")
            and not getattr(m, "_moebalance_init", False)
            and callable(getattr(m, "_init_weights", None))
        ):
            m._init_weights = _zero_price_init(m._init_weights)
            m._moebalance_init = True


def load_stats(model: nn.Module) -> list[LayerStats]:
    """Per MoE layer (in module order), the loads and balance figures of its last forward ([] before any)."""
    return [s for s in (b.stats() for b in _state(model).blocks) if s is not None]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum over the layers of the last forward's aux loss (differentiable with balancer="aux_loss", else 0)."""
    blocks = _state(model).blocks
    total = blocks[0].aux_loss
    for b in blocks[1:]:
        total = total + b.aux_loss.to(total.device)
    return total


def biases(model: nn.Module) -> list[Tensor]:
    """Per MoE layer, the current selection price ``q [E]`` (float32; subtracted from the scores)."""
    return [b.price().detach().clone() for b in _state(model).blocks]


def allreduce_grads(model: nn.Module, *, average: bool = False) -> None:
    """Expert parallelism: sum the replicated parameters' gradients over the group (a collective).

    Expert shards already hold the gradient of the sum of every rank's loss. With ``average=True`` every
    gradient (replicated and expert) is divided by the world size: the gradient of the mean of the losses.
    """
    import torch.distributed as dist

    st = _state(model)
    if not st.expert_parallel:
        raise ValueError("`model` is not expert parallel (enable(..., expert_parallel=True))")
    P = dist.get_world_size(st.group)
    sharded = {id(getattr(b.experts, n)) for b in st.blocks for n in b.shards.names}
    for p in model.parameters():
        if p.grad is None or not p.requires_grad:
            continue
        if id(p) not in sharded:
            dist.all_reduce(p.grad, group=st.group)
        if average:
            p.grad.div_(P)


class LoadRecorder:
    """Records every forward's per-layer loads of an enabled model; :meth:`trace` / :meth:`save` give the
    ``[B, L, E]`` trace of :mod:`._hf_trace`. Use as a context manager or call :meth:`close`.

    >>> with LoadRecorder(model) as rec:
    ...     for batch in batches: model(**batch)
    >>> rec.save("loads.npz")                      # read_trace("loads.npz").placement_problem(step, layer, P)
    """

    def __init__(self, model: nn.Module):
        self._blocks = _state(model).blocks
        self._steps: list[tuple[Tensor, int]] = []
        self.model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        lasts = [b.last for b in self._blocks]
        if any(x is None for x in lasts):
            return
        self._steps.append((torch.stack([x[0] for x in lasts]), lasts[0][1]))

    @property
    def steps(self) -> int:
        return len(self._steps)

    def trace(self) -> LoadTrace:
        E = self._blocks[0].num_experts
        if self._steps:
            loads = np.rint(torch.stack([s for s, _ in self._steps]).cpu().double().numpy()).astype(np.int64)
        else:
            loads = np.zeros((0, len(self._blocks), E), dtype=np.int64)
        return LoadTrace(
            loads,
            np.array([t for _, t in self._steps], dtype=np.int64),
            self._blocks[0].top_k,
            tuple(b.name for b in self._blocks),
            self.model_type,
        )

    def save(self, path: Any) -> Any:
        return self.trace().save(path)

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> LoadRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------
# tiny configurations (tests, examples, benchmarks: no hub needed)
# ---------------------------------------------------------------------------------------------------------

_TINY = {
    "mixtral": lambda I, E, k: dict(intermediate_size=I, num_local_experts=E, num_experts_per_tok=k),
    "qwen2_moe": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        num_experts=E,
        shared_expert_intermediate_size=I,
        num_experts_per_tok=k,
        norm_topk_prob=False,
    ),
    "qwen3_moe": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=True,
        head_dim=16,
    ),
    "olmoe": lambda I, E, k: dict(
        intermediate_size=I, num_experts=E, num_experts_per_tok=k, eos_token_id=1, pad_token_id=0, bos_token_id=None
    ),
    "gpt_oss": lambda I, E, k: dict(
        intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, head_dim=16, sliding_window=16
    ),
    "deepseek_v3": lambda I, E, k: dict(
        intermediate_size=2 * I,
        moe_intermediate_size=I,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=E // 2 if E % 2 == 0 else 1,
        topk_group=max(1, E // 4),
        first_k_dense_replace=0,
        kv_lora_rank=16,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        v_head_dim=16,
        qk_nope_head_dim=8,
        n_shared_experts=1,
    ),
}


def tiny_config(
    model_type: str,
    *,
    hidden: int = 64,
    layers: int = 2,
    experts: int = 8,
    top_k: int = 2,
    ffn: int = 32,
    vocab: int = 256,
    **overrides: Any,
) -> Any:
    """A small random-model config of ``model_type`` ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss",
    "deepseek_v3") for ``AutoModelForCausalLM.from_config``: ``hidden`` wide, ``layers`` MoE layers of
    ``experts`` experts (``ffn`` inner width), top-``top_k``, 4 heads."""
    from transformers import AutoConfig

    if model_type not in _TINY:
        raise ValueError(f"`model_type` must be one of {sorted(_TINY)}, got {model_type!r}")
    kw = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    kw.update(_TINY[model_type](ffn, experts, top_k))
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)
