"""Solver adapters, one module per back-end and problem family; each registers its methods on import.

Importing this package imports every public module in it (the back-ends themselves, ortools and cvxpy, are
imported inside the solver functions, so this stays cheap).
"""

from __future__ import annotations

import importlib
import pkgutil

__all__: list[str] = []

for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
