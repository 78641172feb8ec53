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
do not eat the precision, and a warm start is shifted to a zero minimum and clipped to the rows' spread
(:func:`_normalise_warm_start`: prices 1e6 times the scores' range rounded their differences away); no other
scaling is needed (every step compares differences of scores and prices).

The compiled loops poll a stop flag (once per row, auction step or path) that a timer thread sets at the
deadline and Ctrl-C sets at once: a time limit and an interrupt stop them within a path. Massive ties (identical
rows, uniform or coarse integer scores) make the auction ping-pong at no price change and leave nearly all the
excess to the paths, which move it one unit at a time; the method then hands the problem to the plain flow
(``mcf``, exact), as it does when the paths use more CPU time than the flow would (``stats["engine"]`` says so).

The inner loops are compiled with numba (a main dependency) and cached on disk; the first call in a process
loads them (0.2-1.7 s; a first compile on a machine takes 15 s to 3 min). Under a time limit the load leaves no
room for, that call is answered by ``mcf`` while the loops load (or compile, in a separate process that writes the
cache) in the background; without numba, problems up to ``PYTHON_LIMIT`` score entries run the same loops as
Python and larger ones go to ``mcf``, and the message says so.
Code: this module is the adapter (options, :func:`solve_fast`, :func:`job`, the answer); the phases and the hand-over
to ``mcf`` are in ``_fast_driver``, the compiled engine (load, background compile, the stop flag) in
``_fast_engine``, and the loops in ``_fast_kernels`` and the modules it compiles together.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from ._fast_driver import (  # noqa: F401 - the phases' tuning constants, kept importable from here
    AUCTION_STEPS_PER_EXPERT,
    CHUNK,
    DEFAULT_LIST,
    FLOW_SECONDS_PER_ENTRY,
    HANDOVER_FACTOR,
    HANDOVER_MIN_S,
    HANDOVER_PATH_WORK,
    LIFT_PER_EXPERT,
    LIFT_SAMPLE,
    LIFT_STEPS,
    REBUILD_FACTOR,
    STALL,
    _normalise_warm_start,
    fast_route,
)
from ._fast_engine import (  # noqa: F401 - the engine's state and its one-time load, kept importable from here
    _ENGINE,
    COMPILE_ESTIMATE_S,
    DEADLINE,
    HANDOVER,
    INTERRUPT,
    LOAD_ESTIMATE_S,
    LOAD_MARGIN,
    UNAVAILABLE,
    _marker,
    _marker_path,
    _source_stamp,
    _unavailable_note,
    _write_marker,
    engine_state,
    expected_load_seconds,
    load_seconds,
    start_background_load,
    warm_up,
)
from ._routing_common import PARTITION_SECONDS_PER_ENTRY, drive
from .routing_prices import dual_bound

__all__ = ["solve_fast", "fast_route", "job", "warm_up", "PYTHON_LIMIT"]

PYTHON_LIMIT = 20_000  # T*E above which, without numba, the flow back-end finishes instead of Python loops
SECONDS_PER_ENTRY = 2e-7  # a pessimistic cost of a solve per score entry (measured: 60-70 ns at 4096x64)


def _check_options(
    warm_start: Any, E: int, candidates: Any, auction_steps: Any, stall: Any, max_rounds: Any
) -> np.ndarray | None:
    for name, v, lo in (("auction_steps", auction_steps, 0), ("max_rounds", max_rounds, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"`{name}` must be an integer >= {lo}, got {v!r}")
    if candidates is not None and (
        isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1
    ):
        raise ValueError(f"`candidates` must be a positive integer or None, got {candidates!r}")
    if (
        isinstance(stall, bool)
        or not isinstance(stall, (int, float, np.integer, np.floating))
        or not math.isfinite(stall)
        or stall < 0
    ):
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


@register(
    "routing",
    "fast",
    exact=True,
    gives_bound=True,
    supports_time_limit=True,
    description="exact: an expert-side auction on the prices, then shortest augmenting paths, "
    "certified on the full problem",
    interruptible=True,
    isolated=True,
    options={
        "warm_start": Option("array [E] | None", "starting prices, e.g. the previous batch's `bias`"),
        "candidates": Option(
            "int | None", "experts listed per token (default k + 4): its held experts and its best others"
        ),
        "auction_steps": Option(
            "int | None", "the auction's step budget (default 200 E; 0: straight to the shortest paths)"
        ),
        "stall": Option("float", "the auction's hand-over rate (units of excess per step)"),
        "max_rounds": Option("int", "certificate rounds before every expert becomes a candidate"),
    },
)
def solve_fast(
    problem, *, time_limit=None, warm_start=None, candidates=None, auction_steps=None, stall=STALL, max_rounds=4
) -> RoutingSolution:
    """Exact routing by an auction on the expert prices and shortest augmenting paths (module docstring).

    Options: ``warm_start`` [E] starting prices (e.g. the previous batch's ``bias``); ``candidates`` experts
    listed per token (default k+4): its held experts and its best others, the graph of the shortest paths;
    ``auction_steps`` the auction's step budget (default 200 E; 0: straight to the shortest paths);
    ``stall`` the auction's hand-over rate (units of excess per step); ``max_rounds`` certificate rounds
    before every expert becomes a candidate.
    """
    t0 = time.perf_counter()
    T, E = problem.shape
    q0 = _check_options(warm_start, E, candidates, 0 if auction_steps is None else auction_steps, stall, max_rounds)
    from .routing_flow import solve_mcf

    state = engine_state()
    if state == "unavailable" and T * E > PYTHON_LIMIT:  # the plain flow, exact; said once, plainly
        note = _unavailable_note()
        sol = solve_mcf(problem, time_limit=time_limit)
        return sol.replace(
            method="fast",
            stats={**sol.stats, "engine": f"mcf ({note})"},
            message=f"{sol.message} [{note}: answered by the plain flow `mcf`, exact]",
        )
    load_s = 0.0
    if state == "cold":
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is None or left >= LOAD_MARGIN * expected_load_seconds() + 0.5:
            load_s = warm_up()
        else:  # the limit leaves no room for the one-time load: the flow answers now, the loops load meanwhile
            start_background_load()
            sol = solve_mcf(problem, time_limit=time_limit - (time.perf_counter() - t0))
            return sol.replace(
                method="fast",
                stats={**sol.stats, "engine": "mcf (compiled loops not loaded yet)"},
                message=f"{sol.message} [the compiled loops of `fast` are not loaded yet and the "
                "limit leaves no room for the one-time load: answered by the plain flow "
                "`mcf`, exact; routing_fast.warm_up() loads them]",
            )
        state = engine_state()
    params = {
        "warm_start": q0,
        "candidates": candidates,
        "auction_steps": auction_steps,
        "stall": float(stall),
        "max_rounds": int(max_rounds),
        "use_numba": state == "ready",
    }
    # under a time limit that the solve may not fit well inside (judged from its size, pessimistically), it
    # runs in a child process the deadline kills (greedy answer then); otherwise here, where the compiled loops
    # poll a flag that a timer sets at the deadline and Ctrl-C sets at once
    isolate = time_limit is not None and T * E * SECONDS_PER_ENTRY > 0.25 * time_limit
    sol = drive(
        "fast",
        problem,
        job,
        params,
        time_limit=time_limit,
        start=t0,
        to_solution=lambda p, raw, tl: _to_solution(p, raw, tl, t0),
        isolate=isolate,
    )
    extra: dict[str, Any] = {}
    if load_s > 0:
        extra["engine_load_s"] = load_s
    if state != "ready":
        note = _unavailable_note()
        extra["engine"] = f"python ({note})"
        sol = sol.replace(message=f"{sol.message} [{note}: ran the same loops as Python]")
    return sol.replace(stats={**sol.stats, **extra}) if extra else sol


def job(
    problem: Any,
    *,
    time_limit: float | None = None,
    warm_start: np.ndarray | None,
    candidates: int | None,
    auction_steps: int | None,
    stall: float,
    max_rounds: int,
    use_numba: bool,
) -> dict[str, Any]:
    """:func:`fast_route` (in this process or a child) for ``time_limit`` seconds from now."""
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    assignment, q, stats = fast_route(
        problem.scores,
        problem.k,
        problem.capacity,
        warm_start=warm_start,
        candidates=candidates,
        auction_steps=auction_steps,
        stall=float(stall),
        max_rounds=int(max_rounds),
        deadline=deadline,
        use_numba=bool(use_numba),
    )
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
        return RoutingSolution(
            method="fast",
            status=Status.TIME_LIMIT,
            objective=float("nan"),
            bound=bound,
            stats=stats,
            message="time limit reached before the augmenting paths finished",
        )
    # the bound is the Lagrangian bound of q, which the shared check computes from the problem's own scores
    if str(stats.get("engine", "")).startswith("mcf"):
        message = f"optimal: the plain flow finished ({stats.get('handover', 'hand-over')})"
    else:
        message = (
            f"optimal: auction of {stats.get('auction', {}).get('steps', 0)} step(s), "
            f"{stats.get('augmentations', 0)} augmenting path(s), {stats.get('rounds', 0)} certificate round(s)"
        )
    return RoutingSolution(
        method="fast",
        status=Status.OPTIMAL,
        objective=float("nan"),
        bound=None,
        assignment=np.asarray(raw["assignment"], dtype=np.int64),
        bias=q,
        stats=stats,
        message=message,
    )
