"""The certificate of ``fast``: a token whose held experts are not a top-k of its full row of ``s - q`` proves
the candidate problem's optimum is not the full problem's. :func:`violations` lists them for the driver;
:func:`_certify` is the round the shortest paths run once no excess is left, repairing what it finds."""

from __future__ import annotations

import numpy as np

from ._fast_arcs import _add_candidate, _move

ADD_PER_ROUND = 2  # experts a token that fails the certificate gains as candidates per round


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


def _certify(s, q, k, tol, cand, ncand, slot, mem, load, rawk, argk, cnt, exh, mark, ys, excess):
    """One certificate round of :func:`~._fast_paths.ssp` on the full problem, in place: every token whose held
    experts are not a top-k of its FULL row of ``s - q`` (beyond ``tol``) gains its best outsiders as candidates
    (up to ADD_PER_ROUND, their arcs patched in) and takes the top-k of its candidates, which moves excess.
    Returns ``(tokens that failed, whether one had no free candidate column)``."""
    T, E = s.shape
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
    return nv, lacked
