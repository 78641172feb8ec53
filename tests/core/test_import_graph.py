"""The package's internal import graph has no cycle, and the core never imports evaluation."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = {
    "moebalance": "moebalance",
    "solvers": "moebalance.solvers",
    "kernels": "moebalance.kernels",
    "integrations": "moebalance.integrations",
}


def _modules():
    mods = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts]) if parts else pkg
            if folder == "moebalance" and parts and parts[0] in ("solvers", "kernels", "integrations"):
                continue
            mods[name] = (path, path.name == "__init__.py")
    return mods


def _edges(mods, *, toplevel_only=False):
    """``{module: modules it imports}``; with ``toplevel_only`` only imports at module level (the ones that
    run at import time and so can make a cycle), else every import, function-level ones included."""
    graph = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        package = name if is_pkg else name.rpartition(".")[0]
        for node in tree.body if toplevel_only else ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[: len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def _find_cycle(graph):
    color, stack = {}, []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if color.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in color:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if n not in color:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_at_module_level():
    mods = _modules()
    g = _edges(mods, toplevel_only=True)
    # a package importing its own submodules is not a cycle through them
    for name in g:
        g[name] = {t for t in g[name] if not t.startswith(name + ".")}
    assert _find_cycle(g) is None


def test_core_never_imports_evaluation():
    mods = _modules()
    g = _edges(mods)
    core = [
        m
        for m in mods
        if not m.startswith("moebalance.evaluation") and m not in ("moebalance.cli", "moebalance.__main__")
    ]
    for m in core:
        bad = {t for t in g[m] if t.startswith("moebalance.evaluation")}
        assert not bad, f"{m} imports {bad}"


def test_check_and_plan_do_not_import_each_other():
    g = _edges(_modules())
    assert "moebalance.checking" not in g["moebalance.plan"]
    assert "moebalance.plan" not in g["moebalance.checking"]


def test_no_module_doubles_as_a_function():
    """A name of the package is a module or a function, never both (moebalance.check is the function;
    its module is moebalance.checking)."""
    import importlib
    import pkgutil
    import types

    import moebalance

    for name in dir(moebalance):
        value = getattr(moebalance, name)
        if isinstance(value, types.ModuleType):
            continue
        assert importlib.util.find_spec(f"moebalance.{name}") is None, (
            f"moebalance.{name} is a module and a {type(value).__name__}"
        )
    for mod in pkgutil.iter_modules(moebalance.__path__):
        if mod.name in moebalance.__all__:
            assert isinstance(getattr(moebalance, mod.name), types.ModuleType), mod.name


def test_the_cycle_finder_finds_cycles():
    # the walk above is only meaningful if it would catch one
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    g = _edges(_modules(), toplevel_only=True)
    assert "moebalance.solution" in g["moebalance.registry"]  # the graph is really read
