"""The placement (token-to-device) problem behind expert parallelism, and its cost model.

Under expert parallelism (EP) each of ``P`` devices owns some experts (its *home* experts). A plan says how many
of the tokens routed to expert ``e`` each device computes; a device that computes tokens of an expert it does not
own needs a copy of that expert's weights (a *weight transfer*). The layer waits for the slowest device, so the
objective is the makespan under a :class:`CostModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._validate import (
    MAX_DEVICES,
    MAX_EXPERTS,
    MAX_FACTOR,
    MAX_INT,
    MAX_MAGNITUDE,
    as_int,
    as_int_array,
    as_real,
    check_elements,
)
from ..errors import InfeasibleError
from ..solution import Evaluation
from .solution import PlacementSolution

__all__ = ["CostModel", "PlacementProblem"]


def _check_cost(name: str, value: Any) -> float:
    return as_real(value, name, minimum=0.0, maximum=MAX_MAGNITUDE)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Time a device spends on its share of one MoE layer (any consistent unit; seconds in ``from_shapes``).

    For device ``p`` with ``x[e, p]`` tokens of expert ``e`` and ``y[e, p] = 1`` when ``x[e, p] > 0``::

        t_p = sum_e (token_time * x[e, p] + gemm_time * y[e, p])
              + weight_time * (number of foreign experts on p)
              + token_transfer_time * (tokens of foreign experts on p)

    A *foreign* expert of ``p`` is one whose home is another device. The defaults make ``t_p`` the token count,
    so the makespan is the largest per-device token count. Every field must be finite and >= 0.
    """

    token_time: float = 1.0
    gemm_time: float = 0.0
    weight_time: float = 0.0
    token_transfer_time: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_cost(f.name, getattr(self, f.name)))

    @classmethod
    def from_shapes(
        cls,
        hidden: int,
        ffn: int,
        dtype_bytes: float,
        device_flops: float,
        link_bandwidth: float,
        gemm_overhead: float,
        *,
        dispatch: bool = True,
        foreign_token_hops: float = 0.0,
    ) -> CostModel:
        """Seconds per token, per GEMM and per weight copy for a SwiGLU expert (``[hidden, ffn]``).

        - token_time: ``6 * hidden * ffn / device_flops`` (three matmuls, forward) plus, when ``dispatch``, the
          all-to-all of the token and its output, ``2 * hidden * dtype_bytes / link_bandwidth``: under EP and
          LLEP alike a device receives every token it computes, so this cost follows the token.
        - gemm_time: ``gemm_overhead`` (launch and tail inefficiency of one expert GEMM).
        - weight_time: ``3 * hidden * ffn * dtype_bytes / link_bandwidth`` (one copy of the expert's weights).
        - token_transfer_time: ``foreign_token_hops * 2 * hidden * dtype_bytes / link_bandwidth``. LLEP sends a
          spilled token straight from its source to the helper device, so the default is 0 (no extra hop).

        ``device_flops`` (FLOP/s) and ``link_bandwidth`` (bytes/s) are what the caller assumes for the hardware;
        nothing here is measured.
        """
        hidden = as_int(hidden, "hidden", minimum=1)
        ffn = as_int(ffn, "ffn", minimum=1)
        dtype_bytes = _check_cost("dtype_bytes", dtype_bytes)
        device_flops = _check_cost("device_flops", device_flops)
        link_bandwidth = _check_cost("link_bandwidth", link_bandwidth)
        gemm_overhead = _check_cost("gemm_overhead", gemm_overhead)
        hops = _check_cost("foreign_token_hops", foreign_token_hops)
        if dtype_bytes <= 0:
            raise ValueError(f"`dtype_bytes` must be > 0, got {dtype_bytes!r}")
        if device_flops <= 0:
            raise ValueError(f"`device_flops` must be > 0, got {device_flops!r}")
        if link_bandwidth <= 0:
            raise ValueError(f"`link_bandwidth` must be > 0, got {link_bandwidth!r}")
        token_bytes = 2.0 * hidden * dtype_bytes  # the token in, its output back
        token_time = 6.0 * hidden * ffn / device_flops
        if dispatch:
            token_time += token_bytes / link_bandwidth
        return cls(
            token_time=token_time,
            gemm_time=gemm_overhead,
            weight_time=3.0 * hidden * ffn * dtype_bytes / link_bandwidth,
            token_transfer_time=hops * token_bytes / link_bandwidth,
        )

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _optional_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    return as_int(value, name, minimum=0)


class PlacementProblem:
    """Which device computes which tokens of which expert: minimise the makespan.

    Decision variables: ``x[e, p] >= 0`` integer tokens of expert ``e`` computed on device ``p`` (the
    assignment, ``[E, P]``); ``y[e, p] = 1`` when ``x[e, p] > 0`` (expert ``e`` runs a GEMM on ``p``).

    minimise   max_p t_p                                     (t_p from the :class:`CostModel`)
    subject to sum_p x[e, p] = expert_loads[e]               for every expert e
               sum_e x[e, p] <= max_tokens_per_device        (if set)
               #{e : home[e] != p, x[e, p] > 0} <= max_foreign_experts   (if set)

    Args:
      expert_loads: ``[E]`` non-negative integer tokens routed to each expert over the whole EP group.
      num_devices: ``P >= 1``.
      home: ``[E]`` device owning each expert's weights; default contiguous blocks (expert ``e`` on
        ``e // (E / P)``), which needs ``E`` divisible by ``P``.
      cost: a :class:`CostModel`.
      max_tokens_per_device, max_foreign_experts: optional limits (ints >= 0).
      alpha, min_chunk, imbalance_threshold: LLEP's parameters (capacity factor ``alpha > 0``, minimum spilled
        GEMM size ``min_chunk >= 0``, fallback to EP when max/mean native device load is below
        ``imbalance_threshold``; None disables the fallback). Solvers other than LLEP ignore them.

    Raises ``ValueError`` naming the argument for bad input and :class:`~moebalance.InfeasibleError` when the
    limits provably admit no plan. The object is immutable (read-only arrays).
    """

    kind = "placement"
    sense = "min"
    load_ratio_label = "max/mean"
    solution_type = PlacementSolution

    def __init__(
        self,
        expert_loads: Any,
        num_devices: int,
        *,
        home: Any = None,
        cost: CostModel | None = None,
        max_tokens_per_device: int | None = None,
        max_foreign_experts: int | None = None,
        alpha: float = 1.0,
        min_chunk: int = 1024,
        imbalance_threshold: float | None = 1.3,
    ):
        if isinstance(expert_loads, (str, bytes)) or np.ndim(expert_loads) != 1:
            raise ValueError(f"`expert_loads` must be a 1-D array, got {np.ndim(expert_loads)} dimensions")
        E = int(np.shape(expert_loads)[0])
        if E < 1:
            raise ValueError("`expert_loads` must hold at least one expert")
        if E > MAX_EXPERTS:
            raise ValueError(f"`expert_loads` has E={E} experts, over the limit of {MAX_EXPERTS}")
        loads = as_int_array(expert_loads, "expert_loads", (E,), minimum=0)
        if float(loads.sum(dtype=np.float64)) > MAX_INT:  # the int64 sum could wrap; float64 cannot
            raise ValueError(
                f"`expert_loads` must sum to at most {MAX_INT}, got {float(loads.sum(dtype=np.float64)):.4g}"
            )
        P = as_int(num_devices, "num_devices", minimum=1, maximum=MAX_DEVICES)
        check_elements("num_devices", E, P)  # an assignment is [E, P]
        if home is None:
            if E % P:
                raise ValueError(
                    f"`expert_loads` has E={E} experts, not divisible by `num_devices`={P}; pass `home` to place them"
                )
            h = np.arange(E, dtype=np.int64) // (E // P)
        else:
            h = as_int_array(home, "home", (E,), minimum=0)
            if h.max() >= P:
                raise ValueError(f"`home` must lie in [0, {P}), got maximum {int(h.max())}")
        if cost is None:
            cost = CostModel()
        if not isinstance(cost, CostModel):
            raise ValueError(f"`cost` must be a CostModel, got {type(cost).__name__}")
        cap = _optional_int(max_tokens_per_device, "max_tokens_per_device")
        foreign = _optional_int(max_foreign_experts, "max_foreign_experts")
        alpha = as_real(alpha, "alpha", positive=True, maximum=MAX_FACTOR)
        min_chunk = as_int(min_chunk, "min_chunk", minimum=0)
        if imbalance_threshold is not None:
            imbalance_threshold = as_real(imbalance_threshold, "imbalance_threshold", positive=True, maximum=MAX_FACTOR)
        loads.setflags(write=False)
        h.setflags(write=False)
        self._loads = loads
        self._P = P
        self._home = h
        self._home_given = home is not None
        self._cost = cost
        self._max_tokens = cap
        self._max_foreign = foreign
        self._alpha = float(alpha)
        self._min_chunk = min_chunk
        self._threshold = imbalance_threshold
        self._check_limits()

    def _check_limits(self) -> None:
        """Proven necessary conditions for a plan to exist under the limits; each violation proves infeasibility.

        Only these are checked (the solvers decide the rest): the devices must hold every token
        (``P * max_tokens_per_device >= total``); with ``max_foreign_experts = 0`` no token leaves its home,
        so every device's native load must fit; otherwise each overloaded device ``p`` must shed parts of at
        least ``k_p`` of its experts (its ``k_p`` largest just cover its excess), and each shed part takes a
        foreign slot on a device other than ``p``: ``k_p <= F * (P - 1)`` and ``sum_p k_p <= F * P`` (an
        overloaded device may host foreign experts once it has shed its own, so every device counts).
        """
        total = int(self._loads.sum())
        P = self._P
        native = self.native_loads
        C, F = self._max_tokens, self._max_foreign
        if C is not None and C * P < total:
            raise InfeasibleError(
                f"`max_tokens_per_device`={C} is too small: {P} devices hold at most {C * P} "
                f"tokens but {total} are routed"
            )
        if C is None or F is None:
            return
        over = np.flatnonzero(native > C)
        if over.size and F == 0:
            raise InfeasibleError(
                f"`max_foreign_experts`=0 forbids spilling, but device {int(over[0])} has "
                f"{int(native[over[0]])} native tokens > `max_tokens_per_device`={C}"
            )
        # k_p: experts device p must shed parts of; they go to the other devices' foreign slots. Hall's
        # condition for that transport (every p to every q != p, F slots each) is exactly these two tests.
        shed = []
        for p in over:
            mine = np.sort(self._loads[self._home == p])[::-1]
            shed.append(int(np.searchsorted(np.cumsum(mine), native[p] - C) + 1))
        for p, k_p in zip(over.tolist(), shed):
            if k_p > F * (P - 1):
                raise InfeasibleError(
                    f"`max_foreign_experts`={F} is too small: device {p} must shed parts of at "
                    f"least {k_p} experts, but the other {P - 1} device(s) host at most "
                    f"{F * (P - 1)} foreign experts"
                )
        if sum(shed) > F * P:
            raise InfeasibleError(
                f"`max_foreign_experts`={F} is too small: overloaded devices must shed parts "
                f"of at least {sum(shed)} experts, but {P} devices host at most {F * P} "
                f"foreign experts"
            )

    # read-only views ----------------------------------------------------------------------------
    @property
    def expert_loads(self) -> np.ndarray:
        """``[E]`` int64 tokens per expert, read-only."""
        return self._loads

    @property
    def num_devices(self) -> int:
        return self._P

    @property
    def num_experts(self) -> int:
        return int(self._loads.shape[0])

    @property
    def home(self) -> np.ndarray:
        """``[E]`` int64 home device of each expert, read-only."""
        return self._home

    @property
    def cost(self) -> CostModel:
        return self._cost

    @property
    def max_tokens_per_device(self) -> int | None:
        return self._max_tokens

    @property
    def max_foreign_experts(self) -> int | None:
        return self._max_foreign

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def min_chunk(self) -> int:
        return self._min_chunk

    @property
    def imbalance_threshold(self) -> float | None:
        return self._threshold

    @property
    def total_tokens(self) -> int:
        return int(self._loads.sum())

    @property
    def native_loads(self) -> np.ndarray:
        """``[P]`` tokens of each device's home experts (the EP per-device load)."""
        return np.bincount(self._home, weights=self._loads, minlength=self._P).astype(np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        """``(E, P)``, the shape of an assignment."""
        return (self.num_experts, self._P)

    def imbalance_ratio(self) -> float:
        """max / mean of the native device loads (1.0 when nothing is routed), as LLEP's fallback test uses it."""
        native = self.native_loads
        mean = native.mean()
        return float(native.max() / mean) if mean > 0 else 1.0

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") and not hasattr(self, name):
            object.__setattr__(self, name, value)
        else:
            raise AttributeError(f"PlacementProblem is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        E, P = self.shape
        return f"PlacementProblem(E={E}, P={P}, tokens={self.total_tokens}, imbalance={self.imbalance_ratio():.3f})"

    # the shared check ------------------------------------------------------------------------------
    def evaluate(self, assignment: Any, solution: Any = None) -> Evaluation:
        """The shared check of a plan ``[E, P]`` (see :func:`moebalance.placement.check.check_placement`); a solver's own
        ``token_ranges`` on ``solution`` are kept when they tile the plan."""
        from .check import check_placement

        return check_placement(self, assignment, token_ranges_hint=getattr(solution, "token_ranges", None))

    def certify(self, solution: Any) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        """Placement answers prove no bound of their own."""
        return None, {}, {}

    def objective_scale(self) -> float:
        """The natural magnitude of the makespan: the mean device time of the tokens and expert GEMMs (a lower
        bound on the makespan of every plan)."""
        scale = getattr(self, "_scale", None)
        if scale is None:
            c = self._cost
            total = float(self._loads.sum())
            scale = float((c.token_time * total + c.gemm_time * np.count_nonzero(self._loads)) / self._P)
            object.__setattr__(self, "_scale", scale)
        return scale

    # files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of a placement problem file."""
        return {
            "kind": "placement",
            "expert_loads": self._loads.tolist(),
            "num_devices": self._P,
            "home": self._home.tolist() if self._home_given else None,
            "cost": self._cost.to_dict(),
            "max_tokens_per_device": self._max_tokens,
            "max_foreign_experts": self._max_foreign,
            "alpha": self._alpha,
            "min_chunk": self._min_chunk,
            "imbalance_threshold": self._threshold,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlacementProblem:
        """Inverse of :meth:`to_dict`; unknown keys or a wrong ``kind`` raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"`d` must be a dict, got {type(d).__name__}")
        if d.get("kind", "placement") != "placement":
            raise ValueError(f"`d` has kind {d.get('kind')!r}, expected 'placement'")
        allowed = {
            "kind",
            "expert_loads",
            "num_devices",
            "home",
            "cost",
            "max_tokens_per_device",
            "max_foreign_experts",
            "alpha",
            "min_chunk",
            "imbalance_threshold",
        }
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in placement problem dict")
        for key in ("expert_loads", "num_devices"):
            if key not in d:
                raise ValueError(f"placement problem dict lacks `{key}`")
        cost = d.get("cost")
        if cost is None:
            cost_model = CostModel()
        elif isinstance(cost, dict):
            bad = sorted(set(cost) - {f.name for f in dataclasses.fields(CostModel)})
            if bad:
                raise ValueError(f"unknown `cost` field(s) {', '.join(map(repr, bad))}")
            cost_model = CostModel(**cost)
        else:
            raise ValueError(f"`cost` must be a dict of CostModel fields, got {type(cost).__name__}")
        kwargs = {
            k: d[k]
            for k in ("max_tokens_per_device", "max_foreign_experts", "alpha", "min_chunk", "imbalance_threshold")
            if k in d
        }
        return cls(d["expert_loads"], d["num_devices"], home=d.get("home"), cost=cost_model, **kwargs)
