"""One result type for every method and every problem family (after scipy's ``OptimizeResult``)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

__all__ = ["Status", "Solution"]


class Status(str, enum.Enum):
    """What a solver's answer is worth.

    - ``optimal``: feasible and proven optimal (the shared check passed).
    - ``feasible``: feasible, optimality not proven.
    - ``time_limit``: the time limit stopped the solver; ``assignment`` is the best feasible answer found, or None.
    - ``infeasible``: the answer violates the problem's constraints (e.g. plain top-k over capacity).
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
class Solution:
    """The answer of one method on one problem.

    Fields (every method fills them the same way):
      method:     registry name of the method that produced it.
      status:     a :class:`Status`.
      objective:  the objective of ``assignment`` recomputed by the shared checker (routing: total score,
                  maximised; placement: makespan, minimised). NaN when there is no assignment.
      bound:      best proven bound on the optimum (routing: upper bound; placement: lower bound), or None.
      gap:        relative gap ``|bound - objective| / max(|bound|, 1e-12)``, or None without a bound.
      assignment: routing: ``[T, k]`` int expert ids; placement: ``[E, P]`` token counts. None if none found.
      loads:      routing: ``[E]`` tokens per expert; placement: ``[E]`` tokens per expert (the input loads).
      bias:       routing: ``[E]`` per-expert price q such that top-k of ``scores - q`` reproduces
                  ``assignment`` up to ties; None when the method has none.
      wall_time:  seconds spent in the method (model building included).
      stats:      method-specific numbers (iterations, back-end status, precision, ...).
      message:    a human-readable line.
      device_loads, token_ranges, weight_transfers: placement only (see ``PlacementProblem``); None for routing.
    """

    method: str
    status: Status
    objective: float
    bound: float | None = None
    gap: float | None = None
    assignment: np.ndarray | None = None
    loads: np.ndarray | None = None
    bias: np.ndarray | None = None
    wall_time: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""
    device_loads: np.ndarray | None = None
    token_ranges: dict[int, list[tuple[int, int, int]]] | None = None
    weight_transfers: list[tuple[int, int, int]] | None = None

    def replace(self, **changes: Any) -> "Solution":
        return dataclasses.replace(self, **changes)

    @property
    def feasible(self) -> bool:
        """True when the shared check accepted the assignment."""
        return bool(self.stats.get("feasible", False))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (arrays become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def __repr__(self) -> str:
        bound = "None" if self.bound is None else f"{self.bound:.6g}"
        gap = "None" if self.gap is None else f"{self.gap:.3g}"
        return (
            f"Solution(method={self.method!r}, status={self.status.value}, objective={self.objective:.6g}, "
            f"bound={bound}, gap={gap}, wall_time={self.wall_time:.4g}s, message={self.message!r})"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        v = float(value)
        return v if np.isfinite(v) else None
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
