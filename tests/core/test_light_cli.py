"""A light CLI: ``moebalance --help``, ``--version`` and every subcommand's ``--help`` import no
torch, ortools, cvxpy, triton or matplotlib; a command loads its back-end when it runs."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "ortools", "cvxpy", "triton", "matplotlib", "transformers", "highspy")
COMMANDS = ("demo", "solve", "compare", "methods", "gen", "plot", "simulate", "study", "report")

_PROBE = f"""
import sys
from moebalance.cli import main
argv = sys.argv[1:]
try:
    main(argv)
except SystemExit as exc:
    assert exc.code == 0, exc.code
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))
print('HEAVY=' + ','.join(heavy))
"""


def _heavy_after(*argv: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY=") :].split(",") if m]


def test_top_level_help_and_version_are_light():
    assert _heavy_after("--help") == []
    assert _heavy_after("--version") == []


def test_every_subcommand_help_is_light():
    for command in COMMANDS:
        assert _heavy_after(command, "--help") == [], command


def test_python_dash_m_help_is_light():
    code = (
        "import runpy, sys; sys.argv = ['moebalance', '--help']\n"
        "try:\n    runpy.run_module('moebalance', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_a_command_loads_its_backend_when_it_runs(tmp_path):
    """The probe can see a back-end: ``solve --method bip`` does import ortools."""
    f = tmp_path / "p.json"
    f.write_text('{"kind": "routing", "scores": [[1, 2], [3, 1]], "k": 1}')
    assert "ortools" in _heavy_after("solve", str(f), "--method", "bip")
