"""The result types every method returns, and the one status set (after scipy's ``OptimizeResult``).

``Solution`` holds the fields common to every problem family; each family adds its own typed fields in a
subclass in its own ``solution`` module (``moebalance.routing.solution.RoutingSolution``,
``moebalance.placement.solution.PlacementSolution``, ``moebalance.replication.solution.ReplicationSolution``;
the first two stay importable from here). ``Evaluation`` is what a problem's ``evaluate(assignment)`` (the
shared check) returns.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import numpy as np

__all__ = ["Status", "Solution", "Evaluation", "relative_gap", "GAP_FLOOR"]

# family results importable from here as before they moved to their families (resolved on first use: the
# families' modules import this one)
_MOVED = {
    "RoutingSolution": "moebalance.routing.solution",
    "PlacementSolution": "moebalance.placement.solution",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'moebalance.solution' has no attribute {name!r}")


# the relative gap's denominator never drops below GAP_FLOOR * problem.objective_scale(): a bound within a
# solver's resolution (about 1e-8 of the data's range) of an objective near 0 is a match, not a gap of 1
GAP_FLOOR = 1e-2


class Status(str, enum.Enum):
    """What a solver's answer is worth.

    - ``optimal``: feasible and proven optimal (the shared check passed and the bound agrees).
    - ``feasible``: feasible, optimality not proven.
    - ``time_limit``: the time limit stopped the solver; ``assignment`` is the best feasible answer found, or None.
    - ``infeasible``: the returned answer violates the problem's constraints (e.g. plain top-k over capacity).
    - ``error``: the back-end failed; ``message`` says why.
    """

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    TIME_LIMIT = "time_limit"
    INFEASIBLE = "infeasible"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the shared check found for one assignment (``problem.evaluate(assignment)``).

    feasible:   True when every constraint holds.
    objective:  the objective recomputed from the problem's data alone (NaN when the assignment is malformed).
    violations: one line per violated constraint kind.
    fields:     the family's result fields the check derived (routing ``loads``; placement ``loads``,
                ``device_loads``, ``token_ranges``, ``weight_transfers``; replication ``log2phy``, ...).
    load_ratio: routing: max_e loads / capacity; placement and replication: max / mean device load.
    """

    feasible: bool
    objective: float
    violations: list[str] = dataclasses.field(default_factory=list)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    load_ratio: float = float("nan")

    @property
    def loads(self) -> Any:
        """``[E]`` tokens per expert where the family has them, else None."""
        return self.fields.get("loads")

    @property
    def extras(self) -> dict[str, Any]:
        """The derived fields other than ``loads``."""
        return {k: v for k, v in self.fields.items() if k != "loads"}


def relative_gap(bound: float, objective: float, scale: float) -> float:
    """``|bound - objective| / max(|bound|, |objective|, GAP_FLOOR * scale)``; 0 for an exact match.

    ``scale`` is the problem's natural magnitude (``problem.objective_scale()``: routing ``k * sum_t max_e
    |scores[t, e]|``, placement and replication the mean device load), so the gap means the same at any scale
    of the data and stays defined when the optimum is 0 or negative: the floor only matters for an objective
    below 1% of that magnitude (routing scores that cancel out), where the gap is measured against the floor.
    """
    diff = abs(bound - objective)
    if diff == 0.0:
        return 0.0
    floor = max(GAP_FLOOR * abs(scale), np.finfo(np.float64).tiny)
    return diff / max(abs(bound), abs(objective), floor)


@dataclasses.dataclass(frozen=True)
class Solution:
    """The answer of one method on one problem: the fields every family shares.

    method:     registry name of the method that produced it.
    status:     a :class:`Status`.
    objective:  the objective of ``assignment`` recomputed by the shared check (routing: total score,
                maximised; placement and replication: minimised). NaN when there is no assignment.
    bound:      best proven bound on the optimum (upper for a maximisation, lower for a minimisation), or None.
    gap:        :func:`relative_gap` of bound and objective, or None without a bound or feasible assignment.
    assignment: the family's decision (routing ``[T, k]`` expert ids; placement ``[E, P]`` token counts;
                replication ``phy2log [L, R]``), or None when none was found.
    wall_time:  seconds spent in the method (model building included).
    stats:      method-specific numbers (iterations, back-end status, precision, ...).
    message:    a human-readable line.
    feasible:   True when the shared check accepted ``assignment``.
    """

    method: str
    status: Status
    objective: float = float("nan")
    bound: float | None = None
    gap: float | None = None
    assignment: Any = None
    wall_time: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    feasible: bool = False

    def replace(self, **changes: Any) -> Solution:
        return dataclasses.replace(self, **changes)

    @classmethod
    def family_fields(cls) -> tuple[str, ...]:
        """Names of the fields this class adds to :class:`Solution`."""
        cached = cls.__dict__.get("_family_fields")
        if cached is None:
            base = {f.name for f in dataclasses.fields(Solution)}
            cached = tuple(f.name for f in dataclasses.fields(cls) if f.name not in base)
            type.__setattr__(cls, "_family_fields", cached)
        return cached

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def __repr__(self) -> str:
        bound = "None" if self.bound is None else f"{self.bound:.6g}"
        gap = "None" if self.gap is None else f"{self.gap:.3g}"
        return (
            f"{type(self).__name__}(method={self.method!r}, status={self.status.value}, "
            f"objective={self.objective:.6g}, bound={bound}, gap={gap}, wall_time={self.wall_time:.4g}s, "
            f"message={self.message!r})"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, dict) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
