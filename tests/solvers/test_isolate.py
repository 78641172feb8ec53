"""The isolation driver (solvers/_isolate.py): what happens to Ctrl-C around the fork of a back-end child."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal
    from moebalance.solvers import _isolate
    # the signal lands inside the interpreter's at-fork hooks, where an exception is printed and swallowed
    os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        _isolate._Forked(lambda: None, os.devnull)
        print("lost")
    except KeyboardInterrupt:
        print("raised")
""")


def test_ctrl_c_during_the_fork_reaches_the_parent():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.stdout.split() == ["raised"], (out.stdout, out.stderr)
