"""The expert-side auction of ``fast`` (:func:`auction`): over-full experts raise their prices until their
tokens leave, each token keeping a top-k of its full row of ``s - q``."""

from __future__ import annotations

import numpy as np

from ._fast_select import _kth_smallest_small, _push_desc, _select


def _rebuild(s, q, held, t, lst, lstv, nl, bound, buf, bi):
    """t's list from its full row: the M best experts it does not hold (their scores beside them) and the
    next value as the bound. Returns the list position of the best one."""
    E = s.shape[1]
    M = lst.shape[1]
    nb = 0
    for e in range(E):
        if held[t, e]:
            continue
        nb = _push_desc(buf, bi, nb, M + 1, s[t, e] - q[e], e)
    n = min(nb, M)
    for j in range(n):
        lst[t, j] = bi[j]
        lstv[t, j] = s[t, bi[j]]
    nl[t] = n
    bound[t] = buf[M] if nb > M else -np.inf
    return 0


def _best_alt(s, q, held, t, lst, lstv, nl, bound, buf, bi):
    """The list position of the best expert t does not hold, under ``s - q``: from its list when the list's
    best reaches the bound (prices only rise, so nothing outside the list can beat it), else from a rebuilt
    list."""
    b = -1
    bv = -np.inf
    for j in range(nl[t]):
        v = lstv[t, j] - q[lst[t, j]]
        if v > bv:
            bv = v
            b = j
    if b >= 0 and bv >= bound[t]:
        return b
    return _rebuild(s, q, held, t, lst, lstv, nl, bound, buf, bi)


def auction(s, k, cap, q, sel, held, lst, lstv, nl, bound, budget, stall, out, stop):
    """Expert-side auction from ``sel`` [T, k] (a top-k of every row of ``s - q``), in place on ``q``,
    ``sel``, ``held`` and the lists.

    An over-full expert e raises its price by the (cap_e+1)-th largest margin of its tokens (margin: what t
    loses by swapping e for its best other expert), so exactly cap_e keep it; the others take their best
    other expert (which may overflow in turn: a FIFO of over-full experts) and list e in its place. Every
    token keeps a top-k of its full row of ``s - q`` throughout, prices only rise, and an expert that raised
    its price stays at least full: each step keeps the dual feasible and moves toward the optimum. Stops when
    no expert is over-full, after ``budget`` steps, or when the last E steps removed fewer than ``stall``
    units of excess per step (near-ties, which one-expert steps resolve only slowly: the shortest paths finish
    faster).

    ``out`` [5] receives (steps, evictions, list refreshes, excess left, excess at the start)."""
    T, E = s.shape
    M = lst.shape[1]
    load = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            load[sel[t, j]] += 1
    mem = np.empty((E, T), dtype=np.int32)
    memv = np.empty((E, T))
    fill = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            e = sel[t, j]
            mem[e, fill[e]] = t
            memv[e, fill[e]] = s[t, e]
            fill[e] += 1
    buf = np.empty(M + 1)
    bi = np.empty(M + 1, dtype=np.int64)
    alt = np.empty(T, dtype=np.int64)  # list position of t's best other expert
    altq = np.empty(T)  # its price when found (prices only rise: unchanged means still the best)
    for t in range(T):
        p = _best_alt(s, q, held, t, lst, lstv, nl, bound, buf, bi)
        alt[t] = p
        altq[t] = q[lst[t, p]]
    queue = np.empty(E, dtype=np.int64)
    inq = np.zeros(E, dtype=np.bool_)
    head = 0
    tail = 0
    excess = 0
    for e in range(E):
        if load[e] > cap[e]:
            excess += load[e] - cap[e]
            queue[tail % E] = e
            tail += 1
            inq[e] = True
    out[4] = excess
    marg = np.empty(T)
    work = np.empty(T)
    sbuf = np.empty(33)
    steps = 0
    evictions = 0
    refreshes = 0
    window_excess = excess
    window_start = 0
    while head < tail and steps < budget and stop[0] == 0:
        e = queue[head % E]
        head += 1
        inq[e] = False
        L = load[e]
        C = cap[e]
        if L <= C:
            continue
        steps += 1
        qe = q[e]
        for i in range(L):
            t = mem[e, i]
            p = alt[t]
            qa = q[lst[t, p]]
            if qa != altq[t]:  # its best other expert got dearer: look again
                p = _best_alt(s, q, held, t, lst, lstv, nl, bound, buf, bi)
                alt[t] = p
                qa = q[lst[t, p]]
                altq[t] = qa
                refreshes += 1
            marg[i] = (memv[e, i] - qe) - (lstv[t, p] - qa)
        r = L - C  # tokens to evict: d is the r-th smallest margin
        if r <= 32:
            d = _kth_smallest_small(marg, L, r, sbuf)
        else:
            for i in range(L):
                work[i] = marg[i]
            d = _select(work, L, r - 1)
        below = 0
        for i in range(L):
            if marg[i] < d:
                below += 1
        ties = r - below  # tokens at exactly d that leave too
        if d > 0.0:
            q[e] = qe + d
        w = 0
        for i in range(L):
            t = mem[e, i]
            mi = marg[i]
            if mi > d or (mi == d and ties <= 0):
                mem[e, w] = t
                memv[e, w] = memv[e, i]
                w += 1
                continue
            if mi == d:
                ties -= 1
            p = alt[t]
            a = lst[t, p]
            va = lstv[t, p]
            lst[t, p] = e  # e takes a's place in t's list
            lstv[t, p] = memv[e, i]
            held[t, e] = False
            held[t, a] = True
            la = load[a]
            mem[a, la] = t
            memv[a, la] = va
            load[a] = la + 1
            if la + 1 > cap[a]:
                excess += 1
                if not inq[a]:
                    queue[tail % E] = a
                    tail += 1
                    inq[a] = True
            p = _best_alt(s, q, held, t, lst, lstv, nl, bound, buf, bi)
            alt[t] = p
            altq[t] = q[lst[t, p]]
            evictions += 1
        excess -= L - w
        load[e] = w
        if steps - window_start >= E:
            if window_excess - excess < stall * (steps - window_start):
                break
            window_excess = excess
            window_start = steps
    cnt = np.zeros(T, dtype=np.int64)
    for e in range(E):
        for i in range(load[e]):
            t = mem[e, i]
            sel[t, cnt[t]] = e
            cnt[t] += 1
    out[0] = steps
    out[1] = evictions
    out[2] = refreshes
    out[3] = excess
