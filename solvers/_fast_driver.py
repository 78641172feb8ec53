"""The phases of ``fast`` (:func:`fast_route`): the prices' first pass, the auction, the shortest paths and the
driver's certificate rounds over the compiled loops of :mod:`._fast_kernels`, and the hand-over to the plain flow
``mcf`` when ties make the paths slow (the algorithm: :mod:`moebalance.solvers.routing_fast`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from moebalance.solution import Status

from . import _fast_kernels as K
from ._fast_engine import _LOCAL, DEADLINE, HANDOVER, _Watch, engine_state, warm_up

CHUNK = 200_000  # augmentations per kernel call (the stop flag is read before every one)
DEFAULT_LIST = 4  # experts listed per token beyond its k (the auction's alternatives, the paths' candidates)
AUCTION_STEPS_PER_EXPERT = 200  # the auction's step budget, per expert
REBUILD_FACTOR = 1
LIFT_SAMPLE = 512  # tokens the Jacobi steps before the auction sample: at least this many,
LIFT_PER_EXPERT = 64  # and about this many sampled token slots per expert (E * 64 / k tokens)
LIFT_STEPS = 2  # Jacobi steps on the sample
STALL = 0.5  # the auction hands over once the last E steps removed fewer units of excess per step
# the hand-over to the plain flow: the paths' unit-by-unit work once the auction stalled on ties, in units of
# (excess left) * E / T, beyond which the flow is cheaper (measured at 4096x64: ties leave 440-990 there and the
# paths took 0.6-18 s against the flow's 0.1-0.5 s; random integer scores leave about 100 and the paths win)
HANDOVER_PATH_WORK = 200
FLOW_SECONDS_PER_ENTRY = 1e-6  # the plain flow's cost per score entry (0.5-1.2e-6 measured at 4096x64, ties)
# the compiled loops hand over once they used this multiple of it in CPU seconds (at least HANDOVER_MIN_S): a
# problem that tied rows make slow for the paths then costs at most about twice the flow
HANDOVER_FACTOR, HANDOVER_MIN_S = 1.0, 0.2


def _normalise_warm_start(s: np.ndarray, q0: np.ndarray) -> np.ndarray:
    """Starting prices of the same meaning as ``q0`` and of the scores' own size.

    A uniform shift of every price changes no token's ranking, and a price above the largest spread of a row
    (``R``) already ranks its expert below every unpriced one for every token: ``min(q0 - min(q0), R)`` keeps
    what the warm start says and keeps the prices within R, where float64 resolves the scores. (Prices of
    1e6 R were the failure this prevents: ``s - q`` then rounded away the scores' differences, and the
    certificate's tolerance, which scales with the prices, accepted violations of up to 1e-6 R.) Any start is
    exact: the auction and the paths reach the optimum from every non-negative q; this only keeps the start
    representable."""
    if q0.size == 0:
        return q0
    R = float(s.max(axis=1).max() - s.min(axis=1).min()) if s.size else 0.0
    R = max(R, 0.0)
    return np.minimum(np.maximum(q0 - float(q0.min()), 0.0), R)


def fast_route(
    scores: np.ndarray,
    k: int,
    capacity: np.ndarray,
    *,
    warm_start: np.ndarray | None = None,
    candidates: int | None = None,
    auction_steps: int | None = None,
    stall: float = STALL,
    max_rounds: int = 4,
    deadline: float | None = None,
    lift: int | None = None,
    lift_steps: int | None = None,
    paths: str = "auto",
    use_numba: bool = True,
    stop: np.ndarray | None = None,
    handover: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The exact routing of ``scores`` [T, E] (see the module docstring).

    Returns ``(assignment [T, k] or None when the deadline stopped it (or, ``stats["failed"]``, an invariant
    broke), prices q [E], stats)``. ``capacity`` [E] must admit a feasible routing
    (``sum(min(capacity, T)) >= T * k``). ``deadline``: a ``time.perf_counter()`` value; the compiled loops
    poll a flag a timer thread sets then, so they stop within a row, a step or a path of it
    (``stats["stopped"] = "deadline"``). Ctrl-C sets the same flag and raises KeyboardInterrupt. ``stop``: the
    [1] int64 flag itself (another thread may set it: non-zero stops the loops; 2 means an interrupt). ``lift``:
    the stride of the tokens the Jacobi steps sample (None: about max(512, 64 E / k) of them; 1: all; 0: no
    step); ``lift_steps``: how many Jacobi steps (default 2; at least 1). ``paths``: the direction of the
    shortest-path searches, "auto" (backwards from the deficits when excess nodes outnumber them), "forward"
    or "backward" (the last two for tests: every choice gives the same optimum). ``handover``: when the
    auction leaves most of the excess in place (massive ties: identical rows, uniform scores) or the paths run
    longer than the plain flow would take, the plain flow (``mcf``, exact) finishes the problem
    (``stats["engine"]`` then says so); False keeps the compiled loops to the end (tests).
    """
    if paths not in ("auto", "forward", "backward"):
        raise ValueError(f"`paths` must be 'auto', 'forward' or 'backward', got {paths!r}")
    t0 = time.perf_counter()
    compiled = use_numba and K.HAVE_NUMBA
    if compiled and engine_state() != "ready" and not getattr(_LOCAL, "loading", False):
        warm_up()  # the one-time load (or compile) before the clocks start
        compiled = engine_state() == "ready"
    kern = K.kernels(compiled)
    flag = np.zeros(1, dtype=np.int64) if stop is None else stop
    handover_cpu = None
    if handover and compiled:
        T, E = scores.shape
        handover_cpu = max(HANDOVER_MIN_S, HANDOVER_FACTOR * FLOW_SECONDS_PER_ENTRY * T * E)
    with _Watch(flag, deadline, handover_cpu):
        assignment, q, stats = _route(
            kern,
            flag,
            scores,
            k,
            capacity,
            warm_start,
            candidates,
            auction_steps,
            stall,
            max_rounds,
            lift,
            lift_steps,
            paths,
            handover,
        )
    stats["engine"] = "numba" if compiled else "python"
    if assignment is None and flag[0] == DEADLINE:
        stats["stopped"] = "deadline"
    elif assignment is None and (flag[0] == HANDOVER or "handover" in stats):
        stats.setdefault("handover", "the paths used more CPU time than the plain flow would")
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            stats["stopped"] = "deadline"
            return None, q, stats
        return _flow_route(scores, k, capacity, left, stats, t0)
    stats["seconds"] = time.perf_counter() - t0
    return assignment, q, stats


def _flow_route(
    scores: np.ndarray, k: int, capacity: np.ndarray, time_limit: float | None, stats: dict[str, Any], t0: float
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The plain flow (``mcf``, exact) finishes a problem the compiled loops handed over."""
    from moebalance.routing import RoutingProblem

    from .routing_flow import solve_mcf

    sol = solve_mcf(RoutingProblem(scores, k, capacity=capacity), time_limit=time_limit)
    stats["engine"] = f"mcf ({stats['handover']})"
    stats["seconds"] = time.perf_counter() - t0
    q = np.zeros(scores.shape[1]) if sol.bias is None else np.asarray(sol.bias, dtype=np.float64)
    if sol.status != Status.OPTIMAL or sol.assignment is None:
        stats["stopped"] = "deadline"
        return None, q, stats
    return np.asarray(sol.assignment, dtype=np.int64), q, stats


def _route(
    kern: dict,
    flag: np.ndarray,
    scores: np.ndarray,
    k: int,
    capacity: np.ndarray,
    warm_start: np.ndarray | None,
    candidates: int | None,
    auction_steps: int | None,
    stall: float,
    max_rounds: int,
    lift: int | None,
    lift_steps: int | None,
    paths: str,
    handover: bool,
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """:func:`fast_route`'s phases; None as the assignment when ``flag`` stopped them (or an invariant broke:
    ``stats["failed"]``, or the auction handed over: ``stats["handover"]``)."""
    t0 = time.perf_counter()
    T, E = scores.shape
    cap = np.minimum(np.asarray(capacity, dtype=np.int64), T)
    stats: dict[str, Any] = {}
    if k >= E:
        return np.broadcast_to(np.arange(E, dtype=np.int64), (T, E)).copy(), np.zeros(E), stats
    M = max(1, min(E - k, DEFAULT_LIST if candidates is None else int(candidates) - k))  # listed non-held
    # one pass: scores shifted per row (exact for nearby values, no optimum changes), top-k and the next M
    sc = np.ascontiguousarray(scores, dtype=np.float64)
    q = np.zeros(E) if warm_start is None else _normalise_warm_start(sc, np.array(warm_start, dtype=np.float64))
    s = np.empty_like(sc)
    sel = np.empty((T, k), dtype=np.int64)
    held = np.zeros((T, E), dtype=np.bool_)
    W = min(E - k, REBUILD_FACTOR * M)  # a list rebuilt during the auction holds more: fewer rebuilds later
    lst = np.empty((T, W), dtype=np.int64)
    lstv = np.empty((T, W))
    nl = np.empty(T, dtype=np.int64)
    bound = np.empty(T)
    stride = max(1, T // max(LIFT_SAMPLE, LIFT_PER_EXPERT * E // k)) if lift is None else int(lift)
    built = kern["prepare"](
        sc,
        q,
        k,
        M,
        cap,
        stride,
        LIFT_STEPS if lift_steps is None else int(lift_steps),
        s,
        sel,
        held,
        lst,
        lstv,
        nl,
        bound,
        flag,
    )
    times = stats["times"] = {"prepare": time.perf_counter() - t0}
    if flag[0]:
        return None, q, stats
    if built == K.NOT_BUILT:  # no expert is over-full under q: optimal as it stands when every priced expert is full
        loads = kern["loads"](sel, E)
        if not np.any((q > 0) & (loads < cap)):
            stats.update(
                augmentations=0, rounds=0, auction={"steps": 0, "evictions": 0, "list_refreshes": 0, "excess_left": 0}
            )
            return np.sort(sel, axis=1), q, stats
        kern["relist"](s, q, k, M, sel, held, lst, lstv, nl, bound, flag)
        if flag[0]:
            return None, q, stats
    steps = (AUCTION_STEPS_PER_EXPERT * E) if auction_steps is None else int(auction_steps)
    out = np.zeros(5, dtype=np.int64)
    kern["auction"](s, k, cap, q, sel, held, lst, lstv, nl, bound, steps, float(stall), out, flag)
    times["auction"] = time.perf_counter() - t0
    stats["auction"] = {
        "steps": int(out[0]),
        "evictions": int(out[1]),
        "list_refreshes": int(out[2]),
        "excess_left": int(out[3]),
        "excess_start": int(out[4]),
    }
    if flag[0]:
        return None, q, stats
    if out[3] == 0:  # nothing over-full: optimal as it stands when every priced expert is full
        loads = kern["loads"](sel, E)
        if not np.any((q > 0) & (loads < cap)):
            stats.update(augmentations=0, rounds=0)
            return np.sort(sel, axis=1), q, stats
    if handover and out[0] > 0 and 2 * out[3] > out[4] and out[3] * E > HANDOVER_PATH_WORK * T:
        # the auction removed less than half the excess (ties: evicted tokens move to equal experts and back,
        # at no price change) and the paths, one unit each, would have far more to move than the flow costs
        stats["handover"] = (
            f"massive ties: the auction left {int(out[3])} of {int(out[4])} units of excess for the paths"
        )
        return None, q, stats
    nbest = 0  # tokens per arc list: the kernel's own choice (16 on tied inputs measured at most 2x faster, not more)
    extra = min(E, max(2, k // 2))  # candidates added per token and round
    cand = np.empty((T, min(E, k + W + 2 + 2 * extra)), dtype=np.int64)  # room for the certificate's additions
    ncand = np.empty(T, dtype=np.int64)
    kern["candidates"](sel, lst, nl, cand, ncand)
    del held, lst, lstv, nl, bound
    times["cand"] = time.perf_counter() - t0
    stats["candidates"] = k + M
    # every expert with room becomes a candidate of the tokens that like it best: short, feasible paths
    room = kern["loads"](sel, E) < cap
    if room.any() and int(ncand.min()) < E:
        kern["add_best"](s, q, cand, ncand, room, min(2, E - k), np.arange(T))
    span = float(s.max() - s.min())
    tol = 1e-12 * max(span, float(q.max(initial=0.0)), np.finfo(float).tiny)
    out = np.empty(T, dtype=np.int64)
    reach = np.zeros(E + 1, dtype=np.bool_)
    vout = np.zeros(64, dtype=np.int64)
    aug = pops = rounds = calls = 0
    violations: list[int] = []
    while True:
        calls += 1
        status, a, p, r = kern["ssp"](
            s,
            cand,
            ncand,
            sel,
            cap,
            q,
            CHUNK,
            reach,
            tol,
            int(max_rounds),
            vout,
            {"auto": -1, "forward": 0, "backward": 1}[paths],
            flag,
            nbest,
        )
        aug += int(a)
        pops += int(p)
        rounds += int(r)
        violations += [int(v) for v in vout[: min(int(r), vout.size)]]
        times[f"paths{calls}"] = time.perf_counter() - t0
        if status == K.OK:
            break
        if status == K.STOPPED or flag[0]:
            stats.update(augmentations=aug, dijkstra_pops=pops, rounds=rounds, violations=violations)
            return None, q, stats
        if calls > max_rounds + 3 or (status == K.NO_PATH and int(ncand.min()) >= E):
            # cannot happen on a feasible problem (the last calls solve the full problem): say so
            stats.update(
                augmentations=aug,
                dijkstra_pops=pops,
                rounds=rounds,
                violations=violations,
                failed="no augmenting path" if status == K.NO_PATH else "certificate rounds exhausted",
            )
            return None, q, stats
        if status == K.BUDGET:
            continue
        if status == K.NO_PATH:
            # no feasible routing within the candidates: open the experts the excess could not reach
            rows, allowed = np.arange(T), ~reach[:E]
            violations.append(-1)
        else:  # NEED_ROOM or ROUNDS: wider candidate lists for the tokens that still prefer an outsider
            rows = out[: kern["violations"](s, sel, q, tol, out)].copy()
            allowed = np.ones(E, dtype=np.bool_)
        if calls >= max_rounds:  # the full problem: every expert is a candidate of every token
            rows, allowed, nadd = np.arange(T), np.ones(E, dtype=np.bool_), E
        else:
            nadd = extra
        need = int(ncand[rows].max(initial=0)) + nadd + extra
        if need > cand.shape[1] and cand.shape[1] < E:
            wider = np.empty((T, min(E, need)), dtype=np.int64)
            wider[:, : cand.shape[1]] = cand
            cand = wider
        kern["add_best"](s, q, cand, ncand, allowed, nadd, rows)
        if rows.size:  # these tokens take their top-k under q among their candidates (a new one may beat a held one)
            sub = np.empty((rows.size, k), dtype=np.int64)
            kern["top_k"](np.ascontiguousarray(s[rows]), np.ascontiguousarray(cand[rows]), ncand[rows], k, q, sub)
            sel[rows] = sub
    if violations:
        stats["violations"] = violations
    stats.update(augmentations=aug, dijkstra_pops=pops, rounds=rounds)
    return np.sort(sel, axis=1), q, stats
