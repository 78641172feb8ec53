"""moebalance: the assignment problems behind Mixture-of-Experts load balancing.

State a problem once (:class:`RoutingProblem`, :class:`PlacementProblem`), solve it with any method
(:func:`solve`), and see how far each answer is from the optimum (:func:`compare`).

Importing moebalance imports numpy and scipy only: torch, triton, ortools and cvxpy are imported by the
method or layer that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .checking import check
from .comparison import Comparison, compare
from .errors import InfeasibleError
from .placement.solution import PlacementSolution
from .registry import available_methods, method_info, register, solve
from .routing import RoutingProblem
from .routing.solution import RoutingSolution
from .solution import Evaluation, Solution, Status

__version__ = "0.1.0"

__all__ = [
    "RoutingProblem",
    "PlacementProblem",
    "CostModel",
    "Solution",
    "RoutingSolution",
    "PlacementSolution",
    "Evaluation",
    "Status",
    "InfeasibleError",
    "solve",
    "available_methods",
    "method_info",
    "register",
    "check",
    "compare",
    "Comparison",
    "simulate",
    "ReplicationProblem",
    "ReplicationSolution",
    "rebalance_experts",
    "__version__",
]

# names resolved on first use (their modules import more than numpy and scipy)
_LAZY = {
    "ReplicationProblem": ("moebalance.replication.problem", "ReplicationProblem"),
    "ReplicationSolution": ("moebalance.replication.solution", "ReplicationSolution"),
    "rebalance_experts": ("moebalance.replication.eplb", "rebalance_experts"),
    "PlacementProblem": ("moebalance.placement.problem", "PlacementProblem"),
    "CostModel": ("moebalance.placement.problem", "CostModel"),
    "simulate": ("moebalance.evaluation.simulate", "simulate"),  # the function; moebalance/simulate.py is no module
}


def __getattr__(name: str) -> Any:
    if name == "CheckResult":
        import warnings

        warnings.warn(
            "moebalance.CheckResult is deprecated; use moebalance.Evaluation", DeprecationWarning, stacklevel=2
        )
        return Evaluation
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'moebalance' has no attribute {name!r}")
