"""Expert parallelism for a transformers experts module: shards, plan, exchange (used by ``transformers.py``).

The runtime of :mod:`moebalance.integrations.ep`, applied to a block whose routing the model already did: each
rank keeps its home experts' rows of every ``[E, ...]`` expert tensor (the router, attention and shared experts
stay replicated), all-gathers one header of per-expert pair counts, plans the placement of the global loads
(:class:`~moebalance.integrations.ep.PlacementPlanner`) and runs the exchange
(:func:`~moebalance.integrations.ep.exchange`). Copied experts' tensors go point to point, whatever their number
(gpt-oss has four: ``gate_up_proj``, its bias, ``down_proj``, its bias). The expert step is a callable, so any
layout the model has (SwiGLU on moebalance's kernels, gpt-oss's clamped, interleaved, biased GLU) runs unchanged.

Home experts: rank ``r`` owns the contiguous block ``{e : e * P // E == r}`` (``E`` need not divide by ``P``).

Replicated experts (``enable(model, expert_parallel=ExpertParallel(num_local_slots=..., split=...,
replication=...))``): each rank keeps ``num_local_slots`` rows of every expert tensor, the experts of its slots in
the layout of :class:`~moebalance.integrations.ep.ReplicatedExperts` -- the same object the torch layer uses --
which plans each step's split over the replicas, keeps the load window and moves the rows (and optimizer state)
when :func:`~moebalance.integrations.ep.maybe_rebalance` is called with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from moebalance.integrations.ep import (
    Communicator,
    EPPlan,
    ExpertParallel,
    ExpertParallelError,
    PlacementPlanner,
    RebalanceReport,
    ReplicatedExperts,
    build_exchange,
    exchange,
    home_of,
)
from torch import Tensor

__all__ = ["ExpertShards", "StepPlan", "home_of", "check_placement", "check_expert_parallel", "in_backward"]

StepPlan = EPPlan
"""The plan one step of one layer used (an :class:`~moebalance.integrations.ep.EPPlan`)."""

_ = ExpertParallelError  # re-exported: the error the shards raise


def check_expert_parallel(value: Any) -> None:
    """``expert_parallel`` of ``enable``: a bool or an :class:`~moebalance.integrations.ep.ExpertParallel`."""
    if not isinstance(value, (bool, ExpertParallel)):
        raise ValueError(f"`expert_parallel` must be a bool or an ExpertParallel, got {value!r:.80}")


def check_placement(
    num_experts: int,
    world: int,
    placement: str,
    problem_options: dict[str, Any],
    solve_options: dict[str, Any],
    expert_parallel: Any = True,
) -> None:
    """Validate the method and its options (or the replicas' configuration) on an empty problem (ValueError now,
    not in the first step)."""
    if isinstance(expert_parallel, ExpertParallel):
        if placement != "ep" or problem_options or solve_options:
            raise ValueError(
                "with replicated experts (expert_parallel=ExpertParallel(...)) each expert's tokens are split over "
                f"its replicas: `placement` and its options do not apply (got placement={placement!r}, "
                f"{sorted({**problem_options, **solve_options})}); name a placement method as the ExpertParallel's "
                "`split` (options in `split_options`) to run it over the replicas"
            )
        ReplicatedExperts(expert_parallel, num_experts, world, 0)
        return
    PlacementPlanner(placement, num_experts, world, problem_options, solve_options)


def in_backward() -> bool:
    """Whether this runs inside a backward pass: a forward there is gradient checkpointing's recompute (torch's
    checkpoint, reentrant or not, re-runs the forward while the autograd engine executes the backward graph)."""
    return torch._C._current_graph_task_id() != -1


class ExpertShards:
    """This rank's share of one experts module, and the per-step exchange.

    ``names``: the module's ``[E, ...]`` parameters, replaced by their home rows ``[E_r, ...]``.
    """

    def __init__(
        self,
        experts: torch.nn.Module,
        names: list[str],
        num_experts: int,
        *,
        group: Any,
        placement: str,
        problem_options: dict[str, Any],
        solve_options: dict[str, Any],
        expert_parallel: Any = True,
    ):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = P = dist.get_world_size(group)
        self.E = E = num_experts
        self.home = home_of(E, P)
        mine = np.flatnonzero(self.home == self.rank)
        if mine.size == 0:
            raise ValueError(f"{E} experts cannot give every one of {P} ranks a home expert; use at most {E} ranks")
        self.lo, self.hi = int(mine[0]), int(mine[-1]) + 1
        self.names = list(names)
        self.placement = placement
        self.replicas: ReplicatedExperts | None = None
        self.planner: PlacementPlanner | None = None
        if isinstance(expert_parallel, ExpertParallel):
            self.replicas = ReplicatedExperts(expert_parallel, E, P, self.rank)
            rows = torch.from_numpy(self.replicas.local())
        else:
            self.planner = PlacementPlanner(placement, E, P, problem_options, solve_options)
            rows = torch.arange(self.lo, self.hi)
        self.replicated_plan = self.planner.replicated if self.planner is not None else True
        self.last_plan: StepPlan | None = None
        self.last_exchange: dict[str, Any] = {}
        self.timings: dict[str, float] | None = None  # a dict: seconds per phase are added to it
        self.step = 0
        with torch.no_grad():
            for n in self.names:
                full = getattr(experts, n)
                shard = torch.nn.Parameter(
                    full.detach().index_select(0, rows.to(full.device)), requires_grad=full.requires_grad
                )
                setattr(experts, n, shard)

    def problem(self, loads: np.ndarray) -> Any:
        return self.planner.problem(loads)

    @property
    def local_experts(self) -> np.ndarray:
        """``[S]`` logical expert of each local row (the home block without replicas)."""
        return np.arange(self.lo, self.hi) if self.replicas is None else self.replicas.local()

    def unshard(self, experts: torch.nn.Module) -> None:
        """Gather every rank's rows back into full ``[E, ...]`` parameters (a collective; with replicas, each
        expert's first replica: they are equal)."""
        comm = Communicator(self.group, "disable")
        if self.replicas is not None:
            self.replicas.wait()
            lay = self.replicas.layout
            sizes, pick = [lay.slots] * self.world, torch.from_numpy(lay.log2phy[:, 0])
        else:
            sizes, pick = np.bincount(self.home, minlength=self.world).tolist(), None
        with torch.no_grad():
            for n in self.names:
                shard = getattr(experts, n)
                full = comm.all_gather_rows(f"gather {n}", shard.detach(), sizes)
                if pick is not None:
                    full = full.index_select(0, pick.to(full.device))
                setattr(experts, n, torch.nn.Parameter(full, requires_grad=shard.requires_grad))

    def maybe_rebalance(self, experts: torch.nn.Module, optimizer: Any = None) -> RebalanceReport | None:
        """Re-plan and move this block's replicas when ``step_interval`` forwards have run (a collective)."""
        if self.replicas is None or not self.replicas.due(self.step):
            return None
        comm = Communicator(self.group, f"rebalance, step {self.step}", self.timings)
        params = [getattr(experts, n) for n in self.names]
        return self.replicas.rebalance(comm, self.step, params, optimizer)

    def forward(
        self, experts: torch.nn.Module, x: Tensor, eidx: Tensor, gates: Tensor, ffn: Callable, where: str
    ) -> tuple[Tensor, np.ndarray, np.ndarray, Communicator]:
        """``(y [T, hidden], global loads [E], tokens per rank [P], comm)`` for this rank's routed tokens."""
        E, r = self.E, self.rank
        recompute = in_backward()  # gradient checkpointing's recompute: not a step, its loads already recorded
        if not recompute:
            self.step += 1
        comm = Communicator(self.group, f"{where}, step {self.step}{' (recompute)' * recompute}", self.timings)
        if self.replicas is not None:  # a weight move in flight completes first (a failed one raises, naming it)
            self.replicas.wait()
        T, k = eidx.shape
        counts = torch.bincount(eidx.reshape(-1), minlength=E)[:E].double().cpu()
        weights = tuple(getattr(experts, n) for n in self.names)
        x_grad = torch.is_grad_enabled() and x.requires_grad
        w_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        header = torch.cat([torch.tensor([T, x_grad, w_grad], dtype=torch.float64), counts])
        heads = comm.all_gather("routing header", header).numpy()
        if len({tuple(h) for h in heads[:, 1:3].tolist()}) > 1:
            raise comm.error(
                "ranks disagree on what needs gradients (input, expert weights): "
                f"{heads[:, 1:3].astype(bool).tolist()}; run every rank in the same grad mode"
            )
        Ts = heads[:, 0].astype(np.int64)
        C = np.rint(heads[:, 3:]).astype(np.int64)  # [P, E]
        if self.replicas is None:
            plan = self.planner.plan(comm, C.sum(0))
            slot_of, replica_of, summed = np.full(E, -1, dtype=np.int64), None, None
            slot_of[self.lo : self.hi] = np.arange(self.hi - self.lo)
        else:  # waits for a weight move in flight; a recompute (checkpointing) records no loads
            plan = self.replicas.plan(comm, C.sum(0), record=not recompute)
            slot_of, replica_of = self.replicas.layout.slot_of(r), self.replicas.local()
            summed = np.flatnonzero(self.replicas.layout.logcnt > 1)
        self.last_plan = plan
        ex, send_pairs = build_exchange(
            comm,
            eidx.reshape(-1),
            C,
            plan.assignment,
            plan.weight_transfers,
            slot_of,
            len(self.local_experts),
            ffn,
            x.shape[1],
            replica_of,
            summed,
        )
        self.last_exchange = ex.stats
        y_send = exchange(x.index_select(0, send_pairs // k), ex, weights)
        o = x.new_zeros((T * k, x.shape[1])).index_copy(0, send_pairs, y_send).view(T, k, x.shape[1])
        y = (o.float() * gates.float()[..., None]).sum(1).to(x.dtype)
        return y, C.sum(0), Ts, comm
