"""A torch Mixture-of-Experts layer with switchable load balancing (one device).

>>> from moebalance.integrations.torch import MoEConfig, MoELayer
>>> layer = MoELayer(MoEConfig(hidden=64, ffn=128, num_experts=8, top_k=2, balancer="loss_free"))
>>> y = layer(torch.randn(4, 16, 64))              # [..., hidden] -> [..., hidden]
>>> loss = y.square().mean() + layer.aux_loss      # aux_loss is 0 unless balancer="aux_loss"
>>> layer.last_stats.max_vio                       # (max load - mean) / mean of the last forward

Routing (:func:`route`, a pure function): scores = softmax or sigmoid of the router logits ``[T, E]`` (fp32);
the k experts of a token are the top-k of ``scores - bias`` (ties go to the lower expert index), so the bias
changes which experts are chosen, never the gate values; gates = scores at the chosen experts, divided by their
sum when ``normalize_gates``. The layer output is ``sum_j gates[t, j] * f_e(x[t])`` with the SwiGLU expert
``f_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]``, computed by :func:`moebalance.kernels.moe_experts`.

Balancers ("none" | "aux_loss" | "loss_free" | "bip" | "bip_lagged"): "aux_loss" exposes the Switch-style loss
``aux_loss_coeff * E * sum_e f_e * P_e`` (f_e: fraction of the T*k routed pairs that chose e, P_e: mean router
probability of e) as ``layer.aux_loss`` for the caller to add; "loss_free", "bip" and "bip_lagged" keep a
per-expert bias buffer (persistent: in ``state_dict``). "bip" is arXiv 2502.15451's algorithm: in training the
price iterations of :class:`~moebalance.solvers.balancers.BIPBalancer` run on the batch's own scores, warm-started
from the previous price, *before* its top-k; with ``enforce_capacity=True`` (the default, as in the transformers
integration) that batch is then routed with each expert within its capacity ``ceil(cf * T * k / E)`` (``cf`` the
``capacity_factor``, 1.0 when None; :meth:`~moebalance.solvers.balancers.BIPBalancer.route`: the top-k of
``scores - bias`` where it fits, the overflow moved to the tokens' next best experts with room).
"bip_lagged" and "loss_free"
(:class:`moebalance.solvers.balancers.LossFreeBalancer`) update the bias without gradient after each
training-mode forward, so a batch is routed with the prices of the batches before it.

Capacity: ``capacity_factor=None`` is dropless. Otherwise each expert keeps at most
``ceil(capacity_factor * T * k / E)`` pairs (:func:`moebalance.routing.expert_capacity`), chosen in order of the router score ``scores[t, e]`` (highest
first, ties to the lower token index); a dropped pair contributes nothing (its gate is not redistributed), so a
token whose k pairs are all dropped outputs zero (the residual connection around the layer carries it).

The steps are module functions shared with the expert-parallel layer
(:class:`moebalance.integrations.distributed.ExpertParallelMoE`), so both compute the same thing:
:func:`check_input`, :func:`router_scores` and :func:`route`, :func:`make_balancer`, :func:`price_batch`
(``bip_same_batch``), :func:`bip_route` (``enforce_capacity``), :func:`apply_capacity` with :func:`~moebalance.routing.expert_capacity`,
:func:`moebalance.kernels.combine_pairs` (the gate combine), :func:`aux_loss_of`, :func:`max_violation` and
:func:`step_balancer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from moebalance.kernels.experts import BACKENDS, expert_ffn, moe_experts, resolve_backend
from torch import Tensor, nn

from moebalance.routing import expert_capacity

__all__ = [
    "MoEConfig",
    "MoELayer",
    "MoEStats",
    "route",
    "router_scores",
    "apply_capacity",
    "expert_capacity",
    "expert_ffn",
    "check_input",
    "make_balancer",
    "price_batch",
    "bip_route",
    "step_balancer",
    "router_probs",
    "aux_loss_of",
    "max_violation",
    "ROUTERS",
    "BALANCERS",
]

ROUTERS = ("softmax", "sigmoid")
BALANCERS = ("none", "aux_loss", "loss_free", "bip", "bip_lagged")
_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    return value


def _number(value: Any, name: str, *, positive: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        raise ValueError(f"`{name}` must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


@dataclass
class MoEConfig:
    """Configuration of :class:`MoELayer`, checked at construction (ValueError naming the field).

    Shape: ``hidden``, ``ffn`` (expert inner width), ``num_experts`` (E), ``top_k`` (k, 1 <= k <= E).
    Routing: ``router`` "softmax" | "sigmoid"; ``normalize_gates`` (gates of a token sum to 1).
    Balancing: ``balancer`` "none" | "aux_loss" | "loss_free" | "bip" | "bip_lagged"; ``bias_update_rate``
    (loss_free's u); ``aux_loss_coeff``; ``capacity_factor`` None (dropless) or > 0 (drop overflow pairs; also
    the capacity the BIP balancers price against, 1.0 when None). "bip" prices each training batch before
    routing it (arXiv 2502.15451); "bip_lagged" after. After construction ``balancer`` is "bip" for both and
    ``bip_same_batch`` tells them apart (True for "bip"); :attr:`balancer_name` gives the name.
    ``bip_same_batch`` (kept for older code): None follows the name; False with "bip" means "bip_lagged".
    ``enforce_capacity`` (True): "bip" in training routes its batch with every expert within its capacity
    (:func:`bip_route`); False: the plain top-k of ``scores - bias`` with the batch's prices.
    Execution: ``backend`` "auto" | "triton" | "torch"; ``dtype`` of the parameters (a torch dtype or its name;
    None: torch's default dtype).
    """

    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    router: str = "softmax"
    normalize_gates: bool = True
    balancer: str = "none"
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 1e-2
    capacity_factor: float | None = None
    backend: str = "auto"
    dtype: Any = None
    bip_same_batch: bool | None = None
    enforce_capacity: bool = True

    @property
    def balancer_name(self) -> str:
        """The balancer's name: "bip_lagged" for BIP priced after the forward, else ``balancer``."""
        return "bip_lagged" if self.balancer == "bip" and not self.bip_same_batch else self.balancer

    def __post_init__(self) -> None:
        for name in ("hidden", "ffn", "num_experts", "top_k"):
            _positive_int(getattr(self, name), name)
        if self.top_k > self.num_experts:
            raise ValueError(f"`top_k` must be <= num_experts={self.num_experts}, got {self.top_k}")
        if self.router not in ROUTERS:
            raise ValueError(f"`router` must be one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.normalize_gates, bool):
            raise ValueError(f"`normalize_gates` must be a bool, got {self.normalize_gates!r}")
        if self.balancer not in BALANCERS:
            raise ValueError(f"`balancer` must be one of {BALANCERS}, got {self.balancer!r}")
        self.bias_update_rate = _number(self.bias_update_rate, "bias_update_rate", positive=True)
        self.aux_loss_coeff = _number(self.aux_loss_coeff, "aux_loss_coeff", positive=False)
        if self.capacity_factor is not None:
            self.capacity_factor = _number(self.capacity_factor, "capacity_factor", positive=True)
        if self.bip_same_batch is not None and not isinstance(self.bip_same_batch, bool):
            raise ValueError(f"`bip_same_batch` must be a bool or None, got {self.bip_same_batch!r}")
        if self.balancer == "bip_lagged":
            if self.bip_same_batch:
                raise ValueError("`bip_same_batch`=True contradicts balancer='bip_lagged'")
            self.balancer, self.bip_same_batch = "bip", False
        elif self.balancer == "bip":
            self.bip_same_batch = self.bip_same_batch is not False
        elif self.bip_same_batch:
            raise ValueError(f"`bip_same_batch` needs balancer='bip', got balancer={self.balancer!r}")
        else:
            self.bip_same_batch = False
        if not isinstance(self.enforce_capacity, bool):
            raise ValueError(f"`enforce_capacity` must be a bool, got {self.enforce_capacity!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        dtype = _DTYPES.get(self.dtype, self.dtype) if isinstance(self.dtype, str) else self.dtype
        if dtype is None:
            dtype = torch.get_default_dtype()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating torch dtype or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        self.dtype = dtype


@dataclass
class MoEStats:
    """Balance statistics of one forward, as detached tensors (no host sync; call ``float()`` to read).

    ``loads`` ``[E]``: pairs that chose each expert (before capacity drops); ``max_vio``: (max load - mean) /
    mean with mean = T*k/E; ``aux_loss``: ``aux_loss_coeff * E * sum_e f_e P_e`` (computed for every balancer,
    as a balance measure); ``dropped``: pairs dropped by the capacity (0 when dropless).
    """

    loads: Tensor
    max_vio: Tensor
    aux_loss: Tensor
    dropped: Tensor


def check_input(x: Any, hidden: int, name: str = "x") -> None:
    """ValueError naming ``name`` unless ``x`` is a floating-point torch tensor ``[..., hidden]`` (>= 1-D).

    Refused: numpy arrays and other non-tensors, 0-d tensors, integer, bool and complex tensors (a silent cast
    would compute on truncated or reinterpreted data)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"`{name}` must be a torch.Tensor [..., hidden={hidden}], got {type(x).__name__}")
    if x.ndim < 1:
        raise ValueError(f"`{name}` must have at least one dimension [..., hidden={hidden}], got a 0-d tensor")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != hidden:
        raise ValueError(f"`{name}` must have last dimension hidden={hidden}, got shape {tuple(x.shape)}")


def router_scores(logits: Tensor, router: str) -> Tensor:
    """``[T, E]`` float32 router scores: softmax or sigmoid of the logits."""
    z = logits.float()
    return torch.softmax(z, dim=-1) if router == "softmax" else torch.sigmoid(z)


def router_probs(scores: Tensor, router: str) -> Tensor:
    """``[T, E]`` per-token probabilities ``P`` of the aux loss: softmax scores as they are, sigmoid scores
    normalised per token."""
    return scores if router == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)


def aux_loss_of(config: MoEConfig, loads: Tensor, prob_sums: Tensor, num_tokens: int) -> Tensor:
    """Switch loss with top-k: ``aux_loss_coeff * E * sum_e f_e * prob_sums[e] / T``.

    ``loads`` ``[E]``: pairs per expert over all T tokens (``f_e = loads / (T * k)``); ``prob_sums`` ``[E]``: the
    sum of :func:`router_probs` over the tokens at hand (all T: the loss; one rank's: that rank's share, and the
    shares add up to the loss). Differentiable through ``prob_sums``; 0 when ``num_tokens`` is 0.
    """
    c = config
    T = max(int(num_tokens), 1)
    return c.aux_loss_coeff * c.num_experts * (loads / (T * c.top_k) * prob_sums / T).sum()


def max_violation(loads: Tensor, num_tokens: int, k: int) -> Tensor:
    """MaxVio ``(max_e loads[e] - mean) / mean`` with ``mean = T * k / E``; 0 for an empty batch."""
    if not num_tokens:
        return loads.sum() * 0  # an empty batch violates nothing
    mean = num_tokens * k / loads.shape[0]
    return (loads.max() - mean) / mean


def make_balancer(config: MoEConfig) -> Any:
    """The online balancer of ``config.balancer`` ("loss_free", "bip"), or None."""
    c = config
    if c.balancer == "loss_free":
        from moebalance.solvers.balancers import LossFreeBalancer

        return LossFreeBalancer(c.num_experts, c.top_k, rate=c.bias_update_rate)
    if c.balancer == "bip":
        from moebalance.solvers.balancers import BIPBalancer

        return BIPBalancer(c.num_experts, c.top_k, capacity_factor=c.capacity_factor or 1.0)
    return None


def step_balancer(config: MoEConfig, balancer: Any, bias: Tensor, loads: Tensor, scores: Tensor) -> None:
    """One balancer step after a training forward, in place on the ``bias`` buffer ``[E]`` (the state: what
    ``state_dict`` saves), from the batch's ``loads`` ``[E]`` ("loss_free") or its ``scores`` ``[T, E]``
    ("bip_lagged"; all of the batch's tokens). Nothing for "bip": :func:`price_batch` priced the batch before
    routing it."""
    if config.bip_same_batch:
        return
    with torch.no_grad():
        balancer.bias = bias
        bias.copy_(balancer.update(loads if config.balancer == "loss_free" else scores.detach()))


def price_batch(balancer: Any, bias: Tensor, scores: Tensor) -> None:
    """ "bip": price the batch's own ``scores`` ``[T, E]`` before routing it (bias in place)."""
    with torch.no_grad():
        balancer.bias = bias
        bias.copy_(balancer.update(scores.detach()))


def bip_route(balancer: Any, scores: Tensor) -> Tensor:
    """ "bip" with ``enforce_capacity``: ``[T, k]`` experts for the batch's ``scores [T, E]`` with the prices
    :func:`price_batch` just fitted, each expert within its capacity
    (:meth:`~moebalance.solvers.balancers.BIPBalancer.route`); pass them to :func:`route` as ``experts``."""
    with torch.no_grad():
        return balancer.route(scores.detach())


def route(
    logits: Tensor,
    top_k: int,
    *,
    router: str = "softmax",
    bias: Tensor | None = None,
    normalize_gates: bool = True,
    experts: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing with a selection bias: ``(eidx [T, k] int64, gates [T, k] float32, scores [T, E] float32)``.

    ``eidx`` = the k largest of ``scores - bias`` per token (ties to the lower expert index; the bias is a price
    subtracted before top-k); ``gates`` = scores at eidx, divided by their sum when ``normalize_gates``.
    Differentiable in logits through gates and scores. ``experts`` ``[T, k]``: the experts already chosen
    (e.g. by :func:`bip_route`, within capacity) instead of the top-k; the gates are computed from them alike.
    """
    if router not in ROUTERS:
        raise ValueError(f"`router` must be one of {ROUTERS}, got {router!r}")
    if logits.ndim != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"`logits` must be [T, E] with 1 <= top_k <= E, got {tuple(logits.shape)}, top_k={top_k}")
    scores = router_scores(logits, router)
    if experts is not None:
        if tuple(experts.shape) != (logits.shape[0], top_k):
            raise ValueError(f"`experts` must be [{logits.shape[0]}, {top_k}], got {tuple(experts.shape)}")
        eidx = experts.to(device=logits.device, dtype=torch.int64)
    else:
        select = scores.detach() if bias is None else scores.detach() - bias.float()
        # a stable descending sort makes ties deterministic (lower index first) on every device and back-end
        eidx = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]
    gates = scores.gather(1, eidx)
    if normalize_gates:
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
    return eidx, gates, scores


def apply_capacity(eidx: Tensor, scores: Tensor, capacity: int) -> Tensor:
    """``eidx [T, k]`` with the pairs over each expert's capacity replaced by E (dropped).

    Each expert keeps its ``capacity`` pairs of highest router score ``scores[t, e]`` (``scores [T, E]``), ties
    to the lower token index.
    """
    T, k = eidx.shape
    E = scores.shape[1]
    flat = eidx.reshape(-1)
    s = scores.detach().gather(1, eidx).reshape(-1)
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[torch.sort(flat[order], stable=True).indices]  # by expert, score order inside
    counts = torch.zeros(E, dtype=torch.long, device=eidx.device).scatter_add_(0, flat, torch.ones_like(flat))
    first = counts.cumsum(0) - counts
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel(), device=eidx.device) - first[flat[order]]
    return torch.where(rank < capacity, flat, E).view(T, k)


class MoELayer(nn.Module):
    """Top-k MoE layer with SwiGLU experts and a switchable balancer; see the module docstring.

    Parameters: ``router`` (``nn.Linear(hidden, E, bias=False)``), ``w_gate``, ``w_up`` ``[E, hidden, ffn]``,
    ``w_down`` ``[E, ffn, hidden]``. Buffer: ``bias`` ``[E]`` float32 (the selection price). After each forward:
    ``aux_loss`` (a scalar tensor: differentiable when balancer="aux_loss", else 0) and ``last_stats``
    (:class:`MoEStats`).
    """

    bias: Tensor  # the buffer registered in __init__

    def __init__(self, config: MoEConfig, *, device: Any = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"`config` must be a MoEConfig, got {type(config).__name__}")
        self.config = c = config
        kw = {"device": device, "dtype": c.dtype}
        self.router = nn.Linear(c.hidden, c.num_experts, bias=False, **kw)
        self.w_gate = nn.Parameter(torch.empty(c.num_experts, c.hidden, c.ffn, **kw))
        self.w_up = nn.Parameter(torch.empty(c.num_experts, c.hidden, c.ffn, **kw))
        self.w_down = nn.Parameter(torch.empty(c.num_experts, c.ffn, c.hidden, **kw))
        self.register_buffer("bias", torch.zeros(c.num_experts, dtype=torch.float32, device=device))
        self.balancer = make_balancer(c)
        self.aux_loss: Tensor = torch.zeros((), device=device)
        self.last_stats: MoEStats | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router as ``nn.Linear``; expert weights uniform in +-1/sqrt(fan_in); bias and balancer state zero."""
        self.router.reset_parameters()
        for w, fan_in in (
            (self.w_gate, self.config.hidden),
            (self.w_up, self.config.hidden),
            (self.w_down, self.config.ffn),
        ):
            nn.init.uniform_(w, -(fan_in**-0.5), fan_in**-0.5)
        with torch.no_grad():
            self.bias.zero_()
        if self.balancer is not None:
            self.balancer.reset()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden}, ffn={c.ffn}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"router={c.router}, balancer={c.balancer_name}, capacity_factor={c.capacity_factor}, backend={c.backend}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[..., hidden]`` -> ``[..., hidden]``."""
        c = self.config
        check_input(x, c.hidden)
        x2 = x.reshape(-1, c.hidden).to(self.w_gate.dtype)
        T = x2.shape[0]
        logits = self.router(x2)
        chosen = None
        if c.bip_same_batch and self.training and T:
            s0 = router_scores(logits.detach(), c.router)
            price_batch(self.balancer, self.bias, s0)
            if c.enforce_capacity:
                chosen = bip_route(self.balancer, s0)
        eidx, gates, scores = route(
            logits, c.top_k, router=c.router, bias=self.bias, normalize_gates=c.normalize_gates, experts=chosen
        )
        kept = eidx
        if c.capacity_factor is not None:
            kept = apply_capacity(eidx, scores, expert_capacity(T, c.top_k, c.num_experts, c.capacity_factor))
        y = moe_experts(
            x2, kept, gates, self.w_gate, self.w_up, self.w_down, backend=resolve_backend(c.backend, x2.device)
        )
        self._balance(eidx, kept, scores)
        return y.reshape(x.shape).to(x.dtype)

    def _balance(self, eidx: Tensor, kept: Tensor, scores: Tensor) -> None:
        c = self.config
        T, E = scores.shape
        flat = eidx.reshape(-1)
        loads = torch.zeros(E, dtype=torch.float32, device=flat.device).scatter_add_(
            0, flat, torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
        )
        aux = aux_loss_of(c, loads, router_probs(scores, c.router).sum(0), T)
        self.aux_loss = aux if c.balancer == "aux_loss" else torch.zeros((), device=scores.device)
        self.last_stats = MoEStats(
            loads=loads, max_vio=max_violation(loads, T, c.top_k), aux_loss=aux.detach(), dropped=(kept >= E).sum()
        )
        if self.training and self.balancer is not None and T:
            step_balancer(c, self.balancer, self.bias, loads, scores)
