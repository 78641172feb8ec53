"""``dual``: the price iteration of BIP-based balancing (arXiv 2502.15451) on a whole routing problem, repaired.

The (p, q) sweeps of :func:`moebalance.solvers.routing_prices.price_iteration` (the one implementation the
balancers use too), warm-started from ``warm_start`` (e.g. the previous batch's prices), then top-k of
``scores - q`` repaired to feasibility: an over-full expert keeps its best ``capacity_e`` tokens by reduced
score and the rest overflow greedily to their next-best expert with room. Any q >= 0 certifies the
Lagrangian upper bound ``sum_t topk(scores[t] - q) + q . capacity``, so every answer comes with its own
proven gap, and the sweeps stop early once that certified gap is at most ``gap_tol`` (checked after 1, 2, 4,
8, ... sweeps, so the checks cost at most as much as the sweeps).

``bias`` keeps the library's contract (top-k of ``scores - bias`` reproduces the assignment up to ties): it
is q only when the repair moved nothing; otherwise ``bias`` is None and q, which still certifies the bound,
is ``stats["certificate_bias"]``. For an optimal assignment together with prices that reproduce it, use the
exact ``fast``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._routing_common import chosen_to_assignment, greedy_fill
from .routing_prices import dual_bound, price_iteration

__all__ = ["solve_dual", "price_iteration", "repair"]

OVERFLOW_TO_CHECK = 0.01  # repair and check the gap once at most this share of the T*k slots overflows


# reduced scores are compared on a grid of 2**-36 of the largest |score|: values a last bit apart (equal in exact
# arithmetic) are equal, so ties break the same way (by expert order) at every scale and offset of the scores
_GRID = 2.0 ** -36


def reduced_key(scores: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``[T, E]`` float64 integers ordering ``scores - q`` as exact arithmetic would, up to 2**-36 relative."""
    unit = _GRID * float(np.abs(scores).max(initial=0.0) + np.abs(q).max(initial=0.0))
    red = scores - q
    return np.rint(red / unit) if unit > 0 else red


def repair(scores: np.ndarray, k: int, capacity: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Top-k of ``scores - q`` [T, E] made feasible; returns ``(chosen [T, E] bool, slots repaired, unplaced)``.

    The reduced scores are compared through :func:`reduced_key` (scale free; exact ties to the lower expert)."""
    T, E = scores.shape
    red = reduced_key(scores, q)
    idx = np.argsort(-red, axis=1, kind="stable")[:, :k]
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, idx, True, axis=1)
    loads = chosen.sum(axis=0)
    need = np.zeros(T, dtype=np.int64)
    for e in np.flatnonzero(loads > capacity):
        rows = np.flatnonzero(chosen[:, e])
        drop = rows[np.argsort(red[rows, e], kind="stable")[: loads[e] - capacity[e]]]
        chosen[drop, e] = False
        need[drop] += 1
    repaired = int(need.sum())
    if repaired:
        room = capacity - chosen.sum(axis=0)
        greedy_fill(red, chosen, room, need)
    return chosen, repaired, int(need.sum())


@register("routing", "dual", gives_bound=True, supports_time_limit=True,
          options={"iterations": 50, "gap_tol": 1e-3, "warm_start": None},
          description="price iteration (BIP-based balancing), repaired to feasibility, with a Lagrangian bound")
def solve_dual(problem, *, time_limit=None, iterations=50, gap_tol=1e-3,
               warm_start=None) -> RoutingSolution:
    """Price iteration; ``iterations`` caps the (p, q) sweeps, which stop early on a fixed point or once the
    certified gap is at most ``gap_tol``; ``warm_start`` [E]: starting prices."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"`iterations` must be a non-negative integer, got {iterations!r}")
    if isinstance(gap_tol, bool) or not isinstance(gap_tol, (int, float)) or not (gap_tol >= 0) \
            or not math.isfinite(gap_tol):
        raise ValueError(f"`gap_tol` must be a non-negative number, got {gap_tol!r}")
    from .routing_fast import _check_options

    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    s = problem.scores
    T, E = s.shape
    k = problem.k
    cap = np.minimum(problem.capacity, T)
    q = _check_options(warm_start, E, None, 0, 0.0, 1)
    q = np.zeros(E) if q is None else q
    done, checks, nxt = 0, 0, 1
    best = None  # (objective, chosen, repaired, q, bound)
    floor = 1e-9 * float(np.abs(s).sum(axis=1).max(initial=0.0) * k + 1e-300)
    while True:
        if done < iterations:
            q, n = price_iteration(s, k, cap, nxt - done, q, deadline=deadline)
            fixed = n < nxt - done
            done += n
        else:
            fixed = True
        bound = dual_bound(s, k, cap, q)
        if best is None and done < iterations and not fixed:
            # repairing a far-off top-k is slow and futile: check only once the overflow is small
            top = np.argsort(-reduced_key(s, q), axis=1, kind="stable")[:, :k]
            over = np.bincount(top.ravel(), minlength=E) - cap
            if over.clip(0).sum() > OVERFLOW_TO_CHECK * T * k:
                nxt = min(iterations, 2 * nxt)
                continue
        chosen, repaired, unplaced = repair(s, k, cap, q)
        checks += 1
        if not unplaced:
            obj = float(s[chosen].sum())
            if best is None or obj > best[0]:
                best = (obj, chosen, repaired, q.copy(), bound)
        else:
            obj = -np.inf
        lowest = min(bound, best[4]) if best is not None else bound
        gap = (lowest - best[0]) / max(abs(lowest), abs(best[0]), floor) if best is not None else np.inf
        stopped = deadline is not None and time.perf_counter() > deadline
        if gap <= gap_tol or fixed or done >= iterations or stopped:
            break
        nxt = min(iterations, 2 * nxt)
    stats = {"iterations": done, "gap_checks": checks}
    if best is None:
        return RoutingSolution(method="dual", status=Status.ERROR, objective=float("nan"), bound=bound, stats=stats,
                        message=f"repair could not place {unplaced} slot(s)")
    obj, chosen, repaired, qb, bound_b = best
    stats.update(repaired_slots=repaired, certificate_bias=qb, certified_gap=float(gap))
    status = Status.TIME_LIMIT if (stopped and done < iterations and gap > gap_tol) else Status.FEASIBLE
    return RoutingSolution(method="dual", status=status, objective=float("nan"), bound=min(bound, bound_b),
                    assignment=chosen_to_assignment(chosen, k), bias=qb if repaired == 0 else None,
                    stats=stats, message=f"{done} price iteration(s), {repaired} slot(s) repaired, "
                                         f"certified gap {gap:.2e}")
