"""The isolation driver (solvers/_isolate.py): Ctrl-C around the fork of a back-end child, what reaches the
child and what comes back."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from moebalance.solvers import _isolate

SCRIPT = textwrap.dedent("""
    import os, signal
    from moebalance.solvers import _isolate
    # the signal lands inside the interpreter's at-fork hooks, where an exception is printed and swallowed
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        _isolate._Forked(lambda: None, os.devnull)
        print("lost")
    except KeyboardInterrupt:
        print("raised")
""")


def test_ctrl_c_during_the_fork_reaches_the_parent():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["raised"], (out.stdout, out.stderr)


def _placement_echo(problem, *, time_limit=None):
    """A job for run_bounded: the problem as the child saw it, in a PlacementSolution."""
    from moebalance.solution import PlacementSolution, Status

    return PlacementSolution(
        method="echo",
        status=Status.FEASIBLE,
        assignment=np.diag(problem.expert_loads)[:, : problem.num_devices],
        stats={"loads": problem.expert_loads, "cost": dataclasses.astuple(problem.cost), "P": problem.num_devices},
    )


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_a_placement_problem_reaches_the_child_whole_and_its_solution_comes_back_typed(monkeypatch, mode):
    from moebalance.placement import CostModel, PlacementProblem
    from moebalance.solution import PlacementSolution, Status

    monkeypatch.setenv("MOEBALANCE_ISOLATE", mode)
    loads = np.array([5, 0, 7, 3], dtype=np.int64)
    problem = PlacementProblem(loads, 4, cost=CostModel(1.0, 3.0, 20.0, 0.5))
    out, _ = _isolate.run_bounded(_placement_echo, problem, time_limit=30, start=time.perf_counter(), isolate=True)
    assert type(out) is PlacementSolution and out.status is Status.FEASIBLE
    assert np.array_equal(out.stats["loads"], loads) and out.stats["loads"].dtype == loads.dtype
    assert out.stats["cost"] == (1.0, 3.0, 20.0, 0.5) and out.stats["P"] == 4
    assert np.array_equal(out.assignment, np.diag(loads))


def test_only_moebalance_types_are_rebuilt_from_a_result_file(tmp_path):
    path = str(tmp_path / "value.npz")
    _isolate._save(path, {"x": np.arange(3), (1, "a"): [float("inf"), None, True]})
    back = _isolate._load(path)
    assert back[(1, "a")] == [float("inf"), None, True] and back["x"].tolist() == [0, 1, 2]
    # a file naming any other class is refused, not imported
    forged = {"$dataclass": "subprocess:Popen", "fields": {"args": ["true"]}}
    np.savez(path, __value__=np.array(json.dumps(forged)))
    with pytest.raises(ValueError, match="only moebalance types"):
        _isolate._load(path)


RUN_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from moebalance.solvers import _isolate

    def job(problem, *, time_limit=None):
        time.sleep(60)

    class Interrupted(_isolate._Forked):  # Ctrl-C lands the moment the child's handle is made
        def __init__(self, *args):
            super().__init__(*args)
            os.kill(os.getpid(), signal.SIGINT)

    _isolate._Forked = Interrupted
    try:
        _isolate.run_bounded(job, None, time_limit=30, start=time.perf_counter(), isolate=True)
        print("returned")
    except KeyboardInterrupt:
        print("raised")
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        print("child left" if pid == 0 else "child reaped late")
    except ChildProcessError:
        print("no child")
""")


def test_ctrl_c_right_after_the_fork_leaves_no_child_and_prints_nothing():
    env = dict(os.environ, MOEBALANCE_ISOLATE="fork")
    out = subprocess.run([sys.executable, "-c", RUN_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert out.stdout.split() == ["raised", "no", "child"], (out.stdout, out.stderr)
    assert out.stderr == "", out.stderr
