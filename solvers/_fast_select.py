"""Order statistics over short arrays, shared by the loops of ``fast``: a quickselect, the r-th smallest by
insertion, and the K largest of a row (a sampled threshold, then a sorted insertion)."""

from __future__ import annotations


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
