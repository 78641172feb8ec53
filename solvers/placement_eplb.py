"""``eplb``: DeepSeek EPLB-style replication (the global policy of deepseek-ai/EPLB), mapped onto a plan.

1. ``num_replicas`` physical slots: every expert gets one; each extra slot goes to the expert with the
   highest load per copy (ties: lower expert id).
2. Balanced packing: copies sorted by load per copy (largest first, stable) go one by one to the device with
   the smallest packed load among those with a free slot (ties: lower device id); every device gets
   ``num_replicas / P`` slots.
3. Tokens of an expert are split evenly over its copies (the first ``load % copies`` copies take one more).
4. EPLB's packs are unordered; each pack goes to the device holding most of its experts at home (an assignment
   problem, scipy's ``linear_sum_assignment``), which changes no device's load, only which copies are foreign.

EPLB places weights statically; in this problem's cost model a copy on a device other than the expert's home
counts as a foreign expert (a weight transfer), the same way LLEP's spills do, so EPLB is charged as if it
rebalanced at every step. Its global packing moves most experts off their EP home, so ``eplb-home`` keeps each
expert's first copy at home and packs only the redundant copies (one free slot per device by default): the
replication idea without the re-layout.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from .replication_eplb import pack_rows, replicate_rows

__all__ = ["replicate", "balanced_packing", "pack_to_device", "eplb_assignment", "solve_eplb", "solve_eplb_home"]


def replicate(loads: Any, num_replicas: int) -> np.ndarray:
    """``[E]`` number of copies per expert: one each, then greedily to the highest load per copy (ties: lower
    expert id); the vectorised routine of ``replication_eplb`` in float64."""
    w = np.asarray(loads, dtype=np.float64)
    return replicate_rows(w[None, :], int(num_replicas))[2][0]


def balanced_packing(weights: Any, num_packs: int, capacity: Any = None, initial: Any = None) -> np.ndarray:
    """``[N]`` pack of each item: heaviest first onto the lightest pack with room (ties: lower pack id).

    ``capacity`` ``[num_packs]`` items per pack (default ``N / num_packs`` each); ``initial`` ``[num_packs]``
    load already in each pack (default 0). The vectorised routine of ``replication_eplb`` in float64.
    """
    w = np.asarray(weights, dtype=np.float64)
    N = w.shape[0]
    cap = np.full(num_packs, N // num_packs, dtype=np.int64) if capacity is None else np.asarray(capacity)
    init = None if initial is None else np.asarray(initial, dtype=np.float64)[None, :]
    return pack_rows(w[None, :], num_packs, capacity=cap, initial=init)[0][0]


def pack_to_device(pack: np.ndarray, home_of_copy: np.ndarray, num_devices: int) -> np.ndarray:
    """``[P]`` device of each pack, maximising the copies that sit on their expert's home."""
    from scipy.optimize import linear_sum_assignment

    overlap = np.zeros((num_devices, num_devices), dtype=np.int64)
    np.add.at(overlap, (pack, home_of_copy), 1)
    rows, cols = linear_sum_assignment(-overlap)
    out = np.empty(num_devices, dtype=np.int64)
    out[rows] = cols
    return out


def eplb_assignment(problem: Any, num_replicas: int, *, keep_home: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(``[E, P]`` plan, ``[E]`` copies per expert) of EPLB with ``num_replicas`` slots.

    ``keep_home``: each expert's first copy stays on its home device; only the redundant copies are packed,
    into the slots its home experts leave free on each device.
    """
    E, P = problem.shape
    loads = problem.expert_loads
    home = problem.home
    counts = replicate(loads, num_replicas)
    expert_of = np.repeat(np.arange(E), counts)  # physical slot -> logical expert
    rank = np.arange(expert_of.size) - np.repeat(np.cumsum(counts) - counts, counts)  # copy index within expert
    per_copy = loads[expert_of] // counts[expert_of] + (rank < loads[expert_of] % counts[expert_of])
    weight = loads[expert_of] / counts[expert_of]
    if keep_home:
        device = home[expert_of].copy()
        extra = rank > 0
        free = num_replicas // P - np.bincount(home, minlength=P)
        if free.min() < 0:
            raise ValueError(f"`num_replicas`={num_replicas} leaves fewer slots than home experts on some device")
        initial = np.bincount(device[~extra], weights=weight[~extra], minlength=P)
        device[extra] = balanced_packing(weight[extra], P, capacity=free, initial=initial)
    else:
        pack = balanced_packing(weight, P)
        device = pack_to_device(pack, home[expert_of], P)[pack]
    x = np.zeros((E, P), dtype=np.int64)
    np.add.at(x, (expert_of, device), per_copy)
    return x, counts


def _eplb(problem: Any, method: str, num_replicas: int | None, keep_home: bool) -> PlacementSolution:
    E, P = problem.shape
    if num_replicas is None:
        num_replicas = P * (int(np.bincount(problem.home, minlength=P).max()) + 1)
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, (int, np.integer)):
        raise ValueError(f"`num_replicas` must be an integer, got {num_replicas!r}")
    if num_replicas < E or num_replicas % P:
        raise ValueError(f"`num_replicas` must be >= E={E} and a multiple of P={P}, got {num_replicas}")
    x, counts = eplb_assignment(problem, int(num_replicas), keep_home=keep_home)
    return PlacementSolution(
        method=method,
        status=Status.FEASIBLE,
        objective=float("nan"),
        assignment=x,
        stats={"num_replicas": int(num_replicas), "replicated_experts": int((counts > 1).sum())},
        message=f"{int(num_replicas)} slots, {int((counts > 1).sum())} expert(s) replicated",
    )


@register(
    "placement",
    "eplb",
    deterministic=True,
    supports_time_limit=False,
    description="DeepSeek EPLB-style replication and balanced packing, tokens split evenly over copies",
    per_step=True,
    options={
        "num_replicas": Option("int | None", "replica slots (default one redundant slot per device: P * (E / P + 1))"),
    },
)
def solve_eplb(problem: Any, *, time_limit: float | None = None, num_replicas: int | None = None) -> PlacementSolution:
    """EPLB replication; ``num_replicas`` defaults to one redundant slot per device (``P * (E / P + 1)``)."""
    return _eplb(problem, "eplb", num_replicas, keep_home=False)


@register(
    "placement",
    "eplb-home",
    deterministic=True,
    supports_time_limit=False,
    description="EPLB replication keeping each expert's first copy at home; only redundant copies move",
    per_step=True,
    options={
        "num_replicas": Option("int | None", "replica slots (default one redundant slot per device: P * (E / P + 1))"),
    },
)
def solve_eplb_home(
    problem: Any, *, time_limit: float | None = None, num_replicas: int | None = None
) -> PlacementSolution:
    """EPLB replication with the EP layout kept: redundant copies fill each device's free slots."""
    return _eplb(problem, "eplb-home", num_replicas, keep_home=True)
