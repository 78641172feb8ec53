"""A family is what it declares: a fourth family, defined entirely here, works with solve, compare,
available_methods, save/load and the CLI, with no edit anywhere else; and the core names no family."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moebalance
import moebalance.family as family_mod
import moebalance.registry as registry
from moebalance import compare, solve
from moebalance.cli import main
from moebalance.family import ARRAY_OF_INTS, Family, Generator, all_families, declare, family_of
from moebalance.io import load_problem, load_solution, save_problem, save_solution
from moebalance.solution import Evaluation, Solution, Status


# ---- the toy family: n items of integer sizes into m bins, minimise the fullest bin ----------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class BinsSolution(Solution):
    """``assignment`` is ``[n]`` bin ids; ``bin_loads`` ``[m]`` the size in each bin (from the check)."""

    bin_loads: np.ndarray | None = None


class BinsProblem:
    kind = "bins"
    sense = "min"
    load_ratio_label = "max/mean"
    solution_type = BinsSolution

    def __init__(self, sizes: Any, num_bins: int):
        s = np.asarray(sizes)
        if s.ndim != 1 or s.size == 0 or not np.issubdtype(s.dtype, np.integer) or s.min() < 0:
            raise ValueError(f"`sizes` must be a non-empty 1-D array of integers >= 0, got {sizes!r:.80}")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"`num_bins` must be an integer >= 1, got {num_bins!r}")
        self.sizes = s.astype(np.int64)
        self.num_bins = num_bins

    def __repr__(self) -> str:
        return f"BinsProblem(n={self.sizes.size}, m={self.num_bins})"

    def evaluate(self, assignment: Any, solution: Any = None) -> Evaluation:
        a = np.asarray(assignment)
        if a.shape != self.sizes.shape or not np.issubdtype(a.dtype, np.integer):
            return Evaluation(False, float("nan"), [f"assignment must be {self.sizes.size} integer bin ids"])
        if a.min() < 0 or a.max() >= self.num_bins:
            return Evaluation(False, float("nan"), [f"bin ids must lie in [0, {self.num_bins})"])
        loads = np.bincount(a, weights=self.sizes, minlength=self.num_bins).astype(np.int64)
        mean = loads.mean()
        return Evaluation(
            True, float(loads.max()), [], {"bin_loads": loads}, float(loads.max() / mean) if mean else 1.0
        )

    def certify(self, solution: Any) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        return float(max(self.sizes.sum() / self.num_bins, self.sizes.max())), {}, {}

    def objective_scale(self) -> float:
        return float(self.sizes.sum() / self.num_bins)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "bins", "sizes": self.sizes.tolist(), "num_bins": self.num_bins}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BinsProblem:
        unknown = sorted(set(d) - {"kind", "sizes", "num_bins"})
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}")
        return cls(d["sizes"], d["num_bins"])


def _brute(problem: BinsProblem, *, time_limit: float | None = None) -> BinsSolution:
    """Every assignment: the optimum, proven by enumeration."""
    best, best_a = None, None
    for a in itertools.product(range(problem.num_bins), repeat=problem.sizes.size):
        top = np.bincount(a, weights=problem.sizes, minlength=problem.num_bins).max()
        if best is None or top < best:
            best, best_a = top, np.array(a, dtype=np.int64)
    return BinsSolution(method="brute", status=Status.OPTIMAL, assignment=best_a, bound=float(best))


def _largest_first(problem: BinsProblem, *, time_limit: float | None = None) -> BinsSolution:
    """Largest item first into the emptiest bin."""
    loads = np.zeros(problem.num_bins, dtype=np.int64)
    a = np.empty(problem.sizes.size, dtype=np.int64)
    for i in np.argsort(-problem.sizes, kind="stable"):
        a[i] = int(np.argmin(loads))
        loads[a[i]] += problem.sizes[i]
    return BinsSolution(method="largest-first", status=Status.FEASIBLE, assignment=a)


def _generate(args: Any) -> tuple[BinsProblem, str]:
    rng = np.random.default_rng(args.seed)
    return BinsProblem(rng.integers(1, 10, size=args.items), args.bins), ""


@pytest.fixture
def bins_family():
    """The toy family declared and its two methods registered for one test, then removed again."""
    fam = declare(
        Family(
            name="bins",
            problem=BinsProblem,
            solution=BinsSolution,
            auto=("largest-first",),
            solution_fields={"bin_loads": ARRAY_OF_INTS},
            generator=Generator(
                arguments=(
                    (("--items",), dict(type=int, default=6, help="items")),
                    (("--bins",), dict(type=int, default=2, help="bins")),
                    (("--seed",), dict(type=int, default=0, help="random seed (default 0)")),
                ),
                make=_generate,
            ),
        )
    )
    try:
        registry.register(BinsProblem, "brute", exact=True, gives_bound=True)(_brute)
        registry.register("bins", "largest-first")(_largest_first)  # by the declared name
        yield fam
    finally:
        family_mod._DECLARED.pop("bins", None)
        registry._REGISTRY.pop(BinsProblem, None)
        registry._ALIASES.pop(BinsProblem, None)


# sizes [3, 3, 2, 2, 2] in 2 bins: 6 = 3 + 3 | 2 + 2 + 2 is optimal; largest-first gets 3+2+2 | 3+2 = 7
TOY = ([3, 3, 2, 2, 2], 2)


def test_solve_available_methods_and_auto_read_the_declaration(bins_family):
    problem = BinsProblem(*TOY)
    assert registry.available_methods("bins") == ["brute", "largest-first"]  # exact first
    assert registry.available_methods(problem) == ["brute", "largest-first"]
    assert registry.method_info(problem, "auto").name == "largest-first"  # the declared auto order
    exact, greedy = solve(problem, "brute"), solve(problem)
    assert isinstance(exact, BinsSolution) and exact.status == Status.OPTIMAL and exact.objective == 6.0
    assert greedy.method == "largest-first" and greedy.objective == 7.0 and greedy.status == Status.FEASIBLE
    assert greedy.bound == 6.0 and exact.objective <= greedy.objective  # certify's bound holds for both
    assert list(exact.bin_loads) == [6, 6]
    assert family_of(problem) is bins_family and family_of(BinsSolution) is bins_family
    assert registry.families()["bins"] is BinsProblem


def test_compare_measures_every_gap_to_the_best_bound(bins_family):
    table = compare(BinsProblem(*TOY))
    rows = {r["method"]: r for r in table.rows()}
    assert set(rows) == {"brute", "largest-first"}
    assert table.best_bound == 6.0
    assert rows["brute"]["gap"] == 0.0
    assert rows["largest-first"]["gap"] == pytest.approx(1 / 7)
    assert "max/mean" in str(table)  # the problem's own label of the load ratio


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_problem_and_solution_files_round_trip(bins_family, tmp_path, suffix):
    problem = BinsProblem(*TOY)
    path = save_problem(problem, tmp_path / f"p{suffix}")
    back = load_problem(path)
    assert isinstance(back, BinsProblem) and list(back.sizes) == TOY[0] and back.num_bins == TOY[1]
    sol = solve(back, "brute")
    sol_path = save_solution(sol, tmp_path / "s.json")
    assert json.loads(sol_path.read_text())["kind"] == "bins"
    again = load_solution(sol_path)
    assert type(again) is BinsSolution and again.objective == 6.0
    assert again.bin_loads.dtype == np.int64 and list(again.bin_loads) == [6, 6]
    (tmp_path / "bad.json").write_text('{"kind": "bins", "sizes": [1], "num_bins": 1, "colour": 3}')
    with pytest.raises(ValueError, match="bad.json: unknown key"):
        load_problem(tmp_path / "bad.json")


def test_the_cli_solves_compares_and_generates_the_family(bins_family, tmp_path, capsys):
    f = tmp_path / "p.json"
    assert main(["gen", str(f), "--family", "bins", "--items", "5", "--bins", "2"]) == 0
    assert isinstance(load_problem(f), BinsProblem) and load_problem(f).sizes.size == 5
    save_problem(BinsProblem(*TOY), f)
    out = tmp_path / "s.json"
    assert main(["solve", str(f), "--method", "brute", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "status     optimal" in printed and "objective  6" in printed
    assert load_solution(out).objective == 6.0
    assert main(["compare", str(f), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "brute" in printed and "largest-first" in printed
    assert main(["solve", str(f), "--method", "mcf"]) == 2  # a routing method: refused by name
    assert "unknown `method` 'mcf'" in capsys.readouterr().err


def test_a_family_package_is_found_without_a_central_list(tmp_path, monkeypatch):
    """A sub-package of moebalance with a ``family`` module is discovered: nothing lists the families."""
    pkg = tmp_path / "shelves"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "family.py").write_text(
        textwrap.dedent(
            """
            import dataclasses
            from moebalance.family import Family, declare
            from moebalance.solution import Solution

            @dataclasses.dataclass(frozen=True, repr=False)
            class ShelvesSolution(Solution):
                pass

            class ShelvesProblem:
                kind = "shelves"
                solution_type = ShelvesSolution

            FAMILY = declare(Family(name="shelves", problem=ShelvesProblem, solution=ShelvesSolution))
            """
        )
    )
    monkeypatch.setattr(moebalance, "__path__", [*moebalance.__path__, str(tmp_path)])
    monkeypatch.setattr(family_mod, "_DISCOVERED", False)
    try:
        found = all_families()
        assert {"routing", "placement", "replication", "shelves"} <= set(found)
        assert found["shelves"].problem.__module__ == "moebalance.shelves.family"
    finally:
        family_mod._DECLARED.pop("shelves", None)
        for name in ("moebalance.shelves.family", "moebalance.shelves"):
            sys.modules.pop(name, None)
    assert "shelves" not in all_families()


def test_the_package_families_declare_their_modules():
    found = all_families()
    assert {"routing", "placement", "replication"} <= set(found)
    for name in ("routing", "placement", "replication"):
        fam = found[name]
        assert fam.problem.kind == name and fam.problem.solution_type is fam.solution
        assert fam.problem.__module__ == f"moebalance.{name}.problem"
        assert fam.solution.__module__ == f"moebalance.{name}.solution"
        assert fam.auto, name
        for module in ("problem", "solution", "check", "io", "family"):
            assert (Path(moebalance.__file__).parent / name / f"{module}.py").is_file(), (name, module)
    assert [n for n, f in found.items() if f.untagged_files] == ["routing"]


def test_a_declaration_is_checked():
    with pytest.raises(ValueError, match="kind must be 'other'"):
        Family(name="other", problem=BinsProblem, solution=BinsSolution)
    with pytest.raises(ValueError, match="solution_type"):
        Family(name="bins", problem=BinsProblem, solution=Solution)
    with pytest.raises(ValueError, match="solution_fields"):
        Family(name="bins", problem=BinsProblem, solution=BinsSolution, solution_fields={"bin_loads": "bytes"})
    taken = all_families()["routing"]
    with pytest.raises(ValueError, match="already declared"):
        declare(dataclasses.replace(taken, problem=_renamed(BinsProblem, "routing"), solution=BinsSolution))
    assert all_families()["routing"] is taken


def _renamed(cls: type, kind: str) -> type:
    sub = type(f"{kind.title()}Lookalike", (cls,), {"kind": kind})
    return sub


def test_the_core_names_no_family():
    """registry, io, compare, the CLI and the shared check read families from their declarations: no string
    literal in them is a family's name (docstrings aside)."""
    root = Path(moebalance.__file__).parent
    names = set(all_families())
    offenders = []
    for module in ("registry.py", "io.py", "comparison.py", "cli.py", "checking.py", "family.py"):
        tree = ast.parse((root / module).read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names:
                    offenders.append(f"{module}:{node.lineno} {node.value!r}")
    assert offenders == []
