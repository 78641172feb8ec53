"""The placement family: which device computes which tokens of each expert (expert parallelism, LLEP).

Modules: :mod:`.problem` (:class:`PlacementProblem`, :class:`CostModel`), :mod:`.solution`
(:class:`PlacementSolution`), :mod:`.plan` (device times, token ranges, weight transfers, memory of a plan),
:mod:`.check` (the shared check), :mod:`.io` (the file schema), :mod:`.family` (the declaration).
"""

from __future__ import annotations

from .problem import CostModel, PlacementProblem
from .solution import PlacementSolution

__all__ = ["CostModel", "PlacementProblem", "PlacementSolution"]
