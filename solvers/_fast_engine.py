"""The compiled engine of ``fast``: its numba loops loaded once per process, cached on disk and, where the cache
lacks them and a call's limit leaves no room, compiled by a detached process while ``mcf`` answers; and the stop
flag the loops poll (:class:`_Watch`: a deadline, a CPU budget for the hand-over, Ctrl-C).

A record of the last compile that covered every loop (:func:`_marker`, in NUMBA_CACHE_DIR or the user's cache
folder) says whether a process will only load the loops (about 1 s) or compile them (15 s to 3 min): it is void
once any of the loops' files (:func:`._fast_kernels.source_files`) or numba changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from . import _fast_kernels as K
from ._interrupt import interruptible

DEADLINE, INTERRUPT, HANDOVER = 1, 2, 3  # what the stop flag the compiled loops poll says


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
    """The loops' files as they are now (every module they are compiled from: a change to any one recompiles all)."""
    return [[os.path.basename(p), st.st_mtime_ns, st.st_size] for p in K.source_files() for st in [os.stat(p)]]


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
    from ._fast_driver import fast_route

    rng = np.random.default_rng(0)
    s = rng.random((40, 6)) + np.array([3.0, 2.0, 0, 0, 0, 0])  # two hot experts: paths and rounds
    variants: tuple[dict[str, Any], ...] = (
        {},
        {"candidates": 3, "auction_steps": 0},
        {"max_rounds": 1, "auction_steps": 1},
    )
    for opts in variants:
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
        code = "from moebalance.solvers._fast_engine import warm_up; warm_up()"
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
