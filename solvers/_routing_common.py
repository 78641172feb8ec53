"""Pieces several routing solvers share: integer scaling, prices from an assignment, greedy filling."""

from __future__ import annotations

import numpy as np

__all__ = ["chosen_to_assignment", "prices_from_assignment", "greedy_fill", "integer_scores"]


def chosen_to_assignment(chosen: np.ndarray, k: int) -> np.ndarray:
    """``[T, E]`` 0/1 (or fractional) matrix -> ``[T, k]`` expert ids of the k largest entries per token."""
    idx = np.argsort(-chosen.astype(np.float64), axis=1, kind="stable")[:, :k]
    return np.sort(idx, axis=1).astype(np.int64)


def integer_scores(scores: np.ndarray, max_int: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Quantise ``scores`` [T, E] for integer back-ends.

    Returns ``(ints, rowmin, scale)`` with ``scores ~= ints / scale + rowmin[:, None]`` and ``0 <= ints <= max_int``.
    Each token picks exactly k experts, so shifting a token's row by a constant does not change the optimum;
    the rounding error is at most ``0.5 / scale`` per score, hence at most ``T * k / scale`` on the objective.
    """
    rowmin = scores.min(axis=1)
    shifted = scores - rowmin[:, None]
    span = float(shifted.max())
    scale = max_int / span if span > 0 else 1.0
    return np.rint(shifted * scale).astype(np.int64), rowmin, scale


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


def greedy_fill(scores: np.ndarray, chosen: np.ndarray, room: np.ndarray, need: np.ndarray) -> np.ndarray:
    """Fill each token's missing slots with its best experts that still have room, highest scores first.

    Args:
      scores: ``[T, E]`` preferences.
      chosen: ``[T, E]`` bool, experts already taken by each token (updated in place).
      room: ``[E]`` remaining capacity (updated in place).
      need: ``[T]`` slots each token still needs (updated in place).

    Rounds: every needy token proposes its best expert not yet tried; each expert accepts the highest-scored
    proposals up to its room; the rest move on to their next choice. At most E rounds, each vectorised.
    Returns ``need`` (all zero on success).
    """
    T, E = scores.shape
    pref = np.argsort(-scores, axis=1, kind="stable")
    ptr = np.zeros(T, dtype=np.int64)
    for _ in range(E):
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
        _swap_fill(scores, chosen, room, need)
    return need


def _swap_fill(scores: np.ndarray, chosen: np.ndarray, room: np.ndarray, need: np.ndarray) -> None:
    """Place slots the rounds could not: a token t whose only experts with room r are ones it already has
    takes expert a from a token u that moves to r (t: +a, u: a -> r), choosing the least costly such swap.
    With tight capacities (sum of capacities == T * k) this is what the last few tokens need."""
    for t in np.flatnonzero(need > 0):
        while need[t] > 0:
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
