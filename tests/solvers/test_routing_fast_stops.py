"""``fast`` stops when told: the stop flag its compiled loops poll (deadline, Ctrl-C, hand-over to the flow),
the iteration budgets, and the one-time engine load under a time limit. Logic only: flags set before the loops
run, budgets counted in steps, a SIGINT whose arrival is awaited on the flag; no test reads a wall clock."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from moebalance.solvers import _fast_driver as D
from moebalance.solvers import _fast_engine as EN
from moebalance.solvers import _fast_kernels as K
from moebalance.solvers import routing_fast as F
from moebalance.solvers.routing_fast import fast_route

from moebalance import RoutingProblem, Status, solve
from moebalance.generate import routing_problem
from moebalance.routing import bias_reproduces, routing_dual_bound


def rel(a, b):
    return abs(a - b) / max(1.0, abs(b))


@pytest.fixture(scope="module")
def hot():
    """A problem with real work for every phase (hot experts: auction, paths and certificate rounds)."""
    return routing_problem(1500, 24, 4, kind="zipf", imbalance=2.0, seed=3)


def _kernel_spy(monkeypatch, before=None):
    """Wrap the compiled kernels: record which ran, and run ``before(name, args)`` ahead of each."""
    real = K.kernels(True)
    ran: list[str] = []

    def wrap(name, f):
        def g(*args):
            ran.append(name)
            if before is not None:
                before(name, args)
            return f(*args)

        return g

    spied = {name: wrap(name, f) for name, f in real.items()}
    monkeypatch.setattr(K, "kernels", lambda use_numba=True: spied if use_numba else K._PY)
    return ran


@pytest.mark.parametrize("use_numba", [True, False])
def test_a_deadline_already_passed_stops_in_the_first_loop(hot, use_numba, monkeypatch):
    """The flag is set before any loop runs: prepare returns STOPPED at its first row, nothing after runs, and
    the answer is None with stats saying the deadline stopped it."""
    F.warm_up()
    ran = _kernel_spy(monkeypatch) if use_numba else []
    a, q, st = fast_route(hot.scores, hot.k, hot.capacity, deadline=time.perf_counter() - 1.0, use_numba=use_numba)
    assert a is None and st["stopped"] == "deadline"
    assert list(st["times"]) == ["prepare"]
    if use_numba:
        assert ran == ["prepare"]


def test_each_loop_returns_at_once_on_a_set_flag(hot):
    """Every kernel that polls the flag returns without doing its work when it is set."""
    kern = K.kernels(True)
    F.warm_up()
    T, E, k = hot.num_tokens, hot.num_experts, hot.k
    M = 4
    s = np.empty((T, E))
    sel = np.zeros((T, k), dtype=np.int64)
    held = np.zeros((T, E), dtype=np.bool_)
    lst = np.zeros((T, M), dtype=np.int64)
    lstv = np.zeros((T, M))
    nl = np.zeros(T, dtype=np.int64)
    bound = np.zeros(T)
    cap = np.minimum(hot.capacity, T).astype(np.int64)
    stop = np.ones(1, dtype=np.int64)
    q = np.zeros(E)
    for lift in (0, 1, 3):
        assert (
            kern["prepare"](
                np.ascontiguousarray(hot.scores), q, k, M, cap, lift, 2, s, sel, held, lst, lstv, nl, bound, stop
            )
            == K.STOPPED
        )
    assert np.all(q == 0)
    # a real state, then an auction and the paths with the flag set: no step, no path
    go = np.zeros(1, dtype=np.int64)
    assert (
        kern["prepare"](np.ascontiguousarray(hot.scores), q, k, M, cap, 1, 2, s, sel, held, lst, lstv, nl, bound, go)
        == K.BUILT
    )
    q_before, sel_before = q.copy(), sel.copy()
    out = np.zeros(5, dtype=np.int64)
    kern["auction"](s, k, cap, q, sel, held, lst, lstv, nl, bound, 10**6, 0.0, out, stop)
    assert out[0] == 0 and out[1] == 0 and out[4] > 0 and np.array_equal(q, q_before)
    assert np.array_equal(np.sort(sel, 1), np.sort(sel_before, 1))
    cand = np.zeros((T, E), dtype=np.int64)
    ncand = np.empty(T, dtype=np.int64)
    kern["candidates"](sel, lst, nl, cand, ncand)
    status, aug, pops, rounds = kern["ssp"](
        s,
        cand,
        ncand,
        sel,
        cap,
        q,
        10**6,
        np.zeros(E + 1, dtype=np.bool_),
        1e-12,
        4,
        np.zeros(8, dtype=np.int64),
        -1,
        stop,
        0,
    )
    assert status == K.STOPPED and aug == 0 and pops == 0 and rounds == 0


def test_iteration_budgets_stop_the_auction_and_the_paths(hot):
    """The auction stops after its step budget, the paths after ``max_augment`` augmentations (BUDGET), and
    the driver's resumed calls still reach the optimum."""
    kern = K.kernels(True)
    F.warm_up()
    T, E, k = hot.num_tokens, hot.num_experts, hot.k
    s = np.ascontiguousarray(hot.scores - hot.scores.max(axis=1, keepdims=True))
    sel = np.argsort(-s, axis=1)[:, :k].astype(np.int64)
    cand = np.zeros((T, E), dtype=np.int64)
    cand[:, :k] = sel
    ncand = np.full(T, k, dtype=np.int64)
    q = np.zeros(E)
    cap = np.minimum(hot.capacity, T).astype(np.int64)
    go = np.zeros(1, dtype=np.int64)
    total = 0
    for call in range(10**4):  # noqa: B007  (read after the loop: how many calls it took)
        status, aug, _, _ = kern["ssp"](
            s,
            cand,
            ncand,
            sel,
            cap,
            q,
            3,
            np.zeros(E + 1, dtype=np.bool_),
            1e-12,
            8,
            np.zeros(8, dtype=np.int64),
            -1,
            go,
            0,
        )
        total += aug
        if status != K.BUDGET:
            break
        assert aug == 3
    assert status == K.OK and call > 0
    obj = float(np.take_along_axis(hot.scores, np.sort(sel, 1), 1).sum())
    assert rel(obj, solve(hot, "mcf").objective) < 1e-9
    assert bias_reproduces(hot, sel, q) == 1.0
    a, q2, st = fast_route(hot.scores, k, hot.capacity, auction_steps=5, handover=False)
    assert st["auction"]["steps"] <= 5 and a is not None


def test_a_simulated_sigint_stops_the_loops_and_raises(hot, monkeypatch):
    """SIGINT arrives while the first loop is about to run: the watcher sets the flag (awaited here, so the
    test does not depend on timing), the loop returns at once, no later loop runs and KeyboardInterrupt
    propagates; the process's own SIGINT handler is back afterwards."""
    F.warm_up()
    seen = {}

    def before(name, args):
        if name == "prepare" and "sent" not in seen:
            flag = args[-1]  # the stop flag is every polling kernel's last argument
            seen["sent"] = True
            os.kill(os.getpid(), signal.SIGINT)
            flag_set = threading.Event()
            for _ in range(2000):  # the watcher thread sets the flag; wait for it (not for a time)
                if flag[0] == F.INTERRUPT:
                    flag_set.set()
                    break
                time.sleep(0.005)
            seen["flag"] = flag_set.is_set()

    ran = _kernel_spy(monkeypatch, before)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        fast_route(hot.scores, hot.k, hot.capacity)
    assert seen["flag"] and ran == ["prepare"]
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_flag_set_by_another_thread_means_interrupt(hot):
    stop = np.full(1, F.INTERRUPT, dtype=np.int64)
    with pytest.raises(KeyboardInterrupt):
        fast_route(hot.scores, hot.k, hot.capacity, stop=stop)


def test_the_hand_over_timer_gives_the_flow_the_problem(hot, monkeypatch):
    """When the paths run past the hand-over time (here: at once), the plain flow finishes: exact, certified,
    and the stats say so."""
    F.warm_up()
    monkeypatch.setattr(D, "HANDOVER_MIN_S", -1.0)
    monkeypatch.setattr(D, "HANDOVER_FACTOR", 0.0)
    a, q, st = fast_route(hot.scores, hot.k, hot.capacity)
    assert a is not None and st["engine"].startswith("mcf (") and "plain flow" in st["handover"]
    ev = hot.evaluate(a)
    assert ev.feasible and rel(ev.objective, solve(hot, "mcf").objective) < 1e-12
    assert bias_reproduces(hot, a, q) == 1.0 and rel(routing_dual_bound(hot, q), ev.objective) < 1e-9
    # under a deadline already passed, the hand-over does not start the flow
    a, _, st = fast_route(hot.scores, hot.k, hot.capacity, deadline=time.perf_counter() - 1.0)
    assert a is None and st["stopped"] == "deadline"


def test_massive_ties_go_to_the_flow_and_stay_exact():
    """Identical rows: the auction ping-pongs at zero price change; the plain flow finishes (exact), and the
    compiled paths without the hand-over reach the same optimum."""
    F.warm_up()
    rng = np.random.default_rng(0)
    row = rng.random(64)
    p = RoutingProblem(np.tile(row, (4096, 1)), 8, capacity_factor=1.0)
    ref = solve(p, "mcf")
    sol = solve(p, "fast")
    assert sol.status == Status.OPTIMAL and rel(sol.objective, ref.objective) < 1e-12
    assert sol.stats["engine"].startswith("mcf (massive ties") and "plain flow" in sol.message
    assert sol.stats["bias_reproduces"] == 1.0
    small = RoutingProblem(np.tile(row[:16], (512, 1)), 4, capacity_factor=1.0)
    a, q, st = fast_route(small.scores, 4, small.capacity, handover=False)
    assert st["engine"] == "numba" and rel(small.evaluate(a).objective, solve(small, "mcf").objective) < 1e-12


# ---- the one-time engine load under a time limit ------------------------------------------------------------
@pytest.fixture
def cold_engine(monkeypatch):
    """The engine as a fresh process sees it: not loaded; loading is recorded, not done."""
    F.warm_up()  # the real loops, loaded: the fakes below only pretend they were not
    calls = {"background": 0, "inline": 0}
    monkeypatch.setitem(F._ENGINE, "state", "cold")

    def background():
        calls["background"] += 1

    def inline():
        calls["inline"] += 1
        F._ENGINE["state"] = "ready"
        return 1.25

    monkeypatch.setattr(F, "start_background_load", background)
    monkeypatch.setattr(F, "warm_up", inline)
    return calls


def test_a_cold_engine_under_a_short_limit_answers_with_the_flow(cold_engine, monkeypatch, hot):
    monkeypatch.setattr(F, "expected_load_seconds", lambda: 60.0)
    sol = solve(hot, "fast", time_limit=30)
    assert cold_engine == {"background": 1, "inline": 0}
    assert sol.status == Status.OPTIMAL and rel(sol.objective, solve(hot, "mcf").objective) < 1e-12
    assert sol.stats["engine"].startswith("mcf") and "not loaded yet" in sol.message


def test_a_cold_engine_loads_inline_when_the_limit_leaves_room(cold_engine, monkeypatch, hot):
    monkeypatch.setattr(F, "expected_load_seconds", lambda: 1.0)
    sol = solve(hot, "fast", time_limit=30)
    assert cold_engine == {"background": 0, "inline": 1}
    assert sol.stats["engine"] == "numba" and sol.stats["engine_load_s"] == 1.25
    assert sol.status == Status.OPTIMAL


def test_a_cold_engine_without_a_limit_loads_inline(cold_engine, hot):
    sol = solve(hot, "fast")
    assert cold_engine == {"background": 0, "inline": 1} and sol.stats["engine_load_s"] == 1.25


def test_the_compile_record_matches_only_the_loops_on_disk(tmp_path, monkeypatch):
    """The record of a finished compile is written beside numba's cache and is void once the kernels' source
    changes (its stamp) or numba's index files are gone."""
    path = tmp_path / "rec.json"
    monkeypatch.setattr(EN, "_marker_path", lambda: str(path))
    F.warm_up()
    F._write_marker(40.0, compiled=True)  # a compile: its time is the compile's, the load is estimated
    rec = F._marker()
    assert rec is not None and rec["compile_s"] == 40.0 and rec["load_s"] == F.LOAD_ESTIMATE_S
    F._write_marker(0.5, compiled=False)  # a load from the cache: measured, the compile's time kept
    rec = F._marker()
    assert rec["load_s"] == 0.5 and rec["compile_s"] == 40.0 and rec["stamp"] == F._source_stamp()
    assert F.expected_load_seconds() == 0.0  # loaded in this process
    monkeypatch.setattr(EN, "_source_stamp", lambda: [0, 0])
    assert F._marker() is None


def test_every_loop_module_is_compiled_by_the_warm_up():
    """The loops' modules are the ``_fast_*`` files other than the driver's (a new loop file must join
    ``K.MODULES``); every function in them is a kernel or is called from one (so the warm calls, which the
    detached compile runs, reach it); after the warm-up every compiled function's disk cache holds a fresh entry
    stamped with all the loops' files, and the compile record's stamp names every one of those files."""
    folder = Path(K.__file__).parent
    not_loops = {"_fast_kernels.py", "_fast_codes.py", "_fast_engine.py", "_fast_driver.py"}
    on_disk = {p.name for p in folder.glob("_fast_*.py")} - not_loops
    assert on_disk == {Path(m.__file__).name for m in K.MODULES}
    assert [Path(p).name for p in K.source_files()] == [Path(m.__file__).name for m in K.MODULES] + ["_fast_codes.py"]
    funcs = K.functions()
    assert {f.__module__ for f in funcs.values()} == {m.__name__ for m in K.MODULES}
    reached, todo = set(), [f.__name__ for f in K._PY.values()]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += [n for n in funcs[name].__code__.co_names if n in funcs]
    assert reached == set(funcs)
    F.warm_up()
    disp = K.dispatchers()
    assert set(disp) == set(funcs) and set(K.INLINE) < set(funcs)
    stamp = K.source_stamp()
    for name, d in disp.items():
        cache_file = d._cache._cache_file
        assert cache_file._source_stamp == stamp, name
        if name not in K.INLINE:  # inlined helpers are compiled inside their callers, never on their own
            assert cache_file._load_index(), f"{name}: no fresh cache entry after the warm-up"
    assert [row[0] for row in EN._source_stamp()] == [Path(p).name for p in K.source_files()]


def test_the_cache_stamp_changes_with_any_loop_file(tmp_path, monkeypatch):
    """An edit to any one of the loops' files changes the stamp every compiled loop's cache carries."""
    copies = []
    for p in K.source_files():
        c = tmp_path / Path(p).name
        c.write_bytes(Path(p).read_bytes())
        copies.append(str(c))
    monkeypatch.setattr(K, "source_files", lambda: copies)
    base = K.source_stamp()
    assert K.source_stamp() == base
    seen = {base}
    for c in copies:
        original = Path(c).read_bytes()
        Path(c).write_bytes(original + b"# edited\n")
        seen.add(K.source_stamp())
        Path(c).write_bytes(original)
    assert len(seen) == len(copies) + 1 and K.source_stamp() == base


@pytest.mark.parametrize("mag", [0.0, 1e-3, 1.0, 1e3, 1e6, 1e12])
def test_normalised_warm_start_keeps_rankings_and_size(mag):
    """A uniform shift is removed and prices stay within the rows' spread R; every token's ranking among the
    experts priced below R is unchanged."""
    rng = np.random.default_rng(int(mag) % 97)
    s = rng.random((50, 7)) - 1.0
    q0 = 5.0 + mag * rng.random(7)
    q = F._normalise_warm_start(s, q0)
    R = s.max(axis=1).max() - s.min(axis=1).min()
    assert q.min() == 0.0 and q.max() <= R
    keep = (q0 - q0.min()) < R
    np.testing.assert_allclose(q[keep], (q0 - q0.min())[keep])


def test_timing_tables_show_the_one_time_load_apart(cold_engine, hot):
    """compare's rows give the time without the load and the load in its own field; the table names it."""
    from moebalance import compare

    table = compare(hot, ["fast"])
    row = table.rows()[0]
    sol = table.solutions[0]
    assert row["engine_load_s"] == 1.25 and row["wall_time"] == pytest.approx(sol.wall_time - 1.25)
    assert "one-time engine load, not in the times: fast 1.25 s" in str(table)
    warm = compare(hot, ["fast"])  # loaded now: nothing to show apart
    assert warm.rows()[0]["engine_load_s"] is None and "one-time" not in str(warm)
