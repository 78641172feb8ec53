"""ortools and cvxpy (with highspy) must load and solve in one process, in either order: both ship libhighs."""

import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np
import moebalance as mb
from moebalance.generate import routing_problem
p = routing_problem(64, 8, 2, seed=0)
order = {order!r}
sols = [mb.solve(p, m) for m in order]
assert all(s.status.value == "optimal" for s in sols), [s.message for s in sols]
assert abs(sols[0].objective - sols[1].objective) < 1e-6
import highspy, ortools, cvxpy
print("ok", ortools.__version__, cvxpy.__version__)
"""


@pytest.mark.parametrize("order", [("mcf", "cvxpy"), ("cvxpy", "bip"), ("mip", "cvxpy")])
def test_ortools_and_cvxpy_in_one_process(order):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(order=list(order))], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
