"""Per-step plans of the expert-parallel runtime, from the registry, with one fallback policy and one broadcast.

:class:`PlacementPlanner` asks :func:`moebalance.solve` for a plan of whatever placement method the user named
and executes what the typed :class:`~moebalance.PlacementSolution` holds (``assignment``, ``weight_transfers``);
it names no method itself. The registry's capability flags decide where the plan is computed: a
``deterministic`` method without a ``time_limit`` gives every rank the same plan from the same loads, so every
rank solves; any other (a MIP, anything under a time limit) is solved on group rank 0 and broadcast with
:func:`agree`.

Fallback policy (one, for every path): a plan is usable when its status is ``optimal`` or ``feasible`` and it
passes the cheap invariant check (every expert's tokens covered, counts non-negative); otherwise the step runs
the ``fallback`` method (default ``"auto"``: the registry's default placement method), and when that is not
usable either, every rank raises :class:`~.comm.ExpertParallelError`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from moebalance.solution import Status

from .comm import Communicator, ExpertParallelError

__all__ = ["EPPlan", "PlacementPlanner", "agree", "home_of", "plans_on_every_rank", "PROBLEM_OPTIONS", "USABLE"]

PROBLEM_OPTIONS = ("cost", "max_tokens_per_device", "max_foreign_experts", "alpha", "min_chunk", "imbalance_threshold")
"""``placement_options`` that go to :class:`~moebalance.PlacementProblem`; the others go to ``solve``."""

USABLE = (Status.OPTIMAL, Status.FEASIBLE)
_STATUSES = list(Status)


def plans_on_every_rank(problem: Any, method: str, solve_options: dict[str, Any]) -> bool:
    """Where the runtime computes ``method``'s plans, from the registry's capability flags (the one place that
    reads them): True when every rank can solve the same loads itself and get the same plan (an adapter flagged
    ``per_step``: deterministic, cheap, no back-end; and no ``time_limit``), False when group rank 0 solves and broadcasts."""
    from moebalance import method_info

    info = method_info(problem, method)
    return bool(info.per_step) and solve_options.get("time_limit") is None


def home_of(num_experts: int, world: int) -> np.ndarray:
    """``[E]`` home rank of each expert: contiguous blocks, sizes differing by at most one (with ``E % P == 0``
    the default home of :class:`~moebalance.PlacementProblem`)."""
    return (np.arange(num_experts, dtype=np.int64) * world) // num_experts


@dataclasses.dataclass(frozen=True)
class EPPlan:
    """The placement one step of one layer used (the same on every rank).

    method:           the requested method.
    used:             the method whose plan ran (the fallback's name after a fallback).
    status:           that method's :class:`moebalance.Status`.
    assignment:       ``[E, P]`` int64 token-expert pairs of expert e computed on rank p.
    weight_transfers: ``[(expert, src, dst), ...]`` weight copies made this step, sorted by (expert, dst).
    plan_time:        seconds spent planning on this rank (solve, or waiting for rank 0's broadcast).
    message:          the solver's message, and why a fallback happened.
    """

    method: str
    used: str
    status: Status
    assignment: np.ndarray
    weight_transfers: list
    plan_time: float
    message: str = ""

    @property
    def device_loads(self) -> np.ndarray:
        """``[P]`` pairs each rank computes."""
        return self.assignment.sum(axis=0)


def agree(
    comm: Communicator, replicated: bool, size: int, compute: Callable[[], np.ndarray], what: str = "plan broadcast"
) -> np.ndarray:
    """``compute()`` (an int64 vector of ``size``) on every rank when ``replicated``, else on group rank 0 and
    broadcast. A rank-0 failure reaches the others through a flag in the broadcast, then re-raises on rank 0."""
    if replicated or comm.world == 1:
        return np.asarray(compute(), dtype=np.int64)
    buf = torch.zeros(size + 1, dtype=torch.int64)
    err: BaseException | None = None
    if comm.rank == 0:
        try:
            buf[:-1] = torch.from_numpy(np.ascontiguousarray(compute(), dtype=np.int64))
            buf[-1] = 1
        except Exception as exc:  # the others learn of it through the flag
            err = exc
    buf = comm.broadcast(what, buf)
    if err is not None:
        raise err
    if int(buf[-1]) != 1:
        raise comm.error(f"rank 0 failed to compute the {what.split()[0]} (see its error)")
    return buf[:-1].numpy()


class PlacementPlanner:
    """Plans each step of one layer: ``method`` and its options (``problem_options`` to the problem,
    ``solve_options`` to ``solve``), validated now on an empty problem (ValueError on every rank alike)."""

    def __init__(
        self,
        method: str,
        num_experts: int,
        world: int,
        problem_options: dict[str, Any],
        solve_options: dict[str, Any],
        fallback: str = "auto",
        check_plans: bool = False,
    ):
        from moebalance import method_info, solve

        if not isinstance(method, str):
            raise ValueError(f"`placement` must be a method name, got {method!r}")
        if not isinstance(fallback, str):
            raise ValueError(f"`fallback` must be a method name, got {fallback!r}")
        if num_experts < world:
            raise ValueError(f"{num_experts} experts cannot give each of {world} ranks a home expert")
        self.method, self.fallback, self.check_plans = method, fallback, bool(check_plans)
        self.E, self.P = num_experts, world
        self.home = None if num_experts % world == 0 else home_of(num_experts, world)
        self.problem_options = dict(problem_options)
        self.solve_options = dict(solve_options)
        empty = self.problem(np.zeros(num_experts, dtype=np.int64))
        for name, opts in ((method, self.solve_options), (fallback, {})):
            sol = solve(empty, name, **opts)
            if sol.status == Status.ERROR:
                raise ValueError(f"`placement`={name!r} fails on an empty problem: {sol.message}")
        self.method_name = method_info(empty, method).name
        self.fallback_name = method_info(empty, fallback).name
        self.replicated = plans_on_every_rank(empty, method, self.solve_options)

    def problem(self, loads: np.ndarray) -> Any:
        from moebalance import PlacementProblem

        return PlacementProblem(loads, self.P, home=self.home, **self.problem_options)

    def _solve(self, problem: Any) -> tuple[np.ndarray, list, str, Status, str]:
        from moebalance import solve

        sol = solve(problem, self.method, **self.solve_options)
        why = ""
        if sol.status in USABLE:
            x = np.asarray(sol.assignment, dtype=np.int64)
            bad = self._violations(problem, x)
            if not bad:
                return x, list(sol.weight_transfers or []), sol.method, Status(sol.status), sol.message
            why = f"{sol.method}'s plan is not usable ({'; '.join(bad)})"
        else:
            why = f"{sol.method} returned status {sol.status.value} ({sol.message})"
        fb = solve(problem, self.fallback)
        x = None if fb.assignment is None else np.asarray(fb.assignment, dtype=np.int64)
        if fb.status not in USABLE or self._violations(problem, x):
            raise ExpertParallelError(
                f"no usable plan: {why}, and the fallback {fb.method} returned {fb.status.value} ({fb.message}); "
                f"raise max_tokens_per_device / max_foreign_experts or use a placement that respects them"
            )
        return x, list(fb.weight_transfers or []), fb.method, Status(fb.status), f"{why}; fell back to {fb.method}"

    def _violations(self, problem: Any, x: np.ndarray | None) -> list[str]:
        """The cheap invariant check (``check_plans``: the full shared check)."""
        if x is None or x.shape != (self.E, self.P):
            return ["no [E, P] assignment"]
        bad = []
        if (x < 0).any():
            bad.append("negative counts")
        if not np.array_equal(x.sum(axis=1), problem.expert_loads):
            bad.append("the plan does not conserve tokens")
        if self.check_plans and not bad:
            from moebalance import check

            res = check(problem, x)
            if not res.feasible:
                bad += list(res.violations)
        return bad

    def plan(self, comm: Communicator, loads: np.ndarray) -> EPPlan:
        """This step's plan for the global loads ``[E]`` (identical on every rank)."""
        t0 = time.perf_counter()
        E, P = self.E, self.P
        try:
            problem = self.problem(loads)
        except ValueError as exc:  # the limits cannot hold for these loads (InfeasibleError): no plan can
            raise ExpertParallelError(
                f"no usable plan for step loads {np.asarray(loads).tolist()[:16]}: {exc}; "
                "raise max_tokens_per_device / max_foreign_experts"
            ) from exc
        out: dict[str, Any] = {}

        def compute() -> np.ndarray:
            x, transfers, used, status, msg = self._solve(problem)
            out.update(used=used, status=status, msg=msg)
            tr = np.full((E * P, 3), -1, dtype=np.int64)
            tr[: len(transfers)] = np.asarray(transfers, dtype=np.int64).reshape(-1, 3)
            code = [int(used == self.method_name), _STATUSES.index(status), len(transfers)]
            return np.concatenate([x.reshape(-1), code, tr.reshape(-1)])

        buf = agree(comm, self.replicated, E * P + 3 + 3 * E * P, compute)
        x = buf[: E * P].reshape(E, P)
        own, st, n_tr = (int(v) for v in buf[E * P : E * P + 3])
        transfers = sorted(
            (tuple(int(v) for v in t) for t in buf[E * P + 3 :].reshape(-1, 3)[:n_tr]), key=lambda t: (t[0], t[2])
        )
        if out:
            used, status, msg = out["used"], out["status"], out["msg"]
        else:
            used, status = (self.method_name if own else self.fallback_name), _STATUSES[st]
            msg = "plan broadcast from rank 0"
        if self._violations(problem, x):  # invariant (rank 0 checked the plan it sent)
            raise comm.error("the broadcast plan does not conserve tokens")
        return EPPlan(self.method, used, status, x, transfers, time.perf_counter() - t0, msg)
