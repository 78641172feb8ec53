"""Each token's candidate experts for the shortest paths of ``fast``: built from the auction's lists, widened
by the driver between rounds, a top-k among them, and the loads of an assignment."""

from __future__ import annotations

import numpy as np


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
        for _ in range(nadd):
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
