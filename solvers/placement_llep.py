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

:class:`LLEPPlanner` is the planner object of the hot path: built once with the problem's structure (E, P, home,
cost, LLEP parameters, limits), it plans each step's loads without rebuilding or re-checking a problem, with a cheap
invariant check (:meth:`LLEPPlanner.invariant_violations`); ``solve(problem, "llep")`` runs the same code.
``llep_plan`` is the fast planner (event-driven: only experts whose home is over capacity do work; a heap keeps
the least-loaded device). ``llep_plan_reference`` is a direct transcription of the paper's loop (re-sorting the
devices for every chunk), kept as the test oracle and the benchmark baseline.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.plan import TokenRanges
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

__all__ = [
    "LLEPPlan",
    "LLEPPlanner",
    "llep_capacity",
    "llep_uses_ep",
    "llep_plan",
    "llep_plan_reference",
    "plan_to_assignment",
    "llep_for",
    "run_llep",
]


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
    range, to :func:`llep_plan_reference`. ``spilled_only`` leaves out the experts computed entirely at home
    (:func:`plan_to_assignment` puts them back), which saves building most of the dict.
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


def llep_plan_reference(
    expert_loads: Any,
    num_devices: int,
    home: Any = None,
    *,
    alpha: float = 1.0,
    min_chunk: int = 1024,
    imbalance_threshold: float | None = None,
) -> LLEPPlan:
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


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


class LLEPPlanner:
    """LLEP's planner with the problem structure fixed once: ``plan(expert_loads)`` per step.

    Holds what does not change from step to step -- ``E``, ``P``, the ``home`` map ``[E]`` (default contiguous
    blocks), the :class:`~moebalance.CostModel`, LLEP's ``alpha``, ``min_chunk``, ``imbalance_threshold`` (None: no
    EP fallback) and the limits ``max_tokens_per_device`` / ``max_foreign_experts`` -- checked here, once. Each
    :meth:`plan` validates only the loads and runs the planner: no :class:`~moebalance.PlacementProblem` is built
    and the shared check does not run (``solve(problem, "llep")`` does both, around this same code). The
    attributes ``shape``, ``home``, ``cost``, ``max_tokens_per_device`` and ``max_foreign_experts`` have the
    problem's meaning, so the planner can stand in for a problem where only the structure is read (llep+'s local
    search).
    """

    def __init__(
        self,
        num_experts: int,
        num_devices: int,
        *,
        home: Any = None,
        alpha: float = 1.0,
        min_chunk: int = 1024,
        imbalance_threshold: float | None = 1.3,
        cost: Any = None,
        max_tokens_per_device: int | None = None,
        max_foreign_experts: int | None = None,
    ):
        from moebalance.placement import CostModel

        if not _is_int(num_experts) or num_experts < 1:
            raise ValueError(f"`num_experts` must be an integer >= 1, got {num_experts!r}")
        if not _is_int(num_devices) or num_devices < 1:
            raise ValueError(f"`num_devices` must be an integer >= 1, got {num_devices!r}")
        E, P = int(num_experts), int(num_devices)
        if home is None:
            if E % P:
                raise ValueError(f"`num_experts`={E} is not divisible by `num_devices`={P}; pass `home`")
            h = np.arange(E, dtype=np.int64) // (E // P)
        else:
            h = np.asarray(home)
            if h.shape != (E,) or not np.issubdtype(h.dtype, np.integer) or h.min() < 0 or h.max() >= P:
                raise ValueError(f"`home` must be [{E}] integers in [0, {P}), got {h.dtype} {h.shape}")
            h = h.astype(np.int64)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float, np.floating))
            or not np.isfinite(alpha)
            or alpha <= 0
        ):
            raise ValueError(f"`alpha` must be a positive finite number, got {alpha!r}")
        if not _is_int(min_chunk) or min_chunk < 0:
            raise ValueError(f"`min_chunk` must be an integer >= 0, got {min_chunk!r}")
        t = imbalance_threshold
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not np.isfinite(t) or t <= 0
        ):
            raise ValueError(f"`imbalance_threshold` must be a positive finite number or None, got {t!r}")
        for name, v in (("max_tokens_per_device", max_tokens_per_device), ("max_foreign_experts", max_foreign_experts)):
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"`{name}` must be an integer >= 0 or None, got {v!r}")
        if cost is None:
            cost = CostModel()
        if not isinstance(cost, CostModel):
            raise ValueError(f"`cost` must be a CostModel, got {type(cost).__name__}")
        h.setflags(write=False)
        self.num_experts, self.num_devices, self.shape = E, P, (E, P)
        self.home = h
        self._homes = h.tolist()
        self._rows = np.arange(E)
        self.alpha, self.min_chunk = float(alpha), int(min_chunk)
        self.imbalance_threshold = None if t is None else float(t)
        self.cost = cost
        self.max_tokens_per_device = None if max_tokens_per_device is None else int(max_tokens_per_device)
        self.max_foreign_experts = None if max_foreign_experts is None else int(max_foreign_experts)

    @classmethod
    def for_problem(
        cls, problem: Any, *, alpha: float | None = None, min_chunk: int | None = None, fallback: bool = True
    ) -> LLEPPlanner:
        """The planner of a :class:`~moebalance.PlacementProblem`'s structure (its alpha/min_chunk unless given;
        ``fallback=False`` drops the EP fallback)."""
        E, P = problem.shape
        return cls(
            E,
            P,
            home=problem.home,
            alpha=problem.alpha if alpha is None else alpha,
            min_chunk=problem.min_chunk if min_chunk is None else min_chunk,
            imbalance_threshold=problem.imbalance_threshold if fallback else None,
            cost=problem.cost,
            max_tokens_per_device=problem.max_tokens_per_device,
            max_foreign_experts=problem.max_foreign_experts,
        )

    def _loads(self, expert_loads: Any) -> np.ndarray:
        a = np.asarray(expert_loads)
        if a.dtype == np.int64 and a.shape == self.shape[:1]:  # the per-step case: only the values to check
            if a.size and (a.min() < 0 or (int(a.max()) >= 2**62 // a.size and sum(a.tolist()) >= 2**62)):
                raise ValueError("`expert_loads` must be non-negative, summing below 2**62")
            return a
        if a.shape != (self.num_experts,) or not (
            np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)
        ):
            raise ValueError(f"`expert_loads` must be [{self.num_experts}] integers, got {a.dtype} {a.shape}")
        if np.issubdtype(a.dtype, np.floating):
            if not np.all(np.isfinite(a)) or np.any(a != np.round(a)) or np.any(np.abs(a) >= 2.0**62):
                raise ValueError("`expert_loads` must hold finite integer counts below 2**62")
        x = a.astype(np.int64)
        if x.size and x.min() < 0:
            raise ValueError("`expert_loads` must be non-negative")
        if x.size and int(x.max()) >= 2**62 // x.size and sum(x.tolist()) >= 2**62:  # exact, no wrap-around
            raise ValueError("`expert_loads` sum past 2**62 tokens")
        return x

    def plan(self, expert_loads: Any, *, spilled_only: bool = False) -> LLEPPlan:
        """LLEP's plan for ``expert_loads`` ``[E]`` (non-negative integers), ``assignment`` ``[E, P]`` included.

        ``spilled_only`` leaves the experts computed entirely at home out of ``token_ranges`` (the assignment still
        has them). Equal, range for range, to :func:`llep_plan_reference`.
        """
        loads = self._loads(expert_loads)
        plan = _llep_core(
            loads,
            self.home,
            self._homes,
            self.num_devices,
            self.alpha,
            self.min_chunk,
            self.imbalance_threshold,
            self.max_tokens_per_device,
            spilled_only,
        )
        x = np.zeros(self.shape, dtype=np.int64)
        x[self._rows, self.home] = loads
        for e in dict.fromkeys(t[0] for t in plan.weight_transfers):
            x[e] = 0
            for g, s, t in plan.token_ranges[e]:
                x[e, g] += t - s
        plan.assignment = x
        return plan

    def invariant_violations(self, expert_loads: Any, assignment: Any) -> list[str]:
        """The cheap per-step check of a plan ``[E, P]`` (vectorised, O(E*P)): counts non-negative, every expert's
        tokens covered exactly, and the limits ``max_tokens_per_device`` / ``max_foreign_experts`` respected.
        Empty when it passes. The full shared check (``moebalance.check``) also evaluates the cost model."""
        x = np.asarray(assignment)
        loads = np.asarray(expert_loads, dtype=np.int64)
        if x.shape != self.shape or not np.issubdtype(x.dtype, np.integer):
            return [f"plan must be [{self.num_experts}, {self.num_devices}] integers, got {x.dtype} {x.shape}"]
        bad = []
        if x.size and x.min() < 0:
            bad.append(f"{int(np.count_nonzero(x < 0))} negative token count(s)")
        rows = x.sum(axis=1)
        if not np.array_equal(rows, loads):
            e = int(np.flatnonzero(rows != loads)[0])
            bad.append(f"expert {e}'s tokens not covered: {int(rows[e])} placed, load {int(loads[e])}")
        C, F = self.max_tokens_per_device, self.max_foreign_experts
        if C is not None and x.size and int(x.sum(axis=0).max()) > C:
            bad.append(f"a device computes {int(x.sum(axis=0).max())} tokens > max_tokens_per_device={C}")
        if F is not None:
            used = x > 0
            used[self._rows, self.home] = False
            nf = int(used.sum(axis=0).max()) if x.size else 0
            if nf > F:
                bad.append(f"a device hosts {nf} foreign experts > max_foreign_experts={F}")
        return bad

    def __repr__(self) -> str:
        return (
            f"LLEPPlanner(E={self.num_experts}, P={self.num_devices}, alpha={self.alpha}, "
            f"min_chunk={self.min_chunk}, imbalance_threshold={self.imbalance_threshold})"
        )


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


def llep_for(
    problem: Any,
    *,
    alpha: float | None = None,
    min_chunk: int | None = None,
    fallback: bool = True,
    spilled_only: bool = False,
) -> LLEPPlan:
    """LLEP's plan for a :class:`~moebalance.PlacementProblem` (its alpha/min_chunk unless given), through
    :class:`LLEPPlanner` (so ``assignment`` is filled)."""
    return LLEPPlanner.for_problem(problem, alpha=alpha, min_chunk=min_chunk, fallback=fallback).plan(
        problem.expert_loads, spilled_only=spilled_only
    )


def run_llep(
    problem: Any, *, alpha: float | None = None, min_chunk: int | None = None, fallback: bool = True
) -> tuple[np.ndarray, LLEPPlan]:
    """LLEP on a :class:`~moebalance.PlacementProblem`: its ``[E, P]`` assignment and the plan."""
    plan = llep_for(problem, alpha=alpha, min_chunk=min_chunk, fallback=fallback)
    return plan.assignment, plan


@register(
    "placement",
    "llep",
    description="LLEP least-loaded greedy (arXiv 2601.17111), exactly as the authors' reference code",
    per_step=True,
    options={
        "alpha": Option("float | None", "capacity factor (default the problem's `alpha`)"),
        "min_chunk": Option(
            "int | None", "smallest chunk moved off an expert's home (default the problem's `min_chunk`)"
        ),
        "fallback": Option("bool", "plain EP when the imbalance is below the problem's threshold"),
    },
)
def solve_llep(
    problem: Any,
    *,
    time_limit: float | None = None,
    alpha: float | None = None,
    min_chunk: int | None = None,
    fallback: bool = True,
) -> PlacementSolution:
    """LLEP least-loaded greedy; ``alpha``/``min_chunk`` default to the problem's, ``fallback`` to EP."""
    a = problem.alpha if alpha is None else alpha
    m = problem.min_chunk if min_chunk is None else min_chunk
    if isinstance(a, bool) or not isinstance(a, (int, float, np.floating)) or not np.isfinite(a) or a <= 0:
        raise ValueError(f"`alpha` must be a positive finite number, got {alpha!r}")
    if not _is_int(m) or m < 0:
        raise ValueError(f"`min_chunk` must be an integer >= 0, got {min_chunk!r}")
    # the planner proper on the problem's validated structure (what LLEPPlanner.plan runs per step)
    plan = _llep_core(
        problem.expert_loads,
        problem.home,
        problem.home.tolist(),
        problem.num_devices,
        float(a),
        int(m),
        problem.imbalance_threshold if fallback else None,
        problem.max_tokens_per_device,
        True,
    )
    stats = {"capacity": plan.capacity, "fallback": plan.fallback, "spilled_chunks": len(plan.weight_transfers)}
    msg = "imbalance below threshold: plain EP" if plan.fallback else f"capacity {plan.capacity} tokens/device"
    # the ranges of the experts that spilled, in LLEP's order; every other expert runs whole at home
    ranges = TokenRanges.from_home(problem.expert_loads, problem.home, overrides=plan.token_ranges)
    return PlacementSolution(
        method="llep",
        status=Status.FEASIBLE,
        assignment=ranges.counts(*problem.shape),
        token_ranges=ranges,
        stats=stats,
        message=msg,
    )
