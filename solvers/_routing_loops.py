"""CPU loops of the price-based routing in training (:mod:`~.routing_prices`), compiled by numba (cached on
disk): the capacity-respecting assignment of :func:`~.routing_prices.capacity_topk`, the tie-broken scores
of :func:`~.routing_prices.tie_break` with their finiteness check, and the token step of the price sweeps.

On a CPU batch of a tiny model (512 tokens, 8 to 64 experts) the tensor versions spend their time dispatching
small operations (and the host loops of the repair); each loop here does the same work in one call. Inside a
training step the caches and branch predictors are cold, so what counts is measured there (the step-cost
benchmark), not on one array timed again and again. The sweeps' expert step stays in numpy (its partition is
faster than a compiled quickselect), and so does their token step beyond short rows and small k.

- :func:`tie_broken` gives :func:`~.routing_prices.tie_break`'s values bit for bit: the same float64
  operations in the same order.
- :func:`row_prices` gives the sweeps' token prices bit for bit: the same float64 differences, an exact order
  statistic (a branch-free insertion network, for short rows and small k); with zero prices, the rows'
  thresholds of :func:`capacity_assign`.
- :func:`group_top2_sums` and :func:`keep_groups`: DeepSeek-V3's group scores and its mask of the unchosen
  groups, the same values as the tensor expressions.
- :func:`capacity_assign` runs the same rounds as the tensor version of
  :func:`~.routing_prices.capacity_topk`:
  - the plain top-k, then over-full experts keep their ``capacity`` tokens of largest margin;
  - proposals to the best experts with room, accepted by margin;
  - augmenting paths for the tokens left short.

  Among equal margins both take the lower token first (the tensor version by a stable sort). Among a token's
  equal scores this loop takes the lower expert, the tensor version ``torch.topk``'s order. So the two answers
  are the same wherever no token has two equal scores among those compared.

Without numba the module is unused: :mod:`~.routing_prices` keeps its tensor and numpy paths.
"""

from __future__ import annotations

import importlib.util
import types

import numpy as np

HAVE_NUMBA = importlib.util.find_spec("numba") is not None

NEG_INF = -np.inf
#: the stand-in for a not-allowed (``-inf``) expert a token still has to hold (the tensor version's ``-3e38``)
NOT_ALLOWED = -3e38


def tie_broken(x, scaled, out):
    """``out [T, E]`` float64 = ``x`` plus :func:`~.routing_prices.tie_break`'s offsets (``x`` float32 or
    float64; ``scaled`` [T, E] the offsets' factors ``u * TIE_BREAK`` of :func:`~.routing_prices.tie_break`,
    which depend on the shape only); False, with ``out`` unset, when ``x`` holds NaN or inf."""
    T, E = x.shape
    lo = np.inf
    hi = -np.inf
    bad = 0.0  # NaN once any value is NaN or inf (inf * 0 is NaN): no branch in the loop
    for t in range(T):
        for e in range(E):
            v = np.float64(x[t, e])
            bad += v * 0.0
            lo = v if v < lo else lo
            hi = v if v > hi else hi
    if bad != bad:
        return False
    span = hi - lo
    if not span > 1e-300:
        span = 1e-300
    if T * E == 0:
        span = 1.0
    w = span * 2.0**-20
    for t in range(T):
        for e in range(E):
            v = np.float64(x[t, e])
            out[t, e] = v + scaled[t, e] * (abs(v) + w)
    return True


def row_prices(s, q, k, p, a):
    """``p[t]`` = the (k+1)-th largest of ``s[t] - q`` (float64) for every token t: the token step of the price
    sweeps, by a branch-free insertion network over each row (``a``: k+1 scratch values; the same exact order
    statistic as a sort)."""
    T, E = s.shape
    m = k + 1
    for t in range(T):
        for j in range(m):
            a[j] = -np.inf
        for e in range(E):
            x = s[t, e] - q[e]
            for j in range(m):
                hi = max(a[j], x)
                x = min(a[j], x)
                a[j] = hi
        p[t] = a[m - 1]


def group_top2_sums(c, G, out):
    """``out [T, G]`` = for each token and group of ``c [T, G * n]`` (n consecutive experts a group, n >= 2) the
    sum of its two largest values, larger first (DeepSeek-V3's group score: ``topk(2).sum()`` in the scores'
    dtype, the same value)."""
    T, E = c.shape
    n = E // G
    for t in range(T):
        for g in range(G):
            a = c[t, g * n]
            b = c[t, g * n + 1]
            if b > a:
                a, b = b, a
            for j in range(g * n + 2, g * n + n):
                v = c[t, j]
                if v > a:
                    b = a
                    a = v
                elif v > b:
                    b = v
            out[t, g] = a + b


def keep_groups(c, G, chosen, out):
    """``out`` = ``c [T, G * n]`` with ``-inf`` outside each token's ``chosen [T, m]`` groups."""
    T, E = c.shape
    n = E // G
    for t in range(T):
        for e in range(E):
            out[t, e] = -np.inf
        for j in range(chosen.shape[1]):
            g = chosen[t, j]
            for e in range(g * n, g * n + n):
                out[t, e] = c[t, e]


def _offer(v, i, cnt, m, tv, ids):
    """Offer value v of index i to the m largest so far (``tv[:cnt]``, largest first, their ``ids``): it enters
    when it beats the m-th (an equal one stays behind the earlier). Returns the new count."""
    if cnt < m:
        j = cnt
        cnt += 1
    elif v > tv[m - 1]:
        j = m - 1
    else:
        return cnt
    while j > 0 and tv[j - 1] < v:
        tv[j] = tv[j - 1]
        ids[j] = ids[j - 1]
        j -= 1
    tv[j] = v
    ids[j] = i
    return cnt


def _top_indices(vals, n, m, out, tv):
    """The indices of the ``m`` largest of ``vals[:n]`` into ``out[:m]``, largest first, the lower index first
    among equal values (m <= n); ``tv`` (>= m long) holds their values. One pass (:func:`_offer`)."""
    cnt = 0
    for i in range(n):
        cnt = _offer(vals[i], i, cnt, m, tv, out)


def _mark_first(vals, n, m, mark, ids, tv):
    """``mark[i]``, i < n: whether i is among the first m of ``vals[:n]`` ordered by value, largest first, the
    lower index first among equal values (a stable sort's first m), found from the smaller side: the m first,
    or the n - m last (smallest first, the higher index first among equal values); ``ids``, ``tv``: scratch."""
    if m >= n:
        for i in range(n):
            mark[i] = True
        return
    if m <= n - m:
        for i in range(n):
            mark[i] = False
        _top_indices(vals, n, m, ids, tv)
        for j in range(m):
            mark[ids[j]] = True
        return
    r = n - m
    for i in range(n):
        mark[i] = True
    cnt = 0
    for i in range(n - 1, -1, -1):  # the r smallest; walked from the top, so a higher index enters first
        cnt = _offer(-vals[i], i, cnt, r, tv, ids)
    for j in range(r):
        mark[ids[j]] = False


def _edge(held, fin, t, f, g):
    """Whether some token other than t holds f, not g, and may take g (an edge f -> g of the paths)."""
    for u in range(held.shape[0]):
        if held[u, f] and not held[u, g] and fin[u, g] and u != t:
            return True
    return False


def _path(held, fin, load, cap, t, prev, queue, out):
    """Experts ``out[:n]`` = f0, ..., g: t may take f0, a token other than t holding f_i and not f_{i+1} may take
    f_{i+1}, and g has room (breadth first, experts in index order; an edge is looked for only to an expert not
    reached yet); returns n (0: no path)."""
    E = held.shape[1]
    for f in range(E):
        prev[f] = -2
    n = 0
    for f in range(E):
        if fin[t, f] and not held[t, f]:
            prev[f] = -1
            queue[n] = f
            n += 1
    h = 0
    while h < n:
        f = queue[h]
        h += 1
        if load[f] < cap:
            m = 0
            g = f
            while g != -1:
                out[m] = g
                m += 1
                g = prev[g]
            for i in range(m // 2):
                tmp = out[i]
                out[i] = out[m - 1 - i]
                out[m - 1 - i] = tmp
            return m
        for g in range(E):
            if prev[g] == -2 and _edge(held, fin, t, f, g):
                prev[g] = f
                queue[n] = g
                n += 1
    return 0


def _apply_path(held, fin, cf, t, path, m, load, touched):
    """Along ``path[:m]``, last edge first, move for each edge f -> g the token of largest gain
    ``cf[u, g] - cf[u, f]`` (the first on ties) holding f and not g, other than t. Every edge has one (see
    :func:`~.routing_prices._apply_moves`)."""
    T = held.shape[0]
    for i in range(m - 2, -1, -1):
        f = path[i]
        g = path[i + 1]
        best = -1
        gain = NEG_INF
        for u in range(T):
            if u != t and held[u, f] and not held[u, g] and fin[u, g]:
                d = cf[u, g] - cf[u, f]
                if best < 0 or d > gain:
                    best = u
                    gain = d
        if best < 0:
            raise RuntimeError("capacity_topk: no token to move along an augmenting path")
        held[best, f] = False
        held[best, g] = True
        touched[best] = True
        load[f] -= 1
        load[g] += 1


def _repair(c, fin, held, need, k, cap, load, touched):
    """Tokens left short: an augmenting path each, else their best other experts over capacity (the tensor
    version's ``_repair_short``, in the same order of tokens and tries); ``touched`` marks every token moved."""
    T, E = held.shape
    cf = np.empty_like(c)  # in the scores' dtype: the gains are compared as the tensor version computes them
    for u in range(T):
        for e in range(E):
            cf[u, e] = c[u, e] if fin[u, e] else NEG_INF
    prev = np.empty(E, dtype=np.int64)
    queue = np.empty(E, dtype=np.int64)
    path = np.empty(E, dtype=np.int64)
    for t in range(T):
        if need[t] <= 0:
            continue
        h = 0
        for e in range(E):
            if held[t, e]:
                h += 1
        for _ in range(k - h):
            m = _path(held, fin, load, cap, t, prev, queue, path)
            if m == 0:  # no way to keep the capacity: the best other allowed expert, over capacity
                pick = -1
                for e in range(E):
                    if not held[t, e] and fin[t, e] and (pick < 0 or c[t, e] > c[t, pick]):
                        pick = e
                if pick < 0:  # none allowed: the best other expert at all
                    w = NEG_INF
                    for e in range(E):
                        if not held[t, e]:
                            v = c[t, e] if fin[t, e] else NOT_ALLOWED
                            if pick < 0 or v > w:
                                pick = e
                                w = v
                held[t, pick] = True
                load[pick] += 1
                continue
            _apply_path(held, fin, cf, t, path, m, load, touched)
            held[t, path[0]] = True
            load[path[0]] += 1


def _first_top(c, t, th, m, top, tv):
    """``top[:m]``: the m largest of row t of ``c`` (``th`` its m-th largest value), largest first, the lower
    expert first among equal values: those above th, then those equal to it in index order, sorted."""
    E = c.shape[1]
    n = 0
    for e in range(E):
        if c[t, e] > th:
            top[n] = e
            n += 1
    for e in range(E):
        if n == m:
            break
        if c[t, e] == th:
            top[n] = e
            n += 1
    for i in range(m):
        tv[i] = c[t, top[i]]
    _sort_desc(tv, top, m)  # the experts came in index order within each value


def _sort_desc(tv, ids, m):
    """Sort the pairs ``(tv[i], ids[i])``, i < m, by value, largest first, keeping the order of equal values
    (an insertion sort: m is k or k + 1)."""
    for i in range(1, m):
        v = tv[i]
        e = ids[i]
        j = i
        while j > 0 and tv[j - 1] < v:
            tv[j] = tv[j - 1]
            ids[j] = ids[j - 1]
            j -= 1
        tv[j] = v
        ids[j] = e


def capacity_assign(c, th, k, cap, rounds, out):
    """``out [T, k]`` = distinct experts per token from ``c [T, E]`` (float32 or float64, ``-inf``: not
    allowed), at most ``cap`` tokens per expert where that fits (the caller has raised ``cap`` to
    ``ceil(T * k / E)``; ``k < E``, ``cap < T``); ``th [T]``: each row's (k+1)-th largest value (found
    before, by :func:`row_prices` or numpy's partition). Returns the number of rounds of proposals run (-1: the plain
    top-k fitted)."""
    T, E = c.shape
    top = np.empty(k + 1, dtype=np.int64)
    held = np.zeros((T, E), dtype=np.bool_)
    fin = np.empty((T, E), dtype=np.bool_)
    load = np.zeros(E, dtype=np.int64)
    p = np.empty_like(c[:, 0])  # the margins in the scores' dtype, as the tensor version computes them
    row = np.empty(E)
    tv = np.empty(E)
    for t in range(T):
        for e in range(E):
            fin[t, e] = np.isfinite(c[t, e])
        _first_top(c, t, th[t], k + 1, top, tv)
        for j in range(k):
            out[t, j] = top[j]
            held[t, top[j]] = True
            load[top[j]] += 1
        p[t] = c[t, top[k]]
    most = 0
    for e in range(E):
        if load[e] > most:
            most = load[e]
    if most <= cap:
        return -1
    for t in range(T):
        if not np.isfinite(p[t]):
            p[t] = 0.0
    # over-full experts keep their `cap` tokens of largest margin
    tok = np.empty(T, dtype=np.int64)
    mar = np.empty_like(p)
    touched = np.zeros(T, dtype=np.bool_)  # tokens whose experts changed: the others keep their first top-k
    keep = np.empty(T, dtype=np.bool_)  # scratch of _mark_first
    sid = np.empty(T, dtype=np.int64)
    sv = np.empty_like(p)
    for e in range(E):
        if load[e] <= cap:
            continue
        n = 0
        for t in range(T):
            if held[t, e]:
                tok[n] = t
                mar[n] = c[t, e] - p[t] if fin[t, e] else NEG_INF
                n += 1
        _mark_first(mar, n, cap, keep, sid, sv)  # largest margin first, the lower token on ties
        for j in range(n):
            if not keep[j]:
                held[tok[j], e] = False
                touched[tok[j]] = True
        load[e] = cap
    need = np.zeros(T, dtype=np.int64)
    active = np.empty(T, dtype=np.int64)
    na = 0
    for t in range(T):
        h = 0
        for e in range(E):
            if held[t, e]:
                h += 1
        need[t] = k - h
        if need[t] > 0:
            active[na] = t
            na += 1
    room = np.empty(E, dtype=np.int64)
    for e in range(E):
        room[e] = cap - load[e]
    # proposals: per expert, the proposing tokens (in the order of `active`) and their margins
    ptok = np.empty((E, T), dtype=np.int64)
    pmar = np.empty((E, T), dtype=c.dtype)
    npr = np.zeros(E, dtype=np.int64)
    best = np.empty(E, dtype=np.int64)
    sub = np.empty(E)
    done = 0
    for _ in range(rounds):
        if na == 0:
            break
        npr[:] = 0
        anyok = False
        for i in range(na):
            t = active[i]
            for e in range(E):
                sub[e] = c[t, e] if (not held[t, e] and fin[t, e] and room[e] > 0) else NEG_INF
            m = need[t]
            if m > E:
                m = E
            _top_indices(sub, E, m, best, tv)
            for j in range(m):
                e = best[j]
                if np.isfinite(sub[e]):
                    ptok[e, npr[e]] = t
                    pmar[e, npr[e]] = c[t, e] - p[t]
                    npr[e] += 1
                    anyok = True
        if not anyok:
            break
        done += 1
        for e in range(E):
            n = npr[e]
            if n == 0:
                continue
            take = room[e] if room[e] < n else n
            _mark_first(pmar[e], n, take, keep, sid, sv)  # the largest margins, the lower token on ties
            for j in range(n):
                if keep[j]:
                    t = ptok[e, j]
                    held[t, e] = True
                    need[t] -= 1
                    load[e] += 1
            room[e] -= take
        n2 = 0
        for i in range(na):
            if need[active[i]] > 0:
                active[n2] = active[i]
                n2 += 1
        na = n2
    if na > 0:
        _repair(c, fin, held, need, k, cap, load, touched)
    # each changed token's k held experts, its best first
    for t in range(T):
        if not touched[t]:
            continue
        n = 0
        for e in range(E):
            if held[t, e]:
                row[n] = c[t, e] if fin[t, e] else NOT_ALLOWED
                top[n] = e
                n += 1
        _sort_desc(row, top, n)  # larger first, the lower expert on ties (they came in index order)
        for j in range(k):
            out[t, j] = top[j]
    return done


_LOOPS: dict | None = None


def loops() -> dict:
    """``{"capacity_assign", "tie_broken", "row_prices", "group_top2_sums", "keep_groups"}`` compiled by numba (cached on disk; the first call of each
    compiles it: seconds, once per machine and dtype), or ``{}`` without numba."""
    global _LOOPS
    if _LOOPS is None:
        if not HAVE_NUMBA:
            _LOOPS = {}
            return _LOOPS
        import numba

        ns = dict(globals())
        funcs = {n: f for n, f in ns.items() if isinstance(f, types.FunctionType) and f.__module__ == __name__}
        funcs.pop("loops")
        compiled = {}
        for name, f in funcs.items():
            g = types.FunctionType(f.__code__, ns, f.__name__, f.__defaults__, f.__closure__)
            g.__module__, g.__qualname__ = f.__module__, f.__qualname__
            # the per-element helper is inlined: a call passing arrays costs reference counts per element
            compiled[name] = numba.njit(cache=True, nogil=True, inline="always" if name == "_offer" else "never")(g)
        ns.update(compiled)
        names = ("capacity_assign", "tie_broken", "row_prices", "group_top2_sums", "keep_groups")
        _LOOPS = {name: compiled[name] for name in names}
    return _LOOPS
