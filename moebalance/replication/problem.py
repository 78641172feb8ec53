"""The replication problem behind EPLB-style expert balancing (DeepSeek EPLB's model).

A serving engine gives every MoE layer ``R`` physical expert slots spread evenly over ``G`` GPUs (slot ``j`` on
GPU ``j // (R / G)``). A plan ``phy2log [L, R]`` says which logical expert each slot holds; every expert has
at least one replica and its load is split evenly over its replicas. The step waits for the busiest GPU, so the
objective is the sum over layers of the largest GPU load (for a window of batches: the mean over batches of
that sum). The mapping tables are described in :mod:`moebalance.replication`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._validate import as_int, as_int_array
from ..solution import Evaluation
from .bound import layer_bounds
from .check import check_replication
from .solution import ReplicationSolution
from .tables import _counts

__all__ = ["ReplicationProblem", "MAX_SLOTS"]


def _as_weight(weight: Any) -> tuple[np.ndarray, int]:
    """``weight`` as float64 ``[B, L, E]`` and its original number of dimensions (1, 2 or 3)."""
    if type(weight).__module__.startswith("torch"):
        if getattr(getattr(weight, "device", None), "type", None) == "meta":
            raise ValueError("`weight` is a meta tensor (it holds no data): pass the measured loads")
        try:
            weight = weight.detach().to("cpu").double().numpy()
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"`weight` must be a real numeric tensor: {exc}") from None
    try:
        arr = np.asarray(weight)
    except Exception as exc:
        raise ValueError(f"`weight` must be a numeric array [E], [L, E] or [B, L, E]: {exc}") from None
    if (
        arr.dtype == object
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise ValueError(f"`weight` must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2, 3):
        raise ValueError(f"`weight` must have shape [E], [L, E] or [B, L, E], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"`weight` must not be empty, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("`weight` must be finite: it contains NaN or inf")
    if arr.min() < 0:
        raise ValueError(f"`weight` must be non-negative, got minimum {arr.min():.6g}")
    ndim = arr.ndim
    while arr.ndim < 3:
        arr = arr[None]
    return arr, ndim


def _as_plan(value: Any, name: str, L: int, R: int, E: int) -> np.ndarray:
    """``value`` as an int64 ``[L, R]`` plan of expert ids in [0, E) holding every expert, else ValueError."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.ndim == 1 and L == 1:
        arr = arr[None]
    plan = as_int_array(arr, name, (L, R))
    if plan.size and (plan.min() < 0 or plan.max() >= E):
        raise ValueError(f"`{name}` must hold expert ids in [0, {E}), got range [{plan.min()}, {plan.max()}]")
    counts = _counts(plan, E)
    if np.any(counts == 0):
        layer, expert = np.argwhere(counts == 0)[0]
        raise ValueError(f"`{name}` misses expert {expert} in layer {layer}: every expert needs a replica")
    return plan


#: most slots (layers x replicas) a problem may hold: its plans are int64 ``[L, R]`` arrays (2 GiB at the cap)
MAX_SLOTS = 2**28

_ORDER = ("num_groups", "num_nodes", "num_gpus")


def _eplb_order(args: tuple, num_groups: Any, num_nodes: Any, num_gpus: Any) -> tuple[Any, Any, Any]:
    """``(num_groups, num_nodes, num_gpus)`` from the positional ``args`` after ``num_replicas``: EPLB's order
    ``(num_groups, num_nodes, num_gpus)``, or the older ``(num_gpus,)`` alone (deprecated), plus keywords."""
    import warnings

    given = {"num_groups": num_groups, "num_nodes": num_nodes, "num_gpus": num_gpus}
    if len(args) == 1:
        names: tuple[str, ...] = ("num_gpus",)
    elif len(args) in (0, 3):
        names = _ORDER[: len(args)]
    else:
        raise TypeError(
            f"ReplicationProblem takes weight, num_replicas, then (num_groups, num_nodes, num_gpus) "
            f"positionally or by keyword; got {len(args)} more positional argument(s)"
        )
    for name, value in zip(names, args):
        if given[name] is not None:
            raise TypeError(f"ReplicationProblem got `{name}` both positionally and by keyword")
        given[name] = value
    if given["num_gpus"] is None:
        raise TypeError("ReplicationProblem needs `num_gpus`")
    if len(args) == 1:
        warnings.warn(
            "ReplicationProblem(weight, num_replicas, num_gpus) is deprecated: pass `num_gpus=` by "
            "keyword, or all three in rebalance_experts' order (weight, num_replicas, num_groups, "
            "num_nodes, num_gpus)",
            DeprecationWarning,
            stacklevel=3,
        )
    return (
        1 if given["num_groups"] is None else given["num_groups"],
        1 if given["num_nodes"] is None else given["num_nodes"],
        given["num_gpus"],
    )


def _weight_shape(weight: Any) -> tuple[int, ...]:
    """The shape of ``weight`` without copying it (() when it has none)."""
    shape = getattr(weight, "shape", None)
    if shape is None:
        try:
            shape = np.shape(weight)
        except Exception:
            return ()
    try:
        return tuple(int(n) for n in shape)
    except Exception:
        return ()


class ReplicationProblem:
    """Which logical expert each physical slot holds: minimise the largest GPU load per layer.

    Model (DeepSeek EPLB's): ``R`` slots per layer, ``R / G`` per GPU (slot ``j`` on GPU ``j // (R / G)``; two
    replicas of one expert may share a GPU); every expert has >= 1 replica and its load is split evenly over
    its replicas. With ``num_nodes > 1`` GPUs form nodes of ``G / num_nodes`` consecutive GPUs, experts form
    ``num_groups`` groups of consecutive ids, and all replicas of a group's experts stay on one node.

    minimise   mean_b sum_l max_g sum_{slots j on g} weight[b, l, phy2log[l, j]] / logcnt[l, phy2log[l, j]]
    subject to logcnt[l, e] >= 1; group/node constraint; moves[l] <= max_moves (with ``old_phy2log``).

    A *move* is a replica a GPU must copy in: ``moves[l] = R - sum_{g, e} min(old count, new count)``.

    Args:
      weight: ``[E]``, ``[L, E]`` loads, or a window ``[B, L, E]`` of recent batches (finite, >= 0).
      num_replicas: ``R``, physical slots per layer: a multiple of ``num_gpus`` and >= E; layers x ``R`` at most
        :data:`MAX_SLOTS`.
      num_groups: expert groups (must divide E; with ``num_nodes > 1`` a multiple of ``num_nodes``); default 1.
      num_nodes: server nodes; default 1.
      num_gpus: ``G``, a multiple of ``num_nodes`` (required).

    ``num_groups, num_nodes, num_gpus`` follow ``rebalance_experts``' order (EPLB's) when given positionally;
    ``ReplicationProblem(weight, num_replicas, num_gpus)`` (the older order) still works, with a
    DeprecationWarning; keywords always work.
      old_phy2log: ``[L, R]`` the plan in place, holding every expert (for moves), or None.
      max_moves: at most this many moves per layer (needs ``old_phy2log``), or None.
    """

    kind = "replication"
    sense = "min"
    solution_type = ReplicationSolution

    def __init__(
        self,
        weight: Any,
        num_replicas: int,
        *args: int,
        num_groups: int | None = None,
        num_nodes: int | None = None,
        num_gpus: int | None = None,
        old_phy2log: Any = None,
        max_moves: int | None = None,
    ):
        num_groups, num_nodes, num_gpus = _eplb_order(args, num_groups, num_nodes, num_gpus)
        R = as_int(num_replicas, "num_replicas", minimum=1)
        G = as_int(num_gpus, "num_gpus", minimum=1)
        groups = as_int(num_groups, "num_groups", minimum=1)
        nodes = as_int(num_nodes, "num_nodes", minimum=1)
        shape = _weight_shape(weight)
        L_ = shape[-2] if len(shape) >= 2 else 1
        if R > MAX_SLOTS or L_ * R > MAX_SLOTS:
            raise ValueError(
                f"`num_replicas` ({R}) is too large: a plan of {L_} layer(s) x {R} slots needs "
                f"{L_ * R * 8 / 2**30:.3g} GiB; at most {MAX_SLOTS} slots over all layers"
            )
        if G > R:
            raise ValueError(f"`num_gpus` ({G}) must be <= `num_replicas` ({R}): every GPU holds a slot")
        w, ndim = _as_weight(weight)
        B, L, E = w.shape
        if R % G:
            raise ValueError(f"`num_replicas` ({R}) must be a multiple of `num_gpus` ({G})")
        if R < E:
            raise ValueError(f"`num_replicas` ({R}) must be >= the number of experts ({E}): every expert needs a slot")
        if E % groups:
            raise ValueError(f"`num_groups` ({groups}) must divide the number of experts ({E})")
        if G % nodes:
            raise ValueError(f"`num_gpus` ({G}) must be a multiple of `num_nodes` ({nodes})")
        if nodes > 1 and groups % nodes:
            raise ValueError(
                f"`num_groups` ({groups}) must be a multiple of `num_nodes` ({nodes}) for the hierarchical model"
            )
        old = None if old_phy2log is None else _as_plan(old_phy2log, "old_phy2log", L, R, E)
        if max_moves is not None:
            max_moves = as_int(max_moves, "max_moves", minimum=0)
            if old is None:
                raise ValueError("`max_moves` needs `old_phy2log`: moves are counted from an old plan")
        # an overflowing objective cannot be certified
        with np.errstate(over="ignore"):
            overflow = not np.isfinite(w.sum(axis=2).sum(axis=1).max())
        if overflow:
            raise ValueError(
                "`weight` overflows: the objective (a sum over layers of GPU loads) cannot be represented as a float64"
            )
        self._w = w
        self._w.setflags(write=False)
        self._ndim = ndim
        self._R, self._G, self._groups, self._nodes = R, G, groups, nodes
        self._old = old
        if old is not None:
            old.setflags(write=False)
        self._max_moves = max_moves
        self._layer_bounds: np.ndarray | None = None

    # ---- data ---------------------------------------------------------------------------------------------
    @property
    def weight(self) -> np.ndarray:
        """``[B, L, E]`` loads (B = 1 unless a window was given); read-only."""
        return self._w

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, L, E)``."""
        return tuple(self._w.shape)

    @property
    def num_batches(self) -> int:
        return self._w.shape[0]

    @property
    def num_layers(self) -> int:
        return self._w.shape[1]

    @property
    def num_experts(self) -> int:
        return self._w.shape[2]

    @property
    def num_replicas(self) -> int:
        return self._R

    @property
    def num_gpus(self) -> int:
        return self._G

    @property
    def num_groups(self) -> int:
        return self._groups

    @property
    def num_nodes(self) -> int:
        return self._nodes

    @property
    def slots_per_gpu(self) -> int:
        return self._R // self._G

    @property
    def hierarchical(self) -> bool:
        """True when the group/node constraint binds (``num_nodes > 1``)."""
        return self._nodes > 1

    @property
    def old_phy2log(self) -> np.ndarray | None:
        return self._old

    @property
    def max_moves(self) -> int | None:
        return self._max_moves

    @property
    def window(self) -> bool:
        """True when ``weight`` was a window ``[B, L, E]``."""
        return self._ndim == 3

    def summed_weight(self) -> np.ndarray:
        """``[L, E]`` loads summed over the window (what EPLB plans on)."""
        return self._w.sum(axis=0)

    def __repr__(self) -> str:
        B, L, E = self.shape
        extra = f", window of {B}" if self.window else ""
        extra += f", {self._groups} groups on {self._nodes} nodes" if self.hierarchical else ""
        extra += f", max_moves={self._max_moves}" if self._max_moves is not None else ""
        return f"ReplicationProblem(L={L}, E={E}, R={self._R}, G={self._G}{extra})"

    # ---- the shared check ---------------------------------------------------------------------------------
    def evaluate(self, assignment: Any, solution: Any = None) -> Evaluation:
        """The shared check of ``phy2log [L, R]`` (see :func:`moebalance.replication.check.check_replication`); a
        solver's own ``log2phy`` order on ``solution`` is kept when it lists exactly each expert's slots."""
        return check_replication(self, assignment, solution)

    def certify(self, solution: Any) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        """``(bound, stats, field corrections)``: a lower bound that holds for every plan (:func:`layer_bounds`,
        summed over layers); no field is corrected."""
        lb = float(layer_bounds(self).sum())
        return lb, {"combinatorial_bound": lb}, {}

    def objective_scale(self) -> float:
        """The natural magnitude of the objective: the sum over layers of the mean GPU load (a lower bound)."""
        return float(self._w.sum(axis=2).mean(axis=0).sum() / self._G)

    # ---- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of a replication problem file."""
        w = self._w if self._ndim == 3 else (self._w[0] if self._ndim == 2 else self._w[0, 0])
        return {
            "kind": "replication",
            "weight": w.tolist(),
            "num_replicas": self._R,
            "num_gpus": self._G,
            "num_groups": self._groups,
            "num_nodes": self._nodes,
            "old_phy2log": None if self._old is None else self._old.tolist(),
            "max_moves": self._max_moves,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicationProblem:
        """Inverse of :meth:`to_dict`; unknown keys or a wrong ``kind`` raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"`d` must be a dict, got {type(d).__name__}")
        if d.get("kind", "replication") != "replication":
            raise ValueError(f"`d` has kind {d.get('kind')!r}, expected 'replication'")
        allowed = {"kind", "weight", "num_replicas", "num_gpus", "num_groups", "num_nodes", "old_phy2log", "max_moves"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"`d` has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        for key in ("weight", "num_replicas", "num_gpus"):
            if key not in d:
                raise ValueError(f"`d` misses the key {key!r}")
        return cls(
            d["weight"],
            d["num_replicas"],
            num_gpus=d["num_gpus"],
            num_groups=d.get("num_groups", 1),
            num_nodes=d.get("num_nodes", 1),
            old_phy2log=d.get("old_phy2log"),
            max_moves=d.get("max_moves"),
        )
