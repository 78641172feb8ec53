"""CPU loops of the price-based routing in training (:mod:`~.routing_prices`), compiled by numba (cached on
disk): the capacity-respecting assignment of :func:`~.routing_prices.capacity_topk` and the tie-broken scores
of :func:`~.routing_prices.tie_break` with their finiteness check.

On a CPU batch of a tiny model (512 tokens, 8 to 64 experts) the tensor versions spend their time dispatching
small operations (and the host loops of the repair); each loop here does the same work in one call. The price
sweeps stay in numpy: its partition is faster here than a compiled quickselect.

- :func:`tie_broken` gives :func:`~.routing_prices.tie_break`'s values bit for bit: the same float64
  operations in the same order.
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


def _top_indices(vals, n, m, out, tv):
    """The indices of the ``m`` largest of ``vals[:n]`` into ``out[:m]``, largest first, the lower index first
    among equal values (m <= n); ``tv`` (>= m long) holds their values. One pass: a value enters when it beats
    the m-th so far (an equal one stays behind the earlier, lower index)."""
    cnt = 0
    for i in range(n):
        v = vals[i]
        if cnt < m:
            j = cnt
            cnt += 1
        elif v > tv[m - 1]:
            j = m - 1
        else:
            continue
        while j > 0 and tv[j - 1] < v:
            tv[j] = tv[j - 1]
            out[j] = out[j - 1]
            j -= 1
        tv[j] = v
        out[j] = i


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
    for i in range(1, m):  # insertion sort, stable: the experts came in index order within each value
        v = tv[i]
        e = top[i]
        j = i
        while j > 0 and tv[j - 1] < v:
            tv[j] = tv[j - 1]
            top[j] = top[j - 1]
            j -= 1
        tv[j] = v
        top[j] = e


def capacity_assign(c, th, k, cap, rounds, out):
    """``out [T, k]`` = distinct experts per token from ``c [T, E]`` (float32 or float64, ``-inf``: not
    allowed), at most ``cap`` tokens per expert where that fits (the caller has raised ``cap`` to
    ``ceil(T * k / E)``; ``k < E``, ``cap < T``); ``th [T]``: each row's (k+1)-th largest value (numpy's
    partition finds it faster than a scan here). Returns the number of rounds of proposals run (-1: the plain
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
    for e in range(E):
        if load[e] <= cap:
            continue
        n = 0
        for t in range(T):
            if held[t, e]:
                tok[n] = t
                mar[n] = c[t, e] - p[t] if fin[t, e] else NEG_INF
                n += 1
        order = np.argsort(-mar[:n], kind="mergesort")  # largest margin first, the lower token on ties
        for j in range(cap, n):
            held[tok[order[j]], e] = False
            touched[tok[order[j]]] = True
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
            order = np.argsort(-pmar[e, :n], kind="mergesort")
            take = room[e] if room[e] < n else n
            for j in range(take):
                t = ptok[e, order[j]]
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
                v = c[t, e] if fin[t, e] else NOT_ALLOWED
                j = n  # insertion: larger first, the lower expert on ties (experts come in index order)
                while j > 0 and row[j - 1] < v:
                    row[j] = row[j - 1]
                    top[j] = top[j - 1]
                    j -= 1
                row[j] = v
                top[j] = e
                n += 1
        for j in range(k):
            out[t, j] = top[j]
    return done


_LOOPS: dict | None = None


def loops() -> dict:
    """``{"capacity_assign", "tie_broken"}`` compiled by numba (cached on disk; the first call of each
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
            compiled[name] = numba.njit(cache=True, nogil=True)(g)
        ns.update(compiled)
        _LOOPS = {"capacity_assign": compiled["capacity_assign"], "tie_broken": compiled["tie_broken"]}
    return _LOOPS
