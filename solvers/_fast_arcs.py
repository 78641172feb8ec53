"""The compressed graph of the shortest paths of ``fast``: per arc (a, b), the few tokens held by a with the
smallest ``s[t,a] - s[t,b]`` among those with candidate b not held, kept sorted and patched as tokens move
(:func:`_move`, :func:`_apply_path`), rescanned only when a list empties."""

from __future__ import annotations

import numpy as np

NBEST_MIN, NBEST_MAX = 2, 16  # tokens kept per arc (the smallest s[t,a]-s[t,b]): more when experts hold many
# tokens, so that a list rarely empties (an emptied list rescans every token of its expert); 2 at T=4096, E=64, k=8
# (0.2-0.4 ms less there than 4, measured with the backward paths)


def _insert(rawk, argk, cnt, exh, x, y, w, t):
    """Offer token t with value w to arc (x, y)'s list of the smallest values (sorted, ``cnt`` long).

    Invariant: the list holds the cnt smallest values of the eligible tokens; ``exh`` says it holds all of
    them. A value above the list's largest can only join an exhaustive list with room."""
    c = cnt[x, y]
    K = rawk.shape[0]
    if c == K:
        if w >= rawk[K - 1, x, y]:
            exh[x, y] = False
            return
        c = K - 1
        exh[x, y] = False
    elif not exh[x, y] and (c == 0 or w >= rawk[c - 1, x, y]):
        return
    i = c
    while i > 0 and rawk[i - 1, x, y] > w:
        rawk[i, x, y] = rawk[i - 1, x, y]
        argk[i, x, y] = argk[i - 1, x, y]
        i -= 1
    rawk[i, x, y] = w
    argk[i, x, y] = t
    cnt[x, y] = c + 1


def _add_candidate(s, cand, ncand, slot, rawk, argk, cnt, exh, t, b):
    """Expert b becomes a candidate of token t (a free column is the caller's check), with the arcs from the
    experts t holds (patched into their lists)."""
    cand[t, ncand[t]] = b
    ncand[t] += 1
    slot[t, b] = -1
    for i in range(ncand[t] - 1):
        x = cand[t, i]
        if slot[t, x] > 0:
            _insert(rawk, argk, cnt, exh, x, b, s[t, x] - s[t, b], t)


def _recompute(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, x, ys, nys):
    """Arc lists (x, y) from scratch for y in ys[:nys], scanning the tokens held by x."""
    nb = rawk.shape[0]
    for j in range(nys):
        y = ys[j]
        cnt[x, y] = 0
        rawk[0, x, y] = np.inf
        exh[x, y] = True
        mark[y] = True
    if nys == 1:  # one list (an emptied one): slot says directly whether t is eligible, no candidate scan
        y = ys[0]
        for i in range(load[x]):
            t = mem[x, i]
            if slot[t, y] < 0:
                w = s[t, x] - s[t, y]
                if cnt[x, y] < nb or w < rawk[nb - 1, x, y]:
                    _insert(rawk, argk, cnt, exh, x, y, w, t)
                else:
                    exh[x, y] = False
        mark[y] = False
        return
    for i in range(load[x]):
        t = mem[x, i]
        sx = s[t, x]
        for j in range(ncand[t]):
            y = cand[t, j]
            if mark[y] and slot[t, y] < 0:
                w = sx - s[t, y]
                if cnt[x, y] < nb or w < rawk[nb - 1, x, y]:
                    _insert(rawk, argk, cnt, exh, x, y, w, t)
                else:
                    exh[x, y] = False
    for j in range(nys):
        mark[ys[j]] = False


def _delete(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, x, y, t):
    """Token t is no longer eligible for arc (x, y): drop it from the list, rescanning an emptied one."""
    c = cnt[x, y]
    for i in range(c):
        if argk[i, x, y] == t:
            for j in range(i, c - 1):
                rawk[j, x, y] = rawk[j + 1, x, y]
                argk[j, x, y] = argk[j + 1, x, y]
            cnt[x, y] = c - 1
            if c == 1:
                rawk[0, x, y] = np.inf
            if c == 1 and not exh[x, y]:
                ys[0] = y
                _recompute(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, x, ys, 1)
            return


def _move(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, t, u, v):
    """Token t leaves expert u for its candidate v; patch membership and the arc lists that change."""
    p = slot[t, u] - 1
    last = mem[u, load[u] - 1]
    mem[u, p] = last
    slot[last, u] = p + 1
    load[u] -= 1
    slot[t, u] = -1
    mem[v, load[v]] = t
    load[v] += 1
    slot[t, v] = load[v]
    n = ncand[t]
    # no longer eligible: (u, y) for the candidates y it did not hold (v among them), (x, v) for x held
    for j in range(n):
        y = cand[t, j]
        if y == v or (slot[t, y] < 0 and y != u):
            _delete(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, u, y, t)
        elif slot[t, y] > 0 and y != v:
            _delete(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, y, v, t)
    # newly eligible: (v, y) for the candidates y it does not hold (u among them), (x, u) for x held
    sv = s[t, v]
    su = s[t, u]
    for j in range(n):
        y = cand[t, j]
        if slot[t, y] < 0:
            _insert(rawk, argk, cnt, exh, v, y, sv - s[t, y], t)
        elif y != v:
            _insert(rawk, argk, cnt, exh, y, u, s[t, y] - su, t)


def _pop_min(key):
    """The index of the smallest entry of ``key`` (the first of ties), -1 when all are inf: a plain min
    (vectorised), then its first index."""
    best = np.inf
    for v in range(key.shape[0]):
        best = min(best, key[v])
    if best < np.inf:
        for v in range(key.shape[0]):
            if key[v] == best:
                return v
    return -1


def _apply_path(
    s,
    cand,
    ncand,
    mem,
    load,
    slot,
    rawk,
    argk,
    cnt,
    exh,
    mark,
    ys,
    g,
    excess,
    path_u,
    path_v,
    path_tok,
    n,
    source,
    target,
):
    """Move one unit along the path ``path_u[i] -> path_v[i]`` (i < n; the tokens its arcs chose are in
    ``path_tok``, read before any move): tokens between experts, sends to the sink S (node E) and back."""
    E = g.shape[0]
    for i in range(n):
        u = path_u[i]
        v = path_v[i]
        if u < E and v < E:
            _move(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, path_tok[i], u, v)
        elif v == E:
            g[u] += 1
        else:
            g[v] -= 1
    excess[source] -= 1
    excess[target] += 1
