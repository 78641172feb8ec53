"""The one price iteration of BIP-based balancing (arXiv 2502.15451), for numpy arrays and torch tensors alike.

Block-coordinate descent on the Lagrangian dual of capacitated top-k routing, alternately

  p_t <- (k+1)-th largest of scores[t, :] - q                          (token prices)
  q_e <- max(0, (c_e+1)-th largest of scores[:, e] - p)                (expert prices, the bias)

Any ``q >= 0`` certifies the upper bound ``sum_t topk(scores[t] - q) + q . min(c, T)`` on the optimum
(:func:`dual_bound`). The iteration reaches near-optimal prices in a few sweeps but is not exact in general;
its expert step, taken once from a sample of tokens, is the first step of the exact method ``fast``
(:mod:`moebalance.solvers.routing_fast`), which then runs an auction and shortest paths. Both balancers call
this one function; with a torch tensor it runs on the tensor's device
with tensors only (a fixed number of sweeps, no host synchronisation). :func:`capacity_topk` routes a batch
with prices while keeping every expert within its capacity (what ``bip`` routes with in training).

A training step on the CPU (:func:`cpu_refit`, :func:`capacity_topk` of a CPU tensor) runs compiled loops
(:mod:`._routing_loops`) and numpy on arrays kept between batches: the same prices bit for bit, a few calls
instead of a few hundred small tensor operations. The first such call on a machine compiles the loops (about
6 s on 2 cores, cached on disk after that).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

__all__ = ["price_iteration", "dual_bound", "is_torch", "tie_break", "capacity_topk"]

#: the tie-break offset of a score s is below ``TIE_BREAK * (|s| + 2**-20 * range)``: relative to the score
#: itself (so it stays far below the gaps between small softmax scores), never zero for a zero score
TIE_BREAK = 2.0**-40


def is_torch(x: Any) -> bool:
    """True for a torch tensor (checked without importing torch)."""
    return type(x).__module__.startswith("torch")


_TIE_OFFSETS: dict = {}


def tie_break(scores: Any) -> Any:
    """``[T, E]`` float64 scores plus a deterministic offset per (token, expert), below ``2**-40`` of the score
    (plus ``2**-60`` of the batch's score range).

    Identical rows (a repeated token) and equal scores become distinct, so that a price can separate them: on
    integer scores with k=2 of E=16 and T=4096 (capacity 512), 4 sweeps of :func:`price_iteration` leave a
    largest load of 675 with the offsets and 1392 without; on 4096 identical rows, 4054 and 4096 (3170 after 32
    sweeps: coordinate sweeps separate identical rows slowly). The offset
    depends on the position ``t * E + e`` only (a multiplicative hash), the same in numpy and torch, and
    changes a choice only between scores within ``2**-40`` of each other (relatively). Torch: on the
    scores' device, no host synchronisation."""
    T, E = scores.shape
    if not is_torch(scores) or scores.device.type == "cpu":
        out = _cpu_tie_break(scores)  # one compiled pass on the host: the same values
        if out is not None:
            return out
    if is_torch(scores):
        import torch

        s = scores.detach().double()
        key = (T, E, str(s.device))
        u = _TIE_OFFSETS.get(key)
        if u is None:  # the offsets depend on the shape only: made once per shape and device (the last one kept)
            idx = torch.arange(T * E, dtype=torch.int64, device=s.device)
            u = ((idx * 2654435761) % 4294967296).double().view(T, E) / 4294967296.0
            _TIE_OFFSETS.clear()
            _TIE_OFFSETS[key] = u
        span = (s.max() - s.min()).clamp_min(1e-300) if s.numel() else s.new_ones(())
        return s + u * TIE_BREAK * (s.abs() + span * 2.0**-20)
    a = np.asarray(scores, dtype=np.float64)
    ids = np.arange(T * E, dtype=np.uint64)
    w = ((ids * np.uint64(2654435761)) % np.uint64(4294967296)).astype(np.float64).reshape(T, E) / 4294967296.0
    width = max(float(a.max() - a.min()), 1e-300) if a.size else 1.0
    return a + w * TIE_BREAK * (np.abs(a) + width * 2.0**-20)


def _cpu_tie_break(scores: Any) -> Any:
    """:func:`tie_break` of host scores by the compiled loop (a torch tensor answered as one, on the CPU), or
    None (no numba, or NaN / inf in the scores: the vectorised code then gives its NaN as before)."""
    run = _loops().get("tie_broken")
    if run is None:
        return None
    if is_torch(scores):
        import torch

        x = scores.detach()
        if x.dtype not in (torch.float32, torch.float64):
            x = x.double()
        a = np.ascontiguousarray(x.numpy())
    else:
        a = np.asarray(scores)
        a = np.ascontiguousarray(a if a.dtype in (np.float32, np.float64) else a.astype(np.float64))
    out = np.empty(a.shape, dtype=np.float64)
    if not run(a, _scaled_offsets(*a.shape), out):
        return None
    return torch.from_numpy(out) if is_torch(scores) else out


_SCALED_OFFSETS: dict = {}


def _scaled_offsets(T: int, E: int) -> np.ndarray:
    """``u * TIE_BREAK`` of :func:`tie_break` for a ``[T, E]`` batch (``u`` the multiplicative hash of
    ``t * E + e`` in [0, 1)): made once per shape (the last one kept), for the compiled loop."""
    got = _SCALED_OFFSETS.get((T, E))
    if got is None:
        ids = np.arange(T * E, dtype=np.uint64)
        u = ((ids * np.uint64(2654435761)) % np.uint64(4294967296)).astype(np.float64).reshape(T, E) / 4294967296.0
        got = u * TIE_BREAK
        _SCALED_OFFSETS.clear()
        _SCALED_OFFSETS[(T, E)] = got
    return got


def _row_kth_largest(m: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """``out[i]`` = the (kth[i]+1)-th largest of ``m[i, :]`` (kth 0-based; -inf where kth >= the row length).

    Partitions rows of a contiguous array in ascending order (no negated copy), reordering ``m`` in place."""
    n = m.shape[1]
    out = np.full(m.shape[0], -np.inf)
    for c in np.unique(kth):
        if c < n:
            rows = kth == c
            if rows.all():  # the common case (one capacity): partition m itself, in place
                m.partition(n - 1 - int(c), axis=1)
                out[:] = m[:, n - 1 - int(c)]
            else:
                out[rows] = np.partition(m[rows], n - 1 - int(c), axis=1)[:, n - 1 - int(c)]
    return out


def price_iteration(
    scores: Any,
    k: int,
    capacity: Any,
    iterations: int,
    q: Any = None,
    *,
    deadline: float | None = None,
    stop_when_fixed: bool = True,
) -> tuple[Any, int]:
    """Run ``iterations`` (p, q) sweeps from ``q`` (zeros when None); returns ``(q [E], sweeps done)``.

    Args:
      scores: ``[T, E]`` numpy array or torch tensor (the torch path computes in the tensor's float dtype,
        float32 for half inputs, on its device).
      k: experts per token.
      capacity: an int or ``[E]`` host integers (numpy or a list: never a device tensor, so torch needs no sync).
      iterations: the number of sweeps (numpy stops earlier on a fixed point or at ``deadline``; torch always
        runs all of them).
      q: ``[E]`` starting prices (a warm start, e.g. the previous batch's), same library as ``scores``.
    """
    T, E = scores.shape
    cap = np.minimum(np.broadcast_to(np.asarray(capacity, dtype=np.int64), (E,)), T)
    if is_torch(scores):
        import torch

        s = scores.detach()
        s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
        q = torch.zeros(E, dtype=s.dtype, device=s.device) if q is None else q.to(s.dtype)
        if k >= E or T == 0:
            return q * 0, 0
        free = cap >= T  # no price needed: the expert can take every token
        if free.all():
            return q * 0, iterations
        uniform = bool(np.all(cap == cap[0]))  # the balancer's case: no host-to-device copy at all
        cmax = int(cap[~free].max())
        if s.device.type == "cpu":  # the same sweeps on the host (exact selection: the same values)
            return torch.from_numpy(_cpu_sweeps(s.numpy(), k, cap, free, iterations, q.numpy())), iterations
        if not uniform:
            idx = torch.as_tensor(np.where(free, 0, cap), device=s.device)
            mask = torch.as_tensor(free, device=s.device)
        for _ in range(iterations):
            p = torch.topk(s - q, k + 1, dim=1).values[:, k]
            col = torch.topk(s - p[:, None], cmax + 1, dim=0).values  # [cmax+1, E]
            if uniform:
                q = col[cmax].clamp_min(0.0)
            else:
                q = torch.where(mask, 0.0, col.gather(0, idx[None, :])[0]).clamp_min(0.0)
        return q, iterations
    s = np.asarray(scores, dtype=np.float64)
    q = np.zeros(E) if q is None else np.asarray(q, dtype=np.float64).copy()
    if k >= E or T == 0:
        return np.zeros(E), 0
    done = 0
    sT = np.ascontiguousarray(s.T)  # [E, T]: the column step partitions rows of it
    smax = float(np.abs(s).max(initial=0.0))
    buf = np.empty_like(s)
    bufT = np.empty_like(sT)
    for _ in range(iterations):
        np.subtract(s, q, out=buf)
        buf.partition(E - 1 - k, axis=1)  # in place: no [T, E] copy per sweep
        p = buf[:, E - 1 - k].copy()  # (k+1)-th largest per token
        np.subtract(sT, p[None, :], out=bufT)
        q_new = np.maximum(_row_kth_largest(bufT, cap), 0.0)
        done += 1
        # a fixed point up to rounding (relative to the scores' magnitude), the same at every scale
        fixed = bool(np.abs(q_new - q).max(initial=0.0) <= 8 * np.finfo(np.float64).eps * smax)
        q = q_new
        if (stop_when_fixed and fixed) or (deadline is not None and time.perf_counter() > deadline):
            break
    return q, done


def has_compiled_loops() -> bool:
    """Whether the compiled CPU loops (:mod:`._routing_loops`) are there (numba installed)."""
    return bool(_loops())


def _loops() -> dict:
    """The compiled CPU loops (:func:`._routing_loops.loops`), or ``{}`` without numba (the tensor and numpy
    versions then run)."""
    from ._routing_loops import loops

    return loops()


def _cpu_sweeps(
    s: np.ndarray, k: int, cap: np.ndarray, free: np.ndarray, iterations: int, q: np.ndarray, ws: Any = None
) -> np.ndarray:
    """The torch path's ``iterations`` sweeps on a CPU tensor's array ``s [T, E]`` (its dtype kept), with
    in-place partitions instead of ``torch.topk`` (several times faster on small batches); returns the new q.
    ``ws``: a :class:`SweepSpace` of the same shape and dtype to work in (a training loop reuses one).

    Each selected value is an exact order statistic of the same differences, so q is bit for bit the torch
    loop's."""
    T, E = s.shape
    w = ws if ws is not None else SweepSpace(T, E, s.dtype)
    q = q.astype(s.dtype, copy=True)
    np.copyto(w.sT, s.T)
    buf, bufT, p = w.buf, w.bufT, w.p
    zero = s.dtype.type(0)
    kth = np.where(free, T, cap)  # T for the free experts: -inf, price 0 below
    one = int(kth[0]) if bool(np.all(kth == kth[0])) and kth[0] < T else -1  # one capacity: one partition
    rows = _loops().get("row_prices") if (k + 1) * E <= NETWORK_ROWS and s.dtype == np.float64 else None
    top = np.empty(k + 1)
    for _ in range(iterations):
        if rows is not None:
            rows(s, q, k, p, top)
        else:
            np.subtract(s, q, out=buf)
            if E <= 32:  # short rows: numpy's sort is faster than its partition (the same order statistic)
                buf.sort(axis=1)
            else:
                buf.partition(E - 1 - k, axis=1)
            p[:] = buf[:, E - 1 - k]  # (k+1)-th largest per token
        np.subtract(w.sT, p[None, :], out=bufT)
        if one >= 0:
            bufT.partition(T - 1 - one, axis=1)
            np.maximum(bufT[:, T - 1 - one], zero, out=q)
        else:
            q = np.maximum(_row_kth_largest(bufT, kth), zero).astype(s.dtype, copy=False)
    return q


class SweepSpace:
    """The arrays :func:`_cpu_sweeps` works in for ``[T, E]`` scores: the tie-broken scores ``s`` and their
    transpose, a buffer of each shape and the token prices ``p``."""

    def __init__(self, T: int, E: int, dtype: Any = np.float64):
        self.shape, self.dtype = (T, E), np.dtype(dtype)
        self.s = np.empty((T, E), dtype=dtype)
        self.buf = np.empty((T, E), dtype=dtype)
        self.sT = np.empty((E, T), dtype=dtype)
        self.bufT = np.empty((E, T), dtype=dtype)
        self.p = np.empty(T, dtype=dtype)
        self._caps: tuple[int, np.ndarray, np.ndarray] | None = None

    def capacities(self, capacity: int) -> tuple[np.ndarray, np.ndarray]:
        """``([E] capacities, [E] no-price-needed flags)`` for one capacity (kept while it stays the same)."""
        if self._caps is None or self._caps[0] != capacity:
            E = self.shape[1]
            c = np.full(E, capacity, dtype=np.int64)
            self._caps = (capacity, c, c >= self.shape[0])
        return self._caps[1], self._caps[2]


def cpu_refit(scores: Any, k: int, capacity: int, iterations: int, q: Any, ws: SweepSpace | None) -> Any:
    """:func:`price_iteration` (``iterations`` sweeps, no early stop) of :func:`tie_break`'s scores of a CPU
    tensor ``scores [T, E]`` from the float32 prices ``q``, with one ``capacity`` (``< T``, ``k < E``): the same
    float32 prices as ``price_iteration(tie_break(scores), k, capacity, iterations, q.double(),
    stop_when_fixed=False)[0].float()``, in a few calls on ``ws``'s arrays (reused when of the same shape).

    Returns ``(q, ws)``; needs the compiled loops (:func:`has_compiled_loops`). Raises ValueError naming
    ``scores`` on NaN or inf, before any sweep."""
    run = _loops()["tie_broken"]
    import torch

    x = scores.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.double()
    T, E = x.shape
    if ws is None or ws.shape != (T, E) or ws.dtype != np.float64:
        ws = SweepSpace(T, E)
    if not run(np.ascontiguousarray(x.numpy()), _scaled_offsets(T, E), ws.s):
        raise ValueError("`scores` must be finite: it contains NaN or inf")
    cap, free = ws.capacities(capacity)
    new = _cpu_sweeps(ws.s, k, cap, free, iterations, q.detach().numpy(), ws)
    return torch.from_numpy(new).float(), ws


def dual_bound(scores: Any, k: int, capacity: Any, q: Any) -> Any:
    """The Lagrangian bound ``sum_t topk(scores[t] - q) + q . min(c, T)`` for prices ``q >= 0`` (clipped).

    numpy: a float; torch: a 0-d tensor on the scores' device (no host synchronisation)."""
    T, E = scores.shape
    cap = np.minimum(np.broadcast_to(np.asarray(capacity, dtype=np.int64), (E,)), T)
    if is_torch(scores):
        import torch

        s = scores.detach().double()
        qq = q.double().clamp_min(0.0)
        c = torch.as_tensor(cap, dtype=torch.float64, device=s.device)
        return torch.topk(s - qq, k, dim=1).values.sum() + qq @ c
    qq = np.maximum(np.asarray(q, dtype=np.float64), 0.0)
    red = np.asarray(scores, dtype=np.float64) - qq
    return float(np.partition(red, E - k, axis=1)[:, E - k :].sum() + qq @ cap)


def capacity_topk(choice: Any, k: int, capacity: int, max_rounds: int | None = None) -> Any:
    """``[T, k]`` distinct experts per token with at most ``capacity`` tokens per expert (torch, on the
    tensor's device), from the price-adjusted scores ``choice [T, E]`` (``-inf``: not allowed, e.g. outside
    DeepSeek-V3's chosen groups).

    Each token takes its top-k of ``choice``; an expert over capacity keeps the ``capacity`` of them with the
    largest margin ``choice[t, e] - p_t`` (``p_t`` the token's (k+1)-th best ``choice``: what the token loses
    by going elsewhere); the tokens it lets go propose, in rounds, to their best experts that still have room,
    each of which takes the proposers of largest margin up to its room. A token left short because every
    expert with room is one it already holds (possible when ``E * capacity == T * k``) swaps with a token that
    can move (:func:`_repair_short`). With prices that already balance, this is the plain top-k of ``choice``.
    It ends with every token holding k within capacity whenever ``E * capacity >= T * k`` and the allowed
    experts admit it; otherwise the short tokens take their best other experts over capacity (routing stays
    dropless). A ``capacity`` below ``ceil(T * k / E)`` (where the pairs cannot fit) is raised to it. At most
    ``max_rounds`` rounds (default E); on an accelerator the host synchronises once per round (a few rounds
    with prices near the batch's own).

    Ties: among equal margins the lower token goes first (a stable sort: the tokens proposing to their next
    expert all have margin 0). On a CPU tensor (float32 or float64) a compiled loop
    (:mod:`._routing_loops`, numba) runs the same rounds in one call; among a token's equal scores it takes the
    lower expert, where the tensor version takes ``torch.topk``'s order. The answers are the same wherever no
    token has two equal scores among those compared (tests/solvers/test_routing_loops.py), and the capacity
    holds on tied scores either way.
    """
    import torch

    T, E = choice.shape
    if k >= E or capacity >= T or T == 0:
        return torch.topk(choice, min(k, E), dim=1).indices
    rounds = E if max_rounds is None else max_rounds
    capacity = max(int(capacity), -(-T * k // E))  # below T * k / E the pairs cannot fit: the least that fits
    c = choice.detach()
    if c.device.type == "cpu" and c.dtype in (torch.float32, torch.float64):
        run = _loops().get("capacity_assign")
        if run is not None:  # the same rounds in one compiled call (the same answer: tests/solvers/test_balancers.py)
            a = np.ascontiguousarray(c.numpy())
            out = np.empty((T, k), dtype=np.int64)
            run(a, _row_thresholds(a, k), k, capacity, rounds, out)
            return torch.from_numpy(out)
    top = torch.topk(c, k + 1, dim=1)
    first = top.indices[:, :k]
    loads = torch.bincount(first.reshape(-1), minlength=E)
    if int(loads.max()) <= capacity:  # the prices balanced this batch: the plain top-k
        return first
    finite = torch.isfinite(c)
    p = top.values[:, k]
    neg = torch.tensor(float("-inf"), dtype=c.dtype, device=c.device)
    margin = torch.where(finite, c - torch.where(torch.isfinite(p), p, 0.0)[:, None], neg)
    held = torch.zeros(T, E, dtype=torch.bool, device=c.device).scatter_(1, first, True)
    over = loads > capacity  # over-full experts keep their `capacity` tokens of largest margin
    val = torch.where(held & over[None, :], margin, neg)
    kept = torch.zeros_like(held).scatter_(0, _best_rows(val, capacity), True)
    held &= kept | ~over[None, :]
    room = capacity - held.sum(0)
    need = k - held.sum(1)
    active = torch.nonzero(need > 0).flatten()
    slot = torch.arange(k, device=c.device)[None, :]
    for _ in range(rounds):
        if active.numel() == 0:
            break
        n = active.numel()
        h_a, nd = held[active], need[active]
        sub = torch.where(h_a | ~finite[active] | (room <= 0)[None, :], neg, c[active])
        best = torch.topk(sub, int(nd.max()), dim=1)
        ok = (slot[:, : best.indices.shape[1]] < nd[:, None]) & torch.isfinite(best.values)
        if not bool(ok.any()):
            break
        prop = torch.zeros(n, E, dtype=torch.bool, device=c.device).scatter_(1, best.indices, ok)
        R = min(int(room.max()), n)
        pmar = torch.where(prop, margin[active], neg)
        pick = _best_rows(pmar, R)
        acc = (torch.arange(R, device=c.device)[:, None] < room[None, :]) & torch.isfinite(pmar.gather(0, pick))
        got = torch.zeros(n, E, dtype=torch.bool, device=c.device).scatter_(0, pick, acc) & prop
        held[active] = h_a | got
        room = room - got.sum(0)
        need[active] = nd - got.sum(1)
        active = active[need[active] > 0]
    if active.numel():
        held = _repair_short(c, finite, held, need, k, capacity)
    # the k held experts of each token, its best first
    return torch.topk(torch.where(held, c.masked_fill(~finite, -3e38), neg), k, dim=1).indices


#: the compiled token step (an insertion network of k+1 values per row) where (k+1) * E is at most this;
#: numpy's partition beyond (measured inside training steps: docs/transformers.md#what-bip-costs)
NETWORK_ROWS = 96


def _row_thresholds(a: np.ndarray, k: int) -> np.ndarray:
    """``[T]``: the (k+1)-th largest of each row of the host array ``a [T, E]`` (-inf allowed)."""
    T, E = a.shape
    rows = _loops().get("row_prices") if (k + 1) * E <= NETWORK_ROWS else None
    if rows is None:
        return np.partition(a, E - 1 - k, axis=1)[:, E - 1 - k]
    th = np.empty(T)
    rows(a, np.zeros(E), k, th, np.empty(k + 1))
    return th


def _best_rows(v: Any, m: int) -> Any:
    """``[m, E]`` row indices of the ``m`` largest of each column of ``v [n, E]``, largest first, the lower row
    first among equal values (the margins of tokens proposing to their next expert all tie at 0, so the order of
    ties decides who is taken: a stable sort fixes it, where ``torch.topk``'s order is unspecified)."""
    import torch

    return torch.sort(v, dim=0, descending=True, stable=True).indices[:m]


def _repair_short(c: Any, finite: Any, held: Any, need: Any, k: int, capacity: int) -> Any:
    """Tokens left short (every expert with room is one they hold, or one they may not take): an augmenting
    path each -- token t takes a full expert f0, a token holding f0 moves on to f1, ... the last to an expert
    with room -- found by breadth-first search on the experts (edge f -> f' when a token other than t holds f,
    not f', and may take f'), each move the one of largest gain in ``choice``. Where no path exists, the token's
    best other experts over capacity (dropless; at last any experts, so that every token has k distinct ones).

    A sequential walk token by token: it runs on host (numpy) copies of the tensors, one transfer each way,
    and answers ``held`` as a tensor on its device."""
    import torch

    dev = held.device
    cn = c.detach().cpu().numpy()
    fin = finite.cpu().numpy()
    hd = held.cpu().numpy().copy()
    neg = cn.dtype.type(-np.inf)
    cf = np.where(fin, cn, neg)
    load = hd.sum(0, dtype=np.int64)  # kept up to date with every change of hd below
    for t in np.flatnonzero(need.cpu().numpy() > 0).tolist():
        for _ in range(int(k - hd[t].sum())):
            path = _augmenting_path(hd, fin, load < capacity, t, _expert_edges(hd, fin, t))
            if path is None:  # no way to keep the capacity: the best other allowed expert, over capacity
                rest = np.where(hd[t] | ~fin[t], neg, cn[t])
                if not np.isfinite(rest).any():
                    rest = np.where(hd[t], neg, np.where(fin[t], cn[t], cn.dtype.type(-3e38)))
                e = int(rest.argmax())
                hd[t, e] = True
                load[e] += 1
                continue
            _apply_moves(hd, fin, cf, t, list(zip(path[:-1], path[1:])), load)
            hd[t, path[0]] = True
            load[path[0]] += 1
    return torch.from_numpy(hd).to(dev)


def _apply_moves(held: np.ndarray, finite: np.ndarray, cf: np.ndarray, t: int, moves: list, load: np.ndarray) -> None:
    """Move, last edge first (each frees the slot the one before fills), for each edge ``f -> g`` the token
    of largest gain (the first on ties) holding f and not g, other than t (host arrays, in place; ``load`` [E],
    the experts' token counts, kept up to date).

    Every edge has such a token when the moves are made: the path's edges held when it was found, and a move
    along a later edge only takes a token off an expert further along the path, which can add candidates to
    the earlier edges but never remove one."""
    for f, g in reversed(moves):
        movable = held[:, f] & ~held[:, g] & finite[:, g]
        movable[t] = False
        if not movable.any():
            raise RuntimeError(f"capacity_topk: no token to move from expert {f} to {g} on an augmenting path")
        with np.errstate(invalid="ignore"):  # -inf - -inf off the movable tokens: masked out
            u = int(np.where(movable, cf[:, g] - cf[:, f], cf.dtype.type(-np.inf)).argmax())
        held[u, f], held[u, g] = False, True
        load[f] -= 1
        load[g] += 1


def _expert_edges(held: np.ndarray, finite: np.ndarray, t: int) -> list:
    """``[E][E]`` booleans: f -> f' when some token other than t holds f, not f', and may take f'."""
    others, can = held.copy(), finite & ~held
    others[t] = False
    can[t] = False
    import torch  # its matmul, on the arrays' memory (numpy's BLAS may start threads on a shared machine)

    return ((torch.from_numpy(others).T.double() @ torch.from_numpy(can).double()) > 0).tolist()


def _augmenting_path(held: np.ndarray, finite: np.ndarray, room: np.ndarray, t: int, nxt: list) -> list[int] | None:
    """Experts ``[f0, f1, ..., g]`` along the edges ``nxt`` (:func:`_expert_edges`): t may take f0, a token
    holding f_i and not f_{i+1} may take f_{i+1}, and g has room (``[g]`` alone when t may take g itself);
    None when there is no such path."""
    starts = (finite[t] & ~held[t]).tolist()
    roomy = room.tolist()
    E = len(starts)
    prev = [-2] * E
    queue = [f for f in range(E) if starts[f]]
    for f in queue:
        prev[f] = -1
    for f in queue:  # breadth first (the list grows while it is walked)
        if roomy[f]:
            path = [f]
            while prev[path[-1]] != -1:
                path.append(prev[path[-1]])
            return path[::-1]
        for g in range(E):
            if nxt[f][g] and prev[g] == -2:
                prev[g] = f
                queue.append(g)
    return None
