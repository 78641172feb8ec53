"""Online balancers: per-expert biases that keep state across batches, for the MoE layer.

Both follow the one bias convention: a bias is a per-expert price q subtracted from the router scores before
top-k (``topk(scores - q)``), and it never changes the gate values. Both accept numpy arrays or torch tensors
and answer in the same library, device and dtype (torch: float32 state on the input's device, no host sync).

- :class:`LossFreeBalancer`: DeepSeek's auxiliary-loss-free update (arXiv 2408.15664), in our price
  convention: ``q_e += u * sign(load_e - mean_load)`` (an overloaded expert becomes dearer).
- :class:`BIPBalancer`: the per-batch dual (price) iteration of BIP-based balancing (arXiv 2502.15451):
  ``p_t = (k+1)-th largest of scores[t] - q`` then ``q_e = max(0, (c+1)-th largest of scores[:, e] - p)``
  with ``c = ceil(capacity_factor * T * k / E)``, a few inner iterations per batch, warm-started from the
  previous batch's q.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moebalance._validate import as_int
from moebalance.routing import expert_capacity

__all__ = ["LossFreeBalancer", "BIPBalancer"]


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class _Balancer:
    def __init__(self, num_experts: int, k: int):
        self.num_experts = as_int(num_experts, "num_experts", minimum=1)
        self.k = as_int(k, "k", minimum=1, maximum=self.num_experts)
        self._bias: Any = np.zeros(self.num_experts)

    @property
    def bias(self) -> Any:
        """``[E]`` current prices (numpy float64, or a float32 torch tensor once fed torch input)."""
        return self._bias

    @bias.setter
    def bias(self, value: Any) -> None:
        """Set the prices (e.g. restored from a checkpoint or a layer's buffer); ``[E]``, numpy or torch."""
        if tuple(value.shape) != (self.num_experts,):
            raise ValueError(f"`bias` must have shape [{self.num_experts}], got {tuple(value.shape)}")
        if _is_torch(value):
            self._bias = value.detach().float().clone()
        else:
            self._bias = np.asarray(value, dtype=np.float64).copy()

    def reset(self) -> None:
        """Set every price back to zero (keeping the array library and device)."""
        self._bias = self._bias * 0

    def _state_for(self, x: Any) -> Any:
        """The bias in x's library/device (moved once, when the input library changes)."""
        if _is_torch(x):
            import torch

            if not _is_torch(self._bias):
                self._bias = torch.as_tensor(self._bias, dtype=torch.float32, device=x.device)
            elif self._bias.device != x.device:
                self._bias = self._bias.to(x.device)
        elif _is_torch(self._bias):
            self._bias = self._bias.detach().cpu().double().numpy()
        return self._bias

    def _check_scores(self, x: Any) -> None:
        if x.ndim != 2 or x.shape[1] != self.num_experts:
            raise ValueError(f"`scores` must have shape [T, {self.num_experts}], got {tuple(x.shape)}")

    def loads(self, scores: Any) -> Any:
        """``[E]`` tokens per expert when each token takes the top-k of ``scores - bias`` (scores ``[T, E]``)."""
        self._check_scores(scores)
        q = self._state_for(scores)
        if _is_torch(scores):
            import torch

            idx = torch.topk(scores.detach().float() - q, self.k, dim=1).indices
            return torch.bincount(idx.flatten(), minlength=self.num_experts)
        s = np.asarray(scores, dtype=np.float64) - q
        idx = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
        return np.bincount(idx.ravel(), minlength=self.num_experts)


class LossFreeBalancer(_Balancer):
    """Auxiliary-loss-free bias update (arXiv 2408.15664): ``q_e += rate * sign(load_e - mean_load)``.

    Args:
      num_experts: E.
      k: experts per token (used when ``update`` gets scores).
      rate: the update rate u (paper: 1e-3).
    """

    def __init__(self, num_experts: int, k: int, rate: float = 1e-3):
        super().__init__(num_experts, k)
        if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ValueError(f"`rate` must be a positive finite number, got {rate!r}")
        self.rate = float(rate)

    def update(self, x: Any) -> Any:
        """Update from ``[T, E]`` scores (loads = top-k of scores - bias) or ``[E]`` loads; return the new bias."""
        if x.ndim == 2:
            loads = self.loads(x)
        elif x.ndim == 1 and x.shape[0] == self.num_experts:
            loads = x
            # checked for numpy only: on torch it would cost a host sync every training step
            if not _is_torch(x) and (np.asarray(loads) < 0).any():
                raise ValueError("`loads` must be non-negative")
        else:
            raise ValueError(f"`x` must be [T, {self.num_experts}] scores or [{self.num_experts}] loads, "
                             f"got shape {tuple(x.shape)}")
        q = self._state_for(x)
        if _is_torch(x):
            import torch

            lf = loads.detach().float()
            self._bias = q + self.rate * torch.sign(lf - lf.mean())
        else:
            lf = np.asarray(loads, dtype=np.float64)
            self._bias = q + self.rate * np.sign(lf - lf.mean())
        return self._bias


class BIPBalancer(_Balancer):
    """Per-batch price iteration of BIP-based balancing (arXiv 2502.15451).

    Args:
      num_experts: E.
      k: experts per token.
      capacity_factor: per-expert capacity ``c = ceil(capacity_factor * T * k / E)`` for a batch of T tokens.
      iterations: inner (p, q) iterations per batch.
    """

    def __init__(self, num_experts: int, k: int, capacity_factor: float = 1.0, iterations: int = 4):
        super().__init__(num_experts, k)
        if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor)
                and capacity_factor > 0):
            raise ValueError(f"`capacity_factor` must be a positive finite number, got {capacity_factor!r}")
        self.capacity_factor = float(capacity_factor)
        self.iterations = as_int(iterations, "iterations", minimum=1)

    def update(self, scores: Any) -> Any:
        """Run the inner iterations on ``[T, E]`` scores, warm-started from the current bias; return it."""
        if getattr(scores, "ndim", 0) != 2:
            raise ValueError("`scores` must be a [T, E] array: BIPBalancer needs scores, not loads")
        self._check_scores(scores)
        q = self._state_for(scores)
        T, E = scores.shape
        k = self.k
        cap = expert_capacity(T, k, E, self.capacity_factor)
        if k >= E or cap >= T or T == 0:
            self._bias = q * 0  # no expert can be over capacity: no price is needed
            return self._bias
        if _is_torch(scores):
            import torch

            s = scores.detach().float()
            for _ in range(self.iterations):
                p = torch.topk(s - q, k + 1, dim=1).values[:, k]
                q = torch.topk(s - p[:, None], cap + 1, dim=0).values[cap].clamp_min(0.0)
        else:
            s = np.asarray(scores, dtype=np.float64)
            for _ in range(self.iterations):
                red = s - q
                p = -np.partition(-red, k, axis=1)[:, k]
                col = s - p[:, None]
                q = np.maximum(-np.partition(-col, cap, axis=0)[cap], 0.0)
        self._bias = q
        return self._bias
