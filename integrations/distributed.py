"""Expert parallelism across processes with ``torch.distributed``: standard EP and LLEP, forward and backward.

>>> from moebalance.integrations.distributed import ExpertParallelMoE, init_process_group
>>> init_process_group()                                   # env:// (torchrun), gloo on CPU, nccl on CUDA
>>> layer = MoELayer(config)                               # the same seed on every rank
>>> ep = ExpertParallelMoE.from_layer(layer, placement="llep", min_chunk=256)
>>> y = ep(x_local)                                        # [..., hidden] -> [..., hidden], this rank's tokens
>>> (y.square().sum() + ep.aux_loss).backward()
>>> ep.allreduce_router_grad()                             # the router is replicated: sum its gradient

Each of the ``P`` ranks of ``group`` keeps the router (replicated) and the weights of its ``E / P`` *home*
experts (rank ``r`` owns experts ``r * E/P ... (r+1) * E/P - 1``, the default ``home`` of
:class:`~moebalance.PlacementProblem`). Each forward:

1. routes its own tokens (:func:`moebalance.integrations.torch.route`, the single-device layer's function) and
   all-gathers one small header per rank: a health flag, the token count, grad flags and the per-expert pair
   counts ``[E]`` (and, for the aux loss, the per-expert probability sums);
2. plans the placement of the global loads through the runtime's
   :class:`~moebalance.integrations.ep.PlacementPlanner`: ``solve(PlacementProblem(loads, P, ...), placement)``
   for whatever method the user named, on every rank when the registry marks it ``deterministic`` (and no
   ``time_limit`` is set), else on group rank 0 with the assignment, status and weight transfers broadcast. A plan
   that is not usable (status not optimal/feasible, e.g. ``time_limit``, or tokens not conserved) falls back to
   ``fallback`` (default ``"auto"``, the registry's default placement method); an unusable fallback raises on
   every rank. With replicated experts (``num_local_slots``, ``replication``) each expert's pairs are split over
   its replicas instead (``replica_split``: "even", "lp" or a placement method run over the slots; the runtime's
   :class:`~moebalance.integrations.ep.ReplicatedExperts`, see :meth:`ExpertParallelMoE.rebalance`);
3. sends each pair to a device the plan names for its expert, with one ``all_to_all_single`` of uneven split
   sizes. The plan fixes only how many pairs of expert e each device computes, so a rank first keeps its own
   pairs where the plan gives it room for them (a helper computes its own tokens of a spilled expert without
   moving them) and the rest are matched rank-major (:func:`exchange_counts`); every rank derives every split
   from the gathered counts and the plan, so no size is exchanged separately;
4. the home rank of each copied expert sends its weights point to point (``batch_isend_irecv``), once per step;
5. computes with the single-device expert FFN (:func:`moebalance.kernels.expert_ffn`), once for the home
   experts and once for the copied ones, sends the rows back with the reverse all-to-all and combines them
   with the gates by the single-device layer's own function (:func:`moebalance.kernels.combine_pairs`).

Steps 3-5 are one ``autograd.Function`` (:class:`moebalance.integrations.ep.ExpertExchange`) whose backward
runs the same exchange in reverse (all-to-all of the output gradient, the FFN's backward, reverse all-to-all of the input gradient, then the gradients of copied
weights go back point to point and are added to the owner's). Every rank issues the collectives in the same
fixed order in forward and in backward, so ranks with no tokens, no foreign experts or nothing to compute take
part without special cases. The result equals the single-process ``MoELayer`` applied to the rank-major
concatenation of all ranks' tokens (up to float reordering), for every placement: a plan changes where work
runs, never what it computes.

Gradients. Expert weights: each owner ends with the gradient of the *sum over ranks* of their losses (the
copies' gradients included). The router is replicated: each rank's router gradient comes from its own tokens;
:meth:`ExpertParallelMoE.allreduce_router_grad` sums it over the group (or pass ``average=True`` to follow
data parallelism's mean: it divides the router and the expert gradients by ``P``). Under DDP, keep the expert
weights out of DDP's all-reduce (they are not replicas).

Balancers. The balancer, its step, the aux loss and MaxVio are the single-device layer's functions
(:mod:`moebalance.integrations.torch`). ``loss_free`` steps from the global loads and ``bip`` from the all-gathered
scores, so the bias stays identical on every rank and equal to the single-process layer's; with
``bip_same_batch`` the scores are all-gathered *before* routing (one extra small header gives the batch sizes)
and the batch is priced first, as in the single-device layer. ``aux_loss`` is each rank's share of the
global loss (global ``f_e``, this rank's probabilities over the global token count): the shares add up to the
single-process loss, and so do their gradients. ``capacity_factor`` drops pairs by the global order of the
single-process layer (pair scores and expert ids are all-gathered for it), with the same
:func:`~moebalance.routing.expert_capacity` of the global token count. Every :class:`MoEConfig` option behaves
as in :class:`MoELayer` (``tests/integrations/test_layer_options.py`` checks each one, forward and backward).

Faults and the timeout. :func:`init_process_group` sets a process-group timeout (``DEFAULT_TIMEOUT``, 120 s):
every collective and point-to-point operation of the group waits at most that long for a peer. Every
communication failure -- a peer that raised and left (connection closed), or one that is stuck (timeout) -- is
re-raised as :class:`ExpertParallelError` naming this rank, the step and the operation. A rank whose own
routing fails (bad input) still joins the header all-gather with its health flag down, so the other ranks raise
at once instead of waiting for the timeout. With NCCL the watchdog enforces the timeout
(``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default) by aborting the communicator. All ranks must run the layer
in the same mode (training or eval, grad enabled or not); the header checks the grad flags and raises on every
rank when they disagree. Every rank must run backward through the layer's output when any rank does.

Limits. ``E`` must be divisible by ``P`` (contiguous home blocks). Each step synchronises with the host once
(the gathered counts feed the planner). Within a step the weight copy, the dispatch and the compute run one
after the other; a rebalance's weight moves are posted at :meth:`ExpertParallelMoE.rebalance` and waited for at
the next forward, so what runs in between overlaps them. The exchange is an opaque ``autograd.Function``: ``torch.compile`` breaks the graph there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from moebalance.integrations.ep import (
    DEFAULT_TIMEOUT,
    PROBLEM_OPTIONS,
    Communicator,
    EPPlan,
    ExpertParallelError,
    PlacementPlanner,
    Rebalancer,
    RebalanceReport,
    ReplicaLayout,
    build_exchange,
    exchange,
    exchange_counts,
    init_process_group,
)
from moebalance.integrations.ep.replicas import SPLITS
from moebalance.integrations.ep.runtime import ExpertParallel, ReplicatedExperts
from moebalance.integrations.torch import (
    MoEConfig,
    MoELayer,
    MoEStats,
    apply_capacity,
    aux_loss_of,
    bip_route,
    check_input,
    make_balancer,
    max_violation,
    price_batch,
    route,
    router_probs,
    router_scores,
    step_balancer,
)
from moebalance.kernels import combine_pairs, expert_ffn, resolve_backend
from torch import Tensor, nn

from moebalance.routing import expert_capacity
from moebalance.solution import Status

__all__ = [
    "ExpertParallelMoE",
    "ExpertParallelError",
    "ExpertParallel",
    "EPPlan",
    "RebalanceReport",
    "init_process_group",
    "exchange_counts",
    "DEFAULT_TIMEOUT",
    "PROBLEM_OPTIONS",
]

_ = Status  # re-exported for callers that compared plan statuses through this module


class ExpertParallelMoE(nn.Module):
    """A :class:`~moebalance.integrations.torch.MoELayer` split over the ranks of ``group`` (see the module
    docstring). Build it with :meth:`from_layer`.

    Parameters: ``router`` (replicated ``nn.Linear(hidden, E)``), ``w_gate``, ``w_up`` ``[E/P, hidden, ffn]``
    and ``w_down`` ``[E/P, ffn, hidden]`` (this rank's home experts ``home_experts``). Buffer: ``bias`` ``[E]``.
    After each forward: ``aux_loss`` (this rank's share), ``last_stats`` (global :class:`MoEStats`),
    ``last_plan`` (:class:`EPPlan`) and ``last_exchange`` (a dict of this rank's row and copy counts). Set
    ``profile = True`` to get ``last_timings``: seconds per phase of the last step on this rank (header, plan,
    weight copy, dispatch, expert compute, return; the backward's phases are added when it runs), with CUDA
    synchronised around each phase (slower; for benchmarks). ``check_plans=True`` (or the attribute) runs the
    full shared check (:func:`moebalance.check`) on every step's plan, on top of the cheap invariant check.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        group: Any = None,
        placement: str = "ep",
        device: Any = None,
        check_plans: bool = False,
        fallback: str = "auto",
        num_local_slots: int | None = None,
        replication: str | None = None,
        phy2log: Any = None,
        replica_split: str = "even",
        window_size: int = 16,
        step_interval: int = 16,
        max_moves: int | None = None,
        min_gain: float = 0.05,
        replication_options: dict[str, Any] | None = None,
        async_moves: bool = True,
        **placement_options: Any,
    ):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"`config` must be a MoEConfig, got {type(config).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialized: call "
                "moebalance.integrations.distributed.init_process_group() (or "
                "torch.distributed.init_process_group) on every rank first"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = P = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `group`")
        E = config.num_experts
        if E % P:
            raise ValueError(f"`config.num_experts`={E} must be divisible by the group's world size {P}")
        if not isinstance(check_plans, bool):
            raise ValueError(f"`check_plans` must be a bool, got {check_plans!r}")
        self.config = c = config
        self.experts_per_rank = n = E // P
        self.home_experts = range(self.rank * n, (self.rank + 1) * n)
        # replicated experts: S slots per rank holding a replication plan; else the home experts, as placed
        self.replicated = num_local_slots is not None or replication is not None or phy2log is not None
        self.replicas: ReplicatedExperts | None = None
        self.planner: PlacementPlanner | None = None
        if self.replicated:
            if placement != "ep" or (placement_options and replica_split in SPLITS):
                raise ValueError(
                    "replicated experts split each expert's tokens over its replicas: `placement` and "
                    f"its options do not apply (got placement={placement!r}, {sorted(placement_options)}); "
                    "name a placement method as `replica_split` to run it over the replicas"
                )
            self.replicas = ReplicatedExperts(
                ExpertParallel(
                    num_local_slots=num_local_slots,
                    phy2log=phy2log,
                    split=replica_split,
                    split_options=placement_options or None,
                    replication=replication,
                    window_size=window_size,
                    step_interval=step_interval,
                    max_moves=max_moves,
                    min_gain=min_gain,
                    replication_options=replication_options,
                    async_moves=async_moves,
                ),
                E,
                P,
                self.rank,
            )
            S = self.replicas.slots
            self.replica_split = replica_split
        else:
            S = n
            self.planner = PlacementPlanner(
                placement,
                E,
                P,
                {k: v for k, v in placement_options.items() if k in PROBLEM_OPTIONS},
                {k: v for k, v in placement_options.items() if k not in PROBLEM_OPTIONS},
                fallback=fallback,
                check_plans=check_plans,
            )
        self.num_local_slots = S
        self.placement = placement
        kw = {"device": device, "dtype": c.dtype}
        self.router = nn.Linear(c.hidden, E, bias=False, **kw)
        self.w_gate = nn.Parameter(torch.empty(S, c.hidden, c.ffn, **kw))
        self.w_up = nn.Parameter(torch.empty(S, c.hidden, c.ffn, **kw))
        self.w_down = nn.Parameter(torch.empty(S, c.ffn, c.hidden, **kw))
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32, device=device))
        self.balancer = make_balancer(c)
        self.aux_loss: Tensor = torch.zeros((), device=device)
        self.last_stats: MoEStats | None = None
        self.last_plan: EPPlan | None = None
        self.last_exchange: dict[str, Any] = {}
        self.profile = False  # True: time each phase into last_timings (synchronising CUDA around each)
        self.last_timings: dict[str, float] = {}
        self._step = 0

    @property
    def check_plans(self) -> bool:
        return self.planner is not None and self.planner.check_plans

    @check_plans.setter
    def check_plans(self, value: bool) -> None:
        if self.planner is not None:
            self.planner.check_plans = bool(value)

    @property
    def layout(self) -> ReplicaLayout | None:
        """The replication plan in force (None without replicated experts)."""
        return None if self.replicas is None else self.replicas.layout

    @property
    def rebalancer(self) -> Rebalancer | None:
        return None if self.replicas is None else self.replicas.rebalancer

    @property
    def rebalances(self) -> list[RebalanceReport]:
        """Every :class:`RebalanceReport` so far."""
        return [] if self.replicas is None else self.replicas.reports

    @property
    def local_experts(self) -> np.ndarray:
        """``[S]`` logical expert of each local slot (the home experts without replication)."""
        if self.replicas is None:
            return np.arange(self.home_experts.start, self.home_experts.stop)
        return self.replicas.local()

    @classmethod
    def from_layer(
        cls, layer: MoELayer, group: Any = None, placement: str = "ep", check_plans: bool = False, **options: Any
    ) -> ExpertParallelMoE:
        """Split ``layer`` (built with the same seed on every rank): copy its router, bias and the weights of this
        rank's experts. ``placement`` is any placement method of :func:`moebalance.solve`; ``options`` are
        :data:`PROBLEM_OPTIONS` (to the problem), ``time_limit`` and the method's own options (to ``solve``), or
        the replication options of the constructor (``num_local_slots``, ``replication``, ...). Bad options
        raise ValueError here, on every rank alike."""
        if not isinstance(layer, MoELayer):
            raise ValueError(f"`layer` must be a MoELayer, got {type(layer).__name__}")
        ep = cls(
            layer.config,
            group=group,
            placement=placement,
            device=layer.w_gate.device,
            check_plans=check_plans,
            **options,
        )
        idx = torch.from_numpy(ep.local_experts).to(layer.w_gate.device)
        with torch.no_grad():
            ep.router.weight.copy_(layer.router.weight)
            ep.bias.copy_(layer.bias)
            ep.w_gate.copy_(layer.w_gate[idx])
            ep.w_up.copy_(layer.w_up[idx])
            ep.w_down.copy_(layer.w_down[idx])
        ep.train(layer.training)
        return ep

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden}, ffn={c.ffn}, num_experts={c.num_experts}, top_k={c.top_k}, "
            f"rank={self.rank}/{self.world_size}, home_experts={self.home_experts.start}.."
            f"{self.home_experts.stop - 1}, placement={self.placement}"
        )

    # -- gradients ---------------------------------------------------------------------------------------
    def allreduce_router_grad(self, average: bool = False) -> None:
        """Sum the replicated router's gradient over the group (collective: every rank calls it).

        With ``average=True`` the router gradient is divided by P after the sum, and the expert gradients are
        divided by P as well, so both are gradients of the mean of the ranks' losses (data parallelism's
        convention); the default keeps both as gradients of the sum.
        """
        g = self.router.weight.grad
        if g is None:
            g = self.router.weight.grad = torch.zeros_like(self.router.weight)
        self._comm().all_reduce("router gradient all_reduce", g)
        if average:
            for p in (self.router.weight, self.w_gate, self.w_up, self.w_down):
                if p.grad is not None:
                    p.grad.div_(self.world_size)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """``[..., hidden]`` -> ``[..., hidden]`` for this rank's tokens (a collective: every rank calls it)."""
        c = self.config
        E, P, k = c.num_experts, self.world_size, c.top_k
        self._step += 1
        self.last_timings = {}
        comm = self._comm(self.last_timings if self.profile else None)
        same_batch = c.bip_same_batch and self.training
        failure: BaseException | None = None
        T = 0
        try:  # the same checks and routing functions as MoELayer
            check_input(x, c.hidden)
            backend = resolve_backend(c.backend, self.w_gate.device)
            x2 = x.reshape(-1, c.hidden).to(self.w_gate.dtype)
            T = x2.shape[0]
            logits = self.router(x2)
            if same_batch:
                scores0 = router_scores(logits.detach(), c.router)
        except Exception as exc:  # the other ranks learn of it through a header instead of a timeout
            failure = exc
        all_scores: Tensor | None = None
        chosen: Tensor | None = None
        if same_batch:  # bip_same_batch: price the whole batch (all ranks' scores) before routing it
            pre = torch.tensor([float(failure is None), T], dtype=torch.float64)
            heads0 = comm.all_gather("bip same-batch header (all_gather)", pre).cpu().numpy()
            self._raise_if_failed(failure, heads0, "the same-batch pricing")
            Ts0 = heads0[:, 1].astype(np.int64)
            all_scores = comm.all_gather_rows("bip balancer: scores (all_gather)", scores0, Ts0.tolist())
            if Ts0.sum():
                price_batch(self.balancer, self.bias, all_scores)
                if c.enforce_capacity and failure is None:  # the global batch within capacity; this rank's rows
                    start = int(Ts0[: self.rank].sum())
                    chosen = bip_route(self.balancer, all_scores)[start : start + T]
        if failure is None:
            try:
                eidx, gates, scores = route(
                    logits, k, router=c.router, bias=self.bias, normalize_gates=c.normalize_gates, experts=chosen
                )
                counts = torch.bincount(eidx.reshape(-1), minlength=E).double()
                probs = router_probs(scores, c.router)
                x_grad = torch.is_grad_enabled() and x2.requires_grad
                w_grad = torch.is_grad_enabled() and any(p.requires_grad for p in (self.w_gate, self.w_up, self.w_down))
                header = torch.cat(
                    [
                        torch.tensor([1.0, T, x_grad, w_grad], dtype=torch.float64, device=counts.device),
                        counts,
                        probs.detach().double().sum(0),
                    ]
                )
            except Exception as exc:
                failure = exc
        if failure is not None:
            header = torch.zeros(4 + 2 * E, dtype=torch.float64)
        heads = comm.all_gather("routing header (all_gather)", header).cpu().numpy()
        self._raise_if_failed(failure, heads, "the token exchange")
        if len(set(map(tuple, heads[:, 2:4].tolist()))) > 1:
            raise ExpertParallelError(
                f"rank {self.rank}/{P}: ranks disagree on what needs gradients "
                f"(x, expert weights) per rank: {heads[:, 2:4].astype(bool).tolist()}; run "
                "every rank in the same grad mode with the same requires_grad settings"
            )
        Ts = heads[:, 1].astype(np.int64)
        loads = heads[:, 4 : 4 + E].sum(0)  # pairs per expert before capacity drops
        kept, C = eidx, np.rint(heads[:, 4 : 4 + E]).astype(np.int64)
        if c.capacity_factor is not None:
            kept, C = self._global_capacity(comm, eidx, scores, Ts)
        with comm.timed("plan"):
            if self.replicas is None:
                plan = self.planner.plan(comm, C.sum(0))
            else:  # waits for a weight move in flight first
                plan = self.replicas.plan(comm, C.sum(0))
        self.last_plan = plan
        if self.replicas is None:
            slot_of = np.full(E, -1, dtype=np.int64)
            slot_of[self.home_experts.start : self.home_experts.stop] = np.arange(self.experts_per_rank)
            replica_of = summed = None
        else:
            slot_of, replica_of = self.layout.slot_of(self.rank), self.layout.local(self.rank)
            summed = np.flatnonzero(self.layout.logcnt > 1)

        def step(rows: Tensor, counts: list[int], w: tuple[Tensor, ...]) -> Tensor:
            return expert_ffn(rows, counts, *w, backend=backend)

        ex, send_pairs = build_exchange(
            comm,
            kept.reshape(-1),
            C,
            plan.assignment,
            plan.weight_transfers,
            slot_of,
            self.num_local_slots,
            step,
            c.hidden,
            replica_of,
            summed,
        )
        self.last_exchange = ex.stats
        y_send = exchange(x2.index_select(0, send_pairs // k), ex, (self.w_gate, self.w_up, self.w_down))
        o = x2.new_zeros((T * k, c.hidden)).index_copy(0, send_pairs, y_send).view(T, k, c.hidden)
        y = combine_pairs(o, kept, gates, E).to(x2.dtype)  # MoELayer's combine
        self._balance(comm, loads, heads[:, 4 + E :].sum(0), Ts, int(loads.sum() - C.sum()), scores, all_scores)
        return y.reshape(x.shape).to(x.dtype)

    def _raise_if_failed(self, failure: BaseException | None, heads: np.ndarray, before: str) -> None:
        """Raise this rank's own failure, or ExpertParallelError when another rank's health flag is down."""
        if failure is not None:
            raise failure
        bad = np.flatnonzero(heads[:, 0] == 0).tolist()
        if bad:
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world_size}: rank(s) {bad} failed before {before} "
                f"in step {self._step} (see their errors); stopping here too"
            )

    def _global_capacity(
        self, comm: Communicator, eidx: Tensor, scores: Tensor, Ts: np.ndarray
    ) -> tuple[Tensor, np.ndarray]:
        """This rank's kept ``[T, k]`` and every rank's kept counts ``[P, E]`` under the global capacity."""
        c = self.config
        E, k = c.num_experts, c.top_k
        pair_scores = scores.detach().gather(1, eidx)
        ids_all = comm.all_gather_rows("capacity: expert ids (all_gather)", eidx, Ts.tolist())
        vals_all = comm.all_gather_rows("capacity: pair scores (all_gather)", pair_scores, Ts.tolist())
        # apply_capacity reads scores[t, eidx[t, j]] only: a dense [T_all, E] holding the pair scores suffices
        dense = torch.zeros(ids_all.shape[0], E, device=eidx.device).scatter_(1, ids_all, vals_all)
        cap = expert_capacity(int(Ts.sum()), k, E, c.capacity_factor)
        kept_all = apply_capacity(ids_all, dense, cap)
        starts = np.concatenate([[0], np.cumsum(Ts)])
        C = np.stack(
            [
                np.bincount(kept_all[starts[r] : starts[r + 1]].reshape(-1).cpu().numpy(), minlength=E + 1)[:E]
                for r in range(comm.world)
            ]
        )
        return kept_all[starts[self.rank] : starts[self.rank + 1]], C

    def _balance(
        self,
        comm: Communicator,
        loads: np.ndarray,
        prob_sums: np.ndarray,
        Ts: np.ndarray,
        dropped: int,
        scores: Tensor,
        all_scores: Tensor | None,
    ) -> None:
        """Global stats, this rank's aux-loss share and the bias step (identical on every rank), by MoELayer's
        functions."""
        c = self.config
        T_all = int(Ts.sum())
        dev = scores.device
        loads_t = torch.as_tensor(loads, dtype=torch.float32, device=dev)
        share = aux_loss_of(c, loads_t, router_probs(scores, c.router).sum(0), T_all)
        total = aux_loss_of(c, loads_t, torch.as_tensor(prob_sums, dtype=torch.float32, device=dev), T_all)
        self.aux_loss = share if c.balancer == "aux_loss" else torch.zeros((), device=dev)
        self.last_stats = MoEStats(
            loads=loads_t,
            max_vio=max_violation(loads_t, T_all, c.top_k),
            aux_loss=total.detach(),
            dropped=torch.tensor(dropped),
        )
        if not (self.training and self.balancer is not None and T_all):
            return
        if c.balancer == "bip" and all_scores is None:
            all_scores = comm.all_gather_rows("bip balancer: scores (all_gather)", scores.detach().float(), Ts.tolist())
        step_balancer(c, self.balancer, self.bias, loads_t, all_scores)

    # -- plans and rebalancing ---------------------------------------------------------------------------
    def _comm(self, timings: dict[str, float] | None = None) -> Communicator:
        return Communicator(self.group, f"step {self._step}", timings, self.w_gate.device.type == "cuda")

    def rebalance_due(self) -> bool:
        """True when ``step_interval`` steps have run since the last re-plan (identical on every rank)."""
        return self.replicas is not None and self.replicas.due(self._step)

    def maybe_rebalance(self, optimizer: torch.optim.Optimizer | None = None) -> RebalanceReport | None:
        """:meth:`rebalance` when it is due, else None. Call it between steps (after ``optimizer.step()``)."""
        return self.rebalance(optimizer) if self.rebalance_due() else None

    def rebalance(self, optimizer: torch.optim.Optimizer | None = None) -> RebalanceReport:
        """Re-plan the replicas from the load window and move the weights (a collective: every rank calls it).

        The slots' weights move between ranks, and with ``optimizer`` every per-parameter state tensor shaped like
        a slot tensor (Adam's moments, SGD's momentum) moves with them, so training continues as if nothing had
        moved. With ``async_moves`` (default) the moves run asynchronously: the next forward waits for them before it computes
        (:meth:`wait_moves` waits now). Gradients are cleared (call it between steps). Returns the
        :class:`RebalanceReport`, also appended to ``rebalances``."""
        if self.replicas is None:
            raise ValueError("this layer has no `replication` method to rebalance with")
        return self.replicas.rebalance(self._comm(), self._step, [self.w_gate, self.w_up, self.w_down], optimizer)

    def wait_moves(self) -> None:
        """Complete a weight move in flight (a collective when one is; the next forward does it otherwise)."""
        if self.replicas is not None:
            self.replicas.wait()
