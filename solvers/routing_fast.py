"""``fast``: exact capacitated routing at close to the speed of top-k, certified on the full problem.

The routing LP has T*E variables but only E capacity duals, and E is tiny next to T. The method works on the
prices q [E], keeps every token on an exact top-k of its full row of ``scores - q`` from start to end (the
dual stays feasible), and moves toward feasibility:

1. Prepare (:func:`~moebalance.solvers._fast_kernels.prepare`). Two Jacobi steps on the prices from a sample
   of the tokens (at least 512, about 64 token slots per expert; in each step every over-full expert's price rises
   at once to where its sampled tokens' margins would leave it full), then one pass over all T*E scores: each
   token's top-k under q, its next ``candidates - k`` experts (default 4) with their scores, and a bound on
   everything else.
2. Auction (:func:`~moebalance.solvers._fast_kernels.auction`). An over-full expert raises its price by the
   (c+1)-th largest margin of its tokens, so exactly c keep it; the others take their best other expert
   (from their list while it provably beats everything outside, else from their row). Prices only rise, each
   step keeps the dual feasible; it hands over once the last E steps removed under ``stall`` units of excess
   per step (near-ties, which one-expert steps resolve slowly) or after ``auction_steps``.
3. Shortest augmenting paths (:func:`~moebalance.solvers._fast_kernels.ssp`) on the compressed graph of E
   experts plus a sink, over each token's held and listed experts: one unit at a time from over-full experts
   to experts with room, prices rising by the path lengths. With no excess left, the certificate runs on the
   full problem inside the same kernel: a token that prefers an expert outside its candidates gets it (the
   graph is patched, not rebuilt), takes the top-k of its candidates and the paths resume. When the
   candidates admit no feasible routing, or after ``max_rounds`` rounds, the driver widens the candidates
   and, at the end, makes every expert a candidate (the full problem), so the method always ends exact.

With no violation left the assignment is a top-k of ``scores - q`` for every token, every expert with room has
price 0 and loads are within capacity, so the Lagrangian bound of q equals the objective: ``bias`` is q, and the
shared check computes that bound from the problem's own scores. Problems where nothing is over-full return
after step 1 or 2.

Scores are shifted per token (each token takes exactly k experts, so this changes no optimum) so that offsets
do not eat the precision; no other scaling is needed (every step compares differences of scores and prices).
The inner loops are compiled with numba when it is installed; without numba, problems up to
``PYTHON_LIMIT`` score entries run the same loops as Python and larger ones are handed to ``mcf`` (OR-Tools),
so the answer is exact either way (``stats["engine"]`` says which ran).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from . import _fast_kernels as K
from ._isolate import child_time_left
from ._routing_common import PARTITION_SECONDS_PER_ENTRY, drive, problem_from
from .routing_prices import dual_bound

__all__ = ["solve_fast", "fast_route", "job", "warm_up", "PYTHON_LIMIT"]

PYTHON_LIMIT = 20_000  # T*E above which, without numba, the flow back-end finishes instead of Python loops
CHUNK = 200_000  # augmentations per kernel call (the clock is read between calls)
SECONDS_PER_ENTRY = 2e-7  # a pessimistic cost of a solve per score entry (measured: 60-70 ns at 4096x64)
DEFAULT_LIST = 4  # experts listed per token beyond its k (the auction's alternatives, the paths' candidates)
AUCTION_STEPS_PER_EXPERT = 200  # the auction's step budget, per expert
REBUILD_FACTOR = 1
LIFT_SAMPLE = 512  # tokens the Jacobi steps before the auction sample: at least this many,
LIFT_PER_EXPERT = 64  # and about this many sampled token slots per expert (E * 64 / k tokens)
LIFT_STEPS = 2  # Jacobi steps on the sample
STALL = 0.5  # the auction hands over once the last E steps removed fewer units of excess per step


def _check_options(warm_start: Any, E: int, candidates: Any, auction_steps: Any, stall: Any,
                   max_rounds: Any) -> np.ndarray | None:
    for name, v, lo in (("auction_steps", auction_steps, 0), ("max_rounds", max_rounds, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"`{name}` must be an integer >= {lo}, got {v!r}")
    if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer))
                                   or candidates < 1):
        raise ValueError(f"`candidates` must be a positive integer or None, got {candidates!r}")
    if isinstance(stall, bool) or not isinstance(stall, (int, float, np.integer, np.floating)) \
            or not math.isfinite(stall) or stall < 0:
        raise ValueError(f"`stall` must be a finite number >= 0, got {stall!r}")
    if warm_start is None:
        return None
    if type(warm_start).__module__.startswith("torch"):
        warm_start = warm_start.detach().cpu().double().numpy()
    try:
        q0 = np.asarray(warm_start, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`warm_start` must be a [E] array of prices, got {type(warm_start).__name__}") from None
    if q0.shape != (E,):
        raise ValueError(f"`warm_start` must have shape ({E},), got {q0.shape}")
    if not np.all(np.isfinite(q0)):
        raise ValueError("`warm_start` must be finite: it contains NaN or inf")
    return np.maximum(q0, 0.0)


def fast_route(scores: np.ndarray, k: int, capacity: np.ndarray, *, warm_start: np.ndarray | None = None,
               candidates: int | None = None, auction_steps: int | None = None, stall: float = STALL,
               max_rounds: int = 4, deadline: float | None = None, lift: int | None = None,
               lift_steps: int | None = None, paths: str = "auto",
               use_numba: bool = True) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """The exact routing of ``scores`` [T, E] (see the module docstring).

    Returns ``(assignment [T, k] or None when the deadline stopped it (or, ``stats["failed"]``, an invariant
    broke), prices q [E], stats)``. ``capacity`` [E] must admit a feasible routing
    (``sum(min(capacity, T)) >= T * k``). ``deadline``: a ``time.perf_counter()`` value, read between phases
    and kernel calls. ``lift``: the stride of the tokens the Jacobi steps sample (None: about max(512,
    64 E / k) of them; 1: all; 0: no step); ``lift_steps``: how many Jacobi steps (default 2; at least 1). ``paths``: the direction of the
    shortest-path searches, "auto" (backwards from the deficits when excess nodes outnumber them), "forward"
    or "backward" (the last two for tests: every choice gives the same optimum).
    """
    if paths not in ("auto", "forward", "backward"):
        raise ValueError(f"`paths` must be 'auto', 'forward' or 'backward', got {paths!r}")
    t0 = time.perf_counter()
    T, E = scores.shape
    cap = np.minimum(np.asarray(capacity, dtype=np.int64), T)
    stats: dict[str, Any] = {"engine": "numba" if (use_numba and K.HAVE_NUMBA) else "python"}
    if k >= E:
        return np.broadcast_to(np.arange(E, dtype=np.int64), (T, E)).copy(), np.zeros(E), stats
    kern = K.kernels(use_numba)
    q = np.zeros(E) if warm_start is None else np.array(warm_start, dtype=np.float64)
    M = max(1, min(E - k, DEFAULT_LIST if candidates is None else int(candidates) - k))  # listed non-held
    # one pass: scores shifted per row (exact for nearby values, no optimum changes), top-k and the next M
    sc = np.ascontiguousarray(scores, dtype=np.float64)
    s = np.empty_like(sc)
    sel = np.empty((T, k), dtype=np.int64)
    held = np.zeros((T, E), dtype=np.bool_)
    W = min(E - k, REBUILD_FACTOR * M)  # a list rebuilt during the auction holds more: fewer rebuilds later
    lst = np.empty((T, W), dtype=np.int64)
    lstv = np.empty((T, W))
    nl = np.empty(T, dtype=np.int64)
    bound = np.empty(T)
    stride = max(1, T // max(LIFT_SAMPLE, LIFT_PER_EXPERT * E // k)) if lift is None else int(lift)
    built = kern["prepare"](sc, q, k, M, cap, stride, LIFT_STEPS if lift_steps is None else int(lift_steps), s, sel,
                            held, lst, lstv, nl, bound)
    times = stats["times"] = {"prepare": time.perf_counter() - t0}
    if deadline is not None and time.perf_counter() > deadline:
        return None, q, stats
    if not built:  # no expert is over-full under q: optimal as it stands when every priced expert is full
        loads = kern["loads"](sel, E)
        if not np.any((q > 0) & (loads < cap)):
            stats.update(augmentations=0, rounds=0, auction={"steps": 0, "evictions": 0, "list_refreshes": 0,
                                                             "excess_left": 0})
            return np.sort(sel, axis=1), q, stats
        kern["relist"](s, q, k, M, sel, held, lst, lstv, nl, bound)
    steps = (AUCTION_STEPS_PER_EXPERT * E) if auction_steps is None else int(auction_steps)
    out = np.zeros(4, dtype=np.int64)
    kern["auction"](s, k, cap, q, sel, held, lst, lstv, nl, bound, steps, float(stall), out)
    times["auction"] = time.perf_counter() - t0
    stats["auction"] = {"steps": int(out[0]), "evictions": int(out[1]), "list_refreshes": int(out[2]),
                        "excess_left": int(out[3])}
    if deadline is not None and time.perf_counter() > deadline:
        return None, q, stats
    if out[3] == 0:  # nothing over-full: optimal as it stands when every priced expert is full
        loads = kern["loads"](sel, E)
        if not np.any((q > 0) & (loads < cap)):
            stats.update(augmentations=0, rounds=0)
            return np.sort(sel, axis=1), q, stats
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
        status, a, p, r = kern["ssp"](s, cand, ncand, sel, cap, q, CHUNK, reach, tol, int(max_rounds), vout,
                                      {"auto": -1, "forward": 0, "backward": 1}[paths])
        aug += int(a)
        pops += int(p)
        rounds += int(r)
        violations += [int(v) for v in vout[: min(int(r), vout.size)]]
        times[f"paths{calls}"] = time.perf_counter() - t0
        if status == K.OK:
            break
        if calls > max_rounds + 3 or (status == K.NO_PATH and int(ncand.min()) >= E):
            # cannot happen on a feasible problem (the last calls solve the full problem): say so
            stats.update(augmentations=aug, dijkstra_pops=pops, rounds=rounds, violations=violations,
                         failed="no augmenting path" if status == K.NO_PATH else "certificate rounds exhausted")
            return None, q, stats
        if deadline is not None and time.perf_counter() > deadline:
            stats.update(augmentations=aug, dijkstra_pops=pops, rounds=rounds, violations=violations)
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
    stats.update(augmentations=aug, dijkstra_pops=pops, rounds=rounds, seconds=time.perf_counter() - t0)
    return np.sort(sel, axis=1), q, stats


def warm_up() -> None:
    """Load (or, the first time on a machine, compile: ~10-30 s) every compiled loop now rather than in the first
    solve. A process pays this once; numba caches the machine code on disk."""
    rng = np.random.default_rng(0)
    s = rng.random((40, 6)) + np.array([3.0, 2.0, 0, 0, 0, 0])  # two hot experts: paths and rounds
    for opts in ({}, {"candidates": 3, "auction_steps": 0}, {"max_rounds": 1, "auction_steps": 1}):
        fast_route(s, 2, np.full(6, 14), **opts)
    s.flags.writeable = False  # a problem's scores are read-only: numba compiles that type apart
    fast_route(s, 2, np.full(6, 14))


@register("routing", "fast", exact=True, gives_bound=True, supports_time_limit=True,
          options={"warm_start": None, "candidates": None, "auction_steps": None, "stall": STALL,
                   "max_rounds": 4},
          description="exact: an expert-side auction on the prices, then shortest augmenting paths, "
                      "certified on the full problem")
def solve_fast(problem, *, time_limit=None, warm_start=None, candidates=None, auction_steps=None, stall=STALL,
               max_rounds=4) -> RoutingSolution:
    """Exact routing by an auction on the expert prices and shortest augmenting paths (module docstring).

    Options: ``warm_start`` [E] starting prices (e.g. the previous batch's ``bias``); ``candidates`` experts
    listed per token (default k+4): its held experts and its best others, the graph of the shortest paths;
    ``auction_steps`` the auction's step budget (default 200 E; 0: straight to the shortest paths);
    ``stall`` the auction's hand-over rate (units of excess per step); ``max_rounds`` certificate rounds
    before every expert becomes a candidate.
    """
    t0 = time.perf_counter()
    T, E = problem.shape
    q0 = _check_options(warm_start, E, candidates, 0 if auction_steps is None else auction_steps, stall,
                        max_rounds)
    if not K.HAVE_NUMBA and T * E > PYTHON_LIMIT:
        from .routing_flow import solve_mcf

        sol = solve_mcf(problem, time_limit=time_limit)
        return sol.replace(method="fast", stats={**sol.stats, "engine": "mcf (numba is not installed)"})
    params = {"warm_start": None if q0 is None else q0.tolist(), "candidates": candidates,
              "auction_steps": auction_steps, "stall": float(stall), "max_rounds": int(max_rounds)}
    # under a time limit that the solve may not fit well inside (judged from its size, pessimistically), it
    # runs in a child process the deadline kills (greedy answer then); otherwise here, checking the clock
    # between phases (the child's start and the copy of the scores would cost more than the solve)
    isolate = time_limit is not None and T * E * SECONDS_PER_ENTRY > 0.25 * time_limit
    return drive("fast", problem, "moebalance.solvers.routing_fast:job", params, time_limit=time_limit, start=t0,
                 to_solution=lambda p, raw, tl: _to_solution(p, raw, tl, t0), isolate=isolate)


def job(data: dict, params: dict) -> dict:
    """:func:`fast_route` from arrays (in this process or a child), up to ``params["deadline"]`` (wall clock)."""
    problem = problem_from(data)
    left = child_time_left(params, margin=0.0)
    deadline = None if left is None else time.perf_counter() + left
    q0 = params.get("warm_start")
    assignment, q, stats = fast_route(problem.scores, problem.k, problem.capacity,
                                      warm_start=None if q0 is None else np.asarray(q0, dtype=np.float64),
                                      candidates=params.get("candidates"), auction_steps=params.get("auction_steps"),
                                      stall=float(params.get("stall", STALL)),
                                      max_rounds=int(params.get("max_rounds", 4)), deadline=deadline)
    out: dict[str, Any] = {"q": np.asarray(q, dtype=np.float64), "stats": stats}
    if assignment is not None:
        out["assignment"] = np.asarray(assignment, dtype=np.int64)
    return out


def _to_solution(problem: Any, raw: dict[str, Any], time_limit: float | None, t0: float) -> RoutingSolution:
    """Our answer from :func:`job`'s output."""
    q = np.asarray(raw["q"], dtype=np.float64)
    stats = dict(raw["stats"])
    if "assignment" not in raw and "failed" in stats:  # an internal invariant broke: the flow answers instead
        from .routing_flow import solve_mcf

        left = None if time_limit is None else max(0.01, time_limit - (time.perf_counter() - t0))
        sol = solve_mcf(problem, time_limit=left)
        return sol.replace(method="fast", stats={**sol.stats, "engine": f"mcf ({stats['failed']})"})
    if "assignment" not in raw:
        # the Lagrangian bound of the prices reached is a pass over the scores: only when the limit leaves time
        # for it (else the caller's fallback bound stands)
        T, E = problem.shape
        late = time_limit is not None and time.perf_counter() - t0 + PARTITION_SECONDS_PER_ENTRY * T * E > time_limit
        bound = None if late else dual_bound(problem.scores, problem.k, problem.capacity, q)
        return RoutingSolution(method="fast", status=Status.TIME_LIMIT, objective=float("nan"), bound=bound,
                               stats=stats, message="time limit reached before the augmenting paths finished")
    # the bound is the Lagrangian bound of q, which the shared check computes from the problem's own scores
    return RoutingSolution(method="fast", status=Status.OPTIMAL, objective=float("nan"), bound=None,
                           assignment=np.asarray(raw["assignment"], dtype=np.int64), bias=q, stats=stats,
                           message=f"optimal: auction of {stats.get('auction', {}).get('steps', 0)} step(s), "
                                   f"{stats.get('augmentations', 0)} augmenting path(s), "
                                   f"{stats.get('rounds', 0)} certificate round(s)")
