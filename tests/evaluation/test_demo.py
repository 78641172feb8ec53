"""The demo's own logic: what a time-limited row says, and the closing commands with a path that runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import moebalance as mb
from moebalance import Status
from moebalance.comparison import Comparison
from moebalance.evaluation.demo import command_path, limited_rows, next_steps
from moebalance.generate import routing_problem


def test_a_row_stopped_by_its_limit_says_what_the_limit_cost():
    p = routing_problem(200, 8, 2, kind="zipf", seed=0)
    exact = mb.solve(p, "mcf")
    greedy = mb.solve(p, "greedy")
    stopped = greedy.replace(method="bip", status=Status.TIME_LIMIT)  # a feasible answer the limit stopped
    empty = greedy.replace(
        method="mip", status=Status.TIME_LIMIT, assignment=None, feasible=False, objective=float("nan")
    )
    table = Comparison(p, [exact, greedy, stopped, empty])
    lines = limited_rows(table, 7.0)
    assert len(lines) == 2  # only the two rows the limit stopped
    gap = (exact.bound - greedy.objective) / exact.bound  # the optimum is positive here: the relative gap
    assert gap > 1e-3
    assert lines[0].startswith("bip: stopped by its 7 s limit") and f"{100 * gap:.2f}%" in lines[0], lines[0]
    assert lines[1] == "mip: stopped by its 7 s limit before it had an answer"
    assert limited_rows(Comparison(p, [exact, greedy]), 7.0) == []


def test_next_commands_name_a_moebalance_that_runs(monkeypatch, tmp_path):
    here = Path(sys.executable).parent / "moebalance"
    assert here.exists(), "no moebalance script beside this interpreter: the tests run from a pip install (make test)"
    monkeypatch.setenv("PATH", str(tmp_path))  # not on the PATH: the full path, since cwd is elsewhere
    monkeypatch.chdir(tmp_path)
    path = command_path()
    assert Path(path).is_absolute() and Path(path).resolve() == here.resolve()
    text = next_steps()
    assert f"{path} compare p.npz" in text and "bin/activate" in text
    out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "usage: moebalance" in out.stdout
    monkeypatch.setenv("PATH", f"{here.parent}{os.pathsep}{tmp_path}")  # on the PATH: the plain name
    assert command_path() == "moebalance"
    assert "  moebalance compare p.npz" in next_steps() and "activate" not in next_steps()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.chdir(here.parent.parent.parent)  # the folder holding the venv, as after `make demo`
    rel = command_path()
    assert not Path(rel).is_absolute() and (Path.cwd() / rel).resolve() == here.resolve()
