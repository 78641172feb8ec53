"""The CLI's file commands for every family: ``solve`` and ``compare`` read each family's files and write
files with the umask's mode; bad arguments are one error line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from moebalance.integrations._hf_trace import LoadTrace

from moebalance.cli import EXIT_OK, EXIT_USAGE, main
from moebalance.io import load_solution, save_problem, save_solution, write_atomic
from moebalance.placement import PlacementProblem
from moebalance.registry import available_methods, solve
from moebalance.replication import ReplicationProblem
from moebalance.routing import RoutingProblem

PROBLEMS = {
    "routing": RoutingProblem(np.random.default_rng(0).random((30, 4)), 2),
    "placement": PlacementProblem([50, 3, 7, 0], 2),
    "replication": ReplicationProblem(np.random.default_rng(1).integers(0, 50, (2, 2, 4)).astype(float), 6, num_gpus=2),
    "replication_with_old_plan": ReplicationProblem(
        [[5.0, 1.0, 0.0, 2.0]], 6, num_gpus=2, old_phy2log=[[0, 1, 2, 3, 0, 0]], max_moves=1
    ),
}


@pytest.fixture
def umask():
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_solve_and_compare_read_every_family(tmp_path, capsys, umask, name, suffix):
    problem = PROBLEMS[name]
    f = save_problem(problem, tmp_path / f"p{suffix}")
    assert main(["solve", str(f), "--json", str(tmp_path / "s.json")]) == EXIT_OK
    sol = load_solution(tmp_path / "s.json")
    assert type(sol) is problem.solution_type and sol.feasible
    assert np.array_equal(sol.assignment, solve(problem).assignment)  # the default method is deterministic here
    argv = ["compare", str(f), "--no-progress", "--time-limit", "20", "--json", str(tmp_path / "c.json")]
    assert main(argv) == EXIT_OK
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["method"] for r in rows] == available_methods(problem)
    assert all(r["status"] != "error" for r in rows), rows
    for out in ("s.json", "c.json"):
        assert _mode(tmp_path / out) == 0o666 & ~umask, out  # not the temporary file's 0600
    assert _mode(f) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_writers_respect_the_umask_and_keep_an_existing_mode(tmp_path):
    old = os.umask(0o002)
    try:
        f = write_atomic(tmp_path / "a.json", "{}")
        assert _mode(f) == 0o664
        trace = LoadTrace(np.array([[[1, 1]]]), np.array([1]), 2)
        assert _mode(trace.save(tmp_path / "t.npz")) == 0o664
        assert _mode(save_solution(solve(PROBLEMS["placement"]), tmp_path / "s.json")) == 0o664
        os.chmod(f, 0o600)  # a file the user made private stays private when rewritten
        write_atomic(f, "[]")
        assert _mode(f) == 0o600 and f.read_text() == "[]"
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["solve", "{f}", "--method", "nope"], "unknown `method` 'nope'"),
        (["solve", "{f}", "--method", "mcf", "-o", "max_cost=NaN"], "finite"),
        (["solve", "{f}", "--method", "mcf", "-o", "max_cost=1e999"], "finite"),
        (["solve", "{f}", "--method", "mcf", "-o", "max_cost=1", "-o", "max_cost=2"], "twice"),
        (["solve", "{f}", "--method", "mcf", "-o", "bogus=1"], "unknown option"),
        (["solve", "{f}", "--method", "mcf", "-o", "=1"], "NAME=VALUE"),
        (["solve", "{f}", "--time-limit", "nan"], "seconds"),
        (["solve", "{f}", "--time-limit", "-1"], "seconds"),
        (["compare", "{f}", "--methods", "mcf,,lp"], "comma-separated"),
        (["compare", "{f}", "--methods", "mcf,mcf"], "twice"),
        (["compare", "{f}", "--methods", "mcf,nope"], "unknown `method` 'nope'"),
        (["compare", "{f}", "--time-limit", "inf"], "seconds"),
        (["compare", "{r}", "--methods", "eplb,migrate"], "`old_phy2log`"),
        (["solve", "{r}", "--method", "migrate"], "`old_phy2log`"),
    ],
)
def test_bad_arguments_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, needle):
    f = save_problem(PROBLEMS["routing"], tmp_path / "p.npz")
    r = save_problem(PROBLEMS["replication"], tmp_path / "r.json")
    out = tmp_path / "out.json"
    argv = [a.format(f=f, r=r) for a in argv] + ["--json", str(out)]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == EXIT_USAGE and len(err) == 1 and err[0].startswith("moebalance: error:") and needle in err[0], err
    assert not out.exists()
