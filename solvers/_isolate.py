"""The one driver for time limits, isolation and Ctrl-C: run a job under a hard deadline, in a child process
that is killed when the time is up.

Why: at a few hundred thousand variables none of our back-ends keeps its own time limit (measured on 4096x64,
k=8 with a 1 s limit: CP-SAT returned after 1.4 s, SCIP after 2.7 s, HiGHS after 10 s, none with an answer),
and building the model is outside their clocks anyway. A child process can be stopped at once.

The job is a callable with an adapter's ``solve`` signature, ``job(problem, *, time_limit, **options)``: an
adapter's own ``solve`` (placement ``lp``/``milp``: it returns a typed Solution) or a step function
(routing: build + run, returning the back-end's raw output). :func:`solve_bounded` is what adapters call: it
runs the job in this process when there is no time limit or the model is small (``cells <= INPROCESS_CELLS``:
building and solving then take milliseconds and the back-end's own limit holds), otherwise in a child process,
computes the family's fallback meanwhile, and answers with the fallback (status ``time_limit``) when the
deadline killed the child. :func:`run_bounded` is the bare call underneath (result or None, and the fallback).

The child: on Linux a fork of this process, which starts in about a millisecond with the back-ends imported and
the problem in its inherited memory (nothing is written for it; a child that hangs on a lock inherited from
another thread is killed at the deadline like any other). Elsewhere, or with ``MOEBALANCE_ISOLATE=spawn``, a
fresh ``python -m moebalance.solvers._isolate`` that imports the job by its name (so a job must be a
module-level function) and reads the problem from a problem file (``moebalance.io``, no pickle); its start-up,
about 0.3 s, counts against the limit. The result comes back as an ``.npz`` file read without pickle: arrays
stay arrays, and the rest (a Solution of any family, its status, nested stats) is rebuilt as the same types by
:func:`_decode`. The child's stdout is discarded (no back-end banners); the last line of its stderr names the
error when it fails (a RuntimeError, which ``solve`` reports as ``error``). Ctrl-C: SIGINT is blocked over the
fork (so it reaches the parent), ignored in the child, and while the parent waits it kills the child
(``_interrupt.interruptible``) and raises KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["solve_bounded", "run_bounded", "INPROCESS_CELLS", "job_name"]

# models with at most this many matrix cells (routing T*E, placement A*P) run in this process
INPROCESS_CELLS = 20_000
# the parent waits until time_limit * (1 + SLACK) + GRACE before killing the child
SLACK, GRACE = 0.04, 0.12
# seconds a child keeps back from its deadline for writing its result
MARGIN = 0.05


# ---- the job and its name --------------------------------------------------------------------------------
def job_name(job: Callable[..., Any]) -> str:
    """``"module:function"`` of a module-level function (how a spawned child imports it); ValueError else."""
    module, qual = getattr(job, "__module__", None), getattr(job, "__qualname__", "")
    if not module or not qual or "<" in qual or "." in qual:
        raise ValueError(f"a job run in a spawned child must be a module-level function, got {job!r}")
    return f"{module}:{qual}"


def _job_from(name: str) -> Callable[..., Any]:
    mod, _, attr = name.partition(":")
    return getattr(importlib.import_module(mod), attr)


# ---- what travels between the processes: typed values over an .npz file, no pickle ----------------------
_TYPES_FROM = ("moebalance.",)  # the only modules a decoded Solution or enum class may come from


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON-able data, its arrays moved to ``arrays`` (decoded by :func:`_decode`)."""
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"$array": key}
    if isinstance(value, enum.Enum):
        return {"$enum": f"{type(value).__module__}:{type(value).__qualname__}", "value": _encode(value.value, arrays)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name), arrays) for f in dataclasses.fields(value) if f.init}
        return {"$dataclass": f"{type(value).__module__}:{type(value).__qualname__}", "fields": fields}
    if isinstance(value, np.generic):
        return _encode(value.item(), arrays)
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    if isinstance(value, dict):
        return {"$dict": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)  # an object no process but this one could rebuild: its text


def _typed_class(name: str) -> type:
    module, _, qual = name.partition(":")
    if not module.startswith(_TYPES_FROM):
        raise ValueError(f"refusing to rebuild {name!r}: only moebalance types travel between processes")
    return getattr(importlib.import_module(module), qual)


def _decode(data: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(data, list):
        return [_decode(v, arrays) for v in data]
    if not isinstance(data, dict):
        return data
    if "$array" in data:
        return arrays[data["$array"]]
    if "$float" in data:
        return float(data["$float"])
    if "$tuple" in data:
        return tuple(_decode(v, arrays) for v in data["$tuple"])
    if "$dict" in data:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in data["$dict"]}
    if "$enum" in data:
        return _typed_class(data["$enum"])(_decode(data["value"], arrays))
    if "$dataclass" in data:
        cls = _typed_class(data["$dataclass"])
        return cls(**{k: _decode(v, arrays) for k, v in data["fields"].items()})
    raise ValueError(f"not an encoded value: {sorted(data)}")


def _save(path: str, value: Any) -> None:
    arrays: dict[str, np.ndarray] = {}
    skeleton = json.dumps(_encode(value, arrays))
    with open(path, "wb") as f:
        # numpy types **kwds as the allow_pickle flag too; the keys here are array names and "__value__"
        np.savez(f, __value__=np.array(skeleton), **arrays)  # type: ignore[arg-type]


def _load(path: str) -> Any:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__value__"}
        skeleton = json.loads(str(z["__value__"]))
    return _decode(skeleton, arrays)


def _write_result(dst: str, value: Any) -> None:
    buf = dst + ".part"
    _save(buf, value)
    os.replace(buf, dst)


# ---- the child processes --------------------------------------------------------------------------------
def _time_left(deadline: float | None) -> float | None:
    """Seconds a job may give its back-end up to ``deadline`` (wall clock: a child's own clock starts anew)."""
    return None if deadline is None else max(0.01, deadline - time.time() - MARGIN)


class _Forked:
    """The part of :class:`subprocess.Popen` that :func:`run_bounded` uses, for a forked child running
    ``work()`` (which writes the result); its stderr goes to ``err_path``."""

    def __init__(self, work: Callable[[], Any], err_path: str):
        # Ctrl-C is held back over the fork: a KeyboardInterrupt raised inside the interpreter's at-fork hooks
        # is printed and swallowed, so a signal arriving there would be lost. Unblocked, it is raised here.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it kills the child
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)  # no back-end banners
                os.dup2(devnull, 2)  # nothing reaches the caller's stderr, even if err_path is gone
                os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
                work()  # the inputs are this process's own memory: no copy
                code = 0
            except BaseException as exc:  # the last line of err names the error
                os.write(2, f"{type(exc).__name__}: {exc}\n".encode(errors="replace"))
            finally:
                os._exit(code)
        self.pid = pid
        self.returncode: int | None = None
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C held back is raised now, in the parent
        except BaseException:
            self.kill()
            os.waitpid(pid, 0)
            raise

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.perf_counter() + timeout
        while self.poll() is None:
            if end is not None and time.perf_counter() >= end:
                assert timeout is not None  # end is set from it
                raise subprocess.TimeoutExpired("forked back-end", timeout)
            time.sleep(0.002)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _use_fork() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("MOEBALANCE_ISOLATE", "fork") != "spawn"


def _spawned(name: str, problem_path: str, options_path: str, dst: str) -> None:
    """The spawned child: the problem from its file, options and deadline from theirs, the job by name."""
    from moebalance.io import load_problem

    options = _load(options_path)
    deadline = options.pop("$deadline")
    result = _job_from(name)(load_problem(problem_path), time_limit=_time_left(deadline), **options)
    _write_result(dst, result)


# ---- the driver -----------------------------------------------------------------------------------------
def run_bounded(
    job: Callable[..., Any],
    problem: Any,
    options: dict[str, Any] | None = None,
    *,
    time_limit: float | None,
    start: float,
    isolate: bool,
    meanwhile: Callable[[], Any] | None = None,
    guard: Callable[[Callable[[], Any]], Any] | None = None,
) -> tuple[Any, Any]:
    """``(job(problem, time_limit=left, **options) or None, meanwhile())``.

    ``start`` is the caller's ``time.perf_counter()`` at the start of the solve (the limit covers everything).
    Without a time limit, or with ``isolate`` False, the job runs here with the time left (``meanwhile`` does
    not run: None). Otherwise it runs in a child killed at ``time_limit * (1 + SLACK) + GRACE`` after ``start``
    (result None then) while ``meanwhile`` (e.g. a fallback answer) runs here; Ctrl-C kills the child and
    raises KeyboardInterrupt (``guard(stop)``, default ``_interrupt.interruptible``, wraps the wait with
    ``stop`` killing the child); a child that fails raises RuntimeError naming its error.
    """
    from ._interrupt import interruptible

    options = dict(options or {})
    if time_limit is None or not isolate:
        left = None if time_limit is None else max(0.01, time_limit - (time.perf_counter() - start))
        return job(problem, time_limit=left, **options), None
    kill_at = start + time_limit * (1 + SLACK) + GRACE
    deadline = time.time() + time_limit - (time.perf_counter() - start)  # wall clock: the child's clock differs
    with tempfile.TemporaryDirectory(prefix="moebalance-") as tmp:
        dst, err_path = os.path.join(tmp, "out.npz"), os.path.join(tmp, "err.txt")
        # Ctrl-C is held back from the start of the child until the ``finally`` below is in force, so an
        # interrupt can never leave a child running after this folder is removed; it is raised in the ``try``
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        proc: Any = None
        try:
            if _use_fork():  # the child inherits the problem (copy-on-write): only the result is written
                proc = _Forked(
                    lambda: _write_result(dst, job(problem, time_limit=_time_left(deadline), **options)), err_path
                )
            else:
                from moebalance.io import save_problem

                name = job_name(job)
                problem_path, options_path = os.path.join(tmp, "problem.npz"), os.path.join(tmp, "options.npz")
                save_problem(problem, problem_path)
                _save(options_path, {**options, "$deadline": deadline})
                with open(err_path, "wb") as err:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "moebalance.solvers._isolate", name, problem_path, options_path, dst],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                    )
            signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a Ctrl-C held back is raised here
            side = meanwhile() if meanwhile is not None else None
            try:
                with (guard or interruptible)(proc.kill):
                    proc.wait(timeout=max(0.0, kill_at - time.perf_counter()))
            except subprocess.TimeoutExpired:
                return None, side
            if proc.returncode != 0 or not os.path.exists(dst):
                with open(err_path, "rb") as f:
                    last = (f.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                job_label = getattr(job, "__qualname__", repr(job))
                raise RuntimeError(f"the back-end process for {job_label} exited with code {proc.returncode}: {last}")
            return _load(dst), side
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def solve_bounded(
    method: str,
    problem: Any,
    job: Callable[..., Any],
    options: dict[str, Any] | None = None,
    *,
    time_limit: float | None,
    start: float,
    fallback: Callable[[], Any],
    cells: int,
    isolate: bool | None = None,
    to_solution: Callable[[Any, Any, float | None], Any] | None = None,
    guard: Callable[[Callable[[], Any]], Any] | None = None,
) -> Any:
    """An adapter's answer under the one driver: ``job`` under the deadline (:func:`run_bounded`), its output
    through ``to_solution(problem, raw, time_limit)`` (none when the job returns a Solution).

    ``fallback()`` gives what a stopped run still has, as a Solution of status ``time_limit`` whose message says
    what it holds (routing: the greedy answer and the top-k bound; placement: the llep+ plan); it runs while the
    child works. ``isolate``: run in a child (default: under a time limit, above ``INPROCESS_CELLS`` cells).
    When the deadline killed the child the answer is the fallback; when the job stopped with no answer, the
    fallback's assignment is returned with the better of the two bounds.
    """
    from moebalance.solution import Status

    isolated = time_limit is not None and (cells > INPROCESS_CELLS if isolate is None else bool(isolate))
    raw, fb = run_bounded(
        job, problem, options, time_limit=time_limit, start=start, isolate=isolated, meanwhile=fallback, guard=guard
    )
    if raw is None:
        fb = fb or fallback()
        return fb.replace(
            method=method,
            stats={**fb.stats, "stopped_by": "deadline (process killed)"},
            message="the time limit stopped the back-end; " + fb.message,
        )
    sol = raw if to_solution is None else to_solution(problem, raw, time_limit)
    if sol.status == Status.TIME_LIMIT and sol.assignment is None:
        fb = fb or fallback()
        bound = sol.bound
        if fb.bound is not None:
            better = min if problem.sense == "max" else max
            bound = fb.bound if bound is None else better(bound, fb.bound)
        message = "; ".join(m for m in (sol.message, fb.message) if m)
        sol = sol.replace(assignment=fb.assignment, bound=bound, message=message)
    return sol


if __name__ == "__main__":
    _spawned(*sys.argv[1:5])
