"""``lp``: a lower bound from a linear relaxation (scipy's HiGHS), and ``dispatch``: the best per-batch split
of each expert's tokens over its replicas (the problem SGLang's LPLB solves per batch), an exact LP.

The relaxation keeps what no GPU-level symmetry can blur: every expert picks a mix of replica counts
(``z[e, k] >= 0``, ``sum_k z = 1``), the counts use the ``R`` slots (``sum k z <= R``), and in every batch the
largest GPU load is at least the mean GPU load and at least each expert's load per replica
(``T_b >= sum_k w[b, e] / k z[e, k]``). Counts range as in the MILP (``k_lo .. k_lo + slack`` from the
objective of EPLB's plan). One sparse LP holds every layer. Its plan is EPLB's (the method exists for its
bound; the shared check adds the combinatorial bound, so the reported bound is the larger of the two).
Under a move budget the plan is the old one; the bound ignores the budget (still valid, as a relaxation).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from moebalance.registry import register
from moebalance.replication import ReplicationProblem, ReplicationSolution, gpu_loads
from moebalance.solution import Status

from ._status import SCIPY_HIGHS
from .replication_eplb import eplb_for

__all__ = ["solve_lp", "relaxation_bound", "dispatch"]


#: seconds per nonzero that scipy's linprog spends handing a model to HiGHS (outside HiGHS's clock)
HANDOVER_S_PER_NONZERO = 1.5e-6


def _count_ranges(wn: np.ndarray, upper: float, R: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """``(klo [E], khi [E])``: the replica counts the relaxation needs per expert, from normalised loads
    ``wn [B, E]`` (mean GPU load 1 per batch on average) and EPLB's objective ``upper`` (same units).

    ``klo``: fewer replicas would put a replica above ``upper`` on average. ``khi``: at ``khi`` replicas an
    expert's load per replica is at most the mean GPU load in every batch, which already bounds ``T_b`` from
    below, so the column ``khi`` stands for every larger count (it uses fewer slots and the same constraint).
    Hence at most ``min(R - sum(klo), max_b w / mean_b) + 1 <= G + 1`` columns per expert.
    """
    B, E = wn.shape
    mean = wn.sum(axis=1) / G  # [B]
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(mean[:, None] > 0, wn / np.where(mean[:, None] > 0, mean[:, None], 1.0), 0.0)
        klo_f = wn.mean(axis=0) / upper if upper > 0 else np.zeros(E)
    klo = np.maximum(1, np.ceil(np.minimum(klo_f, R) * (1 - 1e-12) - 1e-12)).astype(np.int64)
    khi = np.ceil(np.minimum(need.max(axis=0), G)).astype(np.int64)
    slack = max(0, R - int(klo.sum()))
    khi = np.clip(khi, klo, klo + slack)
    return klo, khi


def relaxation_bound(
    problem: ReplicationProblem, upper: np.ndarray, time_limit: float | None = None, deadline: Any = None
) -> tuple[np.ndarray | None, str]:
    """``[L]`` LP bound per layer (None if HiGHS did not finish or the deadline passed while building) and
    HiGHS's message.

    Memory: ``O(B * sum_e (khi_e - klo_e + 1))`` nonzeros per layer, at most ``B * E * (G + 1)`` and in practice
    about ``B * (E + G)`` (see :func:`_count_ranges`): proportional to the problem, never to ``R``.
    ``deadline``: a callable returning the seconds left (None: no limit), read after each layer is built.
    """
    from scipy.optimize import linprog

    B, L, E = problem.shape
    R, G = problem.num_replicas, problem.num_gpus
    blocks, lo_rows, hi_rows, cs, lbs, scales = [], [], [], [], [], []
    for l in range(L):
        if deadline is not None and deadline() <= 0:
            return None, "time limit reached while building the LP"
        w = problem.weight[:, l, :]
        scale = float(w.sum(axis=1).mean() / G)
        if not scale > 0:
            scale = 1.0
        wn = w / scale
        klo, khi = _count_ranges(wn, float(upper[l]) / scale, R, G)
        width = khi - klo + 1
        e_of = np.repeat(np.arange(E), width)
        start = np.cumsum(width) - width
        k_of = klo[e_of] + (np.arange(e_of.size) - start[e_of])
        nz = e_of.size
        rows = [e_of, np.full(nz, E)]
        cols = [np.arange(nz), np.arange(nz)]
        vals = [np.ones(nz), k_of.astype(np.float64)]
        # T_b - sum_k w/k z >= 0 for every (b, e)
        for b in range(B):
            r0 = E + 1 + b * E
            rows += [r0 + e_of, r0 + np.arange(E)]
            cols += [np.arange(nz), np.full(E, nz + b)]
            vals += [-(wn[b, e_of] / k_of), np.ones(E)]
        A = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(E + 1 + B * E, nz + B)
        )
        blocks.append(A)
        lo_rows.append(np.concatenate([np.ones(E), [-np.inf], np.zeros(B * E)]))
        hi_rows.append(np.concatenate([np.ones(E), [float(R)], np.full(B * E, np.inf)]))
        # costs in normalised units (HiGHS drops tiny cost coefficients); the layer's bound is scaled back below
        cs.append(np.concatenate([np.zeros(nz), np.full(B, 1.0 / B)]))
        scales.append(scale)
        lbs.append(np.concatenate([np.zeros(nz), wn.sum(axis=1) / G]))
    A = sp.block_diag(blocks, format="csr")
    lo, hi = np.concatenate(lo_rows), np.concatenate(hi_rows)
    c = np.concatenate(cs)
    lb = np.concatenate(lbs)
    eq = lo == hi
    ub_rows = ~eq
    # linprog form: A_ub x <= b_ub (both sides as needed), A_eq x = b_eq
    fin_hi = ub_rows & np.isfinite(hi)
    fin_lo = ub_rows & np.isfinite(lo)
    A_ub = sp.vstack([A[fin_hi], -A[fin_lo]], format="csr")
    b_ub = np.concatenate([hi[fin_hi], -lo[fin_lo]])
    opts: dict[str, Any] = {"presolve": True}
    if deadline is not None:
        # scipy hands the model to HiGHS outside HiGHS's clock, about 1.5 us per nonzero (measured: 0.75 s for
        # 0.52M nonzeros), and HiGHS overshoots a little: keep both inside the limit
        left = 0.9 * deadline() - HANDOVER_S_PER_NONZERO * (A_ub.nnz + A.nnz) - 0.05
        if left <= 0.01:
            return None, "time limit reached while building the LP"
        opts["time_limit"] = float(left)
    elif time_limit is not None:
        opts["time_limit"] = float(time_limit)
    res = linprog(
        c,
        A_ub=A_ub,
        b_ub=b_ub,
        A_eq=A[eq],
        b_eq=lo[eq],
        bounds=np.stack([lb, np.full_like(lb, np.inf)], 1),
        method="highs",
        options=opts,
    )
    if res.status != 0:
        return None, res.message
    # a valid bound needs the dual side; HiGHS's optimum is exact up to its tolerance (1e-7 of O(1) numbers)
    per_layer = []
    off = 0
    for A_l, c_l, scale_l in zip(blocks, cs, scales):
        n = A_l.shape[1]
        per_layer.append(float(c_l @ res.x[off : off + n]) * scale_l)
        off += n
    return np.array(per_layer) * (1 - 1e-7), res.message


@register(
    ReplicationProblem,
    "lp",
    gives_bound=True,
    supports_time_limit=True,
    backends=("scipy",),
    description="linear relaxation (scipy HiGHS): a lower bound; the plan is EPLB's",
    status_map=SCIPY_HIGHS,
)
def solve_lp(problem: ReplicationProblem, *, time_limit: float | None = None) -> ReplicationSolution:
    """LP bound; the returned plan is EPLB's (the old plan under a move budget, which it always meets).

    Memory: EPLB's plan (``O(L * R)``) and the LP of :func:`relaxation_bound` (``O(L * B * (E + G))`` nonzeros
    in practice, at most ``L * B * E * (G + 1)``). ``time_limit`` covers EPLB's plan, the building of the LP
    (checked after each layer) and HiGHS.
    """
    t0 = time.perf_counter()
    deadline = None if time_limit is None else (lambda: float(time_limit) - (time.perf_counter() - t0))
    log2phy: np.ndarray | None
    plan, log2phy = eplb_for(problem)
    if problem.max_moves is not None:
        plan, log2phy = np.array(problem.old_phy2log), None
    upper = gpu_loads(problem.weight, plan, problem.num_gpus).max(axis=2).mean(axis=0)
    bound, msg = relaxation_bound(problem, upper, deadline=deadline)
    if bound is None:
        status = Status.TIME_LIMIT if time_limit is not None and "time" in str(msg).lower() else Status.ERROR
        return ReplicationSolution(
            method="lp", status=status, assignment=plan, log2phy=log2phy, message=f"HiGHS: {msg}; plan from EPLB"
        )
    return ReplicationSolution(
        method="lp",
        status=Status.FEASIBLE,
        assignment=plan,
        log2phy=log2phy,
        bound=float(bound.sum()),
        stats={"lp_layer_bounds": bound.tolist()},
        message="LP relaxation bound (HiGHS); plan from EPLB",
    )


def dispatch(weight: Any, phy2log: Any, num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best split of each expert's tokens over its replicas for one batch.

    Args:
      weight: ``[L, E]`` tokens per expert in this batch.
      phy2log: ``[L, R]`` the placement in force.
      num_gpus: G (slot j on GPU j // (R / G)).

    Returns ``(share [L, R]`` tokens each slot computes (summing to ``weight`` per expert), ``gpu_loads [L, G]``,
    ``max_load [L]``): per layer the LP ``min T s.t. sum_{j of e} x_j = w_e, sum_{j on g} x_j <= T, x >= 0``,
    solved exactly by HiGHS (fractional tokens; rounding moves any GPU by less than one token per slot).
    Bad shapes, dtypes, NaN, negative loads or a plan missing an expert raise ValueError naming the argument.
    Memory: one LP of ``R + 1`` columns and ``2 R`` nonzeros per layer, and ``[L, R]`` outputs.
    """
    from scipy.optimize import linprog

    from moebalance._validate import as_int
    from moebalance.replication import _as_plan, _as_weight, _weight_shape

    if len(_weight_shape(weight)) == 3:
        raise ValueError(f"`weight` must be [L, E] or [E] (one batch), got shape {_weight_shape(weight)}")
    w3, _ = _as_weight(weight)
    w = w3[0]
    L, E = w.shape
    pshape = _weight_shape(phy2log)
    if len(pshape) not in (1, 2) or (len(pshape) == 2 and pshape[0] != L) or (len(pshape) == 1 and L != 1):
        raise ValueError(f"`phy2log` must have shape [L={L}, R], got shape {pshape}")
    R = pshape[-1]
    a = _as_plan(phy2log, "phy2log", L, R, E)
    G = as_int(num_gpus, "num_gpus", minimum=1)
    if R % G:
        raise ValueError(f"`num_gpus` ({G}) must divide the number of slots ({R})")
    S = R // G
    share = np.zeros((L, R))
    for l in range(L):
        scale = float(w[l].sum() / G) or 1.0
        wn = w[l] / scale
        # columns: x_j (R), T
        A_eq = sp.csr_matrix((np.ones(R), (a[l], np.arange(R))), shape=(E, R + 1))
        rows = np.arange(R) // S
        A_ub = sp.hstack(
            [sp.csr_matrix((np.ones(R), (rows, np.arange(R))), shape=(G, R)), -np.ones((G, 1))], format="csr"
        )
        c = np.zeros(R + 1)
        c[-1] = 1.0
        res = linprog(c, A_ub=A_ub, b_ub=np.zeros(G), A_eq=A_eq, b_eq=wn, bounds=(0, None), method="highs")
        if res.status != 0:
            raise RuntimeError(f"HiGHS failed on the dispatch LP of layer {l}: {res.message}")
        x = np.clip(res.x[:R], 0, None)
        # exact row sums (solver tolerance): rescale per expert
        tot = np.bincount(a[l], weights=x, minlength=E)
        x = np.where(
            tot[a[l]] > 0,
            x * wn[a[l]] / np.where(tot[a[l]] > 0, tot[a[l]], 1),
            wn[a[l]] / np.bincount(a[l], minlength=E)[a[l]],
        )
        share[l] = x * scale
    loads = share.reshape(L, G, S).sum(axis=2)
    return share, loads, loads.max(axis=1)
