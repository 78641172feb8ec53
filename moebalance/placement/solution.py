"""The placement family's typed result."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..solution import Solution

__all__ = ["PlacementSolution"]


@dataclasses.dataclass(frozen=True, repr=False)
class PlacementSolution(Solution):
    """A placement answer. ``assignment`` is ``[E, P]`` token counts.

    loads:            ``[E]`` tokens per expert (the problem's expert loads).
    device_loads:     ``[P]`` tokens computed per device.
    token_ranges:     ``{expert: [(device, start, end), ...]}`` tiling each expert's tokens (see ``plan``).
    weight_transfers: ``[(expert, src, dst), ...]`` weight copies the plan needs.
    """

    loads: np.ndarray | None = None
    device_loads: np.ndarray | None = None
    token_ranges: Any = None
    weight_transfers: list[tuple[int, int, int]] | None = None
