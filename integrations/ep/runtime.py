"""Replicated experts of one layer, the same object for :class:`~moebalance.integrations.distributed.ExpertParallelMoE`
and ``moebalance.integrations.transformers.enable(model, expert_parallel=ExpertParallel(...))``.

:class:`ExpertParallel` is the configuration (validated when built, so a bad option fails before a model
changes): how many slots per rank, how each expert's tokens are split over its replicas, and the live rebalancing
policy. :class:`ReplicatedExperts` is its state in one layer: the :class:`~.replicas.ReplicaLayout` in force,
the per-step plan, the load window and the weight moves, which run asynchronously: :meth:`ReplicatedExperts.
rebalance` posts them and the layer's next forward waits for them (:meth:`ReplicatedExperts.wait`) before it
uses the slots, so everything computed in between (the optimizer step, earlier layers) overlaps the transfer.
:func:`maybe_rebalance` runs the rebalance of every replicated layer of a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moebalance.solution import Status

from .comm import Communicator
from .planning import PROBLEM_OPTIONS, EPPlan, PlacementPlanner
from .replicas import SPLITS, PendingMove, Rebalancer, RebalanceReport, ReplicaLayout, check_layout, start_move

__all__ = ["ExpertParallel", "ReplicatedExperts", "maybe_rebalance"]


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Replicated experts and live rebalancing of an expert-parallel layer.

    num_local_slots:  expert slots per rank (``E/P`` home experts plus redundant ones; None: ``E/P``, or as many
                      as ``phy2log`` has).
    phy2log:          the initial replication plan ``[P * S]`` (default :meth:`ReplicaLayout.initial`).
    split:            how each step splits an expert's tokens over its replicas: ``"even"``, ``"lp"`` (the
                      per-batch dispatch LP) or the name of any placement method of ``solve`` (e.g. ``"llep"``),
                      run with the slots as its experts (each slot's even share as its load, its rank as its
                      home), so the method may also lend a slot's weights to another rank for the step.
    split_options:    that placement method's options (problem options such as ``min_chunk``, ``alpha``,
                      ``imbalance_threshold``; ``time_limit`` and the method's own to ``solve``).
    replication:      the replication method of ``solve`` that re-plans (``eplb``, ``eplb+``, ``migrate``, ...);
                      None: the layout stays.
    window_size, step_interval, max_moves, min_gain, replication_options: the rebalancing policy
                      (:class:`~.replicas.Rebalancer`).
    async_moves:      post the weight moves and wait for them at the layer's next forward (True, gloo and NCCL), or
                      wait at once inside the rebalance (False). A move posted by a layer that is then dropped is
                      kept alive until its transfers complete (freeing them mid-flight stalls the group's next
                      collective).
    """

    num_local_slots: int | None = None
    phy2log: Any = None
    split: str = "even"
    split_options: dict[str, Any] | None = None
    replication: str | None = None
    window_size: int = 16
    step_interval: int = 16
    max_moves: int | None = None
    min_gain: float = 0.05
    replication_options: dict[str, Any] | None = None
    async_moves: bool = True

    def __post_init__(self) -> None:
        from moebalance._validate import as_int

        if self.num_local_slots is not None:
            as_int(self.num_local_slots, "num_local_slots", minimum=1)
        if not isinstance(self.split, str):
            raise ValueError(f"`split` must be one of {SPLITS} or a placement method name, got {self.split!r}")
        if self.split_options is not None and not isinstance(self.split_options, dict):
            raise ValueError(f"`split_options` must be a dict, got {type(self.split_options).__name__}")
        if self.split_options and self.split in SPLITS:
            raise ValueError(f"`split_options` apply to a placement method split, not split={self.split!r}")
        if self.replication is not None and not isinstance(self.replication, str):
            raise ValueError(f"`replication` must be a replication method name, got {self.replication!r}")
        if self.replication_options is not None and not isinstance(self.replication_options, dict):
            raise ValueError(f"`replication_options` must be a dict, got {type(self.replication_options).__name__}")
        if not isinstance(self.async_moves, bool):
            raise ValueError(f"`async_moves` must be a bool, got {self.async_moves!r}")
        as_int(self.window_size, "window_size", minimum=1)
        as_int(self.step_interval, "step_interval", minimum=1)


class ReplicatedExperts:
    """One layer's replicas on this rank (see the module docstring): ``config`` for ``num_experts`` experts over
    ``world`` ranks. Bad options raise ValueError here, on every rank alike."""

    def __init__(self, config: ExpertParallel, num_experts: int, world: int, rank: int):
        if not isinstance(config, ExpertParallel):
            raise ValueError(f"`expert_parallel` must be True or an ExpertParallel, got {type(config).__name__}")
        from moebalance._validate import as_int

        E, P = num_experts, world
        if E % P:
            raise ValueError(f"replicated experts need num_experts={E} divisible by the world size {P}")
        n = E // P
        self.config, self.E, self.P, self.rank = config, E, P, rank
        if config.phy2log is not None:
            self.layout = check_layout(config.phy2log, E, P)
            S = self.layout.slots
            if config.num_local_slots is not None and config.num_local_slots != S:
                raise ValueError(f"`num_local_slots`={config.num_local_slots} disagrees with `phy2log` ({S} per rank)")
        else:
            ns = config.num_local_slots
            S = n if ns is None else as_int(ns, "num_local_slots", minimum=n)
            self.layout = ReplicaLayout.initial(E, P, S)
        self.slots = S
        self.split = config.split
        self.planner: PlacementPlanner | None = None
        if self.split not in SPLITS:
            opts = dict(config.split_options or {})
            self.planner = PlacementPlanner(
                self.split,
                P * S,
                P,
                {k: v for k, v in opts.items() if k in PROBLEM_OPTIONS},
                {k: v for k, v in opts.items() if k not in PROBLEM_OPTIONS},
            )
        self.rebalancer: Rebalancer | None = None
        if config.replication is not None:
            self.rebalancer = Rebalancer(
                config.replication,
                E,
                P,
                S,
                window_size=config.window_size,
                step_interval=config.step_interval,
                max_moves=config.max_moves,
                min_gain=config.min_gain,
                options=config.replication_options,
                split="lp" if self.split == "lp" else "even",  # a placement method refines the even shares
            )
        self.pending: tuple[PendingMove, ReplicaLayout] | None = None
        self.reports: list[RebalanceReport] = []

    # -- the plan of a step --------------------------------------------------------------------------------
    def local(self) -> np.ndarray:
        """``[S]`` logical expert of each of this rank's slots (the layout in force)."""
        return self.layout.local(self.rank).copy()

    def plan(self, comm: Communicator, loads: np.ndarray, record: bool = True) -> EPPlan:
        """This step's ``[E, P]`` plan for the global kept loads (identical on every rank); the loads go to the
        rebalancing window unless ``record`` is False (a recompute)."""
        self.wait()
        if record and self.rebalancer is not None:
            self.rebalancer.record(loads)
        lay = self.layout
        if self.planner is None:
            x = lay.assignment(loads, self.split)
            return EPPlan("replicas", f"replicas ({self.split})", Status.FEASIBLE, x, [], 0.0)
        shares = lay.slot_shares(loads, "even")
        sp = self.planner.plan(comm, shares)
        x, transfers = lay.collapse(sp.assignment, sp.weight_transfers)
        return EPPlan(sp.method, f"replicas ({sp.used})", sp.status, x, transfers, sp.plan_time, sp.message)

    # -- live rebalancing ----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.rebalancer is not None and self.rebalancer.due(step)

    def rebalance(
        self, comm: Communicator, step: int, params: list[Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> RebalanceReport:
        """Re-plan from the load window and start moving the slots of ``params`` (``[S, ...]`` each) and of every
        optimizer state tensor shaped like them (a collective). Gradients of ``params`` are cleared."""
        if self.rebalancer is None:
            raise ValueError("this layer has no `replication` method to rebalance with")
        if not self.rebalancer.window:
            raise ValueError("no loads recorded yet: run a forward step before rebalancing")
        self.wait()
        old = self.layout.phy2log
        new, rep = self.rebalancer.plan(comm, self.layout, step)
        if rep.applied:
            tensors = [p.data for p in params]
            if optimizer is not None:
                for p in params:
                    for v in optimizer.state.get(p, {}).values():
                        if isinstance(v, Tensor) and v.shape == p.shape:
                            tensors.append(v)
            for p in params:
                p.grad = None
            move = start_move(comm, old, new, tensors)
            self.pending = (move, ReplicaLayout(new, self.E, self.P))
            per_slot = sum(t[0].numel() * t.element_size() for t in tensors)  # weights and optimizer state
            rep = dataclasses.replace(
                rep, bytes_moved=move.bytes, bytes_saved=(rep.moves_unrelabelled - rep.moves) * per_slot
            )
            if not self.config.async_moves:
                self.wait()
        self.reports.append(rep)
        return rep

    def wait(self) -> None:
        """Complete a weight move in flight (a collective when one is: every rank has one) and put its layout in
        force. A failed move raises :class:`~.comm.ExpertParallelError`; the old weights and layout stay."""
        if self.pending is None:
            return
        move, layout = self.pending
        self.pending = None
        move.wait()
        self.layout = layout


def maybe_rebalance(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[RebalanceReport]:
    """Rebalance every replicated expert-parallel layer of ``model`` that is due (a collective: every rank calls it
    after ``optimizer.step()``), moving ``optimizer``'s state with the weights. Covers
    :class:`~moebalance.integrations.distributed.ExpertParallelMoE` layers and the blocks of a transformers model
    enabled with ``expert_parallel=ExpertParallel(...)``. Returns the reports of the layers that re-planned."""
    out = []
    for m in model.modules():
        if callable(getattr(type(m), "maybe_rebalance", None)):  # ExpertParallelMoE
            rep = m.maybe_rebalance(optimizer)
        else:  # a transformers experts module: its block holds the shards
            blk = m.__dict__.get("_moebalance")
            shards = getattr(blk, "shards", None)
            if getattr(blk, "experts", None) is not m or not callable(getattr(shards, "maybe_rebalance", None)):
                continue
            rep = shards.maybe_rebalance(m, optimizer)
        if rep is not None:
            out.append(rep)
    return out
