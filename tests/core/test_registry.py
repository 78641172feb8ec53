"""solve(), the registry, option checking and the shared check's downgrades."""

import numpy as np
import pytest

import moebalance as mb
from moebalance import RoutingProblem, Solution, Status, solve
from moebalance.registry import _REGISTRY, register


@pytest.fixture
def problem():
    return RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]), 1, capacity=2)


@pytest.fixture
def fake_methods():
    names = []

    def add(name, **kw):
        names.append(name)
        return register("routing", name, **kw)

    yield add
    for n in names:
        _REGISTRY[RoutingProblem].pop(n, None)


def test_unknown_method_lists_valid_ones(problem):
    with pytest.raises(ValueError, match=r"unknown `method` 'nope'.*mcf"):
        solve(problem, "nope")


def test_unknown_option_lists_valid_ones(problem):
    with pytest.raises(ValueError, match=r"unknown option.*'maxcost'.*valid options: .*max_cost"):
        solve(problem, "mcf", maxcost=3)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "soon"])
def test_bad_time_limit(problem, bad):
    with pytest.raises(ValueError, match="time_limit"):
        solve(problem, "mcf", time_limit=bad)


def test_bad_problem_type():
    with pytest.raises(ValueError, match="problem"):
        solve(np.zeros((2, 2)), "mcf")


def test_auto_picks_an_exact_method(problem):
    sol = solve(problem)
    assert sol.method == "fast" and sol.status == Status.OPTIMAL  # fast is the auto default


def test_claimed_optimal_but_infeasible_is_downgraded(problem, fake_methods):
    @fake_methods("liar")
    def liar(p, *, time_limit=None):
        return Solution(
            "liar", Status.OPTIMAL, objective=99.0, bound=99.0, assignment=np.array([[0], [0], [0]])
        )  # expert 0 takes 3 > capacity 2

    sol = solve(problem, "liar")
    assert sol.status == Status.INFEASIBLE
    assert "over capacity" in sol.message
    assert sol.objective == pytest.approx(0.9 + 0.8 + 0.3)  # recomputed, not the claimed 99
    assert sol.gap is None


def test_claimed_optimal_with_distant_bound_is_downgraded(problem, fake_methods):
    @fake_methods("boaster")
    def boaster(p, *, time_limit=None):
        return Solution("boaster", Status.OPTIMAL, objective=0.0, bound=10.0, assignment=np.array([[1], [1], [0]]))

    sol = solve(problem, "boaster")
    assert sol.status == Status.FEASIBLE and "claimed optimal" in sol.message


def test_malformed_assignments_are_infeasible(problem, fake_methods):
    bad = {"shape": np.array([0, 1, 0]), "range": np.array([[0], [5], [1]]), "float": np.array([[0.0], [1.0], [1.0]])}
    for name, a in bad.items():
        fake_methods(f"bad_{name}")(
            lambda p, *, time_limit=None, a=a: Solution("x", Status.FEASIBLE, 0.0, assignment=a)
        )
        sol = solve(problem, f"bad_{name}")
        assert sol.status == Status.INFEASIBLE, name
        assert np.isnan(sol.objective)


def test_backend_exception_becomes_error_status(problem, fake_methods):
    @fake_methods("crash")
    def crash(p, *, time_limit=None):
        raise RuntimeError("segfault-ish")

    sol = solve(problem, "crash")
    assert sol.status == Status.ERROR and "segfault-ish" in sol.message


def test_missing_assignment_is_never_optimal(problem, fake_methods):
    fake_methods("empty")(lambda p, *, time_limit=None: Solution("empty", Status.OPTIMAL, 1.0))
    assert solve(problem, "empty").status == Status.ERROR


def test_solution_fields_and_json(problem):
    sol = solve(problem, "lp")
    d = sol.to_dict()
    for key in (
        "method",
        "status",
        "objective",
        "bound",
        "gap",
        "assignment",
        "loads",
        "bias",
        "wall_time",
        "stats",
        "message",
    ):
        assert key in d
    import json

    json.dumps(d)
    assert d["status"] == "optimal" and sol.assignment.shape == (3, 1) and sol.loads.tolist() == [2, 1]
    assert sol.wall_time > 0


def test_compare_table(problem):
    table = mb.compare(problem, ["mcf", "greedy", "topk"])
    rows = table.rows()
    assert [r["method"] for r in rows] == ["mcf", "greedy", "topk"]
    assert table.best_bound == pytest.approx(0.9 + 0.8 + 0.7)  # mcf's optimum is the best bound
    assert rows[0]["gap"] == pytest.approx(0.0, abs=1e-9)
    text = str(table)
    assert "mcf" in text and "max/cap" in text
    import json

    assert json.loads(table.to_json())["rows"][0]["method"] == "mcf"


def test_method_info_flags():
    info = mb.method_info("routing", "bip")
    assert info.exact and info.gives_bound and info.backends == ("ortools",)
    assert not mb.method_info("routing", "greedy").exact


# ---- what a method can solve, said by the registry ----------------------------------------------------------
def _replication(old=False):
    from moebalance.replication import ReplicationProblem

    w = [[6.0, 1.0, 0.0, 3.0], [2.0, 2.0, 5.0, 0.0]]
    return ReplicationProblem(w, 6, num_gpus=2, old_phy2log=[[0, 1, 2, 3, 0, 3], [0, 1, 2, 3, 2, 2]] if old else None)


def test_available_methods_lists_only_methods_that_can_solve_the_problem():
    plain, with_old = _replication(), _replication(old=True)
    assert "migrate" not in mb.available_methods(plain)
    assert "migrate" in mb.available_methods(with_old) and "migrate" in mb.available_methods("replication")
    # every listed method really solves it: a valid plan, no error status
    for p in (plain, with_old):
        for m in mb.available_methods(p):
            sol = solve(p, m, time_limit=30)
            assert sol.status != Status.ERROR and sol.feasible, (m, sol.message)


def test_a_method_that_cannot_solve_the_problem_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"`method` 'migrate' cannot solve.*`old_phy2log`.*methods that can: .*eplb"):
        solve(_replication(), "migrate")
    with pytest.raises(ValueError, match="`method` 'migrate' cannot solve"):
        mb.compare(_replication(), ["eplb", "migrate"])


def test_requires_is_declared_at_registration(problem, fake_methods):
    fake_methods("needs_bias", requires="bias_prior")(
        lambda p, *, time_limit=None: Solution("needs_bias", Status.FEASIBLE, assignment=np.array([[0], [0], [1]]))
    )
    assert mb.method_info("routing", "needs_bias").requires == ("bias_prior",)
    assert "needs_bias" not in mb.available_methods(problem)
    assert "needs_bias" in mb.available_methods("routing")
    with pytest.raises(ValueError, match="`bias_prior`"):
        solve(problem, "needs_bias")


def test_compare_of_a_replication_problem_runs_every_listed_method():
    table = mb.compare(_replication(), time_limit=30)
    assert [r["method"] for r in table.rows()] == mb.available_methods(_replication())
    assert all(s.feasible for s in table.solutions)


def test_compare_with_one_name_is_one_method(problem):
    table = mb.compare(problem, "mcf")
    assert [r["method"] for r in table.rows()] == ["mcf"]


@pytest.mark.parametrize(
    "methods, options, time_limit, needle",
    [
        (["mcf", "nope"], None, None, "unknown `method` 'nope'"),
        ([], None, None, "`methods` is empty"),
        (["mcf", "mcf"], None, None, "twice"),
        ([3], None, None, "`methods`"),
        (42, None, None, "`methods`"),
        (b"mcf", None, None, "`methods`"),
        (["mcf"], {"mcf": {"maxcost": 1}}, None, "unknown option"),
        (["mcf"], {"mcf": 3}, None, "`options`"),
        (["mcf"], {"lp": {}}, None, "not compared"),
        (["mcf"], None, float("nan"), "`time_limit`"),
        (["mcf"], None, -1, "`time_limit`"),
        (["mcf"], None, True, "`time_limit`"),
    ],
)
def test_compare_validates_like_solve_before_running_anything(
    problem, fake_methods, methods, options, time_limit, needle
):
    ran = []
    fake_methods("spy")(lambda p, *, time_limit=None: ran.append(1))
    names = ["spy", *methods] if isinstance(methods, list) and methods else methods
    with pytest.raises(ValueError, match=needle):
        mb.compare(problem, names, options=options, time_limit=time_limit)
    assert ran == []  # nothing ran before the error


def test_compare_refuses_a_family_name_as_problem():
    with pytest.raises(ValueError, match="`problem` must be a problem object"):
        mb.compare("routing", ["mcf"])


# ---- messages tell the truth ---------------------------------------------------------------------------------
def test_a_time_limit_without_an_answer_never_claims_one(problem, monkeypatch):
    """Every routing method under the shared deadline driver: when neither the back-end nor the greedy fallback
    finished, the message says there is no answer (and how to get one), never 'greedy answer returned'."""
    import moebalance.solvers._isolate as isolate
    import moebalance.solvers._routing_common as common

    monkeypatch.setattr(isolate, "run_bounded", lambda *a, **k: (None, None))  # the deadline killed the job
    monkeypatch.setattr(common, "fallback", lambda p, deadline=None: {"assignment": None, "bound": 3.0})
    checked = 0
    for m in mb.available_methods(problem):
        if not mb.method_info(problem, m).supports_time_limit:
            continue
        sol = solve(problem, m, time_limit=5)
        if sol.assignment is None:
            checked += 1
            assert sol.status == Status.TIME_LIMIT and np.isnan(sol.objective)
            assert "greedy answer" not in sol.message and "no answer" in sol.message, (m, sol.message)
    assert checked >= 3


def test_a_job_that_stops_without_an_answer_is_said_so(problem, monkeypatch):
    import moebalance.solvers._routing_common as common

    monkeypatch.setattr(common, "fallback", lambda p, deadline=None: {"assignment": None, "bound": 3.0})
    stopped = mb.RoutingSolution(method="x", status=Status.TIME_LIMIT, message="back-end stopped")

    def job(p, *, time_limit=None):
        return {}

    sol = common.drive("x", problem, job, {}, time_limit=1.0, start=0.0, to_solution=lambda p, raw, t: stopped)
    assert sol.assignment is None and "greedy answer" not in sol.message and "no answer" in sol.message
    assert sol.bound == 3.0  # the fallback's bound where the back-end gave none
    done = np.array([[0], [0], [1]])
    monkeypatch.setattr(common, "fallback", lambda p, deadline=None: {"assignment": done, "bound": 3.0})
    sol = common.drive("x", problem, job, {}, time_limit=1.0, start=0.0, to_solution=lambda p, raw, t: stopped)
    assert sol.assignment is done and "greedy answer" in sol.message and sol.message.startswith("back-end stopped")


def test_finalize_says_how_to_get_an_answer_after_a_time_limit(problem, fake_methods):
    fake_methods("slow")(lambda p, *, time_limit=None: Solution("slow", Status.TIME_LIMIT, message="stopped"))
    sol = solve(problem, "slow", time_limit=1)
    assert sol.assignment is None and "no answer within the time limit" in sol.message and "`time_limit`" in sol.message


def test_a_method_returning_no_solution_is_an_error_status(problem, fake_methods):
    fake_methods("nothing")(lambda p, *, time_limit=None: None)
    sol = solve(problem, "nothing")
    assert sol.status == Status.ERROR and "returned None" in sol.message
