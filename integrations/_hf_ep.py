"""Expert parallelism for a transformers experts module: shards, plan, exchange (used by ``transformers.py``).

The same protocol as :mod:`moebalance.integrations.distributed` (see its docstring), applied to a block whose
routing the model already did: each rank keeps its home experts' rows of every ``[E, ...]`` expert tensor (the
router, attention and shared experts stay replicated), all-gathers one header of per-expert pair counts, solves
the placement problem of the global loads (methods the registry marks deterministic on every rank; others,
or any under a ``time_limit``, on rank 0 and broadcast), and sends the pairs with ``all_to_all_single`` as :func:`~moebalance.integrations.distributed.
exchange_counts` splits them. Copied experts' tensors go point to point, whatever their number (gpt-oss has
four: ``gate_up_proj``, its bias, ``down_proj``, its bias). The expert step is a callable, so any layout the
model has (SwiGLU on moebalance's kernels, gpt-oss's clamped, interleaved, biased GLU) runs unchanged.

Home experts: rank ``r`` owns the contiguous block ``{e : e * P // E == r}`` (``E`` need not divide by ``P``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from moebalance.integrations.distributed import ExpertParallelError, exchange_counts

__all__ = ["ExpertShards", "StepPlan", "home_of", "check_placement"]

_USABLE = ("optimal", "feasible")


def home_of(num_experts: int, world: int) -> np.ndarray:
    """``[E]`` home rank of each expert: contiguous blocks, sizes differing by at most one."""
    return (np.arange(num_experts, dtype=np.int64) * world) // num_experts


def _problem(loads: Any, world: int, problem_options: dict[str, Any]) -> Any:
    from moebalance import PlacementProblem

    E = len(loads)
    home = None if E % world == 0 else home_of(E, world)
    return PlacementProblem(loads, world, home=home, **problem_options)


def check_placement(num_experts: int, world: int, placement: str, problem_options: dict[str, Any],
                    solve_options: dict[str, Any]) -> None:
    """Validate the method and its options on an empty problem (ValueError now, not in the first step)."""
    from moebalance import solve

    if num_experts < world:
        raise ValueError(f"{num_experts} experts cannot give each of {world} ranks a home expert")
    sol = solve(_problem(np.zeros(num_experts, dtype=np.int64), world, problem_options), placement, **solve_options)
    if sol.status.value == "error":
        raise ValueError(f"`placement`={placement!r} fails on an empty problem: {sol.message}")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The placement one step of one layer used (identical on every rank).

    assignment ``[E, P]``: pairs of expert e computed on rank p; weight_transfers ``[(expert, src, dst)]``;
    used: the method that produced it ("llep" after a fallback); status; plan_time (seconds on this rank).
    """

    method: str
    used: str
    status: str
    assignment: np.ndarray
    weight_transfers: list
    plan_time: float


class _Comm:
    def __init__(self, group: Any, rank: int, world: int, where: str, timings: Optional[dict] = None):
        self.group, self.rank, self.world, self.where, self.timings = group, rank, world, where, timings

    def run(self, what: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except ExpertParallelError:
            raise
        except RuntimeError as exc:  # gloo/nccl errors: a peer raised, left or is stuck
            raise ExpertParallelError(
                f"rank {self.rank}/{self.world}: {what} failed in {self.where}: {type(exc).__name__}: "
                f"{str(exc).strip()[:400]}. Another rank probably raised, exited or is stuck.") from exc
        finally:
            if self.timings is not None:
                self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t0

    def peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def all_gather(self, what: str, t: Tensor) -> Tensor:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self.run(what, lambda: dist.all_gather(out, t.contiguous(), group=self.group))
        return torch.stack(out)

    def all_to_all(self, what: str, t: Tensor, send: list[int], recv: list[int]) -> Tensor:
        out = t.new_empty((sum(recv),) + tuple(t.shape[1:]))
        self.run(what, lambda: dist.all_to_all_single(out, t.contiguous(), output_split_sizes=recv,
                                                      input_split_sizes=send, group=self.group))
        return out

    def p2p(self, what: str, sends: list, recvs: list) -> None:
        ops = [dist.P2POp(dist.isend, t, self.peer(p), self.group, tag) for t, p, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(p), self.group, tag) for t, p, tag in recvs]
        if ops:
            self.run(what, lambda: [req.wait() for req in dist.batch_isend_irecv(ops)])


@dataclasses.dataclass
class _Spec:
    comm: _Comm
    send_split: list[int]
    recv_split: list[int]
    order: Tensor  # received rows in compute order (home experts, then copies, by expert)
    home_counts: list[int]
    copy_counts: list[int]
    copies: list[tuple[int, int]]  # (expert, home rank) copied here
    lent: list[tuple[int, int]]  # (home expert, destination rank) sent from here
    lo: int
    ffn: Callable[[Tensor, list[int], tuple[Tensor, ...]], Tensor]
    hidden: int


class _Dispatch(torch.autograd.Function):
    """``y_send [n_send, hidden]``: each sent row through its expert on the rank the plan names (forward:
    weights p2p, rows all-to-all, local experts in a nested graph, rows back; backward: the reverse, and the
    copies' weight gradients go home and are added to the owner's)."""

    @staticmethod
    def forward(ctx: Any, x_send: Tensor, spec: _Spec, *weights: Tensor) -> Tensor:
        comm, n_w, lo = spec.comm, len(weights), spec.lo
        need = ctx.needs_input_grad
        need_x, need_w = need[0], need[2:]
        wf = tuple(w.new_empty((len(spec.copies),) + tuple(w.shape[1:])) for w in weights)
        comm.p2p("expert weight copy",
                 [(w[e - lo].detach().contiguous(), dst, n_w * e + j) for e, dst in spec.lent
                  for j, w in enumerate(weights)],
                 [(wf[j][n], src, n_w * e + j) for n, (e, src) in enumerate(spec.copies) for j in range(n_w)])
        x_recv = comm.all_to_all("token dispatch", x_send, spec.send_split, spec.recv_split)
        grad = need_x or any(need_w)
        with torch.enable_grad() if grad else contextlib.nullcontext():
            xr = x_recv.detach().requires_grad_(need_x)
            wl = tuple(w.detach().requires_grad_(n) for w, n in zip(weights, need_w))
            wc = tuple(w.requires_grad_(n) for w, n in zip(wf, need_w))
            xc = xr.index_select(0, spec.order)
            n_home = sum(spec.home_counts)
            parts = []
            if n_home:
                parts.append(spec.ffn(xc[:n_home], spec.home_counts, wl))
            if sum(spec.copy_counts):
                parts.append(spec.ffn(xc[n_home:], spec.copy_counts, wc))
            if parts:
                yc = torch.cat(parts)
                y_recv = torch.empty_like(yc).index_copy(0, spec.order, yc)
            else:
                y_recv = xr.new_zeros((0, spec.hidden))
        y_send = comm.all_to_all("result return", y_recv.detach(), spec.recv_split, spec.send_split)
        ctx.spec = spec
        if grad:
            ctx.inner = (xr, y_recv, wl, wc)
        return y_send

    @staticmethod
    def backward(ctx: Any, dy_send: Tensor):
        spec: _Spec = ctx.spec
        comm, lo = spec.comm, spec.lo
        xr, y_recv, wl, wc = ctx.inner
        del ctx.inner
        n_w = len(wl)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        dy_recv = comm.all_to_all("gradient dispatch", dy_send, spec.send_split, spec.recv_split)
        inputs = [t for t in (xr, *wl, *wc) if t.requires_grad]
        grads: dict[int, Optional[Tensor]] = {}
        if inputs and y_recv.grad_fn is not None:
            got = torch.autograd.grad(y_recv, inputs, dy_recv, allow_unused=True)
            grads = {id(t): g for t, g in zip(inputs, got)}

        def grad_of(t: Tensor) -> Tensor:
            g = grads.get(id(t))
            return torch.zeros_like(t) if g is None else g

        dx = comm.all_to_all("gradient return", grad_of(xr), spec.recv_split, spec.send_split) if need_x else None
        dwl = [grad_of(w) if n else None for w, n in zip(wl, need_w)]
        which = [j for j in range(n_w) if need_w[j]]
        if which:
            bufs = [(e, j, torch.empty_like(wl[j][e - lo]), dst) for e, dst in spec.lent for j in which]
            comm.p2p("expert weight gradient return",
                     [(grad_of(wc[j])[n].contiguous(), src, n_w * e + j) for n, (e, src) in enumerate(spec.copies)
                      for j in which],
                     [(b, dst, n_w * e + j) for e, j, b, dst in bufs])
            for e, j, b, _ in bufs:
                dwl[j][e - lo] += b
        return (dx, None, *dwl)


class ExpertShards:
    """This rank's share of one experts module, and the per-step exchange.

    ``names``: the module's ``[E, ...]`` parameters, replaced by their home rows ``[E_r, ...]``.
    """

    def __init__(self, experts: torch.nn.Module, names: list[str], num_experts: int, *, group: Any,
                 placement: str, problem_options: dict[str, Any], solve_options: dict[str, Any]):
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
        self.problem_options = dict(problem_options)
        self.solve_options = dict(solve_options)
        from moebalance import method_info

        # the registry's flag: a deterministic method gives every rank the same plan from the same loads;
        # the others (milp, or any method under a time limit) are solved on rank 0 and broadcast
        info = method_info(self.problem(np.zeros(E, dtype=np.int64)), placement)
        self.replicated_plan = info.deterministic and self.solve_options.get("time_limit") is None
        self.last_plan: Optional[StepPlan] = None
        self.last_exchange: dict[str, Any] = {}
        self.timings: Optional[dict[str, float]] = None  # a dict: seconds per phase are added to it
        self.step = 0
        with torch.no_grad():
            for n in self.names:
                full = getattr(experts, n)
                shard = torch.nn.Parameter(full.detach()[self.lo:self.hi].clone(), requires_grad=full.requires_grad)
                setattr(experts, n, shard)

    def problem(self, loads: np.ndarray) -> Any:
        return _problem(loads, self.world, self.problem_options)

    def unshard(self, experts: torch.nn.Module) -> None:
        """Gather every rank's home rows back into full ``[E, ...]`` parameters (a collective)."""
        comm = _Comm(self.group, self.rank, self.world, "disable")
        sizes = np.bincount(self.home, minlength=self.world)
        n_max = int(sizes.max())
        with torch.no_grad():
            for n in self.names:
                shard = getattr(experts, n)
                pad = shard.new_zeros((n_max,) + tuple(shard.shape[1:]))
                pad[: shard.shape[0]] = shard
                got = comm.all_gather(f"gather {n}", pad)
                full = torch.cat([got[r, : sizes[r]] for r in range(self.world)])
                setattr(experts, n, torch.nn.Parameter(full, requires_grad=shard.requires_grad))

    # -- one step -------------------------------------------------------------------------------------------
    def _solve(self, problem: Any) -> tuple[np.ndarray, str, str]:
        from moebalance import solve

        sol = solve(problem, self.placement, **self.solve_options)
        if sol.status.value in _USABLE:
            return np.asarray(sol.assignment, dtype=np.int64), sol.method, sol.status.value
        fb = solve(problem, "llep")
        if fb.status.value not in _USABLE:
            raise ExpertParallelError(f"no usable plan: {sol.method} returned {sol.status.value} ({sol.message}) "
                                      f"and the llep fallback {fb.status.value} ({fb.message})")
        return np.asarray(fb.assignment, dtype=np.int64), "llep", fb.status.value

    def plan(self, comm: _Comm, loads: np.ndarray) -> StepPlan:
        from moebalance.plan import weight_transfers

        t0 = time.perf_counter()
        problem = self.problem(loads)
        E, P = self.E, self.world
        if self.replicated_plan:
            x, used, status = self._solve(problem)
        else:  # rank 0 solves; the last slot: 0/1 = fallback used or not, 2/3 likewise with status feasible
            buf = torch.zeros(E * P + 1, dtype=torch.int64)
            err: Optional[BaseException] = None
            if self.rank == 0:
                try:
                    x, used, status = self._solve(problem)
                    buf[:-1] = torch.from_numpy(x.reshape(-1))
                    buf[-1] = int(used != "llep" or self.placement == "llep") + 2 * int(status == "feasible")
                except Exception as exc:  # the others learn of it through the flag
                    err, buf[-1] = exc, -1
            comm.run("plan broadcast", lambda: dist.broadcast(buf, src=comm.peer(0), group=self.group))
            if err is not None:
                raise err
            code = int(buf[-1])
            if code < 0:
                raise ExpertParallelError(f"rank {self.rank}/{P}: rank 0 failed to compute the plan")
            x = buf[:-1].numpy().reshape(E, P)
            used = self.placement if code % 2 else "llep"
            status = "feasible" if code >= 2 else "optimal"
        if not np.array_equal(x.sum(axis=1), problem.expert_loads):
            raise ExpertParallelError(f"rank {self.rank}/{P}: the plan does not conserve tokens")  # invariant
        transfers = sorted(weight_transfers(problem, x), key=lambda t: (t[0], t[2]))
        return StepPlan(self.placement, used, status, x, transfers, time.perf_counter() - t0)

    def forward(self, experts: torch.nn.Module, x: Tensor, eidx: Tensor, gates: Tensor, ffn: Callable,
                where: str) -> tuple[Tensor, np.ndarray, np.ndarray, _Comm]:
        """``(y [T, hidden], global loads [E], tokens per rank [P], comm)`` for this rank's routed tokens."""
        E, P, r = self.E, self.world, self.rank
        self.step += 1
        comm = _Comm(self.group, r, P, f"{where}, step {self.step}", self.timings)
        T, k = eidx.shape
        counts = torch.bincount(eidx.reshape(-1), minlength=E)[:E].double().cpu()
        weights = tuple(getattr(experts, n) for n in self.names)
        x_grad = torch.is_grad_enabled() and x.requires_grad
        w_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        header = torch.cat([torch.tensor([T, x_grad, w_grad], dtype=torch.float64), counts])
        heads = comm.all_gather("routing header", header).numpy()
        if len({tuple(h) for h in heads[:, 1:3].tolist()}) > 1:
            raise ExpertParallelError(f"rank {r}/{P}: ranks disagree on what needs gradients (input, expert "
                                      f"weights): {heads[:, 1:3].astype(bool).tolist()}; run every rank in the "
                                      "same grad mode")
        Ts = heads[:, 0].astype(np.int64)
        C = np.rint(heads[:, 3:]).astype(np.int64)  # [P, E]
        plan = self.plan(comm, C.sum(0))
        self.last_plan = plan
        send, recv = exchange_counts(C, plan.assignment, r)
        # send side: this rank's pairs by expert; expert e's run is cut into send[0, e], send[1, e], ... rows
        flat = eidx.reshape(-1)
        pairs = torch.sort(flat, stable=True).indices
        sizes = send.T.reshape(-1)  # [E * P], e-major
        nz = np.flatnonzero(sizes)
        dev = x.device
        starts = torch.from_numpy((np.cumsum(sizes) - sizes)[nz]).to(dev)
        dests = torch.from_numpy(nz % P).to(dev)
        n = flat.numel()
        dest = dests[torch.searchsorted(starts, torch.arange(n, device=dev), right=True) - 1] if n else dests[:0]
        send_pairs = pairs[torch.sort(dest, stable=True).indices]
        # receive side: rows arrive by source rank then expert; compute order = home experts, then copies
        n_home = self.hi - self.lo
        copies = sorted((e, int(src)) for e, src, dst in plan.weight_transfers if dst == r)
        lent = [(e, int(dst)) for e, src, dst in plan.weight_transfers if src == r]
        slot = np.full(E, -1, dtype=np.int64)
        slot[self.lo:self.hi] = np.arange(n_home)
        for i, (e, _) in enumerate(copies):
            slot[e] = n_home + i
        per_expert = recv.sum(0)
        if (slot[per_expert > 0] < 0).any():  # invariant: everything received has weights here
            raise ExpertParallelError(f"rank {r}/{P}: rows received for an expert with no weights here")
        row_slot = torch.from_numpy(np.repeat(np.tile(slot, P), recv.reshape(-1))).to(dev)
        order = torch.sort(row_slot, stable=True).indices
        rows = np.bincount(slot[per_expert > 0], weights=per_expert[per_expert > 0],
                           minlength=n_home + len(copies)).astype(np.int64).tolist()
        self.last_exchange = {"sent": int(send.sum() - send[r].sum()), "received": int(recv.sum() - recv[r].sum()),
                              "computed": int(recv.sum()), "copies": [e for e, _ in copies], "lent": lent}
        spec = _Spec(comm, send.sum(1).tolist(), recv.sum(1).tolist(), order, rows[:n_home], rows[n_home:],
                     copies, lent, self.lo, ffn, x.shape[1])
        y_send = _Dispatch.apply(x.index_select(0, send_pairs // k), spec, *weights)
        o = x.new_zeros((T * k, x.shape[1])).index_copy(0, send_pairs, y_send).view(T, k, x.shape[1])
        y = (o.float() * gates.float()[..., None]).sum(1).to(x.dtype)
        return y, C.sum(0), Ts, comm
