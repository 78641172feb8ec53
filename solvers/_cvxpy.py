"""Import cvxpy quietly: the one place both cvxpy adapters get it from."""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["import_cvxpy"]


def import_cvxpy() -> Any:
    """``(cvxpy, installed solver names)``.

    cvxpy logs an error for each ortools-based solver (GLOP, PDLP) it cannot use with ortools 9.15 when it
    first lists its solvers, and it resets its logger's level on import; those solvers are not ours, so that
    moment is silenced.
    """
    logging.disable(logging.ERROR)
    try:
        import cvxpy as cp

        installed = cp.installed_solvers()
    finally:
        logging.disable(logging.NOTSET)
    return cp, installed
