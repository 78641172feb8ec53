"""Per-MoE-block state of an enabled transformers model: the balancer, the price, the last forward's loads."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moebalance.integrations._hf_prices import PRICE_BUFFER
from moebalance.integrations._hf_routers import _gather_rows
from moebalance.integrations._hf_stats import LayerStats
from torch import Tensor, nn

#: ``loss_free``'s default rate per router kind (``bias_update_rate="auto"``): the sign update moves a price by
#: the rate per step, so it scales with the spread of the scores the price is subtracted from -- about 1/E
#: for softmax probabilities, several times larger for DeepSeek-V3's sigmoid scores (docs/training.md)
LOSS_FREE_RATES = {"softmax": 1e-3, "softmax_of_topk": 1e-3, "grouped_sigmoid": 1e-2}


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
        self.enforce_capacity = bool(options["enforce_capacity"])
        self.capacity_factor = float(options["capacity_factor"])
        self.group: Any = None  # expert parallelism: "bip" prices the global batch over this group
        self._fitted: tuple[int, int] | None = None  # (id, version) of the price tensor the balancer last set
        if balancer == "loss_free":
            from moebalance.solvers.balancers import LossFreeBalancer

            rate = options["bias_update_rate"]
            rate = LOSS_FREE_RATES.get(kind, LOSS_FREE_RATES["softmax"]) if rate == "auto" else rate
            self.balancer = LossFreeBalancer(E, self.top_k, rate=rate)
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
            held = self._price_tensor()
            if held is None or self._fitted != (id(held), held._version):  # changed since the last fit (or new)
                self.balancer.bias = self.price()
            self.set_price(self.balancer.update(scores))
            held = self._price_tensor()
            # float32 holds the balancer's float32 price exactly: the next fit can start from the balancer's own
            exact = held is not None and held.dtype == torch.float32
            self._fitted = (id(held), held._version) if exact else None

    def _price_tensor(self) -> Tensor | None:
        """The tensor the price lives in (DeepSeek-V3's correction bias, else the price buffer; None without)."""
        if self.kind == "grouped_sigmoid":
            return self.router.e_score_correction_bias
        return self.router._buffers.get(PRICE_BUFFER)

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
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.balancer_name == "aux_loss"):
                share = self.aux_coeff * E * (f * probs.sum(0) / max(T_all, 1)).sum()  # a loss for aux_loss alone
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


def is_enabled(model: nn.Module) -> bool:
    return getattr(model, "_moebalance", None) is not None


def _state(model: nn.Module) -> _State:
    st = getattr(model, "_moebalance", None)
    if st is None:
        raise ValueError("`model` is not enabled: call moebalance.integrations.transformers.enable(model) first")
    return st
