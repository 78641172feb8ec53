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

from .bound import _dhondt_threshold as _dhondt_threshold
from .bound import _node_bound as _node_bound
from .bound import _pigeonhole as _pigeonhole
from .bound import layer_bounds
from .eplb import rebalance_experts
from .problem import MAX_SLOTS as MAX_SLOTS
from .problem import ReplicationProblem
from .problem import _as_plan as _as_plan
from .problem import _as_weight as _as_weight
from .problem import _eplb_order as _eplb_order
from .problem import _weight_shape as _weight_shape
from .solution import ReplicationSolution
from .tables import _counts as _counts
from .tables import _per_gpu_counts as _per_gpu_counts
from .tables import count_moves, gpu_loads, log2phy_from_phy2log

__all__ = [
    "ReplicationProblem",
    "ReplicationSolution",
    "rebalance_experts",
    "log2phy_from_phy2log",
    "count_moves",
    "gpu_loads",
    "layer_bounds",
]
