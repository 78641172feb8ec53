"""Compatibility: the placement plan helpers live in :mod:`moebalance.placement.plan` and the shared check in
:mod:`moebalance.placement.check`; every name importable from here before the split still is."""

from __future__ import annotations

from .placement.check import _check_by_ranges, _check_ranges, check_placement
from .placement.plan import (
    TokenRanges,
    _device_times,
    _foreign_mask,
    _is_plain_plan,
    _weight_transfers,
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

_ = (_check_by_ranges, _check_ranges, _device_times, _foreign_mask, _is_plain_plan, _weight_transfers)
