"""Ctrl-C during a back-end's search stops it at once.

From Python, KeyboardInterrupt propagates out of ``solve`` and ``compare`` (CP-SAT and SCIP would otherwise catch
SIGINT, stop, and return a normal-looking status). The CLI exits 130, prints one line, and leaves no output file.

"At once" is checked by what happened, not by a stopwatch (which the machine's load would move): the back-end's
``stop`` was called after the signal, under a time limit far longer than the test, and the CLI exited 130 with
nothing printed but the one line (a search left to run would have printed its answer).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from moebalance.solvers import _interrupt

import moebalance as mb
from moebalance.generate import routing_problem
from moebalance.io import save_problem
from moebalance.placement import CostModel, PlacementProblem

pytest.importorskip("ortools")


def _sigint_after(delay: float, started: threading.Event | None = None) -> dict[str, float]:
    """Send SIGINT to this process ``delay`` s after ``started`` is set (or after now)."""
    sent: dict[str, float] = {}

    def fire() -> None:
        if started is not None and not started.wait(60):
            return
        time.sleep(delay)
        sent["at"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=fire, daemon=True).start()
    return sent


def test_interruptible_stops_a_busy_backend_and_raises():
    """A fake back-end that, like CP-SAT, keeps running until told to stop: the watcher calls ``stop``."""
    stopped = threading.Event()
    calls = []

    def stop() -> None:
        calls.append(time.perf_counter())
        stopped.set()

    before = signal.getsignal(signal.SIGINT)
    sent = _sigint_after(0.2)
    with pytest.raises(KeyboardInterrupt):
        with _interrupt.interruptible(stop):
            # ignores the signal itself; only stop() ends it (the wait is a guard against a hang, not a timing)
            assert stopped.wait(120), "stop() was never called"
    assert calls and calls[0] >= sent["at"]  # called because of the signal, after it
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_interruptible_without_signal_is_transparent():
    with _interrupt.interruptible(lambda: None):
        value = 41 + 1
    assert value == 42
    with pytest.raises(ZeroDivisionError):  # the block's own errors pass through unchanged
        with _interrupt.interruptible():
            _ = 1 / 0


def _spy(monkeypatch, module, stops: list | None = None) -> threading.Event:
    """Set the returned event when ``module``'s solve enters the back-end (inside ``interruptible``); each call of
    the back-end's ``stop`` is appended to ``stops``."""
    started = threading.Event()
    real = _interrupt.interruptible

    @contextlib.contextmanager
    def spy(stop=None):
        def counted_stop():
            if stops is not None:
                stops.append(time.perf_counter())
            return stop()

        with real(None if stop is None else counted_stop):
            started.set()
            yield

    monkeypatch.setattr(module, "interruptible", spy)
    return started


def _hard_placement() -> PlacementProblem:
    rng = np.random.default_rng(0)
    return PlacementProblem(rng.integers(0, 5000, 256), 8, cost=CostModel(1.0, 300.0, 2000.0, 0.1))


@pytest.mark.parametrize(
    "method, module",
    [
        ("bip", "moebalance.solvers.routing_bip"),
        ("mip", "moebalance.solvers.routing_mip"),
        ("milp", "moebalance.solvers.placement_milp"),
    ],
)
def test_keyboard_interrupt_propagates_from_solve(monkeypatch, method, module):
    import importlib

    mod = importlib.import_module(module)
    problem = _hard_placement() if method == "milp" else routing_problem(1000, 64, 8, seed=0)
    stops: list = []
    started = _spy(monkeypatch, mod, stops)
    sent = _sigint_after(0.3, started)
    with pytest.raises(KeyboardInterrupt):
        mb.solve(problem, method, time_limit=600)
    assert started.is_set() and "at" in sent, "the signal did not arrive while the back-end ran"
    # the back-end was told to stop (without it, the search would run on to its 600 s limit, then raise)
    assert stops and stops[0] >= sent["at"]


def test_keyboard_interrupt_stops_compare(monkeypatch):
    """compare stops at the interrupted method instead of labelling it and running the next ones."""
    import moebalance.solvers.routing_bip as bip

    ran = []
    real_solve = sys.modules["moebalance.registry"].solve

    def counting_solve(problem, method="auto", **kw):
        ran.append(method)
        return real_solve(problem, method, **kw)

    monkeypatch.setattr(sys.modules["moebalance.comparison"], "solve", counting_solve)
    started = _spy(monkeypatch, bip)
    _sigint_after(0.3, started)
    with pytest.raises(KeyboardInterrupt):
        mb.compare(routing_problem(1000, 64, 8, seed=0), ["bip", "greedy", "mcf"], time_limit=60)
    assert ran == ["bip"]


@pytest.mark.parametrize(
    "command",
    [
        ["solve", "{file}", "--method", "bip", "--time-limit", "120", "--json", "{out}"],
        ["solve", "{file}", "--method", "mip", "--time-limit", "120", "--json", "{out}"],
        ["compare", "{file}", "--methods", "bip,mip,greedy", "--time-limit", "120", "--no-progress", "--json", "{out}"],
    ],
)
def test_cli_exits_130_one_line_no_file(tmp_path, command):
    f = tmp_path / "hard.npz"
    save_problem(routing_problem(2000, 64, 8, seed=0), f)
    out = tmp_path / "out.json"
    args = [a.replace("{file}", str(f)).replace("{out}", str(out)) for a in command]
    tmp = tmp_path / "tmp"  # the solve's child process works in a "moebalance-*" folder made here
    tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moebalance", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, TMPDIR=str(tmp)),
    )
    try:
        # the signal goes once the back-end runs (its folder exists), however long start-up took on this machine
        for _ in range(6000):
            if proc.poll() is not None or list(tmp.glob("moebalance-*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None and list(tmp.glob("moebalance-*")), "the back-end never started"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)  # a guard against a hang; the search's limit is 120 s
    finally:
        proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    assert stderr.strip().splitlines() == ["moebalance: interrupted"], stderr
    assert not list(tmp.glob("moebalance-*"))  # the child's folder is cleaned up
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))
    assert "status" not in stdout and "best bound" not in stdout
