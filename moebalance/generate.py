"""Compatibility: the synthetic routing generators live in :mod:`moebalance.routing.generate`."""

from __future__ import annotations

from .routing.generate import KINDS, routing_problem, routing_scores
from .routing.generate import _popularity as _popularity

__all__ = ["KINDS", "routing_scores", "routing_problem"]
