"""The replication family's declaration: what the registry, io, the CLI and ``compare`` know of it."""

from __future__ import annotations

from ..family import Family, declare
from . import io
from .problem import ReplicationProblem
from .solution import ReplicationSolution

__all__ = ["FAMILY"]

FAMILY = declare(
    Family(
        name="replication",
        problem=ReplicationProblem,
        solution=ReplicationSolution,
        auto=("eplb+", "eplb"),
        solution_fields=io.SOLUTION_FIELDS,
        description="expert loads [L, E] onto R slots over G GPUs (EPLB's phy2log/log2phy/logcnt)",
    )
)
