"""Local search on replication plans, vectorised over layers (private: ``eplb+`` and ``migrate`` use it).

State per layer: ``phy2log`` (slot -> expert). Each round, for every layer at once, the GPU that is busiest in
most batches (``g*``) is the focus and two neighbourhoods are scored exactly:

- *swap*: a slot on ``g*`` trades its replica with a slot on another GPU (counts unchanged);
- *re-split* (only where no swap helps): a slot changes expert, ``a -> b`` (``a`` keeps >= 1 replica), which
  re-splits both experts' loads over their new replica counts: either a slot on ``g*`` becomes any expert,
  or any slot becomes an expert that has a replica on ``g*``.

A move is taken when it lowers the layer's objective (mean over batches of the largest GPU load) or keeps it
and lowers the sum of squared GPU loads: the pair strictly decreases, so the search ends. Moves respect the
group/node constraint (swaps and re-splits stay inside a node) and, with an old plan, the per-layer move
budget (``R - sum min(old count, new count)`` on every GPU). The best move per layer is applied, for all
layers in one step.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["local_search", "relabel_gpus"]


def _state(W: np.ndarray, a: np.ndarray, G: int, E: int):
    Lw, R = a.shape
    S = R // G
    lay = np.arange(Lw)[:, None]
    c = np.bincount((a + E * lay).ravel(), minlength=Lw * E).reshape(Lw, E)
    n = np.bincount(((lay * G + np.arange(R)[None, :] // S) * E + a).ravel(), minlength=Lw * G * E).reshape(Lw, G, E)
    x = W / np.maximum(c, 1)[:, None, :]  # [Lw, B, E] load per replica
    xs = np.take_along_axis(x, np.broadcast_to(a[:, None, :], (Lw, W.shape[1], R)), axis=2)  # [Lw, B, R]
    loads = xs.reshape(Lw, W.shape[1], G, S).sum(axis=3)
    return c, n, xs, loads


def _max_excluding(loads: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``[Lw, B, G]``: per layer and batch, the largest load over GPUs other than ``g[l]`` and ``h``."""
    Lw, B, G = loads.shape
    k = min(3, G)
    idx = np.argsort(-loads, axis=2)[:, :, :k]
    val = np.take_along_axis(loads, idx, axis=2)
    h = np.arange(G)[None, None, :, None]
    bad = (idx[:, :, None, :] == h) | (idx[:, :, None, :] == g[:, None, None, None])  # [Lw, B, G, k]
    v = np.where(bad, -np.inf, val[:, :, None, :]).max(axis=3)
    return np.where(np.isfinite(v), v, 0.0)


def local_search(
    W: Any,
    phy2log: Any,
    num_gpus: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    old: Any = None,
    max_moves: int | None = None,
    max_rounds: int = 10_000,
    deadline: float | None = None,
    resplit: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Improve ``phy2log [L, R]`` for loads ``W [L, B, E]``; returns the plan and counters.

    ``old`` ``[L, R]`` and ``max_moves``: no accepted move takes a layer above ``max_moves`` moves (a layer
    already above it only takes moves that do not add any). ``deadline``: ``time.perf_counter()`` value.
    """
    W = np.asarray(W, dtype=np.float64)
    a = np.array(phy2log, dtype=np.int64)
    Lw, B, E = W.shape
    R = a.shape[1]
    G = num_gpus
    S = R // G
    # normalise each layer by its mean GPU load: tolerances then mean the same at any scale
    scale = W.sum(axis=2).mean(axis=1) / G
    W = W / np.where(scale > 0, scale, 1.0)[:, None, None]
    gpu_of = np.arange(R) // S
    node_of_gpu = np.arange(G) // (G // num_nodes)
    node_of = node_of_gpu[gpu_of]
    gsize = E // num_groups
    group_node = None
    if num_nodes > 1:
        # the node of every group (fixed: moves stay inside nodes)
        group_node = np.zeros((Lw, num_groups), dtype=np.int64)
        np.put_along_axis(group_node, a // gsize, np.broadcast_to(node_of, a.shape), axis=1)
    oldn = None
    if old is not None:
        _, oldn, _, _ = _state(np.zeros((Lw, 1, E)), np.asarray(old, dtype=np.int64), G, E)
    budget = np.inf if max_moves is None else float(max_moves)
    active = np.ones(Lw, dtype=bool)
    rounds = swaps = resplits = 0
    tol = 1e-12
    while active.any() and rounds < max_rounds:
        if deadline is not None and time.perf_counter() > deadline:
            break
        rounds += 1
        ids = np.flatnonzero(active)
        c, n, xs, loads = _state(W[ids], a[ids], G, E)
        Lb = ids.size
        f0 = loads.max(axis=2).mean(axis=1)  # [Lb]
        sq0 = (loads**2).sum(axis=2).mean(axis=1)
        is_max = loads >= loads.max(axis=2, keepdims=True) - tol
        gstar = np.argmax(is_max.sum(axis=1) + 1e-6 * loads.mean(axis=1), axis=1)  # [Lb]
        moves_now = None
        if oldn is not None:
            moves_now = R - np.minimum(n, oldn[ids]).sum(axis=(1, 2))
            dec = (n <= oldn[ids]).astype(np.int64)  # taking one replica away adds a move
            inc = (n < oldn[ids]).astype(np.int64)  # adding one back saves a move
        mo = _max_excluding(loads, gstar)  # [Lb, B, G]
        Lg = np.take_along_axis(loads, np.broadcast_to(gstar[:, None, None], (Lb, B, 1)), axis=2)  # [Lb, B, 1]
        si = gstar[:, None] * S + np.arange(S)[None, :]  # [Lb, S] slots on g*
        xi = np.take_along_axis(xs, np.broadcast_to(si[:, None, :], (Lb, B, S)), axis=2)  # [Lb, B, S]
        new_g = Lg[..., None] - xi[..., None] + xs[:, :, None, :]  # [Lb, B, S, R]
        Lh = loads[:, :, gpu_of]  # [Lb, B, R]
        new_h = Lh[:, :, None, :] - xs[:, :, None, :] + xi[..., None]
        others = mo[:, :, gpu_of][:, :, None, :]
        f = np.maximum(np.maximum(new_g, new_h), others).mean(axis=1)  # [Lb, S, R]
        dsq = (new_g**2 + new_h**2 - Lg[..., None] ** 2 - Lh[:, :, None, :] ** 2).mean(axis=1)
        ai = np.take_along_axis(a[ids], si, axis=1)  # [Lb, S]
        aj = a[ids]
        ok = (gpu_of[None, None, :] != gstar[:, None, None]) & (ai[:, :, None] != aj[:, None, :])
        ok &= node_of[None, None, :] == node_of_gpu[gstar][:, None, None]
        if moves_now is not None:  # set exactly when there is an old plan
            r2 = np.arange(Lb)[:, None, None]
            dm = (
                dec[r2, gstar[:, None, None], ai[:, :, None]]
                + dec[r2, gpu_of[None, None, :], aj[:, None, :]]
                - inc[r2, gstar[:, None, None], aj[:, None, :]]
                - inc[r2, gpu_of[None, None, :], ai[:, :, None]]
            )
            ok &= (moves_now[:, None, None] + dm <= budget) | (dm <= 0)
        better = ok & (
            (f < f0[:, None, None] - tol)
            | ((f <= f0[:, None, None] + tol) & (dsq < -tol * np.maximum(sq0, 1e-300)[:, None, None]))
        )
        key = np.where(better, f + 1e-9 * dsq, np.inf).reshape(Lb, -1)
        best = key.argmin(axis=1)
        has = np.isfinite(key[np.arange(Lb), best])
        bi, bj = np.divmod(best, R)
        for r in np.flatnonzero(has):
            l, i, j = ids[r], si[r, bi[r]], bj[r]
            a[l, i], a[l, j] = a[l, j], a[l, i]
            swaps += 1
        stuck = np.flatnonzero(~has)
        if resplit and stuck.size:
            done = _resplit(
                W[ids[stuck]],
                a,
                ids[stuck],
                c[stuck],
                n[stuck],
                loads[stuck],
                gstar[stuck],
                f0[stuck],
                sq0[stuck],
                G,
                S,
                gpu_of,
                node_of_gpu,
                group_node,
                gsize,
                None if moves_now is None else (dec[stuck], inc[stuck], moves_now[stuck]),
                budget,
                tol,
            )
            resplits += int(done.sum())
            active[ids[stuck[~done]]] = False
        else:
            active[ids[stuck]] = False
    return a, {
        "rounds": rounds,
        "swaps": swaps,
        "resplits": resplits,
        "stopped_by_time": bool(active.any() and deadline is not None and time.perf_counter() > deadline),
    }


def _resplit(
    W, a, ids, c, n, loads, gstar, f0, sq0, G, S, gpu_of, node_of_gpu, group_node, gsize, mig, budget, tol
) -> np.ndarray:
    """Best re-split move for each layer in ``ids`` (applied to ``a`` in place); ``[len(ids)]`` done flags."""
    Lb, B, E = W.shape
    done = np.zeros(Lb, dtype=bool)
    for r in range(Lb):
        l = ids[r]
        g = int(gstar[r])
        al = a[l]
        w = W[r]  # [B, E]
        cnt, nn = c[r], n[r].T  # [E], [E, G]
        contrib = w[:, :, None] * (nn / cnt[:, None])[None]  # [B, E, G]
        node = node_of_gpu[g]
        allowed = np.ones(E, dtype=bool) if group_node is None else (group_node[l][np.arange(E) // gsize] == node)
        cands = []
        # (A) a slot on g* becomes any allowed expert b
        si = g * S + np.arange(S)
        # (B) any slot of g*'s node becomes an expert present on g*
        sj = np.flatnonzero(node_of_gpu[gpu_of] == node)
        for slots, targets in ((si, np.flatnonzero(allowed)), (sj, np.unique(al[si]))):
            ea = al[slots]
            keep = cnt[ea] >= 2
            slots, ea = slots[keep], ea[keep]
            if slots.size == 0 or targets.size == 0:
                continue
            gi = gpu_of[slots]
            onehot = np.eye(G)[gi]  # [I, G]
            # a loses the slot: its load spreads over c_a - 1 replicas
            da = w[:, ea, None] * ((nn[ea] - onehot) / (cnt[ea, None] - 1))[None] - contrib[:, ea, :]  # [B, I, G]
            # b gains a replica on gi
            nb = nn[targets][None, :, :] + onehot[:, None, :]  # [I, T, G]
            db = (
                w[:, None, targets, None] * (nb / (cnt[targets] + 1)[None, :, None])[None]
                - contrib[:, None, targets, :]
            )  # [B, I, T, G]
            new = loads[r][:, None, None, :] + da[:, :, None, :] + db  # [B, I, T, G]
            f = new.max(axis=3).mean(axis=0)  # [I, T]
            dsq = ((new**2).sum(axis=3) - (loads[r] ** 2).sum(axis=1)[:, None, None]).mean(axis=0)
            ok = ea[:, None] != targets[None, :]
            if mig is not None:
                dec, inc, mnow = mig
                dm = dec[r][gi, ea][:, None] - inc[r][gi[:, None], targets[None, :]]
                ok &= (mnow[r] + dm <= budget) | (dm <= 0)
            better = ok & ((f < f0[r] - tol) | ((f <= f0[r] + tol) & (dsq < -tol * max(sq0[r], 1e-300))))
            if better.any():
                key = np.where(better, f + 1e-9 * dsq, np.inf)
                k = int(key.argmin())
                cands.append((float(key.flat[k]), int(slots[k // targets.size]), int(targets[k % targets.size])))
        if cands:
            _, slot, b = min(cands)
            a[l, slot] = b
            done[r] = True
    return done


def relabel_gpus(new: np.ndarray, old: np.ndarray, num_experts: int, num_gpus: int, num_nodes: int = 1) -> np.ndarray:
    """``new [L, R]`` with its GPUs (and, with nodes, whole nodes) permuted to keep as many replicas where
    ``old [L, R]`` has them: no GPU's load changes, only the moves (linear assignments, scipy)."""
    from scipy.optimize import linear_sum_assignment

    L, R = new.shape
    G = num_gpus
    S = R // G
    gpn = G // num_nodes
    out = new.copy()
    for l in range(L):
        nn = np.zeros((G, num_experts), dtype=np.int64)
        on = np.zeros((G, num_experts), dtype=np.int64)
        np.add.at(nn, (np.arange(R) // S, new[l]), 1)
        np.add.at(on, (np.arange(R) // S, old[l]), 1)
        keep = np.minimum(nn[:, None, :], on[None, :, :]).sum(axis=2)  # [G new, G old]
        gpu_map = np.empty(G, dtype=np.int64)
        if num_nodes == 1:
            rows, cols = linear_sum_assignment(-keep)
            gpu_map[rows] = cols
        else:
            value = np.zeros((num_nodes, num_nodes))
            inner = {}
            for p in range(num_nodes):
                for q in range(num_nodes):
                    blk = keep[p * gpn : (p + 1) * gpn, q * gpn : (q + 1) * gpn]
                    rr, cc = linear_sum_assignment(-blk)
                    value[p, q] = blk[rr, cc].sum()
                    inner[p, q] = cc
            rows, cols = linear_sum_assignment(-value)
            for p, q in zip(rows, cols):
                gpu_map[p * gpn : (p + 1) * gpn] = q * gpn + inner[p, q]
        blocks = new[l].reshape(G, S)
        res = np.empty_like(blocks)
        res[gpu_map] = blocks
        out[l] = res.reshape(R)
    return out


def relink(
    W: Any,
    start: Any,
    target: Any,
    num_gpus: int,
    *,
    num_groups: int = 1,
    num_nodes: int = 1,
    old: Any = None,
    max_moves: int | None = None,
    deadline: float | None = None,
) -> np.ndarray:
    """Walk from ``start [L, R]`` towards ``target [L, R]`` one slot at a time, within the move budget.

    Each step repaints one slot with its target expert (the slot's old expert keeps >= 1 replica, groups stay
    on their node), choosing the step with the lowest objective; it stops when no step fits the budget. With
    a budget below the target's moves this keeps the target's most useful changes (path relinking).
    """
    W = np.asarray(W, dtype=np.float64)
    a = np.array(start, dtype=np.int64)
    t = np.asarray(target, dtype=np.int64)
    L, B, E = W.shape
    R = a.shape[1]
    G = num_gpus
    S = R // G
    gpu_of = np.arange(R) // S
    node_of = (np.arange(G) // (G // num_nodes))[gpu_of]
    gsize = E // num_groups
    budget = np.inf if max_moves is None else float(max_moves)
    oldn = None
    if old is not None:
        _, oldn, _, _ = _state(np.zeros((L, 1, E)), np.asarray(old, dtype=np.int64), G, E)
    for l in range(L):
        w = W[l] / max(W[l].sum(axis=1).mean() / G, 1e-300)
        while True:
            if deadline is not None and time.perf_counter() > deadline:
                return a
            al = a[l]
            diff = np.flatnonzero(al != t[l])
            if diff.size == 0:
                break
            c, n, _, loads = _state(w[None], al[None], G, E)
            c, n, loads = c[0], n[0], loads[0]
            ea, eb, g = al[diff], t[l][diff], gpu_of[diff]
            ok = c[ea] >= 2
            if num_nodes > 1:
                gnode = np.full(num_groups, -1)
                gnode[al // gsize] = node_of
                ok &= gnode[eb // gsize] == node_of[diff]
            if oldn is not None:
                moves = R - np.minimum(n, oldn[l]).sum()
                dm = (n[g, ea] <= oldn[l][g, ea]).astype(int) - (n[g, eb] < oldn[l][g, eb]).astype(int)
                ok &= (moves + dm <= budget) | (dm <= 0)
            if not ok.any():
                break
            diff, ea, eb, g = diff[ok], ea[ok], eb[ok], g[ok]
            onehot = np.eye(G)[g]  # [I, G]
            na, nb = n[:, ea].T, n[:, eb].T  # [I, G]
            ca, cb = c[ea][:, None], c[eb][:, None]
            new = (
                loads[:, None, :]
                + w[:, ea, None] * ((na - onehot) / (ca - 1) - na / ca)[None]
                + w[:, eb, None] * ((nb + onehot) / (cb + 1) - nb / cb)[None]
            )  # [B, I, G]
            f = new.max(axis=2).mean(axis=0) + 1e-9 * (new**2).sum(axis=2).mean(axis=0)
            k = int(f.argmin())
            a[l, diff[k]] = eb[k]
    return a
