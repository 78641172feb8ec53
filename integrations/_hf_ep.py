"""Expert parallelism for a transformers experts module: shards, plan, exchange (used by ``transformers.py``).

The runtime of :mod:`moebalance.integrations.ep`, applied to a block whose routing the model already did: each
rank keeps its home experts' rows of every ``[E, ...]`` expert tensor (the router, attention and shared experts
stay replicated), all-gathers one header of per-expert pair counts, plans the placement of the global loads
(:class:`~moebalance.integrations.ep.PlacementPlanner`) and runs the exchange
(:func:`~moebalance.integrations.ep.exchange`). Copied experts' tensors go point to point, whatever their number
(gpt-oss has four: ``gate_up_proj``, its bias, ``down_proj``, its bias). The expert step is a callable, so any
layout the model has (SwiGLU on moebalance's kernels, gpt-oss's clamped, interleaved, biased GLU) runs unchanged.

Home experts: rank ``r`` owns the contiguous block ``{e : e * P // E == r}`` (``E`` need not divide by ``P``).
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
    ExpertParallelError,
    PlacementPlanner,
    build_exchange,
    exchange,
    home_of,
)
from torch import Tensor

__all__ = ["ExpertShards", "StepPlan", "home_of", "check_placement"]

StepPlan = EPPlan
"""The plan one step of one layer used (an :class:`~moebalance.integrations.ep.EPPlan`)."""

_ = ExpertParallelError  # re-exported: the error the shards raise


def check_placement(
    num_experts: int, world: int, placement: str, problem_options: dict[str, Any], solve_options: dict[str, Any]
) -> None:
    """Validate the method and its options on an empty problem (ValueError now, not in the first step)."""
    PlacementPlanner(placement, num_experts, world, problem_options, solve_options)


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
        self.planner = PlacementPlanner(placement, E, P, problem_options, solve_options)
        self.replicated_plan = self.planner.replicated
        self.last_plan: StepPlan | None = None
        self.last_exchange: dict[str, Any] = {}
        self.timings: dict[str, float] | None = None  # a dict: seconds per phase are added to it
        self.step = 0
        with torch.no_grad():
            for n in self.names:
                full = getattr(experts, n)
                shard = torch.nn.Parameter(full.detach()[self.lo : self.hi].clone(), requires_grad=full.requires_grad)
                setattr(experts, n, shard)

    def problem(self, loads: np.ndarray) -> Any:
        return self.planner.problem(loads)

    def unshard(self, experts: torch.nn.Module) -> None:
        """Gather every rank's home rows back into full ``[E, ...]`` parameters (a collective)."""
        comm = Communicator(self.group, "disable")
        sizes = np.bincount(self.home, minlength=self.world).tolist()
        with torch.no_grad():
            for n in self.names:
                shard = getattr(experts, n)
                full = comm.all_gather_rows(f"gather {n}", shard.detach(), sizes)
                setattr(experts, n, torch.nn.Parameter(full, requires_grad=shard.requires_grad))

    def forward(
        self, experts: torch.nn.Module, x: Tensor, eidx: Tensor, gates: Tensor, ffn: Callable, where: str
    ) -> tuple[Tensor, np.ndarray, np.ndarray, Communicator]:
        """``(y [T, hidden], global loads [E], tokens per rank [P], comm)`` for this rank's routed tokens."""
        E = self.E
        self.step += 1
        comm = Communicator(self.group, f"{where}, step {self.step}", self.timings)
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
        plan = self.planner.plan(comm, C.sum(0))
        self.last_plan = plan
        slot_of = np.full(E, -1, dtype=np.int64)
        slot_of[self.lo : self.hi] = np.arange(self.hi - self.lo)
        ex, send_pairs = build_exchange(
            comm,
            eidx.reshape(-1),
            C,
            plan.assignment,
            plan.weight_transfers,
            slot_of,
            self.hi - self.lo,
            ffn,
            x.shape[1],
        )
        self.last_exchange = ex.stats
        y_send = exchange(x.index_select(0, send_pairs // k), ex, weights)
        o = x.new_zeros((T * k, x.shape[1])).index_copy(0, send_pairs, y_send).view(T, k, x.shape[1])
        y = (o.float() * gates.float()[..., None]).sum(1).to(x.dtype)
        return y, C.sum(0), Ts, comm
