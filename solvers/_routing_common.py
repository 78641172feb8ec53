"""Pieces several routing solvers share: the score normalisation, prices from an assignment, greedy filling and
repair, and the drive that runs an adapter under a hard deadline."""

from __future__ import annotations

import time

import numpy as np

__all__ = [
    "chosen_to_assignment",
    "prices_from_assignment",
    "greedy_fill",
    "RoutingScale",
    "repair",
    "fallback",
    "stopped",
    "drive",
    "certify_prices",
]


def chosen_to_assignment(chosen: np.ndarray, k: int) -> np.ndarray:
    """``[T, E]`` 0/1 (or fractional) matrix -> ``[T, k]`` expert ids of the k largest entries per token."""
    idx = np.argsort(-chosen.astype(np.float64), axis=1, kind="stable")[:, :k]
    return np.sort(idx, axis=1).astype(np.int64)


def prices_from_assignment(scores: np.ndarray, assignment: np.ndarray, tol: float = 0.0) -> np.ndarray | None:
    """The smallest non-negative prices ``q`` [E] under which ``assignment`` [T, k] is a top-k of ``scores - q``.

    For every token t, assigned expert a and unassigned b we need ``s[t,a] - q_a >= s[t,b] - q_b - tol``, i.e.
    the difference constraints ``q_a - q_b <= W[a, b] + tol`` with ``W[a, b] = min_t (s[t,a] - s[t,b])``. Their
    least non-negative solution is ``q = -d`` where d are shortest-path distances (scipy's Bellman-Ford) from a
    virtual root joined to every expert by a 0-weight arc. For an LP-optimal assignment these are LP duals
    (unsaturated experts get price 0). Returns None when the constraints have a negative cycle, i.e. the
    assignment is not optimal for its own loads.
    """
    from scipy.sparse.csgraph import NegativeCycleError, csgraph_from_dense, shortest_path

    T, E = scores.shape
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, assignment, True, axis=1)
    W = np.full((E, E), np.inf)
    for a in range(E):
        rows = np.flatnonzero(chosen[:, a])
        if rows.size == 0:
            continue
        diff = scores[rows, a][:, None] - scores[rows]  # s[t,a] - s[t,b]
        diff[chosen[rows]] = np.inf  # b assigned to t too: no constraint
        W[a] = diff.min(axis=0)
    # graph[u, v] = weight of arc u -> v. q_a - q_b <= W[a, b] is a lower bound q_b >= q_a - W[a, b]: the least
    # solution is a longest path over arcs a -> b of weight -W[a, b], i.e. minus a shortest path over W.
    G = np.full((E + 1, E + 1), np.inf)
    G[:E, :E] = W + tol
    np.fill_diagonal(G, np.inf)
    G[E, :E] = 0.0
    graph = csgraph_from_dense(G, null_value=np.inf)
    try:
        d = shortest_path(graph, method="BF", directed=True, indices=E)
    except NegativeCycleError:
        return None
    return np.maximum(-d[:E], 0.0)


def greedy_fill(
    scores: np.ndarray, chosen: np.ndarray, room: np.ndarray, need: np.ndarray, deadline: float | None = None
) -> np.ndarray:
    """Fill each token's missing slots with its best experts that still have room, highest scores first.

    Args:
      scores: ``[T, E]`` preferences.
      chosen: ``[T, E]`` bool, experts already taken by each token (updated in place).
      room: ``[E]`` remaining capacity (updated in place).
      need: ``[T]`` slots each token still needs (updated in place).

    Rounds: every needy token proposes its best expert not yet tried; each expert accepts the highest-scored
    proposals up to its room; the rest move on to their next choice. At most E rounds, each vectorised.
    ``deadline`` (a ``time.perf_counter()`` value) stops the fill and the swap phase early, leaving slots unplaced.
    Returns ``need`` (all zero on success).
    """
    T, E = scores.shape
    pref = np.argsort(-scores, axis=1, kind="stable")
    ptr = np.zeros(T, dtype=np.int64)
    for _ in range(E):
        if deadline is not None and time.perf_counter() > deadline:
            return need  # out of time: slots left unplaced (the caller then has no greedy answer)
        toks = np.flatnonzero((need > 0) & (ptr < E))
        if toks.size == 0:
            break
        exps = pref[toks, ptr[toks]]
        ptr[toks] += 1
        ok = ~chosen[toks, exps] & (room[exps] > 0)
        toks, exps = toks[ok], exps[ok]
        if toks.size == 0:
            continue
        order = np.lexsort((-scores[toks, exps], exps))
        toks, exps = toks[order], exps[order]
        starts = np.searchsorted(exps, exps, side="left")
        rank = np.arange(exps.size) - starts
        take = rank < room[exps]
        toks, exps = toks[take], exps[take]
        chosen[toks, exps] = True
        need[toks] -= 1
        np.subtract.at(room, exps, 1)
    if need.any():
        _swap_fill(scores, chosen, room, need, deadline)
    return need


def _swap_fill(
    scores: np.ndarray, chosen: np.ndarray, room: np.ndarray, need: np.ndarray, deadline: float | None = None
) -> None:
    """Place slots the rounds could not: a token t whose only experts with room r are ones it already has
    takes expert a from a token u that moves to r (t: +a, u: a -> r), choosing the least costly such swap.
    With tight capacities (sum of capacities == T * k) this is what the last few tokens need."""
    for t in np.flatnonzero(need > 0):
        while need[t] > 0:
            if deadline is not None and time.perf_counter() > deadline:
                return
            best = None
            for r in np.flatnonzero(room > 0):
                ok = chosen & ~chosen[:, r][:, None] & ~chosen[t][None, :]
                ok[t] = False
                if not ok.any():
                    continue
                gain = np.where(ok, scores[t][None, :] + scores[:, r][:, None] - scores, -np.inf)
                u, a = np.unravel_index(int(np.argmax(gain)), gain.shape)
                if best is None or gain[u, a] > best[0]:
                    best = (gain[u, a], u, a, r)
            if best is None:
                return
            _, u, a, r = best
            chosen[u, a], chosen[u, r], chosen[t, a] = False, True, True
            room[r] -= 1
            need[t] -= 1


EPS = float(np.finfo(np.float64).eps)


class RoutingScale:
    """The affine map between a problem's scores and the normalised scores handed to every back-end.

    ``scores[t, e] = unit * norm[t, e] + offset[t]`` with ``offset[t] = min_e scores[t, e]`` and ``unit`` the
    largest per-token range, so ``norm`` lies in [0, 1] whatever the scale and offset of the data. Every token
    takes exactly k experts, so an objective ``v`` of the normalised problem is ``unit * v + k * sum(offset)``
    in the problem's units and the optimum is the same assignment.

    ``magnitude`` (``sum_t k * max_e |scores[t, e]|``, at least the size of any objective) sizes the float
    rounding allowance :meth:`upper` adds: the map itself and the sums of ``T * k`` terms each lose at most a
    few ``T * k * eps`` of it.
    """

    def __init__(self, scores: np.ndarray, k: int):
        s = np.asarray(scores, dtype=np.float64)
        self.k = int(k)
        self.offset = s.min(axis=1)
        top = s.max(axis=1)
        span = float((top - self.offset).max()) if s.size else 0.0
        self.unit = span if span > 0 else 1.0
        # max_e |s| is the larger of |max| and |min|: no [T, E] temporary (0.26 s at 65536x256)
        self.magnitude = float(self.k * np.maximum(np.abs(top), np.abs(self.offset)).sum()) if s.size else 0.0
        self._base = float(self.k * self.offset.sum())
        self.rounding = 4.0 * (s.size + 2) * EPS * self.magnitude

    def normalise(self, scores: np.ndarray) -> np.ndarray:
        """``[T, E]`` scores in [0, 1]."""
        return np.clip((np.asarray(scores, dtype=np.float64) - self.offset[:, None]) / self.unit, 0.0, 1.0)

    def objective(self, value: float) -> float:
        """A normalised objective in the problem's units."""
        return self.unit * float(value) + self._base

    def upper(self, value: float, allowance: float = 0.0) -> float:
        """A normalised upper bound in the problem's units, raised by ``allowance`` (normalised units: the
        back-end's tolerance or quantisation) and by the float rounding of the map."""
        return self.unit * (float(value) + allowance) + self._base + self.rounding


def repair(scores: np.ndarray, weight: np.ndarray, k: int, capacity: np.ndarray) -> np.ndarray | None:
    """A feasible ``[T, k]`` assignment near a (possibly fractional or infeasible) ``weight`` [T, E]: top-k of
    ``weight`` per token, over-full experts keep their highest-weight tokens, the rest are placed greedily by
    score. None when the greedy fill cannot place every slot."""
    T, E = scores.shape
    w = np.nan_to_num(np.asarray(weight, dtype=np.float64), nan=0.0)
    idx = np.argsort(-w, axis=1, kind="stable")[:, :k]
    chosen = np.zeros((T, E), dtype=bool)
    np.put_along_axis(chosen, idx, True, axis=1)
    need = np.zeros(T, dtype=np.int64)
    loads = chosen.sum(axis=0)
    for e in np.flatnonzero(loads > capacity):
        rows = np.flatnonzero(chosen[:, e])
        drop = rows[np.argsort(w[rows, e], kind="stable")[: loads[e] - capacity[e]]]
        chosen[drop, e] = False
        need[drop] += 1
    room = np.asarray(capacity, dtype=np.int64) - chosen.sum(axis=0)
    if need.any():
        greedy_fill(scores, chosen, room, need)
        if need.any():
            return None
    return chosen_to_assignment(chosen, k)


GREEDY_SECONDS_PER_ENTRY = 2e-7  # what the greedy fallback may cost, pessimistically
PARTITION_SECONDS_PER_ENTRY = 1.5e-7  # numpy's row partition, pessimistically (measured 1.1e-7 on random rows)


def fallback(problem, deadline: float | None = None) -> dict:
    """What a routing solve stopped by its deadline still has: the greedy answer ``[T, k]`` (None when it
    could not finish by ``deadline``) and the top-k bound (capacity dropped: a valid upper bound)."""
    s = problem.scores
    T, E = s.shape
    k = problem.k
    chosen = np.zeros((T, E), dtype=bool)
    room = np.asarray(problem.capacity, dtype=np.int64).copy()
    need = np.full(T, k, dtype=np.int64)
    # the greedy's sort alone costs about 1e-7 s a score entry and cannot stop midway: skip it when the
    # deadline would not leave it that much (the answer is then the bound only)
    if deadline is None or time.perf_counter() + GREEDY_SECONDS_PER_ENTRY * T * E < deadline:
        greedy_fill(s, chosen, room, need, deadline=deadline)
    scale = RoutingScale(s, k)
    if deadline is None or time.perf_counter() + PARTITION_SECONDS_PER_ENTRY * T * E < deadline:
        bound = float(np.partition(s, E - k, axis=1)[:, E - k :].sum())  # the top-k bound
    else:  # no time for the partition: k times each token's best score, also an upper bound
        bound = float(k * s.max(axis=1).sum())
    return {"assignment": None if need.any() else chosen_to_assignment(chosen, k), "bound": bound + scale.rounding}


def _fallback_said(fb: dict) -> str:
    """What the fallback gave, truthfully: a greedy answer only when it finished one."""
    if fb["assignment"] is None:
        return "no answer in time (the greedy fallback did not finish either); top-k bound only"
    return "greedy answer and top-k bound returned"


def stopped(problem, method: str, deadline: float | None = None):
    """What a routing solve stopped by its deadline answers: :func:`fallback` as a ``time_limit`` solution."""
    from moebalance.solution import RoutingSolution, Status

    fb = fallback(problem, deadline)
    return RoutingSolution(
        method=method,
        status=Status.TIME_LIMIT,
        objective=float("nan"),
        bound=fb["bound"],
        assignment=fb["assignment"],
        message=_fallback_said(fb),
    )


def drive(
    method: str,
    problem,
    job,
    options: dict,
    *,
    time_limit,
    start: float,
    to_solution,
    isolate: bool | None = None,
    guard=None,
):
    """problem -> ``job(problem, time_limit=..., **options)`` (build + run, maybe in a child under the hard
    deadline: :func:`._isolate.solve_bounded`) -> ``to_solution(problem, raw, time_limit)``.

    When the deadline killed the job, or the job returned no answer under a time limit, the answer is the
    greedy assignment with the top-k bound (:func:`stopped`) and status ``time_limit``. ``isolate``: run the job
    in a child under the hard deadline (default: under a time limit, above ``INPROCESS_CELLS`` score entries).
    ``guard``: see :func:`._isolate.run_bounded`.
    """
    from ._isolate import solve_bounded

    T, E = problem.shape
    # the fallback works while the child does, and gives up shortly before the child is killed
    soon = None if time_limit is None else start + 0.95 * time_limit
    return solve_bounded(
        method,
        problem,
        job,
        options,
        time_limit=time_limit,
        start=start,
        fallback=lambda: stopped(problem, method, soon),
        cells=T * E,
        isolate=isolate,
        to_solution=to_solution,
        guard=guard,
    )


def certify_prices(scores: np.ndarray, assignment: np.ndarray, tol: float) -> np.ndarray | None:
    """Prices ``[E]`` certifying ``assignment``: the exact ones when they exist (their dual bound then equals
    the objective), else those within ``tol`` (a back-end's quantisation or tolerance), else None."""
    q = prices_from_assignment(scores, assignment, tol=0.0)
    return q if q is not None else prices_from_assignment(scores, assignment, tol=tol)
