"""The adapter type and the method table the registry generates: every method is an Adapter, its defaults are
its signature's, the docs' table is the registry's, and a method written as one class registers and solves."""

from __future__ import annotations

import inspect
import pathlib
import re

import numpy as np
import pytest

import moebalance as mb
from moebalance import RoutingProblem, Solution, Status
from moebalance.adapter import FLAGS, Adapter, FunctionAdapter, Option, bind_options
from moebalance.registry import _REGISTRY, method_table, method_table_markdown, register, register_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "methods.md"


def _all_adapters():
    mb.available_methods("routing")  # loads the solvers
    return [(cls, name, a) for cls, table in _REGISTRY.items() for name, a in table.items()]


def test_the_docs_table_is_the_generated_one():
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- method-table: begin -->\n(.*?)<!-- method-table: end -->", text, re.S)
    assert m, "docs/methods.md lost its method-table markers"
    assert m.group(1) == method_table_markdown(), "docs/methods.md is stale: paste `moebalance methods --markdown`"


def test_every_registered_method_is_an_adapter_in_the_table():
    adapters = _all_adapters()
    assert len(adapters) >= 20
    rows = {(r["family"], r["method"]) for r in method_table()}
    for cls, name, a in adapters:
        assert isinstance(a, Adapter) and isinstance(a, mb.registry.SolverInfo)
        assert (cls.kind, name) in rows
        assert mb.method_info(cls, name) is a


def test_each_methods_file_is_the_one_that_registers_it():
    for r in method_table():
        path = ROOT / r["file"]
        assert path.is_file(), r
        src = path.read_text(encoding="utf-8")
        as_function = re.search(r"@register\([^)]*?\"" + re.escape(r["method"]) + '"', src, re.S)
        as_class = re.search(
            r"@register_adapter\nclass \w+\(Adapter\):.*?\n    name = \"" + re.escape(r["method"]) + '"', src, re.S
        )
        assert as_function or as_class, r
    mcf = [r for r in method_table() if r["method"] == "mcf"]
    assert [r["file"] for r in mcf] == ["solvers/routing_flow.py"]
    from moebalance.solvers.routing_flow import MinCostFlow

    assert isinstance(mb.method_info("routing", "mcf"), MinCostFlow)  # a back-end adapter written as one class


def test_defaults_are_the_signatures_and_every_option_is_documented():
    for _, name, a in _all_adapters():
        params = inspect.signature(a.func).parameters
        for opt, spec in a.option_schema.items():
            assert params[opt].default == spec.default or params[opt].default is spec.default, (name, opt)
            assert spec.doc and spec.type != "any", (name, opt)
        assert a.options == {k: o.default for k, o in a.option_schema.items()}
        # options the solve accepts and options the schema lists are the same set
        keywords = {p for p, v in params.items() if v.kind == v.KEYWORD_ONLY and p != "time_limit"}
        assert keywords == set(a.options), name


def test_a_registration_that_writes_a_default_twice_and_differently_is_refused():
    def f(p, *, time_limit=None, size: int = 3):
        return None

    assert bind_options(f, {"size": Option("int", "n")}, "t")["size"].default == 3
    assert bind_options(f, {"size": 3}, "t")["size"].default == 3  # the older form, agreeing
    with pytest.raises(TypeError, match="default 4 in the registration but 3 in the signature"):
        bind_options(f, {"size": 4}, "t")
    with pytest.raises(TypeError, match="not a keyword argument"):
        bind_options(f, {"other": Option("int", "n")}, "t")

    def g(p, *, time_limit=None, size: int):
        return None

    with pytest.raises(TypeError, match="no default"):
        bind_options(g, {"size": Option("int", "n")}, "t")


def test_contradicting_flags_are_refused_at_registration():
    def f(p, *, time_limit=None):
        return None

    with pytest.raises(TypeError, match="per_step"):
        FunctionAdapter(RoutingProblem, "x", f, per_step=True, deterministic=False)
    with pytest.raises(TypeError, match="per_step"):
        FunctionAdapter(RoutingProblem, "x", f, per_step=True, backends=("ortools",))
    with pytest.raises(TypeError, match="isolated"):
        FunctionAdapter(RoutingProblem, "x", f, isolated=True)
    with pytest.raises(TypeError, match="unknown capability flag"):
        FunctionAdapter(RoutingProblem, "x", f, fast=True)


def test_per_step_methods_give_the_same_plan_twice():
    """What the runtime relies on when it plans every step: a per-step method is deterministic and answers
    the same on the same loads."""
    from moebalance.generate import routing_problem
    from moebalance.placement import PlacementProblem
    from moebalance.replication import ReplicationProblem

    rng = np.random.default_rng(3)
    problems = {
        "routing": routing_problem(64, 8, 2, seed=3),
        "placement": PlacementProblem(rng.integers(0, 500, 16), 4),
        "replication": ReplicationProblem(rng.integers(1, 100, (2, 8)), 12, num_gpus=4),
    }
    seen = 0
    for r in method_table():
        if not r["flags"]["per_step"] or r["requires"]:
            continue
        p = problems[r["family"]]
        a, b = mb.solve(p, r["method"]), mb.solve(p, r["method"])
        assert a.feasible and np.array_equal(a.assignment, b.assignment), r["method"]
        seen += 1
    assert seen >= 6


class _ToyTopOne(Adapter):
    """A method in one class: the expert with the highest score, whatever its capacity (may be infeasible)."""

    family = "routing"
    name = "_toy_top_one"
    per_step = True
    OPTIONS = {"claim": Option("str", "the status it claims")}

    def solve(self, problem, *, time_limit=None, claim: str = "optimal"):
        a = np.argsort(-problem.scores, axis=1, kind="stable")[:, : problem.k]
        return Solution(self.name, Status(claim), objective=1e9, bound=1e9, assignment=a)


@pytest.fixture
def toy():
    register_adapter(_ToyTopOne)
    yield _REGISTRY[RoutingProblem]["_toy_top_one"]
    _REGISTRY[RoutingProblem].pop("_toy_top_one", None)


def test_a_method_written_as_one_class_registers_and_goes_through_the_shared_check(toy):
    assert isinstance(toy, _ToyTopOne) and toy.options == {"claim": "optimal"} and toy.per_step
    assert toy.family is RoutingProblem and toy.kind == "routing" and mb.method_info("routing", "_toy_top_one") is toy
    row = [r for r in method_table() if r["method"] == "_toy_top_one"][0]
    assert row["file"] == "tests/core/test_method_table.py" and row["flags"]["per_step"]
    tight = RoutingProblem(np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]), 1, capacity=2)
    sol = mb.solve(tight, "_toy_top_one")  # all three on expert 0, capacity 2: the check says so
    assert sol.status == Status.INFEASIBLE and sol.objective == pytest.approx(0.9 + 0.8 + 0.7)
    loose = RoutingProblem(tight.scores, 1, capacity=3)
    sol = mb.solve(loose, "_toy_top_one", claim="feasible")
    assert sol.status == Status.FEASIBLE  # as claimed; its bound of 1e9 is valid, only loose
    assert sol.feasible and sol.objective == pytest.approx(2.4)
    with pytest.raises(ValueError, match="unknown option.*'clam'.*valid options: claim"):
        mb.solve(loose, "_toy_top_one", clam="x")


def test_register_as_a_function_decorator_still_returns_the_function():
    @register("routing", "_plain_fn", options={"n": 2})
    def plain(p, *, time_limit=None, n=2):
        return None

    try:
        assert callable(plain) and plain.__name__ == "plain"
        info = mb.method_info("routing", "_plain_fn")
        assert (
            info.func is plain
            and info.options == {"n": 2}
            and info.flags() == dict.fromkeys(FLAGS, False) | {"deterministic": True}
        )
    finally:
        _REGISTRY[RoutingProblem].pop("_plain_fn", None)


def test_the_cli_prints_the_same_table(capsys):
    from moebalance.cli import main

    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == method_table_markdown()
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(method_table()) and any("solvers/routing_flow.py" in ln for ln in lines)
