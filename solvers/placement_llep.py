"""``llep``: Least-Loaded Expert Parallelism's token-to-device plan (arXiv 2601.17111, Algorithms 2-4).

Reference: the authors' code, SalesforceAIResearch/LeastLoadedEP, ``llep/gpt_oss_llep.py``
(``compute_llep_lpt_plan``) and ``llep/utils.py`` (``compute_gpu_imbalance_ratio`` and the
``MOE_ADAPTIVE_LPT_ROUTING_RATIO`` fallback). Its rules, which both planners below follow exactly:

- capacity ``cap = max(int(alpha * (total // P)), 1)`` (``total`` when ``total // P == 0``);
- experts by load, largest first (stable: equal loads keep expert order); zero-load experts get no range;
- a device's *effective* load is its assigned tokens plus the tokens of its own experts not yet processed;
- case 1, the home device's effective load (this expert included) fits ``cap``: everything stays home;
- case 2, it fits partly: home takes ``cap - (effective - load)``, the rest goes chunk by chunk to the least
  effectively loaded other device (re-chosen per chunk, ties to the lower id); a chunk is
  ``min(remaining, room)``, and a device whose room is below ``min_chunk`` (and below what remains) is not
  used, in which case the whole rest is forced onto the least-loaded other device;
- case 3, home is already full: other devices are visited once in order of effective load at the start,
  each taking ``min(remaining, room)`` under the same ``min_chunk`` rule; what is left is forced onto the
  first device of that order;
- fallback: when max / mean of the native device loads (computed in float32, as the reference does with a
  torch float tensor) is below ``imbalance_threshold``, the plan is plain EP.

``llep_plan`` is the fast planner (event-driven: only experts whose home is over capacity do work; a heap keeps
the least-loaded device). ``llep_plan_reference`` is a direct transcription of the paper's loop (re-sorting the
devices for every chunk), kept as the test oracle and the benchmark baseline.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

from moebalance.plan import TokenRanges
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

__all__ = ["LLEPPlan", "llep_capacity", "llep_uses_ep", "llep_plan", "llep_plan_reference", "plan_to_assignment",
           "llep_for", "run_llep"]


@dataclasses.dataclass
class LLEPPlan:
    """One LLEP plan.

    token_ranges:     ``{expert: [(device, start, end), ...]}`` in LLEP's order (home chunk first).
    weight_transfers: ``[(expert, src, dst), ...]`` one per spilled chunk, in planning order.
    device_loads:     ``[P]`` tokens per device.
    capacity:         the per-device capacity used.
    fallback:         True when the imbalance test chose plain EP.
    """

    token_ranges: dict[int, list[tuple[int, int, int]]]
    weight_transfers: list[tuple[int, int, int]]
    device_loads: list[int]
    capacity: int
    fallback: bool


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
    mean = native.mean(dtype=np.float32)
    ratio = 1.0 if mean == 0 else float(native.max() / mean)
    return ratio < imbalance_threshold


def _ep_plan(loads: list[int], home: list[int], P: int, cap: int) -> LLEPPlan:
    ranges = {e: [(home[e], 0, L)] for e, L in enumerate(loads) if L > 0}
    dev = [0] * P
    for e, L in enumerate(loads):
        dev[home[e]] += L
    return LLEPPlan(ranges, [], dev, cap, True)


def llep_plan(expert_loads: Any, num_devices: int, home: Any = None, *, alpha: float = 1.0,
              min_chunk: int = 1024, imbalance_threshold: float | None = None,
              max_capacity: int | None = None, spilled_only: bool = False) -> LLEPPlan:
    """LLEP's plan for ``expert_loads`` ``[E]`` on ``num_devices`` devices (``home`` ``[E]``, default blocks).

    ``max_capacity`` caps LLEP's capacity (used for a problem's ``max_tokens_per_device``). Equal, range for
    range, to :func:`llep_plan_reference`. ``spilled_only`` leaves out the experts computed entirely at home
    (:func:`plan_to_assignment` puts them back), which saves building most of the dict.
    """
    loads_arr = np.asarray(expert_loads, dtype=np.int64)
    E = loads_arr.shape[0]
    P = int(num_devices)
    home_arr = np.arange(E) // (E // P) if home is None else np.asarray(home, dtype=np.int64)
    loads = loads_arr.tolist()
    homes = home_arr.tolist()
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
            visited = []
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


def llep_plan_reference(expert_loads: Any, num_devices: int, home: Any = None, *, alpha: float = 1.0,
                        min_chunk: int = 1024, imbalance_threshold: float | None = None) -> LLEPPlan:
    """A direct, pure-Python transcription of the paper's loop (the reference code's control flow).

    Slow on purpose: every spilled chunk rebuilds and sorts the list of other devices. Used as the oracle in
    the tests and as the baseline in ``benchmarks/placement.py``.
    """
    loads = [int(v) for v in expert_loads]
    E = len(loads)
    P = int(num_devices)
    homes = [e // (E // P) for e in range(E)] if home is None else [int(h) for h in home]
    total = sum(loads)
    balanced = total // P if P > 0 else total
    cap = int(alpha * balanced) if balanced > 0 else total
    cap = max(cap, 1)
    native = [0] * P
    for e in range(E):
        native[homes[e]] += loads[e]
    if llep_uses_ep(native, imbalance_threshold):
        return _ep_plan(loads, homes, P, cap)
    pending = list(native)
    assigned = [0] * P
    ranges: dict[int, list[tuple[int, int, int]]] = {}
    transfers: list[tuple[int, int, int]] = []

    def others_by_load(n: int) -> list[tuple[int, int, int]]:
        rows = [(g, assigned[g] + pending[g], cap - assigned[g] - pending[g]) for g in range(P) if g != n]
        return sorted(rows, key=lambda r: r[1])

    for e, L in sorted(enumerate(loads), key=lambda t: -t[1]):
        if L == 0:
            continue
        n = homes[e]
        pending[n] -= L
        room = cap - (assigned[n] + pending[n])
        rs: list[tuple[int, int, int]] = []
        if room >= L:  # case 1
            rs.append((n, 0, L))
            assigned[n] += L
        elif room > 0:  # case 2
            rs.append((n, 0, room))
            assigned[n] += room
            rem, off = L - room, room
            while rem > 0:
                cand = others_by_load(n)
                if not cand:
                    rs[0] = (n, 0, rs[0][2] + rem)
                    assigned[n] += rem
                    break
                done = False
                for g, _, avail in cand:
                    if avail <= 0:
                        continue
                    chunk = min(rem, avail)
                    if chunk < min_chunk and rem > chunk:
                        continue
                    rs.append((g, off, off + chunk))
                    assigned[g] += chunk
                    transfers.append((e, n, g))
                    off += chunk
                    rem -= chunk
                    done = True
                    break
                if not done:
                    g = cand[0][0]
                    rs.append((g, off, off + rem))
                    assigned[g] += rem
                    transfers.append((e, n, g))
                    rem = 0
        else:  # case 3
            cand = others_by_load(n)
            rem, off = L, 0
            for g, _, avail in cand:
                if rem <= 0:
                    break
                if avail <= 0:
                    continue
                chunk = min(rem, avail)
                if chunk < min_chunk and rem > chunk:
                    continue
                rs.append((g, off, off + chunk))
                assigned[g] += chunk
                transfers.append((e, n, g))
                off += chunk
                rem -= chunk
            if rem > 0:
                if cand:
                    g = cand[0][0]
                    rs.append((g, off, off + rem))
                    assigned[g] += rem
                    transfers.append((e, n, g))
                else:
                    rs.append((n, 0, L))
                    assigned[n] += L
        ranges[e] = rs
    return LLEPPlan(ranges, transfers, assigned, cap, False)


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


def llep_for(problem: Any, *, alpha: float | None = None, min_chunk: int | None = None,
             fallback: bool = True, spilled_only: bool = False) -> LLEPPlan:
    """LLEP's plan for a :class:`~moebalance.PlacementProblem` (its alpha/min_chunk unless given)."""
    a = problem.alpha if alpha is None else alpha
    m = problem.min_chunk if min_chunk is None else min_chunk
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not np.isfinite(a) or a <= 0:
        raise ValueError(f"`alpha` must be a positive finite number, got {alpha!r}")
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
        raise ValueError(f"`min_chunk` must be an integer >= 0, got {min_chunk!r}")
    return llep_plan(problem.expert_loads, problem.num_devices, problem.home, alpha=a, min_chunk=int(m),
                     imbalance_threshold=problem.imbalance_threshold if fallback else None,
                     max_capacity=problem.max_tokens_per_device, spilled_only=spilled_only)


def run_llep(problem: Any, *, alpha: float | None = None, min_chunk: int | None = None,
             fallback: bool = True) -> tuple[np.ndarray, LLEPPlan]:
    """LLEP on a :class:`~moebalance.PlacementProblem`: its ``[E, P]`` assignment and the plan."""
    plan = llep_for(problem, alpha=alpha, min_chunk=min_chunk, fallback=fallback)
    return plan_to_assignment(plan, problem.expert_loads, problem.home), plan


@register("placement", "llep", options={"alpha": None, "min_chunk": None, "fallback": True},
          description="LLEP least-loaded greedy (arXiv 2601.17111), exactly as the authors' reference code")
def solve_llep(problem: Any, *, time_limit: float | None = None, alpha: float | None = None,
               min_chunk: int | None = None, fallback: bool = True) -> PlacementSolution:
    """LLEP least-loaded greedy; ``alpha``/``min_chunk`` default to the problem's, ``fallback`` to EP."""
    plan = llep_for(problem, alpha=alpha, min_chunk=min_chunk, fallback=bool(fallback))
    stats = {"capacity": plan.capacity, "fallback": plan.fallback, "spilled_chunks": len(plan.weight_transfers)}
    msg = "imbalance below threshold: plain EP" if plan.fallback else f"capacity {plan.capacity} tokens/device"
    # the ranges of the experts that spilled, in LLEP's order; every other expert runs whole at home
    spilled = {e: plan.token_ranges[e] for e in dict.fromkeys(t[0] for t in plan.weight_transfers)}
    ranges = TokenRanges.from_home(problem.expert_loads, problem.home, overrides=spilled)
    return PlacementSolution(method="llep", status=Status.FEASIBLE, assignment=ranges.counts(*problem.shape),
                             token_ranges=ranges, stats=stats, message=msg)
