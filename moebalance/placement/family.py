"""The placement family's declaration: what the registry, io, the CLI and ``compare`` know of it.

Its ``moebalance gen`` scenarios come from the simulator's model presets, which sit above the core: the CLI
attaches that generator (see ``moebalance.cli``), so none is declared here.
"""

from __future__ import annotations

from ..family import Family, declare
from . import io
from .problem import PlacementProblem
from .solution import PlacementSolution

__all__ = ["FAMILY"]

FAMILY = declare(
    Family(
        name="placement",
        problem=PlacementProblem,
        solution=PlacementSolution,
        auto=("llep",),
        solution_fields=io.SOLUTION_FIELDS,
        description="expert loads [E] over P devices (token ranges and weight transfers)",
    )
)
