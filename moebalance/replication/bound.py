"""Lower bounds on the replication objective that hold for every plan (what ``certify`` proves)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .problem import ReplicationProblem

__all__ = ["layer_bounds"]


def _dhondt_threshold(w: np.ndarray, R: int) -> np.ndarray:
    """``[N]`` min over replica counts (>= 1 each, summing to ``R``) of the largest load per replica, for every
    row of ``w [N, E]``: the ``(R - E + 1)``-th largest of ``w_e / j`` (j >= 1), the first value the greedy
    D'Hondt allocation leaves untaken."""
    N, E = w.shape
    extra = R - E
    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(total > 0, w.max(axis=1) * R / np.where(total > 0, total, 1.0), 1.0)
    K = int(min(extra + 1, np.ceil(need.max()) + 2))
    k = min(extra, E * K - 1)
    # rows in chunks of at most ~2**21 candidate values (16 MiB): memory stays bounded whatever R is
    step = max(1, (1 << 21) // max(1, E * K))
    out = np.empty(N)
    div = np.arange(1, K + 1, dtype=np.float64)
    for lo in range(0, N, step):
        vals = (w[lo : lo + step, :, None] / div).reshape(-1, E * K)
        vals *= -1
        out[lo : lo + step] = -np.partition(vals, k, axis=1)[:, k]
    return out


def _pigeonhole(items: np.ndarray, G: int, S: int) -> np.ndarray:
    """``[N]`` bound on the largest GPU sum when the replica loads ``items [N, G*S]`` are fixed: among the
    ``kG + 1`` largest (k = 0: the largest alone), some GPU holds ``k + 1``; its other ``S - k - 1`` slots hold
    at least the smallest items."""
    srt = -np.sort(-items, axis=1)  # descending
    asc = srt[:, ::-1]
    cum_small = np.concatenate([np.zeros((items.shape[0], 1)), np.cumsum(asc, axis=1)], axis=1)
    best = np.zeros(items.shape[0])
    for k in range(0, S):
        top = k * G + 1
        if top > items.shape[1]:
            break
        part = srt[:, top - k - 1 : top].sum(axis=1)  # the k + 1 smallest of the top kG + 1
        best = np.maximum(best, part + cum_small[:, S - k - 1])
    return best


def _node_bound(group_load: np.ndarray, nodes: int, cap: int) -> np.ndarray:
    """``[N]`` min over assignments of groups to nodes (at most ``cap`` groups per node) of the largest node
    load, for ``group_load [N, Q]``: exact DP over subsets for Q <= 12, else the pigeonhole-free bound
    ``max(total / nodes, largest group)``."""
    N, Q = group_load.shape
    if Q > 12:
        return np.maximum(group_load.sum(axis=1) / nodes, group_load.max(axis=1))
    masks = np.arange(1 << Q)
    bits = (masks[:, None] >> np.arange(Q)) & 1
    sub_load = group_load @ bits.T  # [N, 2**Q]
    size = bits.sum(axis=1)
    pairs = [(m, s) for m in range(1 << Q) for s in _submasks(m) if size[s] <= cap]
    pm = np.array([p[0] for p in pairs])
    ps = np.array([p[1] for p in pairs])
    # masks on the first axis: every gather below copies whole rows of N values
    sub_t = np.ascontiguousarray(sub_load.T)  # [2**Q, N]
    f = np.where(size[:, None] <= cap, sub_t, np.inf)  # one node
    # pairs are listed by increasing m, each m with its submask 0 at least: a segmented min (reduceat) per m
    full = (1 << Q) - 1
    for it in range(nodes - 1):
        # with it + 2 nodes only masks of at most cap * (it + 2) groups are reachable; the last step needs all
        keep = (size[pm] <= cap * (it + 2)) & ((pm == full) if it == nodes - 2 else True)
        qm, qs = pm[keep], ps[keep]
        if qm.size == 0:
            return np.full(N, np.inf)
        starts = np.flatnonzero(np.r_[True, qm[1:] != qm[:-1]])
        cand = np.maximum(sub_t[qs], f[qm ^ qs])
        g = np.full_like(f, np.inf)
        g[qm[starts]] = np.minimum.reduceat(cand, starts, axis=0)
        f = g
    return f[-1]


def _submasks(m: int):
    s = m
    while True:
        yield s
        if s == 0:
            return
        s = (s - 1) & m


def layer_bounds(problem: ReplicationProblem) -> np.ndarray:
    """``[L]`` lower bound on each layer's term of the objective, valid for every plan.

    Per batch the largest of: the mean GPU load; the D'Hondt threshold (no plan has a smaller largest load
    per replica); with ``R == E`` (no replicas, fixed items) the pigeonhole bound; with nodes, the best split
    of the groups over nodes (each node's load spread evenly over its GPUs). A window takes the mean over
    batches of the per-batch bounds.
    """
    cached = getattr(problem, "_layer_bounds", None)
    if cached is not None:  # the problem is immutable: its bounds are computed once
        return cached.copy()
    B, L, E = problem.shape
    R, G = problem.num_replicas, problem.num_gpus
    w = problem.weight.reshape(B * L, E)
    lb = np.maximum(w.sum(axis=1) / G, _dhondt_threshold(w, R))
    if R == E:
        lb = np.maximum(lb, _pigeonhole(w, G, R // G))
    if problem.hierarchical:
        Q, N = problem.num_groups, problem.num_nodes
        gl = w.reshape(B * L, Q, E // Q).sum(axis=2)
        cap = (R // N) // (E // Q)
        lb = np.maximum(lb, _node_bound(gl, N, cap) / (G // N))
    out = lb.reshape(B, L).mean(axis=0)
    out.setflags(write=False)
    try:
        problem._layer_bounds = out
    except AttributeError:
        pass
    return out.copy()
