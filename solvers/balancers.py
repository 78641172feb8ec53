"""Online balancers: per-expert biases that keep state across batches, for the MoE layer.

Both follow the one bias convention: a bias is a per-expert price q subtracted from the router scores before
top-k (``topk(scores - q)``), and it never changes the gate values. Both accept numpy arrays or torch tensors
and answer in the same library, device and dtype (torch: float32 state on the input's device, no host sync).

- :class:`LossFreeBalancer`: DeepSeek's auxiliary-loss-free update (arXiv 2408.15664), in our price
  convention: ``q_e += u * sign(load_e - mean_load)`` (an overloaded expert becomes dearer).
- :class:`BIPBalancer`: the per-batch dual (price) iteration of BIP-based balancing (arXiv 2502.15451):
  ``p_t = (k+1)-th largest of scores[t] - q`` then ``q_e = max(0, (c+1)-th largest of scores[:, e] - p)``
  with ``c = ceil(capacity_factor * T * k / E)``, a fixed number of inner iterations per batch, warm-started
  from the previous batch's q (:func:`moebalance.solvers.routing_prices.price_iteration`). On torch input
  (a GPU router) the step is tensors only, with no host synchronisation; :meth:`BIPBalancer.certificate`
  proves, off the hot path, how far the last batch's prices are from the optimal ones (their Lagrangian bound
  against the exact optimum of ``fast``).

Bad input is refused with a ValueError naming the argument: NaN or inf loads and scores included (a torch
tensor on an accelerator is checked without a host synchronisation: the bias then stays as it was and an
asynchronous assertion reports the bad input at the next synchronisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moebalance._validate import MAX_EXPERTS, MAX_FACTOR, as_int, as_real
from moebalance.routing import expert_capacity

from .routing_prices import cpu_refit, dual_bound, has_compiled_loops, is_torch, price_iteration, tie_break

__all__ = ["LossFreeBalancer", "BIPBalancer"]

_is_torch = is_torch


def _finite_or_raise(x: Any, name: str) -> Any:
    """ValueError naming ``name`` when ``x`` holds NaN or inf. On an accelerator (no host sync) it returns a
    0-d bool tensor ``ok`` instead, and queues an asynchronous assertion; the caller keeps its state when
    ``ok`` is False. Returns None when the check has passed."""
    if _is_torch(x):
        import torch

        if not (x.is_floating_point() or x.is_complex()):
            return None
        ok = torch.isfinite(x).all()
        if x.device.type == "cpu":
            if not bool(ok):
                raise ValueError(f"`{name}` must be finite: it contains NaN or inf")
            return None
        torch._assert_async(ok, f"`{name}` must be finite: it contains NaN or inf")
        return ok
    arr = np.asarray(x)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"`{name}` must be a numeric array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.inexact) and not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite: it contains NaN or inf")
    return None


def _keep_if_bad(ok: Any, new: Any, old: Any) -> Any:
    """``new``, or ``old`` where the async finiteness check ``ok`` failed (torch on an accelerator)."""
    if ok is None:
        return new
    import torch

    return torch.where(ok, new, old)


class _Balancer:
    #: whether selection and prices use the :func:`~.routing_prices.tie_break` offsets (BIP: capacities)
    tie_break = False

    def __init__(self, num_experts: int, k: int):
        self.num_experts = as_int(num_experts, "num_experts", minimum=1, maximum=MAX_EXPERTS)
        self.k = as_int(k, "k", minimum=1, maximum=self.num_experts)
        self._bias: Any = np.zeros(self.num_experts)

    def selection_scores(self, scores: Any) -> Any:
        """The values whose top-k (minus the bias) routes: ``scores``, or BIP's tie-broken float64 copy."""
        return tie_break(scores) if self.tie_break else scores

    @property
    def bias(self) -> Any:
        """``[E]`` current prices (numpy float64, or a float32 torch tensor once fed torch input)."""
        return self._bias

    @bias.setter
    def bias(self, value: Any) -> None:
        """Set the prices (e.g. restored from a checkpoint or a layer's buffer); ``[E]``, numpy or torch."""
        if tuple(getattr(value, "shape", ())) != (self.num_experts,):
            raise ValueError(f"`bias` must have shape [{self.num_experts}], got {tuple(getattr(value, 'shape', ()))}")
        if not _is_torch(value) or value.device.type == "cpu":
            _finite_or_raise(value, "bias")
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

    def _check_shape(self, x: Any) -> None:
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.num_experts:
            raise ValueError(f"`scores` must have shape [T, {self.num_experts}], got {tuple(np.shape(x))}")

    def _check_scores(self, x: Any) -> Any:
        self._check_shape(x)
        return _finite_or_raise(x, "scores")

    def loads(self, scores: Any) -> Any:
        """``[E]`` tokens per expert when each token takes the top-k of ``scores - bias`` (scores ``[T, E]``)."""
        self._check_scores(scores)
        q = self._state_for(scores)
        if _is_torch(scores):
            import torch

            s = self.selection_scores(scores.detach())
            idx = torch.topk(
                s.to(torch.float64 if self.tie_break else torch.float32) - q.to(s.dtype), self.k, dim=1
            ).indices
            return torch.bincount(idx.flatten(), minlength=self.num_experts)
        s = np.asarray(self.selection_scores(scores), dtype=np.float64) - q
        top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
        return np.bincount(top.ravel(), minlength=self.num_experts)


class LossFreeBalancer(_Balancer):
    """Auxiliary-loss-free bias update (arXiv 2408.15664): ``q_e += rate * sign(load_e - mean_load)``.

    Args:
      num_experts: E.
      k: experts per token (used when ``update`` gets scores).
      rate: the update rate u (paper: 1e-3).
    """

    def __init__(self, num_experts: int, k: int, rate: float = 1e-3):
        super().__init__(num_experts, k)
        self.rate = as_real(rate, "rate", positive=True, maximum=MAX_FACTOR)

    def update(self, x: Any) -> Any:
        """Update from ``[T, E]`` scores (loads = top-k of scores - bias) or ``[E]`` loads; return the new bias."""
        ndim = getattr(x, "ndim", None)
        ok = None
        if ndim == 2:
            loads = self.loads(x)
        elif ndim == 1 and x.shape[0] == self.num_experts:
            loads = x
            ok = _finite_or_raise(x, "loads")
            # the sign check is for numpy only: on torch it would cost a host sync every training step
            if not _is_torch(x) and (np.asarray(loads) < 0).any():
                raise ValueError("`loads` must be non-negative")
        else:
            raise ValueError(
                f"`x` must be [T, {self.num_experts}] scores or [{self.num_experts}] loads, "
                f"got shape {tuple(np.shape(x))}"
            )
        q = self._state_for(x)
        if _is_torch(x):
            import torch

            lf = loads.detach().float()
            self._bias = _keep_if_bad(ok, q + self.rate * torch.sign(lf - lf.mean()), q)
        else:
            lf = np.asarray(loads, dtype=np.float64)
            self._bias = q + self.rate * np.sign(lf - lf.mean())
        return self._bias


class BIPBalancer(_Balancer):
    """Per-batch price iteration of BIP-based balancing (arXiv 2502.15451).

    Args:
      num_experts: E.
      k: experts per token.
      capacity_factor: per-expert capacity ``c = ceil(capacity_factor * T * k / E)`` for a batch of T tokens
        (below 1 the batch's T*k pairs do not fit: the prices still push load off the dearest experts, and
        :meth:`certificate` reports the batch as infeasible).
      iterations: inner (p, q) iterations per batch (a fixed budget: the torch step never synchronises).

    With the top-k of ``scores - bias`` capacity is a target, not a guarantee (:meth:`route` enforces it): a few
    coordinate sweeps do not reach the optimal prices, so an expert can receive more than ``c`` pairs (e.g.
    514 against 512 after 32 sweeps on a skewed 4096 x 16 batch, k=2). ``last_overflow`` gives the pairs over
    capacity, summed over the experts, of the last batch routed with its new prices (computed when read, off the
    hot path). Ties (repeated tokens, equal scores) are broken before pricing and
    selection by :func:`~moebalance.solvers.routing_prices.tie_break`'s deterministic offsets (below ``2**-40``
    of each score), so a price can separate them (identical rows otherwise all go to the same experts).
    """

    tie_break = True

    def __init__(self, num_experts: int, k: int, capacity_factor: float = 1.0, iterations: int = 4):
        super().__init__(num_experts, k)
        self.capacity_factor = as_real(capacity_factor, "capacity_factor", positive=True, maximum=MAX_FACTOR)
        self.iterations = as_int(iterations, "iterations", minimum=1, maximum=1 << 20)
        self._last: tuple[Any, int, Any] | None = None
        self._space: Any = None  # the CPU sweeps' arrays (routing_prices.SweepSpace), kept between batches

    @property
    def last_overflow(self) -> int:
        """Pairs over capacity, summed over the experts, when the last priced batch is routed with its new
        prices (0 before any, or when no price was needed). Off the hot path: it synchronises."""
        if self._last is None:
            return 0
        s, cap, q = self._last
        loads = np.asarray(self.loads(s) if not _is_torch(s) else self.loads(s).cpu())
        return int(np.maximum(loads - cap, 0).sum())

    def update(self, scores: Any) -> Any:
        """Run the inner iterations on ``[T, E]`` scores, warm-started from the current bias; return it."""
        if getattr(scores, "ndim", 0) != 2:
            raise ValueError("`scores` must be a [T, E] array: BIPBalancer needs scores, not loads")
        # a training step on the CPU: the prices in a few compiled and numpy calls, which check finiteness
        host = _is_torch(scores) and scores.device.type == "cpu" and self.tie_break and has_compiled_loops()
        if host:
            self._check_shape(scores)
            ok = None
        else:
            ok = self._check_scores(scores)
        q = self._state_for(scores)
        T, E = scores.shape
        k = self.k
        cap = expert_capacity(T, k, E, self.capacity_factor)
        if k >= E or cap >= T or T == 0:
            self._bias = q * 0  # no expert can be over capacity: no price is needed
            self._last = None
            return self._bias
        if host:  # the same prices as below, on arrays kept from the last batch
            self._bias, self._space = cpu_refit(scores, k, cap, self.iterations, q, self._space)
            self._last = (scores.detach(), cap, self._bias)
            return self._bias
        s = self.selection_scores(scores)
        if _is_torch(scores):
            new, _ = price_iteration(s, k, cap, self.iterations, q.double(), stop_when_fixed=False)
            self._bias = _keep_if_bad(ok, new.float(), q)
        else:
            self._bias, _ = price_iteration(s, k, cap, self.iterations, q)
        self._last = (scores.detach() if _is_torch(scores) else np.asarray(scores, dtype=np.float64), cap, self._bias)
        return self._bias

    def route(self, scores: Any) -> Any:
        """``[T, k]`` experts per token for ``[T, E]`` scores with the current prices, each expert within its
        capacity ``ceil(capacity_factor * T * k / E)`` (:func:`~.routing_prices.capacity_topk`: the top-k of
        ``scores - bias`` where it fits); numpy or torch, answered in the same library (what the transformers
        integration's ``bip`` routes with in training)."""
        from .routing_prices import capacity_topk

        self._check_scores(scores)
        q = self._state_for(scores)
        T, E = scores.shape
        cap = expert_capacity(T, self.k, E, self.capacity_factor)
        if _is_torch(scores):
            return capacity_topk(scores.detach().float() - q.float(), self.k, cap)
        import torch

        choice = torch.from_numpy(np.asarray(scores, dtype=np.float64) - np.asarray(q, dtype=np.float64))
        return capacity_topk(choice, self.k, cap).numpy()

    def certificate(self) -> dict[str, float] | None:
        """How good the last batch's prices are, proved (off the hot path: this synchronises and solves).

        Returns ``{"bound", "optimum", "gap", "capacity"}``: ``bound`` is the Lagrangian bound of the prices
        on the last batch (valid for any prices), ``optimum`` the exact optimum of that batch under capacity
        (method ``fast``, warm-started from the prices), ``gap = (bound - optimum) / max(|optimum|, 1e-12)``
        (0 for optimal prices). None before the first priced batch.
        """
        if self._last is None:
            return None
        s, cap, q = self._last
        if cap * self.num_experts < s.shape[0] * self.k:
            raise ValueError(
                f"`capacity_factor`={self.capacity_factor:g} gives a capacity of {cap} pairs per "
                f"expert: the last batch's {s.shape[0]} x {self.k} pairs do not fit {self.num_experts} "
                f"experts, so no capacitated routing (and no optimum to certify against) exists; "
                f"use capacity_factor >= 1"
            )
        if _is_torch(s):
            s = s.detach().cpu().double().numpy()
            q = q.detach().cpu().double().numpy()
        from .routing_fast import fast_route

        s = np.asarray(s, dtype=np.float64)
        E = s.shape[1]
        assignment, _, info = fast_route(s, self.k, np.full(E, cap), warm_start=np.maximum(q, 0.0))
        if assignment is None:  # no deadline was set: only a broken invariant of the compiled loops gets here
            raise RuntimeError(f"method fast returned no routing to certify the prices against: {info.get('failed')}")
        optimum = float(np.take_along_axis(s, assignment, 1).sum())
        bound = float(dual_bound(s, self.k, cap, q))
        return {
            "bound": bound,
            "optimum": optimum,
            "gap": (bound - optimum) / max(abs(optimum), 1e-12),
            "capacity": float(cap),
        }
