"""``llep+`` (ours): LLEP's plan, then a bottleneck local search under the problem's cost model.

LLEP decides with token counts only (capacity ``alpha * total / P``, ``min_chunk``) and ignores GEMM and
weight-transfer costs, so its plan can leave the slowest device above what the cost model allows. The local
search repeatedly takes the slowest device ``p`` and, for every expert ``e`` it computes, tries to move all or
the balancing part of ``e``'s tokens to (a) a device that already computes ``e`` (no new weight copy),
(b) ``e``'s home (weights already there), or (c) the currently least-loaded device (a new copy, paying its GEMM
and weight time). It applies the move that lowers ``max(t_p, t_q)`` the most and stops when the slowest device
cannot be improved by at least ``min_gain`` (1e-4, relative), when it is within ``balance_tol`` (1e-3) of the
mean device time, after ``max_moves`` moves (default ``max(P, 16)``: the gain flattens after about one move per
device), or at the time limit. No move raises any device above the
old ``t_p``, so the makespan never increases, and no move breaks ``max_tokens_per_device`` or
``max_foreign_experts``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from moebalance.solvers._placement_model import normalised_costs

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from .placement_llep import LLEPPlanner

__all__ = ["improve_plan", "llep_plus_plan", "solve_llep_plus"]


def improve_plan(
    problem: Any,
    assignment: Any,
    *,
    max_moves: int | None = None,
    min_gain: float = 1e-4,
    balance_tol: float = 1e-3,
    deadline: float | None = None,
) -> tuple[np.ndarray, int, bool]:
    """Local search from ``assignment`` ``[E, P]``: (improved plan, moves made, stopped by the deadline).

    A move must lower the slowest device's time by at least ``min_gain`` (relative), and the search stops once
    the slowest device is within ``balance_tol`` (relative) of the mean device time: moving tokens keeps their
    total time, so from there a perfect rebalance would gain about that much, at the cost of a move per device.
    ``problem`` is a :class:`~moebalance.PlacementProblem` or an :class:`LLEPPlanner` (only its structure is
    read: ``shape``, ``home``, ``cost`` and the limits).
    """
    x = np.array(assignment, dtype=np.int64)  # a copy, updated move by move
    E, P = problem.shape
    home_arr = problem.home
    home = home_arr.tolist()
    # the search compares sums of costs: it runs on the costs in their own unit, rounded to 12 significant
    # digits, so the same moves are made at every scale of the cost model (a last-bit difference flips ties)
    tt, gt, wt, tr = normalised_costs(problem.cost)
    C = problem.max_tokens_per_device
    F = problem.max_foreign_experts
    if max_moves is None:
        # one move per device is where the gain flattens (most of the gap closes in the first P moves)
        max_moves = max(P, 16)
    # device-major list of the plan's entries, vectorised: device times, token counts, foreign counts
    dev, exp = np.nonzero(x.T)
    val = x[exp, dev]
    foreign = home_arr[exp] != dev
    t = np.bincount(dev, weights=(tt + tr * foreign) * val + gt + wt * foreign, minlength=P).tolist()
    n = x.sum(axis=0).tolist()
    nf = np.bincount(dev, weights=foreign, minlength=P).astype(np.int64).tolist()
    cut = np.concatenate([[0], np.cumsum(np.bincount(dev, minlength=P))]).tolist()
    el, vl = exp.tolist(), val.tolist()
    by_dev = [dict(zip(el[cut[p] : cut[p + 1]], vl[cut[p] : cut[p + 1]])) for p in range(P)]
    # hosts of each expert; built here for split experts, on first use for those on a single device
    by_exp: dict[int, dict[int, int]] = {}
    for e in np.flatnonzero(np.bincount(exp, minlength=E) > 1).tolist():
        cols = np.flatnonzero(x[e])
        by_exp[e] = dict(zip(cols.tolist(), x[e, cols].tolist()))
    moves = 0
    timed_out = False
    while moves < max_moves and P > 1:
        if deadline is not None and (moves & 15) == 0 and time.perf_counter() > deadline:
            timed_out = True
            break
        tp = max(t)
        p = t.index(tp)
        tmin = min(t)
        if tmin >= tp or tp - sum(t) / P < balance_tol * tp:
            break
        least = t.index(tmin)
        best_score = tp - min_gain * abs(tp)  # relative: the same moves at any scale of the costs
        best = None
        for e, xe in by_dev[p].items():
            he = home[e]
            fp = he != p
            cp = tt + tr * fp
            hosts = by_exp.get(e)
            if hosts is None:
                hosts = by_exp[e] = {p: xe}
            # candidates: the least-loaded device (a new copy unless it already hosts e), the least-loaded other
            # host (same per-token cost, no new copy), and home (weights already there); least first, so that
            # the early rejection below prunes the others
            cands = [least]
            if len(hosts) > 1:
                bq = min(hosts, key=t.__getitem__)
                if bq != p and bq != least:
                    cands.append(bq)
            if he != p and he != least and (len(cands) == 1 or cands[1] != he):
                cands.append(he)
            for q in cands:
                has = q in hosts
                fq = he != q
                add = 0.0 if has else (gt + wt * fq)
                tq = t[q] + add
                if tq >= best_score:
                    continue  # q cannot end below the best score found so far
                if not has and fq and F is not None and nf[q] >= F:
                    continue
                cq = tt + tr * fq
                room = C - n[q] if C is not None else xe
                if xe <= room:  # move all of e's tokens off p (p also saves the GEMM and the copy)
                    score = tp - xe * cp - gt - wt * fp
                    sq = tq + xe * cq
                    if sq > score:
                        score = sq
                    if score < best_score:
                        best_score, best = score, (e, q, xe, not has)
                if xe > 1 and cp + cq > 0:  # or the part that balances p and q
                    dd = int((tp - tq) / (cp + cq))
                    for d in (dd, dd + 1):
                        if d >= xe:
                            d = xe - 1
                        if d > room:
                            d = room
                        if d < 1:
                            continue
                        score = tp - d * cp
                        sq = tq + d * cq
                        if sq > score:
                            score = sq
                        if score < best_score:
                            best_score, best = score, (e, q, d, not has)
        if best is None:
            break
        e, q, d, new_copy = best
        he = home[e]
        fp, fq = he != p, he != q
        left = by_dev[p][e] - d
        if left:
            by_dev[p][e] = left
            by_exp[e][p] = left
            t[p] -= d * (tt + tr * fp)
        else:
            del by_dev[p][e]
            del by_exp[e][p]
            t[p] -= d * (tt + tr * fp) + gt + wt * fp
            nf[p] -= fp
        if new_copy:
            by_dev[q][e] = d
            by_exp[e][q] = d
            t[q] += d * (tt + tr * fq) + gt + wt * fq
            nf[q] += fq
        else:
            by_dev[q][e] += d
            by_exp[e][q] += d
            t[q] += d * (tt + tr * fq)
        n[p] -= d
        n[q] += d
        x[e, p] -= d
        x[e, q] += d
        moves += 1
    return x, moves, timed_out


def llep_plus_plan(
    planner: LLEPPlanner,
    expert_loads: Any,
    *,
    max_moves: int | None = None,
    min_gain: float = 1e-4,
    balance_tol: float = 1e-3,
    deadline: float | None = None,
) -> tuple[np.ndarray, Any, int, bool]:
    """llep+ on one step's loads with a prepared planner: ``(assignment [E, P], LLEP plan, moves, timed out)``.

    The code path of ``solve(problem, "llep+")`` and of the expert-parallel layer alike."""
    if max_moves is not None and (
        isinstance(max_moves, bool) or not isinstance(max_moves, (int, np.integer)) or max_moves < 0
    ):
        raise ValueError(f"`max_moves` must be an integer >= 0, got {max_moves!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ValueError(f"`min_gain` must be a number in [0, 1), got {min_gain!r}")
    if isinstance(balance_tol, bool) or not isinstance(balance_tol, (int, float)) or not 0 <= balance_tol < 1:
        raise ValueError(f"`balance_tol` must be a number in [0, 1), got {balance_tol!r}")
    plan = planner.plan(expert_loads, spilled_only=True)
    x, moves, timed_out = improve_plan(
        planner,
        plan.assignment,
        max_moves=max_moves,
        min_gain=float(min_gain),
        balance_tol=float(balance_tol),
        deadline=deadline,
    )
    return x, plan, moves, timed_out


@register(
    "placement",
    "llep+",
    description="LLEP, then a bottleneck local search under the cost model (ours)",
    per_step=True,
    options={
        "max_moves": Option("int | None", "local-search moves (default max(P, 16))"),
        "min_gain": Option("float", "smallest relative makespan gain a move must bring"),
        "balance_tol": Option("float", "relative makespan tolerance under which the plan counts as balanced"),
        "fallback": Option("bool", "LLEP's fallback to plain EP below the threshold"),
    },
)
def solve_llep_plus(
    problem: Any,
    *,
    time_limit: float | None = None,
    max_moves: int | None = None,
    min_gain: float = 1e-4,
    balance_tol: float = 1e-3,
    fallback: bool = True,
) -> PlacementSolution:
    """LLEP followed by the bottleneck local search (``max_moves`` default ``max(P, 16)``)."""
    t0 = time.perf_counter()
    deadline = None if time_limit is None else t0 + time_limit
    planner = LLEPPlanner.for_problem(problem, fallback=bool(fallback))
    x, plan, moves, timed_out = llep_plus_plan(
        planner,
        problem.expert_loads,
        max_moves=max_moves,
        min_gain=min_gain,
        balance_tol=balance_tol,
        deadline=deadline,
    )
    status = Status.TIME_LIMIT if timed_out else Status.FEASIBLE
    stats = {"moves": moves, "llep_fallback": plan.fallback, "llep_capacity": plan.capacity}
    return PlacementSolution(
        method="llep+",
        status=status,
        objective=float("nan"),
        assignment=x,
        stats=stats,
        message=f"LLEP + {moves} local-search move(s)",
    )
