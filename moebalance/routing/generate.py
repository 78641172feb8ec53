"""Synthetic imbalanced routing instances: hot experts, Zipf popularity, Dirichlet mixtures.

Each generator draws router logits ``[T, E]`` = Gaussian noise + a per-expert popularity term, and returns
softmax scores, as a real router would produce. ``imbalance`` sets how strongly popular experts are preferred.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import MAX_EXPERTS, as_int, as_real, check_elements
from .problem import RoutingProblem

__all__ = ["KINDS", "routing_scores", "routing_problem"]

KINDS = ("hot", "zipf", "dirichlet", "uniform")


def _popularity(kind: str, E: int, rng: np.random.Generator, hot_experts: int) -> np.ndarray:
    if kind == "hot":
        pop = np.zeros(E)
        pop[rng.choice(E, size=min(hot_experts, E), replace=False)] = 1.0
        return pop
    if kind == "zipf":
        ranks = rng.permutation(E) + 1
        return np.log(1.0 / ranks) - np.log(1.0 / ranks).mean()
    if kind == "dirichlet":
        w = rng.dirichlet(np.full(E, 0.3))
        return np.log(w + 1e-3) - np.log(w + 1e-3).mean()
    return np.zeros(E)


def routing_scores(
    num_tokens: int,
    num_experts: int,
    *,
    kind: str = "zipf",
    imbalance: float = 1.0,
    hot_experts: int = 1,
    seed: int | None = 0,
) -> np.ndarray:
    """``[T, E]`` softmax router scores with a skewed expert popularity.

    ``T * E`` is limited to :data:`moebalance._validate.MAX_ELEMENTS`, checked before anything is drawn.

    Args:
      kind: "hot" (``hot_experts`` experts get +imbalance*2 logits), "zipf" (log-Zipf popularity),
        "dirichlet" (log of a Dirichlet(0.3) draw) or "uniform" (no skew).
      imbalance: multiplies the popularity term (0 = balanced).
      seed: random seed (None = fresh entropy).
    """
    T = as_int(num_tokens, "num_tokens", minimum=1)
    E = as_int(num_experts, "num_experts", minimum=1, maximum=MAX_EXPERTS)
    check_elements("num_tokens", T, E)  # the [T, E] scores, before they are drawn
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {', '.join(KINDS)}, got {kind!r}")
    imbalance = as_real(imbalance, "imbalance", minimum=0.0, maximum=100.0)  # a logit scale: exp(100) is finite
    hot_experts = as_int(hot_experts, "hot_experts", minimum=0)
    rng = np.random.default_rng(seed)
    scale = 2.0 if kind == "hot" else 1.0
    logits = rng.normal(size=(T, E)) + scale * imbalance * _popularity(kind, E, rng, hot_experts)[None, :]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def routing_problem(
    num_tokens: int, num_experts: int, k: int, *, capacity_factor: float = 1.0, **kwargs: Any
) -> RoutingProblem:
    """A :class:`RoutingProblem` on :func:`routing_scores` (extra keyword arguments go there)."""
    return RoutingProblem(routing_scores(num_tokens, num_experts, **kwargs), k, capacity_factor=capacity_factor)
