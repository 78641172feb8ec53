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
the least-loaded device; it, the plan type and the loop are in ``_llep_plan``). The test oracle, a direct
transcription of the paper's loop (re-sorting the devices for every chunk), is ``tests/oracles/llep_reference.py``:
both planners equal it range for range.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moebalance.adapter import Option
from moebalance.plan import TokenRanges
from moebalance.registry import register
from moebalance.solution import PlacementSolution, Status

from ._llep_plan import LLEPPlan, _llep_core, llep_capacity, llep_plan, llep_uses_ep, plan_to_assignment

__all__ = [
    "LLEPPlan",
    "LLEPPlanner",
    "llep_capacity",
    "llep_uses_ep",
    "llep_plan",
    "plan_to_assignment",
    "llep_for",
    "run_llep",
]


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
        has them). Equal, range for range, to the authors' loop (``tests/oracles/llep_reference.py``).
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
    assert plan.assignment is not None  # LLEPPlanner.plan fills it
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


def __getattr__(name: str) -> Any:
    """``llep_plan_reference``, deprecated: the authors' loop moved to the tests (``tests/oracles/llep_reference.py``,
    a test oracle and a benchmark baseline, not a planner), importable from a source checkout."""
    if name == "llep_plan_reference":
        import warnings

        warnings.warn(
            "`moebalance.solvers.placement_llep.llep_plan_reference` moved to tests/oracles/llep_reference.py "
            "(a test oracle); use `llep_plan` or `LLEPPlanner`, which equal it range for range",
            DeprecationWarning,
            stacklevel=2,
        )
        try:
            from tests.oracles.llep_reference import llep_plan_reference
        except ImportError:
            raise AttributeError(
                "`llep_plan_reference` moved to tests/oracles/llep_reference.py in the source tree (not installed); "
                "use `llep_plan` or `LLEPPlanner`, which equal it range for range"
            ) from None
        return llep_plan_reference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
