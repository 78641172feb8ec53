"""The routing family's shared check: feasibility and objective of an assignment, and what a price certifies."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from ..solution import Evaluation

if TYPE_CHECKING:
    from .problem import RoutingProblem

__all__ = ["check_routing", "routing_dual_bound", "bias_reproduces", "TIE_TOL"]

# relative tolerance of the check's ties (bias_reproduces)
TIE_TOL = 1e-7


def check_routing(problem: RoutingProblem, assignment: Any) -> Evaluation:
    """``assignment`` [T, k] expert ids: in range, k distinct experts per token, loads within capacity."""
    T, E = problem.shape
    k = problem.k
    a = np.asarray(assignment)
    if a.shape != (T, k) or not (np.issubdtype(a.dtype, np.integer)):
        return Evaluation(
            False, float("nan"), [f"assignment must be an integer array of shape ({T}, {k}), got {a.dtype} {a.shape}"]
        )
    violations: list[str] = []
    if a.size and (a.min() < 0 or a.max() >= E):
        return Evaluation(False, float("nan"), [f"expert ids must lie in [0, {E}), got range [{a.min()}, {a.max()}]"])
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
    # numpy's pairwise sum: relative error O(log2(T k) eps), whatever the scale and offset of the scores
    objective = float(np.take_along_axis(problem.scores, a, axis=1).sum())
    cap = problem.capacity.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(cap > 0, loads / np.maximum(cap, 1), np.where(loads > 0, np.inf, 0.0))
    return Evaluation(not violations, objective, violations, {"loads": loads}, float(ratio.max()))


def routing_dual_bound(problem: RoutingProblem, bias: Any) -> float:
    """Certified upper bound on the routing optimum from any price vector ``bias`` [E].

    Lagrangian duality: for q >= 0, OPT <= sum_t (sum of the k largest of scores[t] - q) + sum_e q_e capacity_e.
    Negative prices are clipped to 0 (the bound stays valid). Summed with ``math.fsum`` and rounded up by a
    the floating-point error of the sum (pairwise, ``O(log2(n) eps)`` of the terms' magnitude), so it stays
    valid at any scale and offset.
    """
    q = np.maximum(np.asarray(bias, dtype=np.float64), 0.0)
    red = problem.scores - q[None, :]
    k = problem.k
    E = red.shape[1]
    topk = np.partition(red, E - k, axis=1)[:, E - k :]
    cap = np.minimum(problem.capacity, problem.num_tokens).astype(np.float64)
    qc = q * cap
    total = float(topk.sum()) + float(qc.sum())
    n = topk.size + qc.size
    # each reduced score carries one rounding of |s| + |q|, each sum log2(n) more: round up by all of them
    mag = float(np.abs(topk).sum()) + float(q.max(initial=0.0)) * topk.size + float(qc.sum())
    slack = (math.log2(n + 1) + 4.0) * np.finfo(np.float64).eps * mag
    return total + slack


def _price_certificate(problem: RoutingProblem, assignment: np.ndarray, bias: np.ndarray) -> tuple[float, float]:
    """``(routing_dual_bound(problem, bias), bias_reproduces(problem, assignment, bias))`` in one pass over the
    scores: where the assignment is exactly a top-k of a row of ``scores - q``, that row's top-k sum is the sum
    of its assigned entries, so only the other rows are partitioned. Same values, same rounding allowance."""
    if np.any(bias < 0):  # reproduction is judged on the bias itself, the bound on its clipped prices
        return routing_dual_bound(problem, bias), bias_reproduces(problem, assignment, bias)
    q = bias
    k = problem.k
    T, E = problem.shape
    a = np.asarray(assignment)
    scores = problem.scores
    # row blocks of about 64k entries: the temporaries stay in cache and are reused (no page faults)
    rows = max(1, (1 << 16) // max(E, 1))
    buf = np.empty((min(rows, T), E))
    mag = 0.0
    worst_in = np.empty(T)
    best_out = np.empty(T)
    chosen = np.empty((T, k))
    for i in range(0, T, rows):
        j = min(T, i + rows)
        red = np.subtract(scores[i:j], q[None, :], out=buf[: j - i])
        mag = max(mag, float(red.max(initial=0.0)), -float(red.min(initial=0.0)))
        c = np.take_along_axis(red, a[i:j], axis=1)
        chosen[i:j] = c
        worst_in[i:j] = c.min(axis=1)
        np.put_along_axis(red, a[i:j], -np.inf, axis=1)
        best_out[i:j] = red.max(axis=1)
    tie = TIE_TOL * mag if mag > 0 else 0.0
    rep = float(np.mean(worst_in >= best_out - tie))
    exact = worst_in >= best_out  # the assignment is a top-k of the row: its sum is the row's top-k sum
    topk_sum = float(chosen[exact].sum())
    topk_abs = float(np.abs(chosen[exact]).sum())
    if not exact.all():
        other = scores[~exact] - q[None, :]
        part = np.partition(other, E - k, axis=1)[:, E - k :]
        topk_sum += float(part.sum())
        topk_abs += float(np.abs(part).sum())
    cap = np.minimum(problem.capacity, problem.num_tokens).astype(np.float64)
    qc = q * cap
    n = T * k + qc.size
    total = topk_sum + float(qc.sum())
    mag_sum = topk_abs + float(q.max(initial=0.0)) * T * k + float(qc.sum())
    slack = (math.log2(n + 1) + 4.0) * np.finfo(np.float64).eps * mag_sum
    return total + slack, rep


def bias_reproduces(problem: RoutingProblem, assignment: np.ndarray, bias: Any, tol: float = TIE_TOL) -> float:
    """Fraction of tokens whose assigned experts are a top-k of ``scores - bias`` (ties allowed within tol,
    relative to the magnitude of the reduced scores)."""
    red = problem.scores - np.asarray(bias, dtype=np.float64)[None, :]
    T, E = red.shape
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, np.asarray(assignment), True, axis=1)
    worst_in = np.where(chosen, red, np.inf).min(axis=1)
    best_out = np.where(chosen, -np.inf, red).max(axis=1)
    mag = float(np.abs(red).max()) if red.size else 0.0
    scale = tol * mag if mag > 0 else 0.0
    return float(np.mean(worst_in >= best_out - scale))
