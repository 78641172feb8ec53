"""import moebalance (and its solvers) must not import the heavy back-ends."""

import subprocess
import sys


def test_lazy_backends():
    code = (
        "import sys, moebalance, moebalance.solvers, moebalance.kernels, moebalance.integrations;"
        "heavy = [m for m in ('torch', 'triton', 'ortools', 'cvxpy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_core_never_imports_evaluation():
    """moebalance.evaluation sits on top of the core: no core module imports it (the CLI entry, which dispatches
    to the evaluation commands, is the one allowed reference), and `import moebalance` does not load it."""
    import ast
    from pathlib import Path

    import moebalance

    root = Path(moebalance.__file__).resolve().parents[1]
    offenders = []
    for folder in ("moebalance", "solvers", "kernels", "integrations"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel.startswith("moebalance/evaluation/") or rel == "moebalance/cli.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = ("." * node.level) + (node.module or "")
                    names = [base] + [f"{base}.{a.name}" for a in node.names]
                if any("evaluation" in n.split(".") for n in names):
                    offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []
    code = "import sys, moebalance; print(any(m.startswith('moebalance.evaluation') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_no_module_doubles_as_a_function():
    """`moebalance.simulate` is the simulator's function, and no module of that name exists to shadow it."""
    import importlib.util
    import types

    import moebalance

    assert importlib.util.find_spec("moebalance.simulate") is None
    assert isinstance(moebalance.simulate, types.FunctionType)
    for name in ("study", "report", "demo", "demo_layer", "demo_placement"):
        assert importlib.util.find_spec(f"moebalance.{name}") is None, name
        assert importlib.util.find_spec(f"moebalance.evaluation.{name}") is not None, name


def test_check_result_alias_is_deprecated_and_still_an_evaluation():
    import warnings

    import moebalance
    import moebalance.checking

    for module in (moebalance, moebalance.checking):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            alias = module.CheckResult
        assert alias is moebalance.Evaluation
        assert any(issubclass(w.category, DeprecationWarning) and "Evaluation" in str(w.message) for w in caught)
    assert "CheckResult" not in moebalance.__all__
