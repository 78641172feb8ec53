"""The replication family (EPLB-style expert balancing) and the drop-in ``rebalance_experts``.

Mapping tables follow DeepSeek EPLB (``eplb.rebalance_experts``):

- ``phy2log [L, R]``: logical expert of each physical slot (slot ``j`` on GPU ``j // (R / G)``);
- ``log2phy [L, E, X]``: the physical slots of each expert, ``-1`` padded (``X`` = most replicas of any expert);
- ``logcnt [L, E]``: number of replicas of each expert.

Modules: :mod:`.problem` (:class:`ReplicationProblem`), :mod:`.solution` (:class:`ReplicationSolution`),
:mod:`.tables` (counts, GPU loads, moves, ``log2phy``), :mod:`.check` (the shared check), :mod:`.bound`
(:func:`layer_bounds`), :mod:`.eplb` (:func:`rebalance_experts`), :mod:`.io` (the file schema),
:mod:`.family` (the declaration).
"""

from __future__ import annotations

from .bound import _dhondt_threshold, _node_bound, _pigeonhole, layer_bounds
from .eplb import rebalance_experts
from .problem import MAX_SLOTS, ReplicationProblem, _as_plan, _as_weight, _eplb_order, _weight_shape
from .solution import ReplicationSolution
from .tables import _counts, _per_gpu_counts, count_moves, gpu_loads, log2phy_from_phy2log

__all__ = [
    "ReplicationProblem",
    "ReplicationSolution",
    "rebalance_experts",
    "log2phy_from_phy2log",
    "count_moves",
    "gpu_loads",
    "layer_bounds",
]

# private helpers importable from moebalance.replication as before the split
_ = (_dhondt_threshold, _node_bound, _pigeonhole, MAX_SLOTS, _as_plan, _as_weight, _eplb_order, _weight_shape)
_ = (_counts, _per_gpu_counts)
