"""The placement family's file schema (read and written by :mod:`moebalance.io`).

``kind`` "placement" plus the keys of :meth:`PlacementProblem.to_dict` (expert_loads, num_devices, home, cost,
max_tokens_per_device, max_foreign_experts, alpha, min_chunk, imbalance_threshold); ``null`` keeps its meaning
(``imbalance_threshold: null`` disables LLEP's fallback). :meth:`PlacementProblem.from_dict` reads it back.
"""

from __future__ import annotations

from ..family import ARRAY_OF_INTS, AS_READ

__all__ = ["SOLUTION_FIELDS"]

# how a saved PlacementSolution's own fields are read back: ranges and transfers are nested lists of ints
SOLUTION_FIELDS = {
    "loads": ARRAY_OF_INTS,
    "device_loads": ARRAY_OF_INTS,
    "token_ranges": AS_READ,
    "weight_transfers": AS_READ,
}
