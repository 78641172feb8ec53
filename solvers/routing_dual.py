"""Price iteration in the spirit of BIP-based balancing (arXiv 2502.15451), on a whole routing problem.

Block-coordinate descent on the LP dual: alternately
  p_t <- (k+1)-th largest of scores[t, :] - q            (token prices)
  q_e <- max(0, (capacity_e + 1)-th largest of scores[:, e] - p)   (expert prices, the bias)
then top-k of ``scores - q``, repaired to feasibility: an over-full expert keeps its best ``capacity_e``
tokens by reduced score and the rest overflow greedily to their next-best expert with room. Any q >= 0
certifies the Lagrangian upper bound sum_t topk(scores[t] - q) + q . capacity, so every answer comes with
its own proven gap.
"""

from __future__ import annotations

import time

import numpy as np

from moebalance.check import routing_dual_bound
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import chosen_to_assignment, greedy_fill

__all__ = ["solve_dual", "price_iteration"]


def _kth_largest_per_column(m: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """``out[e]`` = the (kth[e]+1)-th largest of ``m[:, e]`` (kth 0-based; -inf where kth >= T)."""
    T = m.shape[0]
    out = np.full(m.shape[1], -np.inf)
    for c in np.unique(kth):
        cols = np.flatnonzero(kth == c)
        if c < T:
            out[cols] = -np.partition(-m[:, cols], int(c), axis=0)[int(c)]
    return out


def price_iteration(scores: np.ndarray, k: int, capacity: np.ndarray, iterations: int,
                    q: np.ndarray | None = None, deadline: float | None = None) -> tuple[np.ndarray, int]:
    """Run up to ``iterations`` (p, q) updates; returns ``(q [E], iterations done)``."""
    T, E = scores.shape
    q = np.zeros(E) if q is None else q.astype(np.float64).copy()
    if k >= E:
        return np.zeros(E), 0
    cap = np.minimum(capacity, T)
    done = 0
    for _ in range(iterations):
        red = scores - q
        p = -np.partition(-red, k, axis=1)[:, k]
        q_new = np.maximum(_kth_largest_per_column(scores - p[:, None], cap), 0.0)
        done += 1
        converged = np.allclose(q_new, q, rtol=0, atol=1e-12)
        q = q_new
        if converged or (deadline is not None and time.perf_counter() > deadline):
            break
    return q, done


@register("routing", "dual", gives_bound=True, options={"iterations": 50},
          description="price iteration (BIP-based balancing), repaired to feasibility, with a Lagrangian bound")
def solve_dual(problem, *, time_limit=None, iterations=50) -> RoutingSolution:
    """Price iteration; ``iterations`` caps the (p, q) sweeps (stops early on a fixed point)."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"`iterations` must be a non-negative integer, got {iterations!r}")
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    s = problem.scores
    T, E = s.shape
    k = problem.k
    q, done = price_iteration(s, k, problem.capacity, int(iterations), deadline=deadline)
    red = s - q
    idx = np.argpartition(-red, k - 1, axis=1)[:, :k]
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, idx, True, axis=1)
    # repair: an over-full expert keeps its best tokens by reduced score, the rest overflow greedily
    cap = problem.capacity
    loads = chosen.sum(axis=0)
    need = np.zeros(T, dtype=np.int64)
    for e in np.flatnonzero(loads > cap):
        rows = np.flatnonzero(chosen[:, e])
        drop = rows[np.argsort(red[rows, e], kind="stable")[: loads[e] - cap[e]]]
        chosen[drop, e] = False
        need[drop] += 1
    repaired = int(need.sum())
    room = cap - chosen.sum(axis=0)
    if repaired:
        # tokens must not return to the expert that just dropped them: mark full experts as tried
        greedy_fill(red, chosen, room, need)
    stats = {"iterations": done, "repaired_slots": repaired}
    if int(need.sum()):
        return RoutingSolution(method="dual", status=Status.ERROR, objective=float("nan"), bias=q, stats=stats,
                        message=f"repair could not place {int(need.sum())} slot(s)")
    stopped = deadline is not None and time.perf_counter() > deadline and done < iterations
    status = Status.TIME_LIMIT if stopped else Status.FEASIBLE
    return RoutingSolution(method="dual", status=status, objective=float("nan"),
                    bound=routing_dual_bound(problem, q), assignment=chosen_to_assignment(chosen, k), bias=q,
                    stats=stats, message=f"{done} price iteration(s), {repaired} slot(s) repaired")
