"""The command line as a user runs it: in a subprocess, with one-line errors."""

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "moebalance", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("cli") / "p.npz"
    out = run("gen", str(f), "-T", "200", "-E", "8", "-k", "2", "--kind", "hot")
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and f.exists()
    return f


def test_solve(problem_file, tmp_path):
    out = run(
        "solve", str(problem_file), "--method", "mcf", "-o", "max_cost=1000000", "--json", str(tmp_path / "s.json")
    )
    assert out.returncode == 0, out.stderr
    assert "status     optimal" in out.stdout
    sol = json.loads((tmp_path / "s.json").read_text())
    assert sol["method"] == "mcf" and sol["stats"]["max_cost"] == 1000000  # the option reached the solver


def test_compare(problem_file, tmp_path):
    out = run(
        "compare",
        str(problem_file),
        "--methods",
        "mcf,lp,greedy,topk",
        "--no-progress",
        "--json",
        str(tmp_path / "c.json"),
    )
    assert out.returncode == 0, out.stderr
    assert "best bound" in out.stdout
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["status"] for r in rows][:2] == ["optimal", "optimal"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["solve", "missing.npz"], "not a file"),
        (["solve", "{file}", "--method", "magic"], "unknown `method`"),
        (["solve", "{file}", "--method", "mcf", "-o", "maxcost=3"], "unknown option"),
        (["solve", "{file}", "-o", "novalue"], "NAME=VALUE"),
        (["gen", "out.txt"], ".npz or .json"),
        (["gen", "out.json", "-k", "99", "-E", "4"], "`k`"),
    ],
)
def test_errors_are_one_line(problem_file, tmp_path, args, needle):
    args = [a.replace("{file}", str(problem_file)) for a in args]
    out = subprocess.run(
        [sys.executable, "-m", "moebalance", *args], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moebalance: error:") and needle in lines[0], out.stderr


def test_demo_quick():
    out = run("demo", "--quick")
    assert out.returncode == 0, out.stderr
    assert "Routing" in out.stdout and "MaxVio" in out.stdout
    tail = out.stdout.split("=== Next", 1)[1]  # it ends with the next commands
    assert "compare p.npz" in tail and "plot p.npz" in tail


def test_help_for_every_subcommand():
    for sub in ["demo", "solve", "compare", "gen", "plot", "simulate", "study", "report"]:
        out = run(sub, "--help")
        assert out.returncode == 0 and "usage: moebalance" in out.stdout


def test_placement_file_round_trip(tmp_path):
    f = tmp_path / "pl.json"
    out = run(
        "gen", str(f), "--family", "placement", "--scenario", "95:1", "-P", "4", "-T", "512", "--model", "gpt-oss-20b"
    )
    assert out.returncode == 0, out.stderr
    out = run("compare", str(f), "--methods", "ep,llep,llep+,lp", "--no-progress", "--json", str(tmp_path / "c.json"))
    assert out.returncode == 0, out.stderr
    rows = {r["method"]: r for r in json.loads((tmp_path / "c.json").read_text())["rows"]}
    # LLEP beats EP on a 95%-into-one-expert load, and the LP bound is below every plan
    assert rows["llep"]["objective"] < rows["ep"]["objective"]
    assert all(rows["lp"]["bound"] <= r["objective"] + 1e-12 for r in rows.values())
    bad = run("gen", str(tmp_path / "x.json"), "--family", "placement", "--model", "gpt-5")
    assert bad.returncode == 2 and "--model" in bad.stderr
