"""The routing (expert-bias assignment) problem: choose k experts per token under per-expert capacity."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._validate import MAX_EXPERTS, MAX_FACTOR, as_float_array, as_int, as_int_array, as_real
from ..errors import InfeasibleError
from ..solution import Evaluation
from .check import _price_certificate, check_routing, routing_dual_bound
from .solution import RoutingSolution

__all__ = ["RoutingProblem", "expert_capacity"]


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ``ceil(capacity_factor * T * k / E)`` (the one formula every layer, balancer and problem
    uses; a product within 1e-9 above an integer rounds down to it, so ``1.0 * T * k / E`` exact stays exact)."""
    for name, v in (("num_tokens", num_tokens), ("k", k), ("num_experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "num_experts" else 0):
            raise ValueError(f"`{name}` must be an integer >= {1 if name == 'num_experts' else 0}, got {v!r}")
    cf = capacity_factor
    if (
        isinstance(cf, bool)
        or not isinstance(cf, (int, float, np.integer, np.floating))
        or not math.isfinite(cf)
        or cf <= 0
    ):
        raise ValueError(f"`capacity_factor` must be a positive finite number, got {capacity_factor!r}")
    return math.ceil(float(cf) * int(num_tokens) * int(k) / int(num_experts) - 1e-9)


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
    load_ratio_label = "max/cap"
    solution_type = RoutingSolution

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
            cap = np.full(E, expert_capacity(T, k, E, cf), dtype=np.int64)
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
        self._scale = None

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
        return self._scores.shape

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") and not hasattr(self, name):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"RoutingProblem is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        T, E = self.shape
        return f"RoutingProblem(T={T}, E={E}, k={self.k}, capacity=[{self.capacity.min()}..{self.capacity.max()}])"

    # the shared check ---------------------------------------------------------------------------
    def evaluate(self, assignment: Any, solution: Any = None) -> Evaluation:
        """The shared check of an ``assignment`` ``[T, k]`` (see :func:`check_routing`)."""
        return check_routing(self, assignment)

    def certify(self, solution: Any) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        """What a feasible answer proves by itself: ``(bound, stats, field corrections)``.

        The Lagrangian bound of its ``bias`` and of any ``stats["certificate_price"]``. ``bias`` keeps its
        contract (top-k of ``scores - bias`` reproduces the assignment up to ties): a bias that reproduces fewer
        tokens is moved to ``stats["certificate_price"]`` (it still certifies the bound) and ``bias`` becomes
        None.
        """
        stats: dict[str, Any] = {}
        fixes: dict[str, Any] = {}
        bounds = []
        bias = getattr(solution, "bias", None)
        cert = (solution.stats or {}).get("certificate_price")
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64)
            if bias.shape != (self.num_experts,) or not np.all(np.isfinite(bias)):
                return None, {"bias_invalid": True}, {"bias": None, "message": "the method's bias was malformed"}
            bound, rep = _price_certificate(self, np.asarray(solution.assignment), bias)
            bounds.append(bound)
            stats["dual_bound"] = bound
            stats["bias_reproduces"] = rep
            if rep < 1.0:
                fixes["bias"] = None
                fixes["message"] = (
                    f"its bias reproduces {rep:.1%} of the tokens: kept as stats['certificate_price'] only"
                )
                if cert is None:
                    stats["certificate_price"] = bias
        if cert is not None:
            cert = np.asarray(cert, dtype=np.float64)
            if cert.shape == (self.num_experts,) and np.all(np.isfinite(cert)):
                bounds.append(routing_dual_bound(self, cert))
                stats["certificate_bound"] = bounds[-1]
        return (min(bounds) if bounds else None), stats, fixes

    def objective_scale(self) -> float:
        """The natural magnitude of the objective: ``k * sum_t max_e |scores[t, e]|`` (the gap's floor)."""
        if self._scale is None:
            object.__setattr__(self, "_scale", float(self._k * np.abs(self._scores).max(axis=1).sum()))
        return self._scale  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of a routing problem file (see ``moebalance.io``)."""
        return {
            "kind": "routing",
            "scores": self.scores.tolist(),
            "k": self.k,
            "capacity": self.capacity.tolist(),
        }
