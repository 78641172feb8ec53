"""Exceptions raised by moebalance."""

__all__ = ["InfeasibleError"]


class InfeasibleError(ValueError):
    """The problem's constraints admit no solution (e.g. ``sum(capacity) < T * k``)."""
