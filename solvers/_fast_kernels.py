"""Inner loops of the exact routing method ``fast`` (see :mod:`moebalance.solvers.routing_fast`).

Plain Python functions, compiled by numba when it is installed (:func:`kernels`); without numba the very same
code runs as Python: exactly as correct, much slower. numba because these loops move single tokens between
experts (the auction), walk shortest paths one unit at a time over a dense E x E graph and patch a few entries
per step, and select order statistics over short lists: nothing numpy can vectorise.

State shared by the steps: ``s`` [T, E] the scores shifted per row; q [E] the prices; ``sel`` [T, k] each
token's held experts, always a top-k of its full row of ``s - q`` (``held`` [T, E] their membership); ``lst``
[T, M] / ``lstv`` / ``nl`` [T] each token's list of experts it does not hold, with their scores, and ``bound``
[T]: while prices only rise, no expert outside the list is worth more to the token than the bound.

Shortest augmenting paths (:func:`ssp`). Each token t has a candidate list ``cand[t, :ncand[t]]`` (its held
and listed experts; more in later rounds). ``slot[t, e]`` is 0 for a non-candidate, -1 for a candidate t does
not hold, and p > 0 when t holds e (t sits at ``mem[e, p - 1]``). Every token holds a top-k of its candidates
under ``s - q`` (dual feasibility), so moving token t from expert a to candidate b has reduced cost
``(s[t,a]-q_a) - (s[t,b]-q_b) >= 0``. The compressed graph has the E experts and a sink S: arc a->b weighs
``raw[a,b] - q_a + q_b`` with ``raw[a,b] = min over tokens t in a with candidate b not held of s[t,a]-s[t,b]``
(argmin ``arg[a,b]``); arc e->S (room left) weighs ``-q_e`` (0: experts with room have price 0); arc S->e
(e sends one unit less to S) weighs ``q_e``. A priced expert sends its full capacity to S, so its room is a
deficit; an over-full expert has an excess. Dijkstra from every excess node to the nearest deficit node (or, when
excess nodes outnumber deficits, backwards from the deficits to the nearest excess node: it settles a few nodes
instead of nearly all), one unit moved along the path, prices moved by the distances (forwards: lowered by
``min(d_e, D)``; backwards: raised by ``min(d_e, D)``; normalised so that S keeps potential 0): every reduced cost
stays non-negative and the path's arcs are tight. With no excess left the assignment is feasible, every token holds
a top-k of its candidates under ``s - q`` and every expert with room has price 0: optimal for the candidate problem,
and for the full problem once the certificate finds no token preferring a non-candidate.
"""

from __future__ import annotations

import importlib.util

import numpy as np

__all__ = ["kernels", "HAVE_NUMBA", "OK", "NO_PATH", "BUDGET", "NEED_ROOM", "ROUNDS", "STOPPED"]

HAVE_NUMBA = importlib.util.find_spec("numba") is not None  # imported only by kernels()
OK, NO_PATH, BUDGET, NEED_ROOM, ROUNDS, STOPPED = 0, 1, 2, 3, 4, 5
# prepare's answers: nothing over-full (held and lists left unbuilt), built, stopped by the flag
NOT_BUILT, BUILT = 0, 1


def _select(a, n, kth):
    """The kth smallest (0-based) of ``a[:n]``, reordering ``a`` in place (quickselect, median of three)."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        x, y, z = a[lo], a[mid], a[hi]
        if x > y:
            x, y = y, x
        if y > z:
            y = z
            if x > y:
                y = x
        pivot = y
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                tmp = a[i]
                a[i] = a[j]
                a[j] = tmp
                i += 1
                j -= 1
        if kth <= j:
            hi = j
        elif kth >= i:
            lo = i
        else:
            return a[kth]
    return a[kth]


def _kth_smallest_small(a, n, r, buf):
    """The r-th smallest (1-based, r <= n) of ``a[:n]`` with ``buf`` (>= r long) as an ascending insertion
    buffer: for the auction's late steps, which evict only a few tokens."""
    nb = 0
    for i in range(n):
        v = a[i]
        if nb < r:
            j = nb
            nb += 1
        elif v < buf[r - 1]:
            j = r - 1
        else:
            continue
        while j > 0 and buf[j - 1] > v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    return buf[r - 1]


def _push_desc(buf, bi, nb, K, v, e):
    """Offer value v (index e) to the K largest seen so far, ``buf[:nb]`` descending with their indices in
    ``bi``; returns the new count."""
    if nb < K:
        j = nb
        nb += 1
    elif v > buf[K - 1]:
        j = K - 1
    else:
        return nb
    while j > 0 and buf[j - 1] < v:
        buf[j] = buf[j - 1]
        bi[j] = bi[j - 1]
        j -= 1
    buf[j] = v
    bi[j] = e
    return nb


def _top_values(vals, E, K, buf, bi, ids):
    """The K largest of ``vals[:E]`` into ``buf`` (descending) and their indices into ``bi``; returns how
    many (min(K, E)). A threshold from every 4th value (the r-th largest of them, r chosen so that about
    1.5K of the row pass: fewer cost less in the insertion, the rare row where fewer than K pass costs a whole
    row) filters the row without branches, and only the survivors go through the sorted insertion, which is
    what costs (``ids``: [E] scratch). Rows where fewer than K pass are inserted whole."""
    n = E
    if E >= 4 * K:
        S = (E + 3) // 4
        r = min(S, 3 * K * S // (2 * E) + 2)
        nb = 0
        for i in range(S):  # the r largest of the sample, descending (inline: 0.14 ms a pass faster than _push_desc)
            v = vals[4 * i]
            if nb < r:
                j = nb
                nb += 1
            elif v > buf[r - 1]:
                j = r - 1
            else:
                continue
            while j > 0 and buf[j - 1] < v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
        tau = buf[r - 1]
        c = 0
        for e in range(E):
            ids[c] = e
            c += vals[e] >= tau
        if c >= K:
            n = c
        else:
            for e in range(E):
                ids[e] = e
    else:
        for e in range(E):
            ids[e] = e
    nb = 0
    for i in range(n):
        e = ids[i]
        nb = _push_desc(buf, bi, nb, K, vals[e], e)
    return nb


def _top_row(s, q, k, M, t, sel, held, lst, lstv, nl, bound, buf, bi, vals, ids):
    """Row t from scratch: ``sel[t]`` = a top-k of ``s[t] - q`` (``held[t]`` set; the caller clears the old
    one), the next M experts listed with their scores, and the (k+M+1)-th value as the bound."""
    E = s.shape[1]
    K = k + M + 1
    for e in range(E):
        vals[e] = s[t, e] - q[e]
    nb = _top_values(vals, E, K, buf, bi, ids)
    for j in range(k):
        sel[t, j] = bi[j]
        held[t, bi[j]] = True
    m = min(nb, K - 1) - k
    for j in range(m):
        e = bi[k + j]
        lst[t, j] = e
        lstv[t, j] = s[t, e]
    nl[t] = m
    bound[t] = buf[K - 1] if nb == K else -np.inf


def prepare(scores, q, k, M, cap, lift, steps, s, sel, held, lst, lstv, nl, bound, stop):
    """Passes over ``scores`` [T, E], in place on ``q``; returns BUILT, NOT_BUILT or STOPPED.

    ``stop`` [1] (:func:`prepare`, :func:`relist`, :func:`auction` and :func:`ssp` take it): a flag another
    thread sets (a deadline, Ctrl-C); these kernels read it once per row, step or path and return at once when
    it is non-zero, their outputs then unfinished.

    With ``lift`` (a stride >= 1), first ``steps`` Jacobi steps on the prices, from every ``lift``-th token:
    in each, every over-full expert's price rises at once by the (c+1)-th largest margin of its sampled
    tokens (margin: a token's value for e under ``s - q`` minus its (k+1)-th value; c its capacity scaled
    to the sample), which is what the auction's first step for e alone would do. From zero prices one step
    stays below the optimal prices in practice (raising the others' prices only raises e's margins; on 30 random
    instances the full step never rose above the prices ``fast`` ends with), and it about halves the auction's work:
    the hot experts' prices move in bulk instead of token by token; a second step takes another 40% off (a third
    overshoots some optimal prices, and the paths then cost more than it saves). A sample of about 64 token slots
    per expert does as well as all of them. Correctness does not depend on the steps: the shortest paths repair any
    deficit or overshoot they leave. With ``lift`` = 1 every token is used, and when no expert is over-full the
    function returns NOT_BUILT at once: ``sel`` is then a top-k of every row of ``s - q`` and ``held`` and the lists
    are not built (:func:`relist`).

    Then the main pass: ``s`` = scores minus each row's maximum, ``sel[t]`` = a top-k of ``s[t] - q``
    (``held[t]`` its membership), ``lst[t, :nl[t]]`` = the next M experts (never a held one) with their
    scores ``lstv``, ``bound[t]`` = the (k+M+1)-th value of the row (-inf when it has no more): while prices
    only rise, no expert outside the list is worth more to t than that."""
    T, E = scores.shape
    K = k + M + 1
    buf = np.empty(K)
    bi = np.empty(K, dtype=np.int64)
    vals = np.empty(E)
    ids = np.empty(E, dtype=np.int64)
    shifted = False
    if lift >= 1:
        stride = lift
        ns = (T + stride - 1) // stride
        ssel = sel[:ns]
        marg = np.empty((ns, k))
        mxs = np.empty(ns)
        for i in range(ns):
            t = i * stride
            mx = scores[t, 0]
            for e in range(1, E):
                if scores[t, e] > mx:
                    mx = scores[t, e]
            mxs[i] = mx
            if stride == 1:
                for e in range(E):
                    s[t, e] = scores[t, e] - mx
        shifted = stride == 1
        start = np.empty(E + 1, dtype=np.int64)
        cs = np.empty(E, dtype=np.int64)
        col = np.empty(ns * k)
        for e in range(E):
            cs[e] = cap[e] if stride == 1 else (cap[e] * ns) // T
        for _step in range(max(1, steps)):
            for i in range(ns):
                if stop[0] != 0:
                    return STOPPED
                t = i * stride
                mx = mxs[i]
                for e in range(E):
                    vals[e] = (scores[t, e] - mx) - q[e]
                _top_values(vals, E, k + 1, buf, bi, ids)  # the k+1 largest, descending
                for j in range(k):
                    ssel[i, j] = bi[j]
                    marg[i, j] = buf[j] - buf[k]
            for e in range(E + 1):
                start[e] = 0
            for i in range(ns):
                for j in range(k):
                    start[ssel[i, j] + 1] += 1
            over = False
            for e in range(E):
                if start[e + 1] > cs[e]:
                    over = True
                start[e + 1] += start[e]
            if not over:
                if stride == 1:
                    return NOT_BUILT  # no expert is over-full: ``sel`` is the top-k; held and lists are left unbuilt
                break
            fill = start[:E].copy()
            for i in range(ns):
                for j in range(k):
                    e = ssel[i, j]
                    col[fill[e]] = marg[i, j]
                    fill[e] += 1
            for e in range(E):
                L = start[e + 1] - start[e]
                if L > cs[e]:
                    d = _select(col[start[e] : start[e + 1]], L, L - cs[e] - 1)
                    if d > 0.0:
                        q[e] += d
    if not shifted:
        for t in range(T):
            if stop[0] != 0:
                return STOPPED
            mx = scores[t, 0]
            for e in range(1, E):
                if scores[t, e] > mx:
                    mx = scores[t, e]
            for e in range(E):
                s[t, e] = scores[t, e] - mx
    relist(s, q, k, M, sel, held, lst, lstv, nl, bound, stop)
    return STOPPED if stop[0] != 0 else BUILT


def relist(s, q, k, M, sel, held, lst, lstv, nl, bound, stop):
    """:func:`prepare`'s second pass: every row's top-k, list and bound under ``q``."""
    T, E = s.shape
    buf = np.empty(k + M + 1)
    bi = np.empty(k + M + 1, dtype=np.int64)
    vals = np.empty(E)
    ids = np.empty(E, dtype=np.int64)
    for t in range(T):
        if stop[0] != 0:
            return
        _top_row(s, q, k, M, t, sel, held, lst, lstv, nl, bound, buf, bi, vals, ids)


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


def candidates_from_lists(sel, lst, nl, cand, ncand):
    """``cand[t]`` = t's held experts, then its list (experts it does not hold)."""
    T, k = sel.shape
    for t in range(T):
        for j in range(k):
            cand[t, j] = sel[t, j]
        n = min(nl[t], cand.shape[1] - k)
        for j in range(n):
            cand[t, k + j] = lst[t, j]
        ncand[t] = k + n


def top_k_of_candidates(s, cand, ncand, k, q, sel):
    """``sel[t]`` = a top-k of t's candidates under ``s - q`` (ties: the earlier candidate)."""
    T = s.shape[0]
    M = cand.shape[1]
    row = np.empty(M)
    for t in range(T):
        n = ncand[t]
        for j in range(n):
            row[j] = s[t, cand[t, j]] - q[cand[t, j]]
        # k passes of selection: k is small next to the candidate count
        for i in range(k):
            b = -1
            bv = -np.inf
            for j in range(n):
                if row[j] > bv:
                    bv = row[j]
                    b = j
            if b < 0:  # fewer finite candidates than k cannot happen (ncand >= k)
                b = i
            sel[t, i] = cand[t, b]
            row[b] = -np.inf


def violations(s, sel, q, tol, out):
    """Tokens whose held experts are not a top-k of the FULL row of ``s - q`` (beyond ``tol``): written to
    ``out``; returns their count. This is the certificate: none means the candidate optimum is optimal."""
    T, E = s.shape
    k = sel.shape[1]
    n = 0
    held = np.zeros(E, dtype=np.bool_)
    for t in range(T):
        lo = np.inf
        for j in range(k):
            e = sel[t, j]
            held[e] = True
            v = s[t, e] - q[e]
            if v < lo:
                lo = v
        lim = lo + tol
        for e in range(E):
            if not held[e] and s[t, e] - q[e] > lim:
                out[n] = t
                n += 1
                break
        for j in range(k):
            held[sel[t, j]] = False
    return n


def add_best(s, q, cand, ncand, allowed, nadd, rows):
    """Append to each token t in ``rows`` its ``nadd`` best experts of ``s[t] - q`` among ``allowed`` [E] that
    are not yet its candidates (fewer when there are fewer or ``cand`` has no free column left)."""
    E = s.shape[1]
    inlist = np.zeros(E, dtype=np.bool_)
    for r in range(rows.shape[0]):
        t = rows[r]
        n0 = ncand[t]
        for j in range(n0):
            inlist[cand[t, j]] = True
        for _a in range(nadd):
            if ncand[t] >= cand.shape[1]:
                break
            b = -1
            bv = -np.inf
            for e in range(E):
                if allowed[e] and not inlist[e]:
                    v = s[t, e] - q[e]
                    if b < 0 or v > bv:
                        bv = v
                        b = e
            if b < 0:
                break
            inlist[b] = True
            cand[t, ncand[t]] = b
            ncand[t] += 1
        for j in range(ncand[t]):
            inlist[cand[t, j]] = False


def loads_of(sel, E):
    """``[E]`` tokens per expert of ``sel`` [T, k]."""
    out = np.zeros(E, dtype=np.int64)
    for t in range(sel.shape[0]):
        for j in range(sel.shape[1]):
            out[sel[t, j]] += 1
    return out


ADD_PER_ROUND = 2  # experts a token that fails the certificate gains as candidates per round
CONNECT = 64  # tokens that gain an unreachable expert as a candidate when no path is left
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


def ssp(s, cand, ncand, sel, cap, q, max_augment, reach, tol, max_rounds, out, direction, stop, nbest):
    """Successive shortest paths from ``sel`` [T, k], a top-k of each token's candidates under ``s - q``.

    Args:
      s: ``[T, E]`` float64 scores.
      cand, ncand: ``[T, M]`` candidate experts and ``[T]`` their counts (held experts are candidates).
      sel: ``[T, k]`` int64; overwritten with the candidate problem's optimal assignment on success.
      cap: ``[E]`` int64 capacities, already clipped to T.
      q: ``[E]`` float64 prices >= 0, updated in place to the optimal prices.
      max_augment: stop (status BUDGET) after this many augmentations.

      reach: ``[E + 1]`` bool, written on status NO_PATH: the nodes the excess could reach (no deficit among
        them: the candidate problem has no feasible routing until some token in them gets a candidate outside).
      tol: the certificate's tolerance on reduced scores.
      max_rounds: certificate rounds before status ROUNDS.
      out: ``[R]`` int64; ``out[r]`` = tokens that failed certificate round r.
      direction: which way Dijkstra searches: -1 backwards from the deficits when excess nodes outnumber them,
        else forwards from the excess (the default); 0 always forwards; 1 backwards whenever (tests).
      stop: ``[1]`` flag, read before every path and certificate round: non-zero returns STOPPED at once
        (``sel`` and ``q`` are then left as they were, unfinished).
      nbest: tokens kept per arc list (0: T k / (512 E) clipped to [NBEST_MIN, NBEST_MAX]). Where many tokens
        tie, a short list empties after a few moves and its refill rescans every token of its expert: more
        kept tokens make the refills rarer.

    Once no excess is left, the certificate runs on the full problem, in place: a token that prefers an
    expert outside its candidates gets it as a candidate (with its arcs: the graph is patched, not rebuilt)
    and takes the top-k of its candidates, which moves excess; the paths resume. Status OK means certified:
    every token holds a top-k of its full row of ``s - q`` (within ``tol``), loads are within capacity and
    every expert with room is unpriced. NEED_ROOM: a token has no free candidate column (``cand`` must be
    widened); ROUNDS: ``max_rounds`` rounds found violations.

    Returns ``(status, augmentations, dijkstra_pops, certificate rounds)``.
    """
    T, E = s.shape
    k = sel.shape[1]
    slot = np.zeros((T, E), dtype=np.int32)
    mem = np.empty((E, T), dtype=np.int32)
    load = np.zeros(E, dtype=np.int64)
    for t in range(T):
        for j in range(ncand[t]):
            slot[t, cand[t, j]] = -1
        for j in range(k):
            a = sel[t, j]
            mem[a, load[a]] = t
            load[a] += 1
            slot[t, a] = load[a]
    nb = nbest if nbest > 0 else min(NBEST_MAX, max(NBEST_MIN, (T * k) // (E * 512)))
    rawk = np.empty((nb, E, E))  # [i, a, b]: the i-th smallest, contiguous over b for Dijkstra
    for a in range(E):
        for b in range(E):
            rawk[0, a, b] = np.inf  # invariant: an arc without tokens weighs +inf
    argk = np.empty((nb, E, E), dtype=np.int64)
    cnt = np.zeros((E, E), dtype=np.int64)
    exh = np.ones((E, E), dtype=np.bool_)  # every list starts exhaustive (empty, nothing seen yet)
    nh = np.empty(cand.shape[1], dtype=np.int64)
    nhv = np.empty(cand.shape[1])
    for t in range(T):
        m = 0
        for i in range(ncand[t]):
            b = cand[t, i]
            if slot[t, b] < 0:
                nh[m] = b
                nhv[m] = s[t, b]
                m += 1
        if m == 0:
            continue
        for j in range(k):
            a = sel[t, j]
            sa = s[t, a]
            for i in range(m):
                b = nh[i]
                w = sa - nhv[i]
                # _insert written out (half the time here): no list has lost an entry yet, so a list that
                # is not full is exhaustive, and one that rejects or drops a value no longer is
                c = cnt[a, b]
                if c < nb or w < rawk[nb - 1, a, b]:
                    if c == nb:
                        c = nb - 1
                        exh[a, b] = False
                    h = c
                    while h > 0 and rawk[h - 1, a, b] > w:
                        rawk[h, a, b] = rawk[h - 1, a, b]
                        argk[h, a, b] = argk[h - 1, a, b]
                        h -= 1
                    rawk[h, a, b] = w
                    argk[h, a, b] = t
                    cnt[a, b] = c + 1
                else:
                    exh[a, b] = False
    g = np.empty(E, dtype=np.int64)
    excess = np.empty(E + 1, dtype=np.int64)
    total = 0
    for e in range(E):
        g[e] = cap[e] if q[e] > 0 else min(load[e], cap[e])
        excess[e] = load[e] - g[e]
        total += g[e]
    excess[E] = total - T * k
    dist = np.empty(E + 1)
    key = np.empty(E + 1)
    worst = np.empty(T)
    gbuf = np.empty(CONNECT)
    gtok = np.empty(CONNECT, dtype=np.int64)
    pred = np.empty(E + 1, dtype=np.int64)
    done = np.zeros(E + 1, dtype=np.bool_)
    mark = np.zeros(E, dtype=np.bool_)
    ys = np.empty(E, dtype=np.int64)
    path_tok = np.empty(E + 1, dtype=np.int64)
    path_u = np.empty(E + 1, dtype=np.int64)
    path_v = np.empty(E + 1, dtype=np.int64)
    aug = 0
    pops = 0
    rounds = 0
    while True:
        any_excess = False
        for v in range(E + 1):
            if excess[v] > 0:
                any_excess = True
                break
        status = -1
        if stop[0] != 0:
            return STOPPED, aug, pops, rounds
        if any_excess and aug >= max_augment:
            status = BUDGET
        elif not any_excess:
            # the certificate on the full problem: every token's experts a top-k of its FULL row of s - q
            nv = 0
            lacked = False
            for t in range(T):
                lo = np.inf
                for i in range(ncand[t]):
                    e = cand[t, i]
                    if slot[t, e] > 0:
                        v = s[t, e] - q[e]
                        if v < lo:
                            lo = v
                lim = lo + tol
                bad = False
                for e in range(E):
                    if slot[t, e] <= 0 and s[t, e] - q[e] > lim:
                        bad = True
                        break
                if not bad:
                    continue
                nv += 1
                # its best experts outside the candidates become candidates, with their arcs (patched in)
                for _ in range(ADD_PER_ROUND):
                    b = -1
                    bv = lim
                    for e in range(E):
                        if slot[t, e] == 0:
                            v = s[t, e] - q[e]
                            if v > bv:
                                bv = v
                                b = e
                    if b < 0:
                        break
                    if ncand[t] >= cand.shape[1]:
                        lacked = True
                        break
                    _add_candidate(s, cand, ncand, slot, rawk, argk, cnt, exh, t, b)
                # t takes the top-k of its candidates: swap its worst held for its best other while it gains
                for _ in range(k):
                    a = -1
                    av = np.inf
                    b = -1
                    bv = -np.inf
                    for i in range(ncand[t]):
                        e = cand[t, i]
                        v = s[t, e] - q[e]
                        if slot[t, e] > 0:
                            if v < av:
                                av = v
                                a = e
                        elif v > bv:
                            bv = v
                            b = e
                    if b < 0 or bv <= av:
                        break
                    _move(s, cand, ncand, mem, load, slot, rawk, argk, cnt, exh, mark, ys, t, a, b)
                    excess[a] -= 1
                    excess[b] += 1
            if out.shape[0] > rounds:
                out[rounds] = nv
            rounds += 1
            if nv == 0:
                status = OK
            elif lacked:
                status = NEED_ROOM
            elif rounds >= max_rounds:
                status = ROUNDS
        if status >= 0:
            for t in range(T):  # write the state back: a top-k per token (feasible when no excess is left)
                j = 0
                for i in range(ncand[t]):
                    e = cand[t, i]
                    if slot[t, e] > 0:
                        sel[t, j] = e
                        j += 1
            return status, aug, pops, rounds
        if not any_excess:
            continue
        nsrc = 0
        ndef = 0
        for v in range(E + 1):
            if excess[v] > 0:
                nsrc += 1
            elif excess[v] < 0:
                ndef += 1
        if (direction < 0 and nsrc > ndef) or direction > 0:
            # more excess nodes than deficits (the usual case: many experts a few over, one sink): Dijkstra
            # backwards from the deficits over the reversed arcs stops at the first excess node, after a few
            # pops instead of nearly all. dist[v]: the shortest path from v to a deficit.
            for v in range(E + 1):
                dist[v] = 0.0 if excess[v] < 0 else np.inf
                key[v] = dist[v]
                pred[v] = -1  # here: the next node on v's path
            source = -1
            while True:
                u = _pop_min(key)
                if u < 0:
                    break
                key[u] = np.inf
                pops += 1
                if excess[u] > 0:
                    source = u
                    break
                du = dist[u]
                if u < E:
                    qu = q[u]
                    for f in range(E):  # arcs f -> u
                        w = rawk[0, f, u] - q[f] + qu
                        nd = du + max(w, 0.0)
                        better = nd < dist[f]
                        dist[f] = nd if better else dist[f]
                        key[f] = nd if better else key[f]
                        pred[f] = u if better else pred[f]
                    if g[u] > 0:  # S -> u
                        nd = du + (qu if qu > 0.0 else 0.0)
                        if nd < dist[E]:
                            dist[E] = nd
                            key[E] = nd
                            pred[E] = u
                else:
                    for f in range(E):  # f -> S for the experts with room
                        if g[f] < cap[f]:
                            nd = du + (-q[f] if q[f] < 0.0 else 0.0)
                            if nd < dist[f]:
                                dist[f] = nd
                                key[f] = nd
                                pred[f] = E
            if source >= 0:
                # potentials from the distances to the deficits: prices rise by min(dist, D) (the sink's
                # normalised to 0), which keeps every reduced cost >= 0 and makes the path's arcs tight
                D = dist[source]
                dS = min(dist[E], D)
                for e in range(E):
                    qe = q[e] + min(dist[e], D) - dS
                    q[e] = qe if qe > 0.0 else 0.0
                n = 0
                u = source
                while pred[u] >= 0:
                    v = pred[u]
                    path_u[n] = u
                    path_v[n] = v
                    path_tok[n] = argk[0, u, v] if (u < E and v < E) else -1
                    n += 1
                    u = v
                _apply_path(
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
                    u,
                )
                aug += 1
                continue
            # no excess node reaches a deficit: the forward search below finds what the excess reaches
        for v in range(E + 1):
            dist[v] = 0.0 if excess[v] > 0 else np.inf
            key[v] = dist[v]  # dist of the nodes not yet settled, inf once settled
            pred[v] = -1
            done[v] = False
        target = -1
        while True:
            u = _pop_min(key)
            if u < 0:
                break
            done[u] = True
            key[u] = np.inf
            pops += 1
            if excess[u] < 0:
                target = u
                break
            du = dist[u]
            # weights are clipped at 0, so a settled node (dist <= du) is never improved: no check needed
            if u < E:
                qu = q[u]
                for f in range(E):  # branch-free, so that it vectorises
                    w = rawk[0, u, f] - qu + q[f]  # +inf for an arc without tokens
                    nd = du + max(w, 0.0)
                    better = nd < dist[f]
                    dist[f] = nd if better else dist[f]
                    key[f] = nd if better else key[f]
                    pred[f] = u if better else pred[f]
                if g[u] < cap[u]:
                    nd = du + (-qu if qu < 0.0 else 0.0)
                    if nd < dist[E]:
                        dist[E] = nd
                        key[E] = nd
                        pred[E] = u
            else:
                for f in range(E):
                    if g[f] > 0:
                        nd = du + q[f]
                        if nd < dist[f]:
                            dist[f] = nd
                            key[f] = nd
                            pred[f] = E
        if target < 0:
            # no deficit reachable: connect every unreached expert to the tokens that value it most (their
            # best gain over their worst held expert), patching the graph; give up only if none can take it
            added = 0
            for t in range(T):
                lo = np.inf
                for i in range(ncand[t]):
                    e = cand[t, i]
                    if slot[t, e] > 0:
                        lo = min(lo, s[t, e] - q[e])
                worst[t] = lo
            for b in range(E):
                if done[b]:
                    continue
                nbst = 0
                for t in range(T):
                    if slot[t, b] != 0 or ncand[t] >= cand.shape[1]:
                        continue
                    nbst = _push_desc(gbuf, gtok, nbst, CONNECT, (s[t, b] - q[b]) - worst[t], t)
                for j in range(nbst):
                    _add_candidate(s, cand, ncand, slot, rawk, argk, cnt, exh, gtok[j], b)
                    added += 1
            if added == 0:
                for v in range(E + 1):
                    reach[v] = done[v]
                return NO_PATH, aug, pops, rounds
            continue
        D = dist[target]
        dS = min(dist[E], D)
        for e in range(E):
            qe = q[e] - min(dist[e], D) + dS
            q[e] = qe if qe > 0.0 else 0.0
        # collect the path first (the tokens its arcs chose), then apply it
        n = 0
        v = target
        while pred[v] >= 0:
            u = pred[v]
            path_u[n] = u
            path_v[n] = v
            path_tok[n] = argk[0, u, v] if (u < E and v < E) else -1
            n += 1
            v = u
        _apply_path(
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
            v,
            target,
        )
        aug += 1


_PY = {
    "ssp": ssp,
    "prepare": prepare,
    "relist": relist,
    "auction": auction,
    "candidates": candidates_from_lists,
    "top_k": top_k_of_candidates,
    "violations": violations,
    "add_best": add_best,
    "loads": loads_of,
}
_COMPILED: dict | None = None


def kernels(use_numba: bool = True) -> dict:
    """``{"ssp", "prepare", "relist", "auction", "candidates", "top_k", "violations", "add_best", "loads"}``:
    compiled by numba (cached on disk) when it is installed and ``use_numba``, else the plain Python
    functions."""
    global _COMPILED
    if not (use_numba and HAVE_NUMBA):
        return _PY
    if _COMPILED is None:
        import types

        import numba

        ns = dict(globals())  # the compiled functions call compiled helpers: rebind them in a namespace

        def comp(f, **opts):
            return numba.njit(cache=True, nogil=True, **opts)(
                types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
            )

        # helpers are inlined into their callers: a call that passes arrays costs two atomic reference
        # counts per array, which dominated the auction's and the paths' inner loops
        for name in ("_select", "_rebuild", "_recompute", "_delete", "_move", "relist", "_apply_path"):
            ns[name] = comp(globals()[name])
        for name in (
            "_push_desc",
            "_kth_smallest_small",
            "_top_values",
            "_top_row",
            "_best_alt",
            "_insert",
            "_pop_min",
            "_add_candidate",
        ):
            ns[name] = comp(globals()[name], inline="always")
        _COMPILED = {key: comp(f) for key, f in _PY.items()}
    return _COMPILED
