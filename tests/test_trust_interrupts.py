"""Issue 9, class 8 (interrupts): Ctrl-C during a back-end's search stops it at once.

From Python, KeyboardInterrupt propagates out of ``solve`` and ``compare`` (CP-SAT and SCIP would otherwise catch
SIGINT, stop, and return a normal-looking status). The CLI exits 130 within 2 s, prints one line, and leaves no
output file.
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

import moebalance as mb
from moebalance.generate import routing_problem
from moebalance.io import save_problem
from moebalance.placement import CostModel, PlacementProblem
from moebalance.solvers import _interrupt

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
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with _interrupt.interruptible(stop):
            while not stopped.is_set():  # ignores the signal itself; only stop() ends it
                time.sleep(0.01)
                assert time.perf_counter() - t0 < 10, "stop() was never called"
    assert calls and calls[0] - sent["at"] < 1.0
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_interruptible_without_signal_is_transparent():
    with _interrupt.interruptible(lambda: None):
        value = 41 + 1
    assert value == 42
    with pytest.raises(ZeroDivisionError):  # the block's own errors pass through unchanged
        with _interrupt.interruptible():
            1 / 0


def _spy(monkeypatch, module) -> threading.Event:
    """Set the returned event when ``module``'s solve enters the back-end (inside ``interruptible``)."""
    started = threading.Event()
    real = _interrupt.interruptible

    @contextlib.contextmanager
    def spy(stop=None):
        with real(stop):
            started.set()
            yield

    monkeypatch.setattr(module, "interruptible", spy)
    return started


def _hard_placement() -> PlacementProblem:
    rng = np.random.default_rng(0)
    return PlacementProblem(rng.integers(0, 5000, 256), 8, cost=CostModel(1.0, 300.0, 2000.0, 0.1))


@pytest.mark.parametrize("method, module", [
    ("bip", "moebalance.solvers.routing_bip"),
    ("mip", "moebalance.solvers.routing_mip"),
    ("milp", "moebalance.solvers.placement_milp"),
])
def test_keyboard_interrupt_propagates_from_solve(monkeypatch, method, module):
    import importlib

    mod = importlib.import_module(module)
    problem = _hard_placement() if method == "milp" else routing_problem(1000, 64, 8, seed=0)
    started = _spy(monkeypatch, mod)
    sent = _sigint_after(0.3, started)
    with pytest.raises(KeyboardInterrupt):
        mb.solve(problem, method, time_limit=60)
    assert started.is_set() and "at" in sent, "the signal did not arrive while the back-end ran"
    assert time.perf_counter() - sent["at"] < 2.0


def test_keyboard_interrupt_stops_compare(monkeypatch):
    """compare stops at the interrupted method instead of labelling it and running the next ones."""
    import moebalance.solvers.routing_bip as bip

    ran = []
    real_solve = sys.modules["moebalance.registry"].solve

    def counting_solve(problem, method="auto", **kw):
        ran.append(method)
        return real_solve(problem, method, **kw)

    monkeypatch.setattr(sys.modules["moebalance.compare"], "solve", counting_solve)
    started = _spy(monkeypatch, bip)
    _sigint_after(0.3, started)
    with pytest.raises(KeyboardInterrupt):
        mb.compare(routing_problem(1000, 64, 8, seed=0), ["bip", "greedy", "mcf"], time_limit=60)
    assert ran == ["bip"]


@pytest.mark.parametrize("command", [
    ["solve", "{file}", "--method", "bip", "--time-limit", "120", "--json", "{out}"],
    ["solve", "{file}", "--method", "mip", "--time-limit", "120", "--json", "{out}"],
    ["compare", "{file}", "--methods", "bip,mip,greedy", "--time-limit", "120", "--no-progress", "--json", "{out}"],
])
def test_cli_exits_130_within_2s_one_line_no_file(tmp_path, command):
    f = tmp_path / "hard.npz"
    save_problem(routing_problem(2000, 64, 8, seed=0), f)
    out = tmp_path / "out.json"
    args = [a.replace("{file}", str(f)).replace("{out}", str(out)) for a in command]
    proc = subprocess.Popen([sys.executable, "-m", "moebalance", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(3.0)  # start-up, loading, model building (about 1 s), then well inside the search
    assert proc.poll() is None, proc.communicate()
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    took = time.perf_counter() - sent
    assert proc.returncode == 130, (stdout, stderr)
    assert took < 2.0, f"exited {took:.2f} s after SIGINT"
    assert stderr.strip().splitlines() == ["moebalance: interrupted"], stderr
    assert not out.exists() and not list(tmp_path.glob(".out.json*"))
    assert "status" not in stdout and "best bound" not in stdout
