"""Exceptions raised by moebalance."""

__all__ = ["InfeasibleError", "ArgumentError"]


class InfeasibleError(ValueError):
    """The problem's constraints admit no solution (e.g. ``sum(capacity) < T * k``)."""


class ArgumentError(ValueError, AssertionError):
    """A bad argument to an API that replaces one which asserted its arguments (DeepSeek's and vLLM's
    ``rebalance_experts``): callers catching either ``ValueError`` or ``AssertionError`` keep working."""
