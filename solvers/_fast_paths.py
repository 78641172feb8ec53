"""The successive shortest paths of ``fast`` (:func:`ssp`), which finish what the auction leaves.

Each token t has a candidate list ``cand[t, :ncand[t]]`` (its held
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

import numpy as np

from ._fast_arcs import NBEST_MAX, NBEST_MIN, _add_candidate, _apply_path, _pop_min
from ._fast_certificate import _certify
from ._fast_codes import BUDGET, NEED_ROOM, NO_PATH, OK, ROUNDS, STOPPED
from ._fast_select import _push_desc

CONNECT = 64  # tokens that gain an unreachable expert as a candidate when no path is left


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
            nv, lacked = _certify(s, q, k, tol, cand, ncand, slot, mem, load, rawk, argk, cnt, exh, mark, ys, excess)
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
