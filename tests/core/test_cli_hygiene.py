"""CLI hygiene: names, options and output paths are checked before anything is solved;
documented exit codes; ``--version``; help for every option; no back-end banners or warnings on stdout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings

import pytest

import moebalance
from moebalance import cli
from moebalance.generate import routing_problem
from moebalance.io import save_problem
from moebalance.solution import Solution, Status


def run(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "moebalance", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.fixture(scope="module")
def hard_file(tmp_path_factory):
    # bip needs several seconds on it
    f = tmp_path_factory.mktemp("hyg") / "hard.npz"
    save_problem(routing_problem(2000, 64, 8, seed=0), f)
    return f


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("hyg") / "small.json"
    save_problem(routing_problem(200, 8, 2, kind="hot", seed=0), f)
    return f


def _error(out, code=cli.EXIT_USAGE):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (out.returncode, out.stderr)
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["compare", "{file}", "--methods", "bip,dula"], "'dula'"),
        (["compare", "{file}", "--methods", "bip,,mcf"], "--methods"),
        (["compare", "{file}", "--methods", "bip", "--json", "{tmp}/no/such/dir/c.json"], "does not exist"),
        (["compare", "{file}", "--methods", "bip", "--json", "{tmp}"], "is a folder"),
        (["compare", "{file}", "--methods", "bip", "--json", "{tmp}/c.txt"], ".json"),
        (["solve", "{file}", "--method", "bip", "--json", "{tmp}/no/such/dir/s.json"], "does not exist"),
        (["solve", "{file}", "--method", "bip", "-o", "workerz=2"], "unknown option"),
        (["solve", "{file}", "--method", "bipp"], "unknown `method`"),
        (["solve", "{file}", "--method", "bip", "--time-limit", "-1"], "time-limit"),
        (["solve", "{file}", "--method", "bip", "--time-limit", "nan"], "time-limit"),
        (["gen", "{tmp}/no/such/dir/p.npz"], "does not exist"),
    ],
)
def test_everything_is_checked_before_solving(hard_file, tmp_path, monkeypatch, capsys, args, needle):
    """Each bad name, option or path is refused (exit 2, one line) with no method run and no file written: the
    solve functions are replaced by ones that record being called."""
    args = [a.replace("{file}", str(hard_file)).replace("{tmp}", str(tmp_path)) for a in args]
    solved = []
    monkeypatch.setattr(sys.modules["moebalance.registry"], "solve", lambda *a, **k: solved.append(a))
    monkeypatch.setattr(sys.modules["moebalance.comparison"], "solve", lambda *a, **k: solved.append(a))
    monkeypatch.chdir(tmp_path)
    try:
        code = cli.main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out = capsys.readouterr()
    assert code == 2 and needle in out.err, out.err
    assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("moebalance: error:")
    assert solved == [], "a method ran before the check"
    assert out.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_python_compare_checks_every_name_first(monkeypatch):
    calls = []
    monkeypatch.setattr(sys.modules["moebalance.comparison"], "solve", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="dula"):
        moebalance.compare(routing_problem(20, 4, 2), ["mcf", "dula"])
    assert calls == []


def test_exit_status_of_solve(small_file, tmp_path):
    ok = run("solve", str(small_file), "--method", "mcf", "--json", str(tmp_path / "s.json"))
    assert ok.returncode == cli.EXIT_OK and json.loads((tmp_path / "s.json").read_text())["status"] == "optimal"
    infeasible = run("solve", str(small_file), "--method", "topk")  # plain top-k ignores capacity
    assert infeasible.returncode == cli.EXIT_INFEASIBLE and "status     infeasible" in infeasible.stdout
    f = tmp_path / "tight.json"
    f.write_text('{"kind": "routing", "scores": [[1, 2], [3, 4]], "k": 1, "capacity": [0, 1]}')
    line = _error(run("solve", str(f)), cli.EXIT_INFEASIBLE)
    assert line.startswith("moebalance: infeasible:") and "`capacity`" in line


@pytest.mark.parametrize(
    "status, answer, code",
    [
        (Status.ERROR, False, cli.EXIT_FAILED),
        (Status.TIME_LIMIT, False, cli.EXIT_FAILED),
        (Status.TIME_LIMIT, True, cli.EXIT_OK),
        (Status.FEASIBLE, True, cli.EXIT_OK),
    ],
)
def test_exit_status_for_each_status(monkeypatch, small_file, tmp_path, capsys, status, answer, code):
    import numpy as np

    from moebalance import registry

    problem = moebalance.io.load_problem(small_file)
    greedy = registry.solve(problem, "greedy")

    def fake(problem, method="auto", **kw):
        raw = Solution(
            method="greedy",
            status=status,
            objective=float("nan"),
            assignment=np.asarray(greedy.assignment) if answer else None,
            message="fake",
        )
        return registry.finalize(problem, raw)

    monkeypatch.setattr(registry, "solve", fake)
    out = tmp_path / "s.json"
    assert cli.main(["solve", str(small_file), "--method", "greedy", "--json", str(out)]) == code
    assert out.is_file()  # the answer is written whatever its status
    assert f"status     {status.value}" in capsys.readouterr().out


def test_compare_exit_status(small_file):
    assert run("compare", str(small_file), "--methods", "mcf,topk", "--no-progress").returncode == cli.EXIT_OK
    assert run("compare", str(small_file), "--methods", "topk", "--no-progress").returncode == cli.EXIT_FAILED


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"moebalance {moebalance.__version__}"


def _actions(parser: argparse.ArgumentParser, path: str = "moebalance"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help():
    parser = cli.build_parser()
    missing = [
        f"{path}: {a.option_strings or a.dest}"
        for path, a in _actions(parser)
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert missing == []
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert set(subs.choices) == {"demo", "solve", "compare", "methods", "gen", "plot", "simulate", "study", "report"}
    assert all(c.help for c in subs._choices_actions)


def test_exit_codes_are_documented():
    doc = cli.__doc__ or ""
    for code in (cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_USAGE, cli.EXIT_INFEASIBLE, cli.EXIT_INTERRUPTED):
        assert f"\n{code} " in doc
    assert "130 interrupted" in cli.build_parser().epilog


def test_no_backend_banner_on_stdout(small_file):
    """HiGHS (through OR-Tools) prints 'Running HiGHS ...' on file descriptor 1 unless the CLI stops it."""
    out = run("solve", str(small_file), "--method", "mip", "-o", "backend=HIGHS")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith("RoutingProblem(") and "HiGHS" not in out.stdout
    out = run("compare", str(small_file), "--no-progress")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("RoutingProblem(") and lines[1].startswith("best bound")
    assert "HiGHS" not in out.stdout and "Warning" not in out.stdout


def test_backend_warnings_become_one_note_on_stderr(monkeypatch, small_file, capsys):
    from moebalance import registry

    real = registry.solve

    def noisy(*a, **k):
        warnings.warn("overflow encountered in multiply", RuntimeWarning, stacklevel=2)
        warnings.warn("second", RuntimeWarning, stacklevel=2)
        return real(*a, **k)

    monkeypatch.setattr(registry, "solve", noisy)
    assert cli.main(["solve", str(small_file), "--method", "mcf"]) == 0
    out, err = capsys.readouterr()
    assert "overflow" not in out
    assert err.strip().splitlines() == [
        "moebalance: note: 2 back-end warning(s) while solving; first: RuntimeWarning: overflow encountered in multiply"
    ]


def test_output_written_whole_or_not_at_all(small_file, tmp_path):
    out = tmp_path / "s.json"
    assert run("solve", str(small_file), "--method", "mcf", "--json", str(out)).returncode == 0
    assert json.loads(out.read_text())["method"] == "mcf"
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]  # no temporary file left behind
