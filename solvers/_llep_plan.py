"""LLEP's plan and its planning loop: the rules of :mod:`moebalance.solvers.placement_llep` (the capacity, the
EP fallback, the three cases per expert), event-driven (:func:`llep_plan`: only experts whose home is over capacity
do work; a heap keeps the least-loaded device), and the ``[E, P]`` counts of a plan (:func:`plan_to_assignment`).
:class:`~moebalance.solvers.placement_llep.LLEPPlanner` (the hot path) and ``solve(problem, "llep")`` run this
code; ``tests/oracles/llep_reference.py`` (the authors' loop, transcribed) is what it must equal."""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

__all__ = ["LLEPPlan", "llep_capacity", "llep_uses_ep", "llep_plan", "plan_to_assignment"]


@dataclasses.dataclass
class LLEPPlan:
    """One LLEP plan.

    token_ranges:     ``{expert: [(device, start, end), ...]}`` in LLEP's order (home chunk first).
    weight_transfers: ``[(expert, src, dst), ...]`` one per spilled chunk, in planning order.
    device_loads:     ``[P]`` tokens per device.
    capacity:         the per-device capacity used.
    fallback:         True when the imbalance test chose plain EP.
    assignment:       ``[E, P]`` int64 token counts (filled by :class:`LLEPPlanner`; None from ``llep_plan``).
    """

    token_ranges: dict[int, list[tuple[int, int, int]]]
    weight_transfers: list[tuple[int, int, int]]
    device_loads: list[int]
    capacity: int
    fallback: bool
    assignment: np.ndarray | None = None

    def copies(self) -> list[tuple[int, int, int]]:
        """``[(expert, src, dst), ...]``: each weight copy once (chunks to the same device merged), sorted by
        (expert, dst)."""
        return sorted(set(self.weight_transfers), key=lambda t: (t[0], t[2]))


def llep_capacity(total: int, num_devices: int, alpha: float) -> int:
    """The reference's per-device capacity ``max(int(alpha * (total // P)), 1)``."""
    balanced = total // num_devices
    cap = int(alpha * balanced) if balanced > 0 else total
    return max(cap, 1)


def llep_uses_ep(native_loads: Any, imbalance_threshold: float | None) -> bool:
    """True when the fallback picks EP: max / mean native device load (float32) < threshold."""
    if imbalance_threshold is None or imbalance_threshold <= 0:
        return False
    native = np.asarray(native_loads, dtype=np.float32)
    # numpy's native.mean(dtype=float32), without its dispatch: a float32 sum, divided in float64, back to float32
    mean = np.float32(float(np.add.reduce(native, dtype=np.float32)) / native.shape[0])
    ratio = 1.0 if mean == 0 else float(native.max() / mean)
    return ratio < imbalance_threshold


def _ep_plan(loads: list[int], home: list[int], P: int, cap: int) -> LLEPPlan:
    ranges = {e: [(home[e], 0, L)] for e, L in enumerate(loads) if L > 0}
    dev = [0] * P
    for e, L in enumerate(loads):
        dev[home[e]] += L
    return LLEPPlan(ranges, [], dev, cap, True)


def llep_plan(
    expert_loads: Any,
    num_devices: int,
    home: Any = None,
    *,
    alpha: float = 1.0,
    min_chunk: int = 1024,
    imbalance_threshold: float | None = None,
    max_capacity: int | None = None,
    spilled_only: bool = False,
) -> LLEPPlan:
    """LLEP's plan for ``expert_loads`` ``[E]`` on ``num_devices`` devices (``home`` ``[E]``, default blocks).

    ``max_capacity`` caps LLEP's capacity (used for a problem's ``max_tokens_per_device``). Equal, range for
    range, to the authors' loop (``tests/oracles/llep_reference.py``). ``spilled_only`` leaves out the experts
    computed entirely at home (:func:`plan_to_assignment` puts them back), which saves building most of the dict.
    """
    loads_arr = np.asarray(expert_loads, dtype=np.int64)
    E = loads_arr.shape[0]
    P = int(num_devices)
    home_arr = np.arange(E) // (E // P) if home is None else np.asarray(home, dtype=np.int64)
    return _llep_core(
        loads_arr,
        home_arr,
        home_arr.tolist(),
        P,
        float(alpha),
        int(min_chunk),
        imbalance_threshold,
        max_capacity,
        spilled_only,
    )


def _llep_core(
    loads_arr: np.ndarray,
    home_arr: np.ndarray,
    homes: list[int],
    P: int,
    alpha: float,
    min_chunk: int,
    imbalance_threshold: float | None,
    max_capacity: int | None,
    spilled_only: bool,
) -> LLEPPlan:
    """The planner proper, on checked inputs (``loads_arr`` ``[E]`` int64 >= 0, ``home_arr`` ``[E]`` in [0, P))."""
    loads = loads_arr.tolist()
    total = sum(loads)
    cap = llep_capacity(total, P, alpha)
    if max_capacity is not None:
        cap = min(cap, int(max_capacity))
    native = np.bincount(home_arr, weights=loads_arr, minlength=P).astype(np.int64)
    if llep_uses_ep(native, imbalance_threshold):
        if spilled_only:
            return LLEPPlan({}, [], native.tolist(), cap, True)
        return _ep_plan(loads, homes, P, cap)

    eff = native.tolist()  # effective load: assigned + pending native
    ranges: dict[int, list[tuple[int, int, int]]] = {}
    transfers: list[tuple[int, int, int]] = []
    # in case 1 nothing changes (the expert moves from pending to assigned on its home), so only experts whose
    # home is over capacity when their turn comes need work
    order = np.argsort(-loads_arr, kind="stable").tolist()
    if P == 1:
        full = {} if spilled_only else {e: [(0, 0, loads[e])] for e in order if loads[e] > 0}
        return LLEPPlan(full, [], [total], cap, False)
    ver = [0] * P
    heap = [(eff[g], g, 0) for g in range(P)]
    heapq.heapify(heap)

    def push(g: int) -> None:
        ver[g] += 1
        heapq.heappush(heap, (eff[g], g, ver[g]))

    def pop_least(n: int) -> tuple[int, int]:
        # least effective load among devices other than n (ties: lower id); removes its entry
        held = None
        while True:
            v, g, k = heapq.heappop(heap)
            if k != ver[g]:
                continue
            if g == n:
                held = (v, g, k)
                continue
            if held is not None:
                heapq.heappush(heap, held)
            return v, g

    for e in order:
        L = loads[e]
        if L == 0:
            break
        n = homes[e]
        en = eff[n]
        if en <= cap:  # case 1
            if not spilled_only:
                ranges[e] = [(n, 0, L)]
            continue
        room = cap - (en - L)
        if room > 0:  # case 2
            rs = [(n, 0, room)]
            eff[n] = cap
            push(n)
            off, rem = room, L - room
            while rem:
                v, g = pop_least(n)
                avail = cap - v
                if avail > 0 and (avail >= rem or avail >= min_chunk):
                    chunk = rem if rem < avail else avail
                else:
                    chunk = rem  # nobody has room: forced onto the least-loaded device
                rs.append((g, off, off + chunk))
                transfers.append((e, n, g))
                off += chunk
                rem -= chunk
                eff[g] = v + chunk
                push(g)
            ranges[e] = rs
        else:  # case 3: home full, spill everything
            eff[n] = en - L
            push(n)
            rs = []
            off, rem = 0, L
            first = -1
            visited: list[int] = []
            while rem and len(visited) < P - 1:
                v, g = pop_least(n)
                if first < 0:
                    first = g
                avail = cap - v
                if avail <= 0 or (avail < rem and avail < min_chunk):
                    # rooms only shrink along this order, so nobody after g qualifies either
                    heapq.heappush(heap, (v, g, ver[g]))
                    break
                chunk = rem if rem < avail else avail
                rs.append((g, off, off + chunk))
                transfers.append((e, n, g))
                off += chunk
                rem -= chunk
                eff[g] = v + chunk
                visited.append(g)
            for g in visited:
                push(g)
            if rem:
                rs.append((first, off, off + rem))
                transfers.append((e, n, first))
                eff[first] += rem
                push(first)
            ranges[e] = rs
    return LLEPPlan(ranges, transfers, eff, cap, False)


def plan_to_assignment(plan: LLEPPlan, expert_loads: Any, home: Any) -> np.ndarray:
    """``[E, P]`` token counts of an :class:`LLEPPlan` (``P = len(plan.device_loads)``): every expert at home,
    then the rows of the experts that spilled (those named in ``weight_transfers``) from their ranges."""
    loads = np.asarray(expert_loads, dtype=np.int64)
    E, P = loads.shape[0], len(plan.device_loads)
    x = np.zeros((E, P), dtype=np.int64)
    x[np.arange(E), np.asarray(home, dtype=np.int64)] = loads
    for e in dict.fromkeys(t[0] for t in plan.weight_transfers):
        x[e] = 0
        for g, s, t in plan.token_ranges[e]:
            x[e, g] += t - s
    return x
