"""The mapping tables of a replication plan (DeepSeek EPLB's): replica counts, GPU loads, moves, ``log2phy``.

Slot ``j`` of ``phy2log [L, R]`` sits on GPU ``j // (R / G)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["count_moves", "gpu_loads", "log2phy_from_phy2log"]


def _counts(phy2log: np.ndarray, E: int) -> np.ndarray:
    """``[L, E]`` replicas per expert."""
    L = phy2log.shape[0]
    return np.bincount((phy2log + E * np.arange(L)[:, None]).ravel(), minlength=L * E).reshape(L, E)


def _per_gpu_counts(phy2log: np.ndarray, E: int, G: int) -> np.ndarray:
    """``[L, G, E]`` replicas of each expert on each GPU."""
    L, R = phy2log.shape
    gpu = np.arange(R) // (R // G)
    idx = (np.arange(L)[:, None] * G + gpu[None, :]) * E + phy2log
    return np.bincount(idx.ravel(), minlength=L * G * E).reshape(L, G, E)


def count_moves(old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L]`` replicas a GPU must copy in to go from ``old_phy2log`` to ``new_phy2log`` (both ``[L, R]``):
    ``R - sum_{gpu, expert} min(old count, new count)``."""
    old = _per_gpu_counts(np.asarray(old_phy2log), num_experts, num_gpus)
    new = _per_gpu_counts(np.asarray(new_phy2log), num_experts, num_gpus)
    return (new_phy2log.shape[1] - np.minimum(old, new).sum(axis=(1, 2))).astype(np.int64)


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[B, L, G]`` load per GPU of plan ``phy2log [L, R]`` under loads ``weight [B, L, E]``."""
    B, L, E = weight.shape
    R = phy2log.shape[1]
    cnt = _counts(phy2log, E)
    per_replica = weight / np.maximum(cnt, 1)[None]  # [B, L, E]
    slot = np.take_along_axis(per_replica, np.broadcast_to(phy2log[None], (B, L, R)), axis=2)
    return slot.reshape(B, L, num_gpus, R // num_gpus).sum(axis=3)


def log2phy_from_phy2log(phy2log: np.ndarray, num_experts: int, order: Any = None) -> np.ndarray:
    """``[L, E, X]`` slots of each expert (-1 padded) from ``phy2log [L, R]``.

    ``order`` ``[L, R]`` (optional): the rank of each slot among its expert's replicas (EPLB's ``phyrank``);
    default: slots in increasing order.
    """
    L, R = phy2log.shape
    cnt = _counts(phy2log, num_experts)
    X = int(cnt.max()) if cnt.size else 0
    if order is None:
        key = phy2log.astype(np.int64) * R + np.arange(R)[None, :]
        srt = np.argsort(key, axis=1, kind="stable")
        start = np.cumsum(cnt, axis=1) - cnt
        sorted_e = np.take_along_axis(phy2log, srt, axis=1)
        order = np.empty_like(phy2log)
        np.put_along_axis(order, srt, np.arange(R)[None, :] - np.take_along_axis(start, sorted_e, axis=1), axis=1)
    out = np.full((L, num_experts * X), -1, dtype=np.int64)
    np.put_along_axis(out, phy2log * X + order, np.broadcast_to(np.arange(R, dtype=np.int64), (L, R)), axis=1)
    return out.reshape(L, num_experts, X)
