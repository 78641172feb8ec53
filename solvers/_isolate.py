"""Run a back-end under a hard deadline: in a child process that is killed when the time is up.

Why: at a few hundred thousand variables none of our back-ends keeps its own time limit (measured on 4096x64,
k=8 with a 1 s limit: CP-SAT returned after 1.4 s, SCIP after 2.7 s, HiGHS after 10 s, none with an answer),
and building the model is outside their clocks anyway. A child process can be stopped at once.

The job is ``func(data, params) -> dict`` named by ``"module:function"``, where ``data`` maps names to numpy
arrays and ``params`` is JSON. It runs in this process when there is no time limit or the model is small
(``cells <= INPROCESS_CELLS``: building and solving then take milliseconds and the back-end's own limit holds);
otherwise in a child process, whose result comes back as an ``.npz`` file (``allow_pickle=False``) in a
temporary folder. On Linux the child is a fork of this process: it starts in about a millisecond, with the
back-ends already imported and the inputs in its inherited memory (nothing is written for it; a child that hangs
on a lock inherited from another thread is killed at the deadline like any other). Elsewhere, or with
``MOEBALANCE_ISOLATE=spawn``, it is a fresh ``python -m moebalance.solvers._isolate`` that reads its inputs from
an ``.npz`` file too (arrays only) and whose start-up, about 0.3 s, counts against the limit. The child's stdout
is discarded (no back-end banners); the last line of its stderr names the error when it fails (a RuntimeError,
which ``solve`` reports as ``error``). :func:`run_bounded` returns the job's result, or None when the deadline
killed it; KeyboardInterrupt kills the child and propagates.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["run_bounded", "INPROCESS_CELLS", "child_time_left"]

# models with at most this many matrix cells (routing T*E, placement A*P) run in this process
INPROCESS_CELLS = 20_000
# the parent waits until time_limit * (1 + SLACK) + GRACE before killing the child
SLACK, GRACE = 0.04, 0.12


def _job(target: str) -> Callable[[dict, dict], dict]:
    mod, _, name = target.partition(":")
    return getattr(importlib.import_module(mod), name)


def _save(path: str, arrays: dict[str, Any], params: dict[str, Any]) -> None:
    # names starting with "_" are objects a forked child inherits (e.g. the validated problem), never written
    payload = {k: np.asarray(v) for k, v in arrays.items() if not k.startswith("_")}
    payload["__json__"] = np.array(json.dumps(params))
    with open(path, "wb") as f:
        # numpy types **kwds as the allow_pickle flag too; the keys here are array names and "__json__"
        np.savez(f, **payload)  # type: ignore[arg-type]


def _load(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "__json__"}
        params = json.loads(str(z["__json__"]))
    return arrays, params


def child_time_left(params: dict[str, Any], margin: float = 0.05) -> float | None:
    """Seconds the job may give its back-end: up to the deadline in ``params`` (wall clock), minus ``margin``
    for writing the result; None without a deadline."""
    deadline = params.get("deadline")
    if deadline is None:
        return None
    return max(0.01, deadline - time.time() - margin)


class _Forked:
    """The part of :class:`subprocess.Popen` that :func:`run_bounded` uses, for a forked child running
    :func:`_child`."""

    def __init__(self, target: str, data: dict[str, Any], params: dict[str, Any], dst: str, err_path: str):
        # Ctrl-C is held back over the fork: a KeyboardInterrupt raised inside the interpreter's at-fork hooks
        # is printed and swallowed, so a signal arriving there would be lost. Unblocked, it is raised here.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it kills the child
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # no back-end banners
                os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
                _run(target, data, params, dst)  # the inputs are this process's own memory: no copy
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


def run_bounded(
    target: str,
    data: dict[str, Any],
    params: dict[str, Any],
    *,
    time_limit: float | None,
    start: float,
    cells: int,
    meanwhile: Callable[[], Any] | None = None,
    guard: Callable[[Callable[[], Any]], Any] | None = None,
) -> tuple[dict | None, Any]:
    """Run ``target(data, params)`` and return ``(result or None, meanwhile())``.

    ``start`` is the caller's ``time.perf_counter()`` at the start of the solve (the limit covers everything);
    ``meanwhile`` (e.g. a fallback answer) runs in this process while a child works (not at all in-process).
    ``params['deadline']``
    is set to the wall-clock deadline the job should give its back-end. ``guard(stop)`` (e.g.
    ``_interrupt.interruptible``) wraps the wait for the child, with ``stop`` killing it.
    """
    job = _job(target)
    if time_limit is None or cells <= INPROCESS_CELLS:
        left = None if time_limit is None else time_limit - (time.perf_counter() - start)
        p = dict(params, deadline=None if left is None else time.time() + left)
        return job(data, p), None
    kill_at = start + time_limit * (1 + SLACK) + GRACE
    p = dict(params, deadline=time.time() + time_limit - (time.perf_counter() - start))
    with tempfile.TemporaryDirectory(prefix="moebalance-") as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        if _use_fork():  # the child inherits the inputs (copy-on-write): only the result is written
            proc: Any = _Forked(target, data, p, dst, os.path.join(tmp, "err.txt"))
        else:
            _save(src, data, p)
            with open(os.path.join(tmp, "err.txt"), "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moebalance.solvers._isolate", target, src, dst],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
        try:
            side = meanwhile() if meanwhile is not None else None
            try:
                with guard(proc.kill) if guard is not None else contextlib.nullcontext():
                    proc.wait(timeout=max(0.0, kill_at - time.perf_counter()))
            except subprocess.TimeoutExpired:
                return None, side
            if proc.returncode != 0 or not os.path.exists(dst):
                with open(os.path.join(tmp, "err.txt"), "rb") as f:
                    last = (f.read().decode(errors="replace").strip().splitlines() or [""])[-1]
                raise RuntimeError(f"the back-end process for {target} exited with code {proc.returncode}: {last}")
            out, extra = _load(dst)
            out.update(extra)
            return out, side
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _child(target: str, src: str, dst: str) -> None:
    data, params = _load(src)
    _run(target, data, params, dst)


def _run(target: str, data: dict[str, Any], params: dict[str, Any], dst: str) -> None:
    out = _job(target)(data, params)
    arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in out.items() if not isinstance(v, np.ndarray)}
    buf = dst + ".part"
    _save(buf, arrays, scalars)
    os.replace(buf, dst)


if __name__ == "__main__":
    _child(*sys.argv[1:4])
