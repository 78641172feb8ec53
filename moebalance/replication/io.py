"""The replication family's file schema (read and written by :mod:`moebalance.io`).

``kind`` "replication" plus the keys of :meth:`ReplicationProblem.to_dict` (weight [E], [L, E] or [B, L, E];
num_replicas, num_gpus, num_groups, num_nodes; old_phy2log [L, R] or null; max_moves or null);
:meth:`ReplicationProblem.from_dict` reads it back.
"""

from __future__ import annotations

from ..family import ARRAY_OF_FLOATS, ARRAY_OF_INTS

__all__ = ["SOLUTION_FIELDS"]

# how a saved ReplicationSolution's own fields are read back
SOLUTION_FIELDS = {
    "phy2log": ARRAY_OF_INTS,
    "log2phy": ARRAY_OF_INTS,
    "logcnt": ARRAY_OF_INTS,
    "gpu_loads": ARRAY_OF_FLOATS,
    "moves": ARRAY_OF_INTS,
}
