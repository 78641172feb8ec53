"""The first pass of ``fast``: Jacobi steps on the prices from a sample of the tokens, then every token's top-k
under the prices, its list of the next experts and the bound on the rest (:func:`prepare`, :func:`relist`)."""

from __future__ import annotations

import numpy as np

from ._fast_codes import BUILT, NOT_BUILT, STOPPED
from ._fast_select import _select, _top_values


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
