"""The one independent feasibility check every returned answer goes through.

It trusts nothing a solver says: it recomputes the objective and the loads from the problem's data and the
assignment alone, and lists every violated constraint. Placement problems are checked by
``moebalance.plan.check_placement`` through the same entry point.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["CheckResult", "check", "check_routing", "routing_dual_bound", "bias_reproduces"]

TOL = 1e-9


@dataclasses.dataclass
class CheckResult:
    """What the checker found.

    feasible:   True when every constraint holds.
    objective:  the objective recomputed from the problem's data (NaN when the assignment is malformed).
    loads:      ``[E]`` tokens per expert (placement: the problem's expert loads).
    load_ratio: routing: max_e loads[e] / capacity[e]; placement: max device time / mean device time.
    violations: one line per violated constraint kind.
    extras:     further :class:`Solution` fields the checker derived (placement: device_loads, token_ranges,
                weight_transfers).
    """

    feasible: bool
    objective: float
    loads: np.ndarray | None
    load_ratio: float
    violations: list[str]
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)


def check(problem: Any, assignment: Any, token_ranges: Any = None) -> CheckResult:
    """Check ``assignment`` against ``problem`` (routing or placement).

    ``token_ranges`` (placement only): a solver's own order of ranges, kept when it tiles every expert's tokens
    and matches the assignment, and a violation otherwise.
    """
    if getattr(problem, "kind", None) == "routing":
        return check_routing(problem, assignment)
    if getattr(problem, "kind", None) == "placement":
        from .plan import check_placement

        return check_placement(problem, assignment, token_ranges_hint=token_ranges)
    raise ValueError(f"`problem` must be a RoutingProblem or PlacementProblem, got {type(problem).__name__}")


def check_routing(problem: Any, assignment: Any) -> CheckResult:
    """``assignment`` [T, k] expert ids: in range, k distinct experts per token, loads within capacity."""
    T, E = problem.shape
    k = problem.k
    a = np.asarray(assignment)
    if a.shape != (T, k) or not (np.issubdtype(a.dtype, np.integer)):
        return CheckResult(False, float("nan"), None, float("nan"),
                           [f"assignment must be an integer array of shape ({T}, {k}), got {a.dtype} {a.shape}"])
    violations: list[str] = []
    if a.size and (a.min() < 0 or a.max() >= E):
        return CheckResult(False, float("nan"), None, float("nan"),
                           [f"expert ids must lie in [0, {E}), got range [{a.min()}, {a.max()}]"])
    srt = np.sort(a, axis=1)
    dup = int(np.count_nonzero(srt[:, 1:] == srt[:, :-1])) if k > 1 else 0
    if dup:
        violations.append(f"{dup} token(s) pick the same expert twice")
    loads = np.bincount(a.ravel(), minlength=E).astype(np.int64)
    over = loads - problem.capacity
    if np.any(over > 0):
        e = int(np.argmax(over))
        violations.append(
            f"{int(np.count_nonzero(over > 0))} expert(s) over capacity (worst: expert {e} has {loads[e]} "
            f"> {problem.capacity[e]})"
        )
    objective = float(np.take_along_axis(problem.scores, a, axis=1).sum())
    cap = problem.capacity.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cap > 0, loads / np.maximum(cap, 1), np.where(loads > 0, np.inf, 0.0))
    return CheckResult(not violations, objective, loads, float(ratio.max()), violations)


def routing_dual_bound(problem: Any, bias: Any) -> float:
    """Certified upper bound on the routing optimum from any price vector ``bias`` [E].

    Lagrangian duality: for q >= 0, OPT <= sum_t (sum of the k largest of scores[t] - q) + sum_e q_e capacity_e.
    Negative prices are clipped to 0 (the bound stays valid).
    """
    q = np.maximum(np.asarray(bias, dtype=np.float64), 0.0)
    red = problem.scores - q[None, :]
    k = problem.k
    topk = np.partition(red, red.shape[1] - k, axis=1)[:, red.shape[1] - k:]
    return float(topk.sum() + q @ np.minimum(problem.capacity, problem.num_tokens))


def bias_reproduces(problem: Any, assignment: np.ndarray, bias: Any, tol: float = 1e-7) -> float:
    """Fraction of tokens whose assigned experts are a top-k of ``scores - bias`` (ties allowed within tol)."""
    red = problem.scores - np.asarray(bias, dtype=np.float64)[None, :]
    T, E = red.shape
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, assignment, True, axis=1)
    worst_in = np.where(chosen, red, np.inf).min(axis=1)
    best_out = np.where(chosen, -np.inf, red).max(axis=1)
    scale = tol * max(1.0, float(np.abs(red).max()))
    return float(np.mean(worst_in >= best_out - scale))
