"""The routing family's typed result."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..solution import Solution

__all__ = ["RoutingSolution"]


@dataclasses.dataclass(frozen=True, repr=False)
class RoutingSolution(Solution):
    """A routing answer. ``assignment`` is ``[T, k]`` int expert ids.

    loads: ``[E]`` tokens per expert (from the shared check).
    bias:  ``[E]`` per-expert price q such that top-k of ``scores - q`` reproduces ``assignment`` up to ties
           (``stats["bias_reproduces"]`` is the fraction of tokens it reproduces); None when the method has none.
           A price that only certifies the bound is kept in ``stats["certificate_price"]``.
    """

    loads: np.ndarray | None = None
    bias: np.ndarray | None = None
