"""The routing family: choose k experts per token under per-expert capacity.

Modules: :mod:`.problem` (:class:`RoutingProblem`, :func:`expert_capacity`), :mod:`.solution`
(:class:`RoutingSolution`), :mod:`.check` (the shared check and the price certificate), :mod:`.io` (the file
schema), :mod:`.family` (the declaration the registry, io and the CLI read).
"""

from __future__ import annotations

from .check import TIE_TOL as TIE_TOL
from .check import _price_certificate as _price_certificate
from .check import bias_reproduces, check_routing, routing_dual_bound
from .problem import RoutingProblem, expert_capacity
from .solution import RoutingSolution

__all__ = [
    "RoutingProblem",
    "RoutingSolution",
    "check_routing",
    "routing_dual_bound",
    "bias_reproduces",
    "expert_capacity",
]
