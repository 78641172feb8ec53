"""``moebalance plot``: a user's own problem and solution files drawn into one PNG, every solution re-checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moebalance as mb
from moebalance.cli import main
from moebalance.evaluation.plot_files import load_solution
from moebalance.generate import routing_problem
from moebalance.io import save_problem, save_solution
from moebalance.placement import PlacementProblem


@pytest.fixture()
def routing_files(tmp_path):
    problem = routing_problem(60, 6, 2, kind="zipf", seed=3)
    save_problem(problem, tmp_path / "p.npz")
    paths = []
    for method in ("greedy", "mcf"):
        paths.append(save_solution(mb.solve(problem, method), tmp_path / f"{method}.json"))
    return problem, tmp_path / "p.npz", paths


def _png(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something is drawn, not a blank page
    return img


def test_plot_of_a_routing_problem_and_two_solutions(routing_files, tmp_path, capsys):
    _, problem_path, solutions = routing_files
    out = tmp_path / "plot.png"
    assert main(["plot", str(problem_path), *map(str, solutions), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    wide = _png(out)
    one = tmp_path / "one.png"
    assert main(["plot", str(problem_path), str(solutions[1]), "-o", str(one)]) == 0
    assert _png(one).shape[1] < wide.shape[1]  # one solution: no gap panel


def test_plot_of_a_placement_problem(tmp_path):
    problem = PlacementProblem([900, 30, 20, 10, 50, 5, 200, 100], 4)
    save_problem(problem, tmp_path / "q.json")
    sols = [save_solution(mb.solve(problem, m), tmp_path / f"{m}.json") for m in ("ep", "llep")]
    out = tmp_path / "q.png"
    assert main(["plot", str(tmp_path / "q.json"), *map(str, sols), "--out", str(out)]) == 0
    _png(out)


def test_a_solution_file_is_rechecked_on_the_problem(routing_files, tmp_path):
    problem, _, solutions = routing_files
    d = json.loads(solutions[1].read_text())
    d["loads"] = [0] * problem.num_experts  # numbers stored beside the assignment are not believed
    d["objective"] = 1e9
    (tmp_path / "edited.json").write_text(json.dumps(d))
    sol = load_solution(problem, tmp_path / "edited.json")
    ref = mb.solve(problem, "mcf")
    assert sol.feasible and sol.objective == pytest.approx(ref.objective, rel=1e-12)
    assert np.array_equal(sol.loads, ref.loads)
    bad = dict(d, assignment=[[0, 1]] * problem.num_tokens)  # every token on experts 0 and 1: over capacity
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert not load_solution(problem, tmp_path / "bad.json").feasible


@pytest.mark.parametrize(
    "case, needle",
    [
        ("suffix", ".png"),
        ("missing", "does not exist"),
        ("not_json", "not a solution"),
        ("wrong_shape", "solution"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(routing_files, tmp_path, capsys, case, needle):
    _, problem_path, solutions = routing_files
    out, sol = tmp_path / "out.png", str(solutions[0])
    if case == "suffix":
        out = tmp_path / "out.jpg"
    elif case == "missing":
        sol = str(tmp_path / "nope.json")
    elif case == "not_json":
        (tmp_path / "x.json").write_text("[1, 2")
        sol = str(tmp_path / "x.json")
    else:  # a solution of another problem
        other = routing_problem(10, 3, 1, seed=0)
        sol = str(save_solution(mb.solve(other, "greedy"), tmp_path / "other.json"))
    before = set(tmp_path.iterdir())
    assert main(["plot", str(problem_path), sol, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moebalance: error:") and len(err.strip().splitlines()) == 1, err
    assert needle in err, err
    assert set(tmp_path.iterdir()) == before
