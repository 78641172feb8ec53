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
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import RoutingSolution, Status

from . import _fast_kernels as K
from ._interrupt import interruptible
from ._routing_common import PARTITION_SECONDS_PER_ENTRY, drive
from .routing_prices import dual_bound

__all__ = ["solve_fast", "fast_route", "job", "warm_up", "PYTHON_LIMIT"]

PYTHON_LIMIT = 20_000  # T*E above which, without numba, the flow back-end finishes instead of Python loops
CHUNK = 200_000  # augmentations per kernel call (the stop flag is read before every one)
SECONDS_PER_ENTRY = 2e-7  # a pessimistic cost of a solve per score entry (measured: 60-70 ns at 4096x64)
DEFAULT_LIST = 4  # experts listed per token beyond its k (the auction's alternatives, the paths' candidates)
AUCTION_STEPS_PER_EXPERT = 200  # the auction's step budget, per expert
REBUILD_FACTOR = 1
LIFT_SAMPLE = 512  # tokens the Jacobi steps before the auction sample: at least this many,
LIFT_PER_EXPERT = 64  # and about this many sampled token slots per expert (E * 64 / k tokens)
LIFT_STEPS = 2  # Jacobi steps on the sample
STALL = 0.5  # the auction hands over once the last E steps removed fewer units of excess per step
DEADLINE, INTERRUPT, HANDOVER = 1, 2, 3  # what the stop flag the compiled loops poll says
# the hand-over to the plain flow: the paths' unit-by-unit work once the auction stalled on ties, in units of
# (excess left) * E / T, beyond which the flow is cheaper (measured at 4096x64: ties leave 440-990 there and the
# paths took 0.6-18 s against the flow's 0.1-0.5 s; random integer scores leave about 100 and the paths win)
HANDOVER_PATH_WORK = 200
FLOW_SECONDS_PER_ENTRY = 1e-6  # the plain flow's cost per score entry (0.5-1.2e-6 measured at 4096x64, ties)
# the compiled loops hand over once they used this multiple of it in CPU seconds (at least HANDOVER_MIN_S): a
# problem that tied rows make slow for the paths then costs at most about twice the flow
HANDOVER_FACTOR, HANDOVER_MIN_S = 1.0, 0.2


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


class _Watch:
    """The flag [1] the kernels poll, and who sets it: a timer thread at the deadline (DEADLINE, wall clock) and
    once the solve has used ``handover_cpu`` seconds of CPU (HANDOVER: CPU time, so that a loaded machine does
    not change which engine answers), and Ctrl-C (INTERRUPT, through :func:`._interrupt.interruptible`, whose
    watcher runs while the compiled loops hold the main thread; KeyboardInterrupt is raised when the block
    ends)."""

    TICK = 0.02  # the shortest sleep between looks at the CPU clock

    def __init__(self, flag: np.ndarray, deadline: float | None, handover_cpu: float | None):
        self.flag = flag
        self.deadline = deadline
        self.handover_cpu = handover_cpu
        self.cpu0 = time.process_time()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.block: Any = None

    def _due(self) -> int:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return DEADLINE
        if self.handover_cpu is not None and time.process_time() - self.cpu0 >= self.handover_cpu:
            return HANDOVER
        return 0

    def _run(self) -> None:
        while not self.done.is_set():
            due = self._due()
            if due:
                if self.flag[0] == 0:
                    self.flag[0] = due
                if due == DEADLINE or self.deadline is None:
                    return
                self.handover_cpu = None  # handed over: only the deadline is left to watch
            # sleep to the next moment anything can be due: one busy thread spends CPU time no faster than wall
            # time, so the CPU budget left is a safe wall-clock sleep (a solve shorter than the budget never wakes
            # this thread: a wake-up that contends for the GIL costs the solve milliseconds)
            waits = [0.5]
            if self.deadline is not None:
                waits.append(max(0.0, self.deadline - time.perf_counter()))
            if self.handover_cpu is not None:
                waits.append(max(self.TICK, self.handover_cpu - (time.process_time() - self.cpu0)))
            self.done.wait(min(waits))

    def __enter__(self) -> _Watch:
        due = self._due()  # already due: set here, before any kernel runs (no race)
        if due and self.flag[0] == 0:
            self.flag[0] = due
        if not due and (self.deadline is not None or self.handover_cpu is not None):
            self.thread = threading.Thread(target=self._run, name="moebalance-fast-clock", daemon=True)
            self.thread.start()
        # Ctrl-C: only where this process handles SIGINT (a child that ignores it is stopped by its parent)
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            self.block = interruptible(lambda: self.flag.__setitem__(0, INTERRUPT))
            self.block.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        if self.block is not None:
            self.block.__exit__(*exc)  # raises KeyboardInterrupt when Ctrl-C came
        if self.flag[0] == INTERRUPT and exc[0] is None:
            raise KeyboardInterrupt


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


# ---- the compiled engine: loaded once per process, cached on disk, compiled in the background when needed ----
UNAVAILABLE = "compiled loops unavailable"
_ENGINE: dict[str, Any] = {"state": "cold", "load_s": None, "thread": None, "error": None}  # thread: the compile
_ENGINE_LOCK = threading.Lock()
_LOCAL = threading.local()  # .loading: this thread is running the one-time load (its own solves must not wait on it)
COMPILE_ESTIMATE_S = 180.0  # a first compile's cost when none was measured on this machine (16-180 s seen)
LOAD_ESTIMATE_S = 1.0  # a load from numba's disk cache before one was measured (0.2-1.7 s seen)
LOAD_MARGIN = 3.0  # under a time limit, the loops load inline only when the limit is this many loads and more


def _progress(message: str) -> None:
    """One line on stderr for long one-time work, where a command line asked for it (MOEBALANCE_PROGRESS=1)."""
    if os.environ.get("MOEBALANCE_PROGRESS") == "1":
        print(f"moebalance: {message}", file=sys.stderr, flush=True)


def _source_stamp() -> list:
    st = os.stat(K.__file__)
    return [st.st_mtime_ns, st.st_size]


def _marker_path() -> str | None:
    """Where the record of a finished compile lives, found without importing numba (the check runs inside a
    caller's time limit): NUMBA_CACHE_DIR when set, else the user's cache folder, else the temporary folder;
    named after the kernels' file, so that every checkout and install has its own."""
    import hashlib
    import tempfile

    name = f"moebalance_fast_engine_{hashlib.sha1(os.path.abspath(K.__file__).encode()).hexdigest()[:16]}.json"
    env = os.environ.get("NUMBA_CACHE_DIR")
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for folder in ([env] if env else []) + [os.path.join(user, "moebalance"), tempfile.gettempdir()]:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return os.path.join(folder, name)
    return None


def _numba_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("numba")
    except PackageNotFoundError:
        return None


def _marker() -> dict | None:
    """The record of the last compile that covered every loop, if it matches the loops on disk now."""
    path = _marker_path()
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if rec.get("stamp") != _source_stamp() or rec.get("numba") != _numba_version():
        return None
    if not all(os.path.exists(p) for p in rec.get("index", [])):
        return None
    return rec


def _write_marker(seconds: float, compiled: bool | None = None) -> None:
    """Record a finished load: ``compiled`` (None: from numba's cache statistics) says whether it compiled (its
    seconds are then the compile's, and a later load from the cache is estimated at LOAD_ESTIMATE_S)."""
    path = _marker_path()
    if path is None:
        return
    try:
        disp = K.kernels(True).values()
        index = [d._cache._cache_file._index_path for d in disp]
        if not all(os.path.exists(p) for p in index):
            return  # a loop was not cached (not compiled here): no record, so no call counts on the cache
        if compiled is None:
            compiled = any(len(d.stats.cache_misses) for d in disp)
        prev = {}
        if os.path.exists(path):
            with open(path) as f:
                prev = json.load(f)
        rec = {
            "stamp": _source_stamp(),
            "numba": _numba_version(),
            "index": index,
            "compile_s": seconds if compiled else prev.get("compile_s", COMPILE_ESTIMATE_S),
            "load_s": prev.get("load_s", LOAD_ESTIMATE_S) if compiled else seconds,
        }
        tmp = f"{path}.{os.getpid()}.part"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    except (OSError, ValueError, AttributeError):
        pass  # no record: the next process estimates pessimistically, nothing else changes


def _warm_calls() -> None:
    rng = np.random.default_rng(0)
    s = rng.random((40, 6)) + np.array([3.0, 2.0, 0, 0, 0, 0])  # two hot experts: paths and rounds
    for opts in ({}, {"candidates": 3, "auction_steps": 0}, {"max_rounds": 1, "auction_steps": 1}):
        fast_route(s, 2, np.full(6, 14), handover=False, **opts)
    s.flags.writeable = False  # a problem's scores are read-only: numba compiles that type apart
    fast_route(s, 2, np.full(6, 14), handover=False)
    # the two loops only the driver's later rounds call, with the types the driver passes
    kern = K.kernels(True)
    w = np.ascontiguousarray(s - s.max(axis=1, keepdims=True))
    sel = np.argsort(-w, axis=1)[:, :2].astype(np.int64)
    kern["violations"](w, sel, np.zeros(6), 1e-12, np.empty(40, dtype=np.int64))
    rows = np.arange(40)
    cand = np.ascontiguousarray(np.broadcast_to(np.arange(6, dtype=np.int64), (40, 6))[rows])
    kern["top_k"](
        np.ascontiguousarray(w[rows]),
        cand,
        np.full(40, 6, dtype=np.int64)[rows],
        2,
        np.zeros(6),
        np.empty((40, 2), dtype=np.int64),
    )


def _load() -> None:
    """Load (or compile) every loop in this process; records the seconds it took."""
    t = time.perf_counter()
    _LOCAL.loading = True
    try:
        _warm_calls()
    except Exception as exc:  # noqa: BLE001 - a numba that cannot compile here: the flow answers, and says why
        with _ENGINE_LOCK:
            _ENGINE.update(state="unavailable", error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        return
    finally:
        _LOCAL.loading = False
    dt = time.perf_counter() - t
    _write_marker(dt)
    with _ENGINE_LOCK:
        _ENGINE.update(state="ready", load_s=dt)


def engine_state() -> str:
    """``"ready"`` (the compiled loops are loaded in this process), ``"cold"`` (not yet) or ``"unavailable"``
    (numba is missing or failed: ``fast`` answers with ``mcf``)."""
    if not K.HAVE_NUMBA:
        return "unavailable"
    return _ENGINE["state"]


def load_seconds() -> float | None:
    """Seconds this process spent loading (or compiling) the compiled loops: a one-time cost, None before.
    A solve that paid it reports it as ``stats["engine_load_s"]`` (timing tables show it apart)."""
    return _ENGINE["load_s"]


def expected_load_seconds() -> float:
    """What loading the loops would cost now: the last load measured on this machine when numba's disk cache
    holds them, else a first compile's cost (measured, or :data:`COMPILE_ESTIMATE_S`)."""
    if engine_state() == "ready":
        return 0.0
    rec = _marker()
    if rec is not None:
        return float(rec.get("load_s", LOAD_ESTIMATE_S))
    path = _marker_path()
    if path is not None and os.path.exists(path):  # a stale record still says what a compile costs here
        try:
            with open(path) as f:
                return float(json.load(f).get("compile_s", COMPILE_ESTIMATE_S))
        except (OSError, ValueError):
            pass
    return COMPILE_ESTIMATE_S


def warm_up() -> float:
    """Load (or, the first time on a machine, compile: 15 s to 3 min) every compiled loop now rather than in the
    first solve; returns the seconds it took (0 when already loaded). A process pays this once; numba caches
    the machine code on disk, so later processes only load it (about 1-2 s)."""
    state = engine_state()
    if state in ("ready", "unavailable") or getattr(_LOCAL, "loading", False):
        return 0.0
    cached = _marker() is not None
    _progress(
        "loading the compiled loops of `fast` (one time per process)"
        if cached
        else "compiling the loops of `fast` (one time on this machine, 15 s to 3 min; cached on disk after)"
    )
    _load()
    if engine_state() == "ready":
        _progress(f"compiled loops ready in {_ENGINE['load_s']:.1f} s")
    return float(_ENGINE["load_s"] or 0.0)


def start_background_load() -> None:
    """Where numba's disk cache lacks the loops, start compiling them in a separate process (once per process;
    it outlives a short command and writes the cache) and return at once; ``fast`` answers with ``mcf``
    meanwhile. The loops are loaded into this process later, by a call whose limit leaves room for the load (or
    has none), or by :func:`warm_up`: never beside a running timed call (a load holds the GIL in long C calls,
    which made a 0.6 s limit overrun by 0.8 s when it ran in a thread)."""
    with _ENGINE_LOCK:
        if _ENGINE["state"] != "cold" or not K.HAVE_NUMBA or _ENGINE["thread"] is not None:
            return
        if _marker() is not None:
            return  # cached: the load itself is what is left, at a call with room for it
        code = "from moebalance.solvers.routing_fast import warm_up; warm_up()"
        _ENGINE["thread"] = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    _progress(
        "compiling the loops of `fast` in the background (one time on this machine); this call is "
        "answered by the plain flow `mcf`"
    )


def _unavailable_note() -> str:
    why = "numba is not installed" if not K.HAVE_NUMBA else (_ENGINE["error"] or "numba failed")
    return f"{UNAVAILABLE} ({why})"


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
