"""Time limits cover everything, model building included, and a stopped run is honest: status ``time_limit``
(never ``infeasible``), any assignment it returns feasible, any bound valid.

No test here measures how long a solve took (that depends on the machine's load; ``benchmarks/time_limits.py``
holds the timings: every time-limited method within ``time_limit * 1.1 + 0.5`` s). The logic is checked instead:

- under a fake clock on which every reading comes 1000 s after the previous one, any limit is spent by the time
  the model is built, so every method must stop with status ``time_limit`` (a method that ignored the clock after
  building its model would finish and say ``optimal``);
- a real limit far longer than the work gives the optimum, and a child process that works far longer than its
  limit is killed (the job would otherwise return an answer).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import numpy as np
import pytest

import moebalance as mb
from moebalance import Status
from moebalance.generate import routing_problem
from moebalance.placement import CostModel, PlacementProblem

# the methods that were seen to overrun their limits are checked whatever their flags say
NAMED = {"routing": ("bip", "mip", "cvxpy", "lp", "mcf"), "placement": ("milp", "lp", "lp-cvxpy")}


def _timed(family: str) -> list:
    out = []
    for name in mb.available_methods(family):
        if mb.method_info(family, name).supports_time_limit or name in NAMED[family]:
            out.append(name)
    return out


ROUTING = [(m, {}) for m in _timed("routing")]
if "mip" in dict(ROUTING):
    ROUTING += [("mip", {"backend": "HIGHS"}), ("mip", {"backend": "CBC"})]


@pytest.fixture()
def racing_clock(monkeypatch):
    """``time.perf_counter`` where every reading is 1000 s after the previous one: whatever a method does between
    two readings (building its model, starting a child) spends any time limit."""
    real = time.perf_counter
    readings = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: real() + 1000.0 * next(readings))


@pytest.fixture(scope="module")
def big_routing():
    return routing_problem(4096, 64, 8, kind="zipf", seed=0)


@pytest.fixture(scope="module")
def big_routing_bound(big_routing):
    return mb.solve(big_routing, "mcf").objective  # the optimum, for bound validity


@pytest.mark.parametrize("method, options", ROUTING, ids=[f"{m}-{o.get('backend', '')}" for m, o in ROUTING])
def test_routing_limit_spent_by_model_building_stops_honestly(
    big_routing, big_routing_bound, racing_clock, method, options
):
    sol = mb.solve(big_routing, method, time_limit=5.0, **options)
    assert sol.status == Status.TIME_LIMIT, sol
    assert sol.assignment is None or sol.feasible, sol
    assert sol.bound is not None and sol.bound >= big_routing_bound * (1 - 1e-9), sol


@pytest.mark.parametrize("method, options", ROUTING, ids=[f"{m}-{o.get('backend', '')}" for m, o in ROUTING])
def test_routing_short_real_limit_is_honest(big_routing, big_routing_bound, method, options):
    # whether 0.6 s is enough depends on the machine: either outcome is fine, as long as it is told honestly
    sol = mb.solve(big_routing, method, time_limit=0.6, **options)
    assert sol.status in (Status.TIME_LIMIT, Status.OPTIMAL, Status.FEASIBLE), sol
    assert sol.assignment is None or sol.feasible, sol
    if sol.bound is not None:
        assert sol.bound >= big_routing_bound * (1 - 1e-9), sol
    if sol.status == Status.OPTIMAL:
        assert sol.objective == pytest.approx(big_routing_bound, rel=1e-6), sol


def test_a_generous_limit_still_solves(big_routing_bound):
    # the child process does not change answers: a limit the solve fits in gives the optimum
    p = routing_problem(512, 64, 8, kind="zipf", seed=1)
    ref = mb.solve(p, "mcf")
    for m in ("lp", "mcf", "fast"):
        sol = mb.solve(p, m, time_limit=60)
        assert sol.status == Status.OPTIMAL and sol.objective == pytest.approx(ref.objective, rel=1e-9), sol


def test_fast_judged_slow_for_its_limit_runs_in_a_child(monkeypatch, big_routing, big_routing_bound):
    """A limit that a solve of this size may not fit inside well (judged from its size) sends ``fast`` to a child
    process; its answer comes back through the child's files, optimal and equal to mcf's. The size rule is made
    to judge every solve slow, so a limit far longer than the work takes the child path on any machine."""
    from moebalance.solvers import _isolate, routing_fast

    children = []
    real = _isolate._Forked

    class Counted(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **k):
            children.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(_isolate, "_Forked", Counted)
    monkeypatch.setenv("MOEBALANCE_ISOLATE", "fork")
    routing_fast.warm_up()  # the compiled loops loaded (a cold process may answer with mcf while they compile)
    monkeypatch.setattr(routing_fast, "SECONDS_PER_ENTRY", 1.0)  # every solve now looks too slow for its limit
    sol = mb.solve(big_routing, "fast", time_limit=120)
    assert children == [1], "the solve did not go to a child process"
    assert sol.status == Status.OPTIMAL and sol.objective == pytest.approx(big_routing_bound, rel=1e-9), sol
    assert sol.stats["bias_reproduces"] == 1.0 and sol.stats["auction"]["steps"] > 0


def _sleeping_job(problem, *, time_limit=None):
    """A job for run_bounded that works far longer than any limit given to it here."""
    time.sleep(600)
    return {"x": np.zeros(1)}


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_a_child_working_past_its_limit_is_killed(monkeypatch, mode):
    from moebalance.solvers import _isolate

    monkeypatch.setenv("MOEBALANCE_ISOLATE", mode)
    out, side = _isolate.run_bounded(
        _sleeping_job,
        _tiny(),
        time_limit=0.5,
        start=time.perf_counter(),
        isolate=True,
        meanwhile=lambda: "fallback ran",
    )
    assert out is None and side == "fallback ran"


def _tiny():
    return mb.RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2]]), 1)


@pytest.fixture(scope="module")
def big_placement():
    rng = np.random.default_rng(0)
    return PlacementProblem(rng.integers(0, 5000, 1024), 64, cost=CostModel(1.0, 300.0, 2000.0, 0.1))


@pytest.mark.parametrize("method", _timed("placement"))
def test_placement_limit_spent_by_model_building_stops_honestly(big_placement, racing_clock, method):
    sol = mb.solve(big_placement, method, time_limit=5.0)
    assert sol.status == Status.TIME_LIMIT, sol
    assert sol.assignment is None or sol.feasible, sol


@pytest.mark.parametrize("method", _timed("placement"))
def test_placement_short_real_limit_is_honest(big_placement, method):
    sol = mb.solve(big_placement, method, time_limit=0.6)
    assert sol.status in (Status.TIME_LIMIT, Status.OPTIMAL, Status.FEASIBLE), sol
    assert sol.assignment is None or sol.feasible, sol
    if sol.bound is not None and sol.feasible:
        assert sol.bound <= sol.objective * (1 + 1e-9), sol


@pytest.mark.parametrize("method", ["milp", "eplb+"])
def test_replication_limit_spent_stops_honestly(racing_clock, method):
    from moebalance.replication import ReplicationProblem

    rng = np.random.default_rng(0)
    p = ReplicationProblem(rng.integers(1, 1000, (2, 64)), 80, num_gpus=8)
    sol = mb.solve(p, method, time_limit=5.0)
    assert sol.status == Status.TIME_LIMIT and sol.feasible, sol  # EPLB's plan at worst
    if sol.bound is not None:
        assert sol.bound <= sol.objective * (1 + 1e-9), sol


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_keyboard_interrupt_kills_the_child_process(monkeypatch, big_routing, mode):
    """A KeyboardInterrupt while a child process solves propagates and leaves no child behind (a forked child
    on Linux, a fresh interpreter with MOEBALANCE_ISOLATE=spawn)."""
    import subprocess

    from moebalance.solvers import _isolate

    monkeypatch.setenv("MOEBALANCE_ISOLATE", mode)
    seen = []
    real = _isolate._Forked if mode == "fork" else subprocess.Popen

    class Spy(real):  # type: ignore[misc, valid-type]
        def wait(self, timeout=None):
            if self not in seen:  # the first wait is "interrupted"; the clean-up's wait is real
                seen.append(self)
                raise KeyboardInterrupt
            return super().wait(timeout)

    monkeypatch.setattr(_isolate, "_Forked", Spy) if mode == "fork" else monkeypatch.setattr(
        _isolate.subprocess, "Popen", Spy
    )
    with pytest.raises(KeyboardInterrupt):
        mb.solve(big_routing, "lp", time_limit=5)
    assert seen and all(p.poll() is not None for p in seen)


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_a_failing_child_is_an_error_naming_the_cause(monkeypatch, mode):
    import time

    from moebalance.solvers import _isolate

    monkeypatch.setenv("MOEBALANCE_ISOLATE", mode)
    with pytest.raises(RuntimeError, match="exited with code 1: TypeError"):
        # json.loads(problem, time_limit=...): a TypeError inside the child
        _isolate.run_bounded(json.loads, _tiny(), time_limit=5, start=time.perf_counter(), isolate=True)


def _echo_job(problem, *, time_limit=None, factor=1.0, warm=None):
    """A job for run_bounded: what the child saw and computed, in the types a solver returns."""
    return mb.RoutingSolution(
        method="echo",
        status=Status.TIME_LIMIT,
        bound=float("inf"),
        assignment=np.argmax(problem.scores, axis=1)[:, None],
        bias=np.asarray(warm, dtype=np.float64) * factor,
        stats={
            "same_object": int(problem is _SEEN.get("problem")),
            "in_parent": int(str(os.getpid()) == os.environ["MOEBALANCE_TEST_PARENT"]),
            "nested": {"t": (1, 2.5), "arr": np.arange(3, dtype=np.int32), "nan": float("nan")},
            "time_limit": time_limit,
        },
    )


_SEEN: dict = {}


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_a_forked_child_inherits_the_inputs_a_spawned_one_reads_them(monkeypatch, mode, tmp_path):
    """A forked child works on the parent's own problem object (nothing is written for it); a spawned child
    reads the problem from a problem file and the options from a file of arrays (no pickle either way). The
    typed answer comes back as the same types: a RoutingSolution with its Status, arrays with their dtypes,
    nested stats with tuples and NaN."""
    import time

    from moebalance.solvers import _isolate

    monkeypatch.setenv("MOEBALANCE_ISOLATE", mode)
    monkeypatch.setattr(_isolate.tempfile, "tempdir", str(tmp_path))
    written = []
    real_save = _isolate._save

    def save(path, value):  # what each written file holds, read back as the child would (no pickle)
        real_save(path, value)
        with np.load(path, allow_pickle=False) as z:
            written.append((os.path.basename(path), sorted(z.files)))

    monkeypatch.setattr(_isolate, "_save", save)
    import moebalance.io as io

    problem_files = []
    real_save_problem = io.save_problem

    def save_problem(problem, path):
        problem_files.append(os.path.basename(path))
        return real_save_problem(problem, path)

    monkeypatch.setattr(io, "save_problem", save_problem)
    monkeypatch.setenv("MOEBALANCE_TEST_PARENT", str(os.getpid()))  # a spawned child sees it too
    problem = _tiny()
    _SEEN["problem"] = problem
    out, _ = _isolate.run_bounded(
        _echo_job,
        problem,
        {"factor": 2.0, "warm": np.arange(2.0)},
        time_limit=20,
        start=time.perf_counter(),
        isolate=True,
    )
    assert isinstance(out, mb.RoutingSolution) and out.status is Status.TIME_LIMIT and out.method == "echo"
    assert out.bound == float("inf") and np.array_equal(out.bias, [0.0, 2.0])
    assert out.assignment.dtype == np.int64 and out.assignment.tolist() == [[0], [0]]
    nested = out.stats["nested"]
    assert nested["t"] == (1, 2.5) and nested["arr"].dtype == np.int32 and np.isnan(nested["nan"])
    assert out.stats["in_parent"] == 0 and 0 < out.stats["time_limit"] <= 20
    inputs = [w for w in written if w[0] != "out.npz.part"]
    if mode == "fork":
        assert out.stats["same_object"] == 1 and inputs == []
    else:
        assert out.stats["same_object"] == 0 and [w[0] for w in inputs] == ["options.npz"]
        assert problem_files == ["problem.npz"]  # written as a problem file (moebalance.io), read back the same
    assert problem_files == ([] if mode == "fork" else ["problem.npz"])


def test_fallback_bound_under_a_tight_deadline_is_still_an_upper_bound(big_routing, big_routing_bound):
    """With no time for the row partition the fallback bounds by k times each token's best score (looser,
    still valid); with time it gives the top-k bound. RoutingScale's magnitude is max_e |s| summed over rows."""
    import time

    from moebalance.solvers._routing_common import RoutingScale, fallback

    loose = fallback(big_routing, deadline=time.perf_counter())  # already past: no greedy, no partition
    tight = fallback(big_routing, deadline=None)
    s, k = big_routing.scores, big_routing.k
    assert loose["assignment"] is None
    assert loose["bound"] >= tight["bound"] >= big_routing_bound * (1 - 1e-12)
    rounding = RoutingScale(s, k).rounding  # the float allowance both add
    assert 0 < rounding < 1e-9 * tight["bound"]
    assert loose["bound"] - rounding == pytest.approx(k * s.max(axis=1).sum(), rel=1e-12)
    assert tight["bound"] - rounding == pytest.approx(np.sort(s, axis=1)[:, -k:].sum(), rel=1e-12)
    shifted = -3.0 * s + 0.5  # negative scores: the magnitude takes the row minimum's size
    assert RoutingScale(shifted, k).magnitude == pytest.approx(k * np.abs(shifted).max(axis=1).sum(), rel=1e-15)
