"""The replication family's typed result: the mapping tables a serving engine uses."""

from __future__ import annotations

import dataclasses

import numpy as np

from ..solution import Solution

__all__ = ["ReplicationSolution"]


@dataclasses.dataclass(frozen=True, repr=False)
class ReplicationSolution(Solution):
    """A replication answer. ``assignment`` is ``phy2log [L, R]`` (int64 logical expert of every slot).

    phy2log:   ``[L, R]`` the assignment again (None without one).
    log2phy:   ``[L, E, X]`` slots of each expert, -1 padded; a solver's own order of an expert's slots (EPLB's
               replica ranks) is kept when it lists exactly that expert's slots, else slots in increasing order.
    logcnt:    ``[L, E]`` replicas per expert.
    gpu_loads: ``[L, G]`` load per GPU (each expert's load split evenly over its replicas); for a window, the
               mean over batches.
    moves:     ``[L]`` replicas copied onto a GPU relative to ``old_phy2log``; None without an old plan.
    """

    phy2log: np.ndarray | None = None
    log2phy: np.ndarray | None = None
    logcnt: np.ndarray | None = None
    gpu_loads: np.ndarray | None = None
    moves: np.ndarray | None = None
