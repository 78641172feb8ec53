"""Triton kernels for the MoE layer's hot paths, each with a plain torch reference.

- :func:`moe_experts` / :func:`expert_ffn`: the differentiable expert computation (``backend`` "auto" |
  "triton" | "torch"), used by :class:`moebalance.integrations.torch.MoELayer` and the distributed layer.
- :mod:`moebalance.kernels.ops`: the Triton kernels as ``torch.library`` custom ops with fake implementations.
- :mod:`moebalance.kernels.reference`: the torch reference of every op, same signatures.

Importing this package imports neither torch nor triton: the names below load ``moebalance.kernels.experts``
(and torch) on first use, and triton is imported on the first Triton call.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "moe_experts",
    "expert_ffn",
    "combine_pairs",
    "resolve_backend",
    "grouped_mm_available",
    "BACKENDS",
    "TORCH_IMPLS",
    "ops",
    "reference",
]

_FROM_EXPERTS = {
    "moe_experts",
    "expert_ffn",
    "combine_pairs",
    "resolve_backend",
    "grouped_mm_available",
    "BACKENDS",
    "TORCH_IMPLS",
}


def __getattr__(name: str) -> Any:
    if name in _FROM_EXPERTS:
        return getattr(importlib.import_module(f"{__name__}.experts"), name)
    if name in ("ops", "reference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
