"""Compatibility: the placement plan helpers live in :mod:`moebalance.placement.plan` and the shared check in
:mod:`moebalance.placement.check`; every name importable from here before the split still is."""

from __future__ import annotations

from .placement.check import _check_by_ranges as _check_by_ranges
from .placement.check import _check_ranges as _check_ranges
from .placement.check import check_placement
from .placement.plan import (
    TokenRanges,
    activation_bytes_per_token,
    as_assignment,
    assignment_from_ranges,
    device_times,
    expert_weight_bytes,
    makespan,
    peak_memory,
    token_ranges,
    weight_transfers,
)
from .placement.plan import _device_times as _device_times
from .placement.plan import _foreign_mask as _foreign_mask
from .placement.plan import _is_plain_plan as _is_plain_plan
from .placement.plan import _weight_transfers as _weight_transfers

__all__ = [
    "TokenRanges",
    "check_placement",
    "as_assignment",
    "device_times",
    "makespan",
    "token_ranges",
    "weight_transfers",
    "assignment_from_ranges",
    "peak_memory",
    "expert_weight_bytes",
    "activation_bytes_per_token",
]
