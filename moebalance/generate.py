"""Compatibility: the synthetic routing generators live in :mod:`moebalance.routing.generate`."""

from __future__ import annotations

from .routing.generate import KINDS, _popularity, routing_problem, routing_scores

__all__ = ["KINDS", "routing_scores", "routing_problem"]

_ = _popularity
