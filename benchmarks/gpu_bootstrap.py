"""Make ``import moebalance`` work from a plain checkout, without ``pip install`` (the GPU machine has no registry).

pyproject.toml maps the packages onto folders (``moebalance.solvers`` -> ``solvers/``, ``moebalance.kernels`` ->
``kernels/``, ``moebalance.integrations`` -> ``integrations/``); an editable install does that mapping with an
import hook. This module installs the same mapping as a ``sys.meta_path`` finder, read from the checkout's
``[tool.setuptools.package-dir]``, placed first so the checkout wins over any installed copy.

``benchmarks/gpu_suite.sh`` links this file as ``sitecustomize.py`` into a temporary folder on ``PYTHONPATH``, so
every Python process of the suite (pytest, the benchmark scripts, their children) gets the mapping at start-up;
an image's own ``sitecustomize`` further down ``sys.path`` is still run afterwards. Environment:

- ``MOEBALANCE_CHECKOUT``: the checkout's root (default: the folder above this file's real location).
- ``GPU_SUITE_BLOCK``: comma-separated top-level module names hidden (they look absent), so a
  CPU dry run sees what the GPU machine lacks (the suite's ``--dry-run`` blocks ortools, cvxpy and highspy).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["install", "package_dirs", "checkout_root"]


def checkout_root() -> Path:
    env = os.environ.get("MOEBALANCE_CHECKOUT")
    return Path(env).resolve() if env else Path(__file__).resolve().parent.parent


def package_dirs(root: Path) -> dict[str, Path]:
    """``{package: folder}`` from ``[tool.setuptools.package-dir]`` of ``root/pyproject.toml``."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    try:
        import tomllib  # Python >= 3.11

        table = tomllib.loads(text).get("tool", {}).get("setuptools", {}).get("package-dir", {})
    except ImportError:  # pragma: no cover - Python 3.10: the section is simple "key" = "value" lines
        m = re.search(r"^\[tool\.setuptools\.package-dir\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        table = dict(re.findall(r'^\s*"([^"]+)"\s*=\s*"([^"]+)"', m.group(1), re.M)) if m else {}
    return {name: (root / folder).resolve() for name, folder in table.items()}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages in the checkout; everything below them resolves through their ``__path__``."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def find_spec(self, name: str, path: Sequence[str] | None = None, target=None):
        folder = self.dirs.get(name)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


class _BlockingPathFinder(importlib.machinery.PathFinder):
    """``PathFinder`` that does not see the blocked top-level modules: ``find_spec`` gives None, so they look
    exactly as absent as on a machine without them (``importlib.util.find_spec`` is None, import raises
    ``ModuleNotFoundError``)."""

    blocked: frozenset = frozenset()

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in cls.blocked:
            return None
        return super().find_spec(name, path, target)


def install() -> None:
    """Install the finder (and hide the blocked modules) once per process."""
    if any(type(f).__name__ == "_CheckoutFinder" for f in sys.meta_path):
        return
    blocked = frozenset(n.strip() for n in os.environ.get("GPU_SUITE_BLOCK", "").split(",") if n.strip())
    if blocked:
        _BlockingPathFinder.blocked = blocked
        sys.meta_path[:] = [_BlockingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        for name in [m for m in sys.modules if m.split(".")[0] in blocked]:
            del sys.modules[name]
    sys.meta_path.insert(0, _CheckoutFinder(package_dirs(checkout_root())))


def _chain_next_sitecustomize() -> None:
    """Run the next ``sitecustomize`` on sys.path (an image's own), which importing this one shadowed."""
    here = Path(__file__).parent.resolve()
    for entry in sys.path:
        try:
            if not entry or Path(entry).resolve() == here:
                continue
        except OSError:
            continue
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [entry])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # pragma: no cover - the image's hook is not ours to fix
                print(f"gpu_bootstrap: the image's sitecustomize failed: {exc!r}", file=sys.stderr)
            return


install()
if __name__ == "sitecustomize":
    _chain_next_sitecustomize()
