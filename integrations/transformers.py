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
  all-gathered, so the price is identical on every rank) and only then routes, by ``scores - q`` with each
  expert's capacity ``ceil(capacity_factor * T * k / E)`` enforced (``enforce_capacity=True``, the default:
  :func:`~moebalance.solvers.routing_prices.capacity_topk`; DeepSeek-V3's groups too; False: the plain
  top-k), the gates always the router's own. "loss_free" (``bias_update_rate="auto"``: :data:`LOSS_FREE_RATES`,
  1e-3 for softmax routers, 1e-2 for DeepSeek-V3's sigmoid router) and
  "bip_lagged" step the price without gradient after each training-mode forward (a batch is routed with the
  prices of the batches before it). In eval mode no price steps: the router uses the trained price
  (``eval_prices="trained"``) or its own rule (``eval_prices="none"``). With
  "aux_loss", :func:`aux_loss` gives the Switch-style loss ``aux_loss_coeff * E * sum_e f_e P_e`` summed over
  the layers, to add to the training loss (the model's own ``output_router_logits`` loss keeps working too).
  Routing is dropless: every token gets k distinct experts.
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

import types
from typing import Any

import numpy as np
from moebalance.integrations._hf_block import LOSS_FREE_RATES, _Block, _State, _state, is_enabled
from moebalance.integrations._hf_experts import (
    EXPERTS_IMPLEMENTATION,
    _expert_tensors,
    experts_forward,
    register_experts_implementation,
)
from moebalance.integrations._hf_prices import (
    PRICE_BUFFER,
    _check_prices,
    _install_price_hooks,
    _restore_prices,
)
from moebalance.integrations._hf_routers import _check_router, _find_blocks, _route, _router_forward, _router_kind
from moebalance.integrations._hf_stats import LayerStats, LoadRecorder
from moebalance.integrations._hf_tiny import tiny_config
from moebalance.integrations._hf_trace import LoadTrace, read_trace
from moebalance.integrations.ep import ExpertParallel, maybe_rebalance
from moebalance.kernels import BACKENDS, resolve_backend
from torch import Tensor, nn

__all__ = [
    "enable",
    "disable",
    "load_stats",
    "aux_loss",
    "biases",
    "allreduce_grads",
    "is_enabled",
    "ExpertParallel",
    "maybe_rebalance",
    "LayerStats",
    "LoadRecorder",
    "LoadTrace",
    "read_trace",
    "tiny_config",
    "register_experts_implementation",
    "EXPERTS_IMPLEMENTATION",
    "BALANCERS",
    "LOSS_FREE_RATES",
]

BALANCERS = ("none", "aux_loss", "loss_free", "bip", "bip_lagged")
_PRICED = ("loss_free", "bip", "bip_lagged")  # balancers whose price steps in training
_BALANCER_OPTIONS = {
    "bias_update_rate": "auto",  # LOSS_FREE_RATES by router kind
    "aux_loss_coeff": 1e-2,
    "capacity_factor": 1.0,
    "bip_iterations": 4,
    "enforce_capacity": True,
    "prices": "auto",
    "eval_prices": "trained",
}
# re-exported for code that reached them here before the split into the private _hf_* modules
_REEXPORTED = (_route, experts_forward, _State)

# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------


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
      options: balancer options ``bias_update_rate`` ("auto": 1e-3 for softmax routers, 1e-2 for DeepSeek-V3's
        sigmoid router, ``LOSS_FREE_RATES``), ``aux_loss_coeff`` (1e-2), ``capacity_factor``
        (1.0, BIP's capacity), ``bip_iterations`` (4), ``enforce_capacity`` (True: "bip" in training keeps
        each expert within its capacity), ``prices`` ("auto": the router's, else the checkpoint's,
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
        if key == "bias_update_rate" and isinstance(v, str) and v == "auto":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"`{key}` must be a finite number > 0, got {v!r}")
    v = bal_opts["aux_loss_coeff"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
        raise ValueError(f"`aux_loss_coeff` must be a finite number >= 0, got {v!r}")
    v = bal_opts["bip_iterations"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
        raise ValueError(f"`bip_iterations` must be an integer in [1, 2**20], got {v!r}")
    if not isinstance(bal_opts["enforce_capacity"], bool):
        raise ValueError(f"`enforce_capacity` must be a bool, got {bal_opts['enforce_capacity']!r}")
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
    for _name, _blk, router, _experts in found:
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
