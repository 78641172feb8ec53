"""The routing (expert-bias assignment) problem: choose k experts per token under per-expert capacity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._validate import MAX_EXPERTS, MAX_FACTOR, as_float_array, as_int, as_int_array, as_real
from .errors import InfeasibleError

__all__ = ["RoutingProblem"]


class RoutingProblem:
    """Top-k routing under per-expert capacity, as a binary program.

    maximise   sum_{t,e} scores[t, e] * x[t, e]
    subject to sum_e x[t, e] = k              for every token t
               sum_t x[t, e] <= capacity[e]   for every expert e
               x[t, e] in {0, 1}

    Args:
      scores: ``[T, E]`` router scores (numpy or torch, any float dtype); kept as float64 numpy.
      k: experts per token, ``1 <= k <= E``.
      capacity: an int (same for every expert), an ``[E]`` int array, or None for
        ``ceil(capacity_factor * T * k / E)`` per expert.
      capacity_factor: used only when ``capacity`` is None; must be > 0.

    Raises ``ValueError`` naming the argument for bad input, and :class:`~moebalance.InfeasibleError`
    when ``sum(capacity) < T * k``. The object is immutable: its arrays are read-only.
    """

    kind = "routing"
    sense = "max"

    def __init__(self, scores: Any, k: int, capacity: Any = None, capacity_factor: float = 1.0):
        s = as_float_array(scores, "scores", 2)
        T, E = s.shape
        if T < 1 or E < 1:
            raise ValueError(f"`scores` must have at least one token and one expert, got shape {s.shape}")
        if E > MAX_EXPERTS:
            raise ValueError(f"`scores` has E={E} experts, over the limit of {MAX_EXPERTS}")
        k = as_int(k, "k", minimum=1, maximum=E)
        cf: float | None = None
        if capacity is None:
            cf = as_real(capacity_factor, "capacity_factor", positive=True, maximum=MAX_FACTOR)
            cap = np.full(E, math.ceil(cf * T * k / E - 1e-9), dtype=np.int64)
        elif np.ndim(capacity) == 0 and not type(capacity).__module__.startswith("torch"):
            cap = np.full(E, as_int(capacity, "capacity", minimum=0), dtype=np.int64)
        else:
            cap = as_int_array(capacity, "capacity", (E,), minimum=0)
        if int(np.minimum(cap, T).sum()) < T * k:
            raise InfeasibleError(
                f"`capacity` is too small: the experts can take {int(np.minimum(cap, T).sum())} token slots "
                f"(each at most T={T}) but T*k = {T * k} are needed"
            )
        s.setflags(write=False)
        cap.setflags(write=False)
        self._scores = s
        self._k = k
        self._capacity = cap
        self._capacity_factor = cf

    # read-only views -------------------------------------------------------------------------
    @property
    def scores(self) -> np.ndarray:
        """``[T, E]`` float64, read-only."""
        return self._scores

    @property
    def k(self) -> int:
        return self._k

    @property
    def capacity(self) -> np.ndarray:
        """``[E]`` int64, read-only."""
        return self._capacity

    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    @property
    def num_tokens(self) -> int:
        return self._scores.shape[0]

    @property
    def num_experts(self) -> int:
        return self._scores.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self._scores.shape  # type: ignore[return-value]

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") and not hasattr(self, name):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"RoutingProblem is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        T, E = self.shape
        return (
            f"RoutingProblem(T={T}, E={E}, k={self.k}, capacity=[{self.capacity.min()}..{self.capacity.max()}])"
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of a routing problem file (see ``moebalance.io``)."""
        return {
            "kind": "routing",
            "scores": self.scores.tolist(),
            "k": self.k,
            "capacity": self.capacity.tolist(),
        }
