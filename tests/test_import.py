"""import moebalance (and its solvers) must not import the heavy back-ends."""

import subprocess
import sys


def test_lazy_backends():
    code = ("import sys, moebalance, moebalance.solvers, moebalance.kernels, moebalance.integrations;"
            "heavy = [m for m in ('torch', 'triton', 'ortools', 'cvxpy') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
