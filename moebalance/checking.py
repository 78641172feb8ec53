"""The one independent feasibility check every returned answer goes through.

It trusts nothing a solver says: ``problem.evaluate(assignment)`` recomputes the objective and the family's
derived fields from the problem's data and the assignment alone, and lists every violated constraint. This
module is the family-free entry point; each family's checker lives in its family's ``check`` module
(``moebalance.routing.check``, ``moebalance.placement.check``, ``moebalance.replication.check``). The routing
names below stay importable from here as before.
"""

from __future__ import annotations

from typing import Any

from .routing.check import bias_reproduces, check_routing, routing_dual_bound
from .solution import Evaluation

__all__ = ["Evaluation", "check", "check_routing", "routing_dual_bound", "bias_reproduces"]


def __getattr__(name: str) -> Any:
    if name == "CheckResult":  # the name earlier releases used for an Evaluation
        import warnings

        warnings.warn(
            "moebalance.checking.CheckResult is deprecated; use moebalance.Evaluation", DeprecationWarning, stacklevel=2
        )
        return Evaluation
    raise AttributeError(f"module 'moebalance.checking' has no attribute {name!r}")


def check(problem: Any, assignment: Any, token_ranges: Any = None) -> Evaluation:
    """Check ``assignment`` against ``problem`` (any family) and evaluate it.

    ``token_ranges`` (placement only): a solver's own order of ranges, kept when it tiles every expert's tokens
    and matches the assignment, and a violation otherwise.
    """
    evaluate = getattr(problem, "evaluate", None)
    if evaluate is None or isinstance(problem, type):
        from .family import all_families

        names = ", ".join(f.problem.__name__ for f in all_families().values())
        raise ValueError(f"`problem` must be a problem object ({names}), got {type(problem).__name__}")
    if token_ranges is None:
        return evaluate(assignment)
    return evaluate(assignment, solution=_Hint(token_ranges))


class _Hint:
    """A stand-in raw answer carrying only a solver's token ranges."""

    def __init__(self, token_ranges: Any):
        self.token_ranges = token_ranges
        self.stats: dict[str, Any] = {}
