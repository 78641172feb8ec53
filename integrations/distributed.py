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
2. plans the placement of the global loads on every rank. ``ep``, ``llep`` and ``llep+`` run a planner object
   built once (:class:`moebalance.solvers.placement_llep.LLEPPlanner`: home map, P, E, cost, LLEP parameters and
   limits fixed at construction), with a cheap invariant check per step (every expert's tokens covered, counts
   non-negative, limits kept; ``check_plans=True`` adds the full shared check, as the tests do); its assignment
   and weight copies feed the exchange as they are. Other methods go through
   ``solve(PlacementProblem(loads, P, ...), method=placement)``: deterministic ones (the registry's
   ``deterministic`` flag) on every rank, the others (``milp``, or any method given a ``time_limit``) on group
   rank 0, with the ``[E, P]`` assignment broadcast. A plan that is not usable (status not optimal/feasible, e.g.
   ``time_limit``, or limits broken) falls back to ``llep``; an unusable fallback raises on every rank;
3. sends each pair to a device the plan names for its expert, with one ``all_to_all_single`` of uneven split
   sizes. The plan fixes only how many pairs of expert e each device computes, so a rank first keeps its own
   pairs where the plan gives it room for them (a helper computes its own tokens of a spilled expert without
   moving them) and the rest are matched rank-major (:func:`exchange_counts`); every rank derives every split
   from the gathered counts and the plan, so no size is exchanged separately;
4. the home rank of each copied expert sends its weights point to point (``batch_isend_irecv``), once per step;
5. computes with the single-device expert FFN (:func:`moebalance.kernels.expert_ffn`), once for the home
   experts and once for the copied ones, sends the rows back with the reverse all-to-all and combines them
   with the gates by the single-device layer's own function (:func:`moebalance.kernels.combine_pairs`).

Steps 3-5 are one ``autograd.Function`` whose backward runs the same exchange in reverse (all-to-all of the
output gradient, the FFN's backward, reverse all-to-all of the input gradient, then the gradients of copied
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
as in :class:`MoELayer` (``tests/test_trust_one_layer.py`` checks each one, forward and backward).

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
(the gathered counts feed the planner). The weight copy, the dispatch and the compute run one after the other
(no overlap yet). The exchange is an opaque ``autograd.Function``: ``torch.compile`` breaks the graph there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from moebalance.integrations.torch import (MoEConfig, MoELayer, MoEStats, apply_capacity, aux_loss_of, check_input,
                                           make_balancer, max_violation, price_batch, route, router_probs,
                                           router_scores, step_balancer)
from moebalance.kernels import combine_pairs, expert_ffn, resolve_backend
from moebalance.kernels.reference import sort_by_expert
from moebalance.routing import expert_capacity
from moebalance.solution import Status

__all__ = [
    "ExpertParallelMoE",
    "ExpertParallelError",
    "EPPlan",
    "init_process_group",
    "exchange_counts",
    "DEFAULT_TIMEOUT",
    "PROBLEM_OPTIONS",
]

DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)
"""Process-group timeout of :func:`init_process_group`: longer than any one step (plan, exchange, compute) of a
sane configuration, short enough that a dead or stuck peer surfaces within two minutes."""

PROBLEM_OPTIONS = ("cost", "max_tokens_per_device", "max_foreign_experts", "alpha", "min_chunk",
                   "imbalance_threshold")
"""``placement_options`` that go to :class:`~moebalance.PlacementProblem`; the others go to ``solve``."""

_USABLE = (Status.OPTIMAL, Status.FEASIBLE)
_CODES = [(own, status) for own in (True, False) for status in _USABLE]  # broadcast plan: (requested method?, status)
_PLANNED = ("ep", "llep", "llep+")  # methods with a planner object (no problem built, no full check per step)


class ExpertParallelError(RuntimeError):
    """A collective or point-to-point operation of the expert-parallel layer failed (peer gone or timed out),
    another rank failed this step, or the ranks disagree on something they must share."""


def init_process_group(backend: Optional[str] = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT,
                       **kwargs: Any) -> None:
    """``torch.distributed.init_process_group`` with this layer's defaults.

    ``backend`` None picks "nccl" when CUDA is available, else "gloo". ``timeout`` (default
    :data:`DEFAULT_TIMEOUT`) bounds every wait for a peer. Other keyword arguments (``init_method``, ``rank``,
    ``world_size``, ``store``) pass through; without them the env:// variables that ``torchrun`` sets are used.
    With NCCL each process should call ``torch.cuda.set_device(local_rank)`` first.
    """
    if not isinstance(timeout, datetime.timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"`timeout` must be a positive datetime.timedelta, got {timeout!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# the plan and the exchange sizes it implies (pure functions of the gathered counts, identical on every rank)
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EPPlan:
    """The placement one step used (the same on every rank).

    method:           the requested placement method.
    used:             the method whose plan ran ("llep" after a fallback).
    status:           that method's status (a :class:`moebalance.Status`).
    assignment:       ``[E, P]`` int64 token-expert pairs of expert e computed on device p.
    weight_transfers: ``[(expert, src, dst), ...]`` copies made this step, sorted by (expert, dst).
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
        """``[P]`` pairs each device computes."""
        return self.assignment.sum(axis=0)


def exchange_counts(counts: Any, assignment: Any, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(send [P, E], recv [P, E])``: pairs of each expert that ``rank`` sends to / receives from each rank.

    ``counts`` ``[P, E]``: pairs of expert e routed on rank s; ``assignment`` ``[E, P]``: pairs of expert e the
    plan computes on device d (each expert's column sums agree). Which pairs go where is free as long as the
    counts match, so pairs stay where they were routed first: rank s keeps ``min(counts[s, e],
    assignment[e, s])`` of its own pairs of e (the most any matching can keep), and the remaining pairs of e are
    matched to the remaining room in rank order (rank-major, like cutting two queues side by side).
    ``send[d, e]``: pairs of e from ``rank`` to d (d = rank: kept); ``recv[s, e]``: pairs of e from s to ``rank``.
    """
    c = np.asarray(counts, dtype=np.int64)
    q = np.asarray(assignment, dtype=np.int64).T  # [P, E] room per device
    keep = np.minimum(c, q)
    rest_c, rest_q = c - keep, q - keep
    hi_c, hi_q = np.cumsum(rest_c, axis=0), np.cumsum(rest_q, axis=0)
    lo_c, lo_q = hi_c - rest_c, hi_q - rest_q
    send = np.clip(np.minimum(hi_c[rank], hi_q) - np.maximum(lo_c[rank], lo_q), 0, None)
    recv = np.clip(np.minimum(hi_c, hi_q[rank]) - np.maximum(lo_c, lo_q[rank]), 0, None)
    send[rank] += keep[rank]
    recv[rank] += keep[rank]
    return send, recv


def _copies(x: np.ndarray, home: np.ndarray) -> list[tuple[int, int, int]]:
    """``[(expert, home, dst), ...]`` sorted by (expert, dst): every foreign device computing tokens of an expert."""
    rows, cols = np.nonzero(x > 0)
    foreign = cols != home[rows]
    return [(e, int(home[e]), d) for e, d in zip(rows[foreign].tolist(), cols[foreign].tolist())]


class _StepPlanner:
    """The layer's planner for ``ep``, ``llep`` and ``llep+``: built once from the problem structure (a
    :class:`~moebalance.solvers.placement_llep.LLEPPlanner`), it turns each step's loads into an assignment and its
    weight copies with the cheap invariant check only."""

    def __init__(self, method: str, problem: Any, solve_opts: dict[str, Any]):
        from moebalance.solvers.placement_llep import LLEPPlanner

        self.method = method
        opts = dict(solve_opts)
        self.llep = LLEPPlanner.for_problem(problem)  # also the fallback
        self.planner = LLEPPlanner.for_problem(problem, fallback=bool(opts.pop("fallback", True)))
        self.plus_opts = opts  # llep+: max_moves, min_gain, balance_tol

    def _run(self, method: str, loads: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        pl = self.planner if method == self.method else self.llep
        if method == "ep":
            x = np.zeros(pl.shape, dtype=np.int64)
            x[np.arange(pl.num_experts), pl.home] = loads
            return x, []
        if method == "llep":
            plan = pl.plan(loads)
            return plan.assignment, plan.copies()
        from moebalance.solvers.placement_llep_plus import llep_plus_plan

        x = llep_plus_plan(pl, loads, **self.plus_opts)[0]
        return x, _copies(x, pl.home)

    def plan(self, loads: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]], str, Status, str]:
        """``(assignment [E, P], weight copies, method used, status, message)``; ExpertParallelError when neither
        the method nor the llep fallback gives a plan within the limits."""
        x, copies = self._run(self.method, loads)
        bad = self.planner.invariant_violations(loads, x)
        if not bad:
            return x, copies, self.method, Status.FEASIBLE, ""
        why = f"{self.method}'s plan is not usable ({'; '.join(bad)}); fell back to llep"
        if self.method != "llep" or self.planner.imbalance_threshold != self.llep.imbalance_threshold:
            x, copies = self._run("llep", loads)
            again = self.llep.invariant_violations(loads, x)
            if not again:
                return x, copies, "llep", Status.FEASIBLE, why
            bad = again
        raise ExpertParallelError(
            f"no usable plan: {why}, which is not usable either ({'; '.join(bad)}); raise "
            f"max_tokens_per_device / max_foreign_experts or use a placement that respects them")


# ---------------------------------------------------------------------------------------------------------
# communication: every call is wrapped so a failed or timed-out peer becomes one clear error
# ---------------------------------------------------------------------------------------------------------


class _Comm:
    def __init__(self, group: Any, rank: int, world: int, step: int, timings: Optional[dict[str, float]] = None,
                 cuda: bool = False):
        self.group, self.rank, self.world, self.step = group, rank, world, step
        self.timings, self.cuda = timings, cuda

    @contextlib.contextmanager
    def timed(self, what: str):
        """Add the seconds spent inside to ``timings[what]`` (synchronising CUDA first) when profiling."""
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            with self.timed(what):
                return fn()
        except ExpertParallelError:
            raise
        except RuntimeError as exc:  # gloo/nccl errors (DistBackendError, DistNetworkError, timeouts)
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {what} failed in step {self.step}: {type(exc).__name__}: "
                f"{str(exc).strip()[:600]}. Another rank probably raised, exited or is stuck; every wait is "
                f"bounded by the process group's timeout (init_process_group(timeout=...)).") from exc

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_gather(self, what: str, t: Tensor) -> Tensor:
        """``[P, *t.shape]``."""
        if self.world == 1:
            return t[None]
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.run(what, lambda: dist.all_gather(out, t.contiguous(), group=self.group))
        return torch.stack(out)

    def all_to_all(self, what: str, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
        """Rows ``t[sum(send[:d]) : sum(send[:d+1])]`` go to rank d; rows from rank s arrive in order."""
        if self.world == 1:
            return t
        out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
        self.run(what, lambda: dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv,
                                                      input_split_sizes=send, group=self.group))
        return out

    def p2p(self, what: str, sends: list[tuple[Tensor, int, int]], recvs: list[tuple[Tensor, int, int]]) -> None:
        """Post every ``(tensor, peer group rank, tag)`` send and receive at once and wait for all of them."""
        ops = [dist.P2POp(dist.isend, t, self.global_rank(p), self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.global_rank(p), self.group, tag) for t, p, tag in recvs]
        if not ops:
            return

        def go() -> None:
            for req in dist.batch_isend_irecv(ops):
                req.wait()

        self.run(what, go)


@dataclasses.dataclass
class _Exchange:
    """Everything one step's exchange needs, derived identically on every rank from the counts and the plan."""

    comm: _Comm
    send_split: list[int]  # rows to each rank
    recv_split: list[int]  # rows from each rank
    order: Tensor  # [n_recv] received rows in compute order (home experts, then copies, by expert)
    home_counts: list[int]  # [E_local] rows of each home expert computed here
    copy_counts: list[int]  # [n_copies] rows of each copied expert
    copies: list[tuple[int, int]]  # (expert, home rank) of each expert copied to this rank, sorted
    lent: list[tuple[int, int]]  # (home expert, destination rank) of each copy this rank sends, sorted
    first_home: int  # this rank's first home expert
    backend: str


def _ffn_rows(x: Tensor, counts: list[int], w: tuple[Tensor, Tensor, Tensor], backend: str) -> Optional[Tensor]:
    if not sum(counts):
        return None
    return expert_ffn(x, counts, *w, backend=backend)


class _ExpertExchange(torch.autograd.Function):
    """``y_send [n_send, hidden]``: each sent row through its expert's FFN on the rank the plan names.

    Forward: weights to borrowers (p2p), rows to computing ranks (all-to-all), local FFN inside a nested graph,
    rows back (reverse all-to-all). Backward: the same in reverse; copies' weight gradients go home (p2p).
    The nested graph lets backward run the local FFN's backward between its own collectives, so every rank
    issues them in one fixed order whatever it computed.
    """

    @staticmethod
    def forward(ctx: Any, x_send: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, ex: _Exchange) -> Tensor:
        comm = ex.comm
        need = ctx.needs_input_grad[:4]
        wl = (w_gate, w_up, w_down)
        lo = ex.first_home
        # 1. copies of foreign experts from their home ranks (tag: 3 * expert + which weight)
        wf = tuple(w.new_empty((len(ex.copies),) + tuple(w.shape[1:])) for w in wl)
        comm.p2p("expert weight copy (batch_isend_irecv)",
                 sends=[(w[e - lo].detach(), dst, 3 * e + j) for e, dst in ex.lent for j, w in enumerate(wl)],
                 recvs=[(wf[j][n], src, 3 * e + j) for n, (e, src) in enumerate(ex.copies) for j in range(3)])
        # 2. rows to the ranks that compute them
        x_recv = comm.all_to_all("token dispatch (all_to_all_single)", x_send, ex.send_split, ex.recv_split)
        # 3. the local FFN, home experts then copies, in a graph of its own
        with torch.enable_grad() if any(need) else contextlib.nullcontext():
            xr = x_recv.detach().requires_grad_(need[0])
            wl_in = tuple(w.detach().requires_grad_(n) for w, n in zip(wl, need[1:]))
            wf_in = tuple(w.requires_grad_(n) for w, n in zip(wf, need[1:]))
            with comm.timed("expert compute (forward)"):
                xc = xr.index_select(0, ex.order)
                n_home = sum(ex.home_counts)
                parts = [p for p in (_ffn_rows(xc[:n_home], ex.home_counts, wl_in, ex.backend),
                                     _ffn_rows(xc[n_home:], ex.copy_counts, wf_in, ex.backend)) if p is not None]
                if parts:
                    yc = torch.cat(parts)
                    y_recv = torch.empty_like(yc).index_copy(0, ex.order, yc)
                else:
                    y_recv = xr.new_zeros((0, w_down.shape[2]))
        # 4. rows back to the ranks they came from
        y_send = comm.all_to_all("result return (all_to_all_single)", y_recv.detach(), ex.recv_split, ex.send_split)
        ctx.ex = ex
        if any(need):
            ctx.inner = (xr, y_recv, wl_in, wf_in)  # not save_for_backward: y_recv must keep its own graph
        return y_send

    @staticmethod
    def backward(ctx: Any, dy_send: Tensor):
        ex: _Exchange = ctx.ex
        comm = ex.comm
        xr, y_recv, wl, wf = ctx.inner
        del ctx.inner
        need = ctx.needs_input_grad[:4]
        dy_recv = comm.all_to_all("gradient dispatch (all_to_all_single)", dy_send, ex.send_split, ex.recv_split)
        inputs = [t for t in (xr, *wl, *wf) if t.requires_grad]
        grads: dict[int, Optional[Tensor]] = {}
        if inputs and y_recv.grad_fn is not None:
            with comm.timed("expert compute (backward)"):
                got = torch.autograd.grad(y_recv, inputs, dy_recv, allow_unused=True)
            grads = {id(t): g for t, g in zip(inputs, got)}

        def grad_of(t: Tensor) -> Tensor:
            g = grads.get(id(t))
            return torch.zeros_like(t) if g is None else g

        dx_send = None
        if need[0]:
            dx_send = comm.all_to_all("gradient return (all_to_all_single)", grad_of(xr), ex.recv_split,
                                      ex.send_split)
        dwl = [grad_of(w) if n else None for w, n in zip(wl, need[1:])]
        which = [j for j in range(3) if need[1 + j]]
        if which:
            # the copies' gradients go back to the owners, who add them to their own
            lo = ex.first_home
            dwf = [grad_of(w) for w in wf]
            bufs = [(e, j, torch.empty_like(wl[j][e - lo]), dst) for e, dst in ex.lent for j in which]
            comm.p2p("expert weight gradient return (batch_isend_irecv)",
                     sends=[(dwf[j][n], src, 3 * e + j) for n, (e, src) in enumerate(ex.copies) for j in which],
                     recvs=[(b, dst, 3 * e + j) for e, j, b, dst in bufs])
            for e, j, b, _ in bufs:
                dwl[j][e - lo] += b
        return dx_send, dwl[0], dwl[1], dwl[2], None


# ---------------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------------


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

    def __init__(self, config: MoEConfig, *, group: Any = None, placement: str = "ep", device: Any = None,
                 check_plans: bool = False, **placement_options: Any):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise ValueError(f"`config` must be a MoEConfig, got {type(config).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("torch.distributed is not initialized: call "
                             "moebalance.integrations.distributed.init_process_group() (or "
                             "torch.distributed.init_process_group) on every rank first")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = P = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of `group`")
        E = config.num_experts
        if E % P:
            raise ValueError(f"`config.num_experts`={E} must be divisible by the group's world size {P}")
        self.config = c = config
        self.experts_per_rank = n = E // P
        self.home_experts = range(self.rank * n, (self.rank + 1) * n)
        kw = {"device": device, "dtype": c.dtype}
        self.router = nn.Linear(c.hidden, E, bias=False, **kw)
        self.w_gate = nn.Parameter(torch.empty(n, c.hidden, c.ffn, **kw))
        self.w_up = nn.Parameter(torch.empty(n, c.hidden, c.ffn, **kw))
        self.w_down = nn.Parameter(torch.empty(n, c.ffn, c.hidden, **kw))
        self.register_buffer("bias", torch.zeros(E, dtype=torch.float32, device=device))
        self.balancer = make_balancer(c)
        if not isinstance(check_plans, bool):
            raise ValueError(f"`check_plans` must be a bool, got {check_plans!r}")
        self.check_plans = check_plans
        self._set_placement(placement, placement_options)
        self.aux_loss: Tensor = torch.zeros((), device=device)
        self.last_stats: Optional[MoEStats] = None
        self.last_plan: Optional[EPPlan] = None
        self.last_exchange: dict[str, Any] = {}
        self.profile = False  # True: time each phase into last_timings (synchronising CUDA around each)
        self.last_timings: dict[str, float] = {}
        self._step = 0

    @classmethod
    def from_layer(cls, layer: MoELayer, group: Any = None, placement: str = "ep", check_plans: bool = False,
                   **placement_options: Any) -> "ExpertParallelMoE":
        """Split ``layer`` (built with the same seed on every rank): copy its router, bias and this rank's home
        experts' weights. ``placement`` is any placement method of :func:`moebalance.solve` ("ep", "llep",
        "llep+", "eplb", "milp", ...); ``placement_options`` are :data:`PROBLEM_OPTIONS` (to the problem),
        ``time_limit`` and the method's own options (to ``solve``). Bad options raise ValueError here, on every
        rank alike."""
        if not isinstance(layer, MoELayer):
            raise ValueError(f"`layer` must be a MoELayer, got {type(layer).__name__}")
        ep = cls(layer.config, group=group, placement=placement, device=layer.w_gate.device,
                 check_plans=check_plans, **placement_options)
        s = slice(ep.home_experts.start, ep.home_experts.stop)
        with torch.no_grad():
            ep.router.weight.copy_(layer.router.weight)
            ep.bias.copy_(layer.bias)
            ep.w_gate.copy_(layer.w_gate[s])
            ep.w_up.copy_(layer.w_up[s])
            ep.w_down.copy_(layer.w_down[s])
        ep.train(layer.training)
        return ep

    def _set_placement(self, placement: str, options: dict[str, Any]) -> None:
        from moebalance import PlacementProblem, method_info, solve

        if not isinstance(placement, str):
            raise ValueError(f"`placement` must be a method name, got {placement!r}")
        self.placement = placement
        self._problem_opts = {k: v for k, v in options.items() if k in PROBLEM_OPTIONS}
        self._solve_opts = {k: v for k, v in options.items() if k not in PROBLEM_OPTIONS}
        # a dry run on an empty problem validates the method, the problem options and the method's options now
        E, P = self.config.num_experts, self.world_size
        problem = PlacementProblem(np.zeros(E, dtype=np.int64), P, **self._problem_opts)
        sol = solve(problem, placement, **self._solve_opts)
        if sol.status == Status.ERROR:
            raise ValueError(f"`placement`={placement!r} fails on an empty problem: {sol.message}")
        self._method = sol.method
        info = method_info(problem, placement)
        # the registry's flag: a deterministic method gives every rank the same plan from the same loads
        self._replicate = info.deterministic and self._solve_opts.get("time_limit") is None
        # ep / llep / llep+ replicated: a planner object built once, no problem or full check per step
        self._planner = _StepPlanner(self._method, problem, self._solve_opts) \
            if self._replicate and self._method in _PLANNED else None

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden}, ffn={c.ffn}, num_experts={c.num_experts}, top_k={c.top_k}, "
                f"rank={self.rank}/{self.world_size}, home_experts={self.home_experts.start}.."
                f"{self.home_experts.stop - 1}, placement={self.placement}")

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
        comm = _Comm(self.group, self.rank, self.world_size, self._step)
        if self.world_size > 1:
            comm.run("router gradient all_reduce", lambda: dist.all_reduce(g, group=self.group))
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
        comm = _Comm(self.group, self.rank, P, self._step, self.last_timings if self.profile else None,
                     self.w_gate.device.type == "cuda")
        on_gpu = dist.get_backend(self.group) == "nccl"
        hdev = self.w_gate.device if on_gpu else torch.device("cpu")
        same_batch = c.bip_same_batch and self.training
        failure: Optional[BaseException] = None
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
        all_scores: Optional[Tensor] = None
        if same_batch:  # bip_same_batch: price the whole batch (all ranks' scores) before routing it
            pre = torch.tensor([float(failure is None), T], dtype=torch.float64)
            heads0 = comm.all_gather("bip same-batch header (all_gather)", pre.to(hdev)).cpu().numpy()
            self._raise_if_failed(failure, heads0, "the same-batch pricing")
            Ts0 = heads0[:, 1].astype(np.int64)
            all_scores = self._gather_rows(comm, "bip balancer: scores (all_gather)", scores0, Ts0, hdev)
            if Ts0.sum():
                price_batch(self.balancer, self.bias, all_scores)
        if failure is None:
            try:
                eidx, gates, scores = route(logits, k, router=c.router, bias=self.bias,
                                            normalize_gates=c.normalize_gates)
                counts = torch.bincount(eidx.reshape(-1), minlength=E).double()
                probs = router_probs(scores, c.router)
                x_grad = torch.is_grad_enabled() and x2.requires_grad
                w_grad = torch.is_grad_enabled() and any(p.requires_grad for p in (self.w_gate, self.w_up,
                                                                                   self.w_down))
                header = torch.cat([torch.tensor([1.0, T, x_grad, w_grad], dtype=torch.float64,
                                                 device=counts.device), counts, probs.detach().double().sum(0)])
            except Exception as exc:
                failure = exc
        if failure is not None:
            header = torch.zeros(4 + 2 * E, dtype=torch.float64)
        heads = comm.all_gather("routing header (all_gather)", header.to(hdev)).cpu().numpy()
        self._raise_if_failed(failure, heads, "the token exchange")
        if len(set(map(tuple, heads[:, 2:4].tolist()))) > 1:
            raise ExpertParallelError(f"rank {self.rank}/{P}: ranks disagree on what needs gradients "
                                      f"(x, expert weights) per rank: {heads[:, 2:4].astype(bool).tolist()}; run "
                                      "every rank in the same grad mode with the same requires_grad settings")
        Ts = heads[:, 1].astype(np.int64)
        loads = heads[:, 4:4 + E].sum(0)  # pairs per expert before capacity drops
        kept, C = eidx, np.rint(heads[:, 4:4 + E]).astype(np.int64)
        if c.capacity_factor is not None:
            kept, C = self._global_capacity(comm, eidx, scores, Ts, hdev)
        with comm.timed("plan"):
            plan = self._plan(comm, C.sum(0), hdev)
        self.last_plan = plan
        ex, send_pairs = self._exchange(comm, kept, C, plan, x2.device, backend)
        y_send = _ExpertExchange.apply(x2.index_select(0, send_pairs // k), self.w_gate, self.w_up, self.w_down, ex)
        o = x2.new_zeros((T * k, c.hidden)).index_copy(0, send_pairs, y_send).view(T, k, c.hidden)
        y = combine_pairs(o, kept, gates, E).to(x2.dtype)  # MoELayer's combine
        self._balance(comm, loads, heads[:, 4 + E:].sum(0), Ts, int(loads.sum() - C.sum()), scores, hdev,
                      all_scores)
        return y.reshape(x.shape).to(x.dtype)

    def _raise_if_failed(self, failure: Optional[BaseException], heads: np.ndarray, before: str) -> None:
        """Raise this rank's own failure, or ExpertParallelError when another rank's health flag is down."""
        if failure is not None:
            raise failure
        bad = np.flatnonzero(heads[:, 0] == 0).tolist()
        if bad:
            raise ExpertParallelError(f"rank {self.rank}/{self.world_size}: rank(s) {bad} failed before {before} "
                                      f"in step {self._step} (see their errors); stopping here too")

    @staticmethod
    def _gather_rows(comm: _Comm, what: str, t: Tensor, Ts: np.ndarray, hdev: torch.device) -> Tensor:
        """Every rank's rows ``t [T_r, ...]`` concatenated rank-major ``[sum(Ts), ...]`` (padded all-gather)."""
        pad = int(Ts.max()) - t.shape[0]
        got = comm.all_gather(what, torch.nn.functional.pad(t, (0, 0, 0, pad)).to(hdev))
        return torch.cat([got[r, :Ts[r]] for r in range(comm.world)]).to(t.device)

    def _global_capacity(self, comm: _Comm, eidx: Tensor, scores: Tensor, Ts: np.ndarray,
                         hdev: torch.device) -> tuple[Tensor, np.ndarray]:
        """This rank's kept ``[T, k]`` and every rank's kept counts ``[P, E]`` under the global capacity."""
        c = self.config
        E, k = c.num_experts, c.top_k
        pair_scores = scores.detach().gather(1, eidx)
        ids_all = self._gather_rows(comm, "capacity: expert ids (all_gather)", eidx, Ts, hdev)
        vals_all = self._gather_rows(comm, "capacity: pair scores (all_gather)", pair_scores, Ts, hdev)
        # apply_capacity reads scores[t, eidx[t, j]] only: a dense [T_all, E] holding the pair scores suffices
        dense = torch.zeros(ids_all.shape[0], E, device=eidx.device).scatter_(1, ids_all, vals_all)
        cap = expert_capacity(int(Ts.sum()), k, E, c.capacity_factor)
        kept_all = apply_capacity(ids_all, dense, cap)
        starts = np.concatenate([[0], np.cumsum(Ts)])
        C = np.stack([np.bincount(kept_all[starts[r]:starts[r + 1]].reshape(-1).cpu().numpy(),
                                  minlength=E + 1)[:E] for r in range(comm.world)])
        return kept_all[starts[self.rank]:starts[self.rank + 1]], C

    def _plan(self, comm: _Comm, loads: np.ndarray, hdev: torch.device) -> EPPlan:
        from moebalance import PlacementProblem

        t0 = time.perf_counter()
        E, P = self.config.num_experts, self.world_size
        problem = None
        if self._planner is not None:  # the hot path: the planner object, the cheap invariant check inside
            x, copies, used, status, msg = self._planner.plan(loads)
        else:
            problem = PlacementProblem(loads, P, **self._problem_opts)
            if self._replicate:
                x, used, status, msg = self._solve(problem)
            else:
                x, used, status, msg = self._broadcast_plan(comm, problem, hdev)
            if not np.array_equal(x.sum(axis=1), loads):  # invariant (solve checked the plan on rank 0)
                raise ExpertParallelError(f"rank {self.rank}/{P}: the plan does not conserve tokens")
            copies = _copies(x, problem.home)
        if self.check_plans:  # debug: the full shared check on every step's plan
            from moebalance import check

            res = check(problem or PlacementProblem(loads, P, **self._problem_opts), x)
            if not res.feasible:
                raise ExpertParallelError(f"rank {self.rank}/{P}: step {self._step}'s plan ({used}) fails the "
                                          f"shared check: {'; '.join(res.violations)}")
        return EPPlan(self.placement, used, status, x, copies, time.perf_counter() - t0, msg)

    def _broadcast_plan(self, comm: _Comm, problem: Any, hdev: torch.device) -> tuple[np.ndarray, str, Status, str]:
        """Rank 0 solves and broadcasts; the last slot says how: _CODES index, or -1 when it failed."""
        E, P = problem.shape
        buf = torch.zeros(E * P + 1, dtype=torch.int64)
        err: Optional[BaseException] = None
        if self.rank == 0:
            try:
                x, used, status, msg = self._solve(problem)
                buf[:-1] = torch.from_numpy(x.reshape(-1))
                buf[-1] = _CODES.index((used == self._method, status))
            except Exception as exc:
                err = exc
                buf[-1] = -1
        buf = buf.to(hdev)
        root = comm.global_rank(0)
        comm.run("plan broadcast", lambda: dist.broadcast(buf, src=root, group=self.group))
        if err is not None:
            raise err
        buf = buf.cpu()
        if int(buf[-1]) < 0:
            raise ExpertParallelError(f"rank {self.rank}/{P}: rank 0 failed to compute the plan in step "
                                      f"{self._step} (see its error)")
        x = buf[:-1].numpy().reshape(E, P)
        if self.rank == 0:
            return x, used, status, msg
        own, status = _CODES[int(buf[-1])]
        return x, self._method if own else "llep", status, "plan broadcast from rank 0"

    def _solve(self, problem: Any) -> tuple[np.ndarray, str, Status, str]:
        from moebalance import solve

        sol = solve(problem, self.placement, **self._solve_opts)
        if sol.status in _USABLE:
            return np.asarray(sol.assignment, dtype=np.int64), sol.method, Status(sol.status), sol.message
        why = f"{sol.method} returned status {sol.status.value} ({sol.message}); fell back to llep"
        fb = solve(problem, "llep")
        if fb.status not in _USABLE:
            raise ExpertParallelError(
                f"no usable plan: {why}, which returned {fb.status.value} ({fb.message}); raise "
                f"max_tokens_per_device / max_foreign_experts or use a placement that respects them")
        return np.asarray(fb.assignment, dtype=np.int64), "llep", Status(fb.status), why

    def _exchange(self, comm: _Comm, kept: Tensor, C: np.ndarray, plan: EPPlan, device: torch.device,
                  backend: str) -> tuple[_Exchange, Tensor]:
        """This rank's split sizes and orders, and its kept pair ids in send order ``[n_send]``."""
        E, P, r = self.config.num_experts, self.world_size, self.rank
        send, recv = exchange_counts(C, plan.assignment, r)
        # send side: this rank's kept pairs sorted by expert; expert e's run is cut into send[0, e], send[1, e],
        # ... consecutive pairs for ranks 0, 1, ... (the cells of one e-major table of run starts)
        sorted_idx, _ = sort_by_expert(kept, E)
        n_valid = int(C[r].sum())
        pairs = sorted_idx[:n_valid].long()
        sizes = send.T.reshape(-1)  # [E * P], e-major
        nz = np.flatnonzero(sizes)
        starts = torch.from_numpy((np.cumsum(sizes) - sizes)[nz]).to(device)
        devs = torch.from_numpy(nz % P).to(device)
        dest = devs[torch.searchsorted(starts, torch.arange(n_valid, device=device), right=True) - 1]
        send_pairs = pairs[torch.sort(dest, stable=True).indices]
        # receive side: rows arrive by source rank, then expert; compute order = home experts, then copies
        lo = self.home_experts.start
        copies = sorted((e, int(src)) for e, src, dst in plan.weight_transfers if dst == r)
        lent = [(e, int(dst)) for e, src, dst in plan.weight_transfers if src == r]
        slot_of = np.full(E, -1, dtype=np.int64)
        slot_of[lo:lo + self.experts_per_rank] = np.arange(self.experts_per_rank)
        for n, (e, _) in enumerate(copies):
            slot_of[e] = self.experts_per_rank + n
        per_expert = recv.sum(0)
        if (slot_of[per_expert > 0] < 0).any():  # invariant: everything received has weights here
            raise ExpertParallelError(f"rank {r}/{P}: rows received for an expert with no weights here")
        row_slot = torch.from_numpy(np.repeat(np.tile(slot_of, P), recv.reshape(-1))).to(device)
        order = torch.sort(row_slot, stable=True).indices
        rows = np.bincount(slot_of[per_expert > 0], weights=per_expert[per_expert > 0],
                           minlength=self.experts_per_rank + len(copies)).astype(np.int64).tolist()
        if int(recv.sum()) != int(plan.assignment[:, r].sum()):  # invariant: exactly the plan's load arrives
            raise ExpertParallelError(f"rank {r}/{P}: would receive {int(recv.sum())} rows, plan says "
                                      f"{int(plan.assignment[:, r].sum())}")
        self.last_exchange = {"sent": int(send.sum()), "received": int(recv.sum()),
                              "copies": [e for e, _ in copies], "lent": lent}
        ex = _Exchange(comm, send.sum(1).tolist(), recv.sum(1).tolist(), order, rows[:self.experts_per_rank],
                       rows[self.experts_per_rank:], copies, lent, lo, backend)
        return ex, send_pairs

    def _balance(self, comm: _Comm, loads: np.ndarray, prob_sums: np.ndarray, Ts: np.ndarray, dropped: int,
                 scores: Tensor, hdev: torch.device, all_scores: Optional[Tensor]) -> None:
        """Global stats, this rank's aux-loss share and the bias step (identical on every rank), by MoELayer's
        functions."""
        c = self.config
        T_all = int(Ts.sum())
        dev = scores.device
        loads_t = torch.as_tensor(loads, dtype=torch.float32, device=dev)
        share = aux_loss_of(c, loads_t, router_probs(scores, c.router).sum(0), T_all)
        total = aux_loss_of(c, loads_t, torch.as_tensor(prob_sums, dtype=torch.float32, device=dev), T_all)
        self.aux_loss = share if c.balancer == "aux_loss" else torch.zeros((), device=dev)
        self.last_stats = MoEStats(loads=loads_t, max_vio=max_violation(loads_t, T_all, c.top_k),
                                   aux_loss=total.detach(), dropped=torch.tensor(dropped))
        if not (self.training and self.balancer is not None and T_all):
            return
        if c.balancer == "bip" and all_scores is None:
            all_scores = self._gather_rows(comm, "bip balancer: scores (all_gather)", scores.detach().float(), Ts,
                                           hdev)
        step_balancer(c, self.balancer, self.bias, loads_t, all_scores)
