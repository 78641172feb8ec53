"""The token exchange of the expert-parallel runtime: one ``autograd.Function`` for dispatch, expert compute and
combine, over :class:`~.comm.Communicator` (``all_to_all_single`` with uneven splits, point-to-point weight
copies).

A step is fixed by ``counts [P, E]`` (kept pairs of expert e routed on rank s, all-gathered), the plan's
``assignment [E, P]`` (pairs of expert e computed on rank d) and its ``weight_transfers`` (experts whose weights a
rank borrows for the step). :func:`build_exchange` turns them into this rank's split sizes and row orders, the
same way on every rank, so no size is exchanged separately. :class:`ExpertExchange` then runs:

forward   weights to borrowers (p2p) -> rows to the computing ranks (all-to-all) -> the expert step on local
          slots and borrowed copies (a nested graph) -> rows back (reverse all-to-all);
backward  the reverse: output gradients out, the expert step's backward, input gradients back, and the
          borrowed copies' weight gradients go home (p2p) and are added to the owner's slot; with replicated
          slots the slot gradients are summed over every replica of each expert (one all-reduce), so replicas
          stay equal.

Every rank issues the collectives in the same fixed order in forward and backward, so ranks with no tokens,
no borrowed experts or nothing to compute take part without special cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .comm import Communicator

__all__ = ["exchange_counts", "Exchange", "build_exchange", "ExpertExchange", "exchange"]

ExpertStep = Callable[[Tensor, list[int], tuple[Tensor, ...]], Tensor]
"""``step(x [n, hidden] grouped by slot, rows per slot, weights [S, ...] each) -> y [n, hidden]``."""


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


@dataclasses.dataclass
class Exchange:
    """One step's exchange on one rank (derived identically on every rank from the counts and the plan)."""

    comm: Communicator
    send_split: list[int]  # rows to each rank
    recv_split: list[int]  # rows from each rank
    order: Tensor  # [n_recv] received rows in compute order (local slots, then borrowed copies)
    local_counts: list[int]  # [S] rows of each local slot computed here
    copy_counts: list[int]  # [n_copies] rows of each borrowed expert
    copies: list[tuple[int, int]]  # (expert, lender rank) of each expert borrowed here, sorted
    lent: list[tuple[int, int, int]]  # (expert, local slot, borrower rank) of each copy sent from here
    step: ExpertStep
    hidden: int
    replica_of: np.ndarray | None = None  # [S] logical expert of each local slot when slots are replicated
    num_experts: int = 0
    summed: np.ndarray | None = None  # experts whose replicas' gradients are summed (None: every expert)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_exchange(
    comm: Communicator,
    flat_eidx: Tensor,
    counts: np.ndarray,
    assignment: np.ndarray,
    weight_transfers: list,
    slot_of: np.ndarray,
    num_slots: int,
    step: ExpertStep,
    hidden: int,
    replica_of: np.ndarray | None = None,
    summed: np.ndarray | None = None,
) -> tuple[Exchange, Tensor]:
    """``(exchange, send_pairs)``: this rank's exchange and its pair ids ``[n_send]`` in send order.

    ``flat_eidx [T * k]``: this rank's expert id per pair (``E`` or more: dropped); ``counts [P, E]`` kept pairs
    per rank and expert; ``assignment [E, P]`` and ``weight_transfers [(expert, src, dst)]`` the plan's;
    ``slot_of [E]``: the local slot holding each expert on this rank (-1: none); with replicated slots,
    ``replica_of [S]`` the expert of each local slot and ``summed`` the experts held more than once (the same on
    every rank: their slots' gradients are summed in backward).
    """
    E, P, r = counts.shape[1], comm.world, comm.rank
    dev = flat_eidx.device
    send, recv = exchange_counts(counts, assignment, r)
    # send side: this rank's kept pairs by expert; expert e's run is cut into send[0, e], send[1, e], ... rows
    n_valid = int(counts[r].sum())
    pairs = torch.sort(flat_eidx, stable=True).indices[:n_valid]
    sizes = send.T.reshape(-1)  # [E * P], e-major
    nz = np.flatnonzero(sizes)
    starts = torch.from_numpy((np.cumsum(sizes) - sizes)[nz]).to(dev)
    dests = torch.from_numpy(nz % P).to(dev)
    if n_valid:
        dest = dests[torch.searchsorted(starts, torch.arange(n_valid, device=dev), right=True) - 1]
        send_pairs = pairs[torch.sort(dest, stable=True).indices]
    else:
        send_pairs = pairs
    # receive side: rows arrive by source rank then expert; compute order = local slots, then borrowed copies
    copies = sorted((int(e), int(src)) for e, src, dst in weight_transfers if dst == r)
    lent = sorted((int(e), int(slot_of[e]), int(dst)) for e, src, dst in weight_transfers if src == r)
    if any(s < 0 for _, s, _ in lent):
        raise comm.error("the plan lends an expert whose weights are not on this rank")
    slot = np.asarray(slot_of, dtype=np.int64).copy()
    for n, (e, _) in enumerate(copies):
        slot[e] = num_slots + n
    per_expert = recv.sum(0)
    if (slot[per_expert > 0] < 0).any():  # invariant: everything received has weights here
        raise comm.error("rows received for an expert with no weights here")
    if int(recv.sum()) != int(np.asarray(assignment)[:, r].sum()):  # invariant: exactly the plan's load arrives
        raise comm.error(f"would receive {int(recv.sum())} rows, the plan says {int(assignment[:, r].sum())}")
    row_slot = torch.from_numpy(np.repeat(np.tile(slot, P), recv.reshape(-1))).to(dev)
    order = torch.sort(row_slot, stable=True).indices
    rows = (
        np.bincount(slot[per_expert > 0], weights=per_expert[per_expert > 0], minlength=num_slots + len(copies))
        .astype(np.int64)
        .tolist()
    )
    ex = Exchange(
        comm,
        send.sum(1).tolist(),
        recv.sum(1).tolist(),
        order,
        rows[:num_slots],
        rows[num_slots:],
        copies,
        lent,
        step,
        hidden,
        replica_of,
        E,
        None if summed is None else np.asarray(summed, dtype=np.int64),
    )
    ex.stats = {
        "sent": int(send.sum() - send[r].sum()),
        "received": int(recv.sum() - recv[r].sum()),
        "computed": int(recv.sum()),
        "copies": [e for e, _ in copies],
        "lent": [(e, d) for e, _, d in lent],
    }
    return ex, send_pairs


class ExpertExchange(torch.autograd.Function):
    """``y_send [n_send, hidden]``: each sent row through its expert on the rank the plan names (see the module
    docstring). Inputs: ``x_send [n_send, hidden]``, the :class:`Exchange`, then the local slot weights."""

    @staticmethod
    def forward(ctx: Any, x_send: Tensor, ex: Exchange, *weights: Tensor) -> Tensor:
        comm, n_w = ex.comm, len(weights)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        # 1. borrowed experts' weights from their lenders (tag: n_w * expert + which weight)
        wf = tuple(w.new_empty((len(ex.copies),) + tuple(w.shape[1:])) for w in weights)
        comm.p2p(
            "expert weight copy (batch_isend_irecv)",
            [(w[s].detach(), dst, n_w * e + j) for e, s, dst in ex.lent for j, w in enumerate(weights)],
            [(wf[j][n], src, n_w * e + j) for n, (e, src) in enumerate(ex.copies) for j in range(n_w)],
        )
        # 2. rows to the ranks that compute them
        x_recv = comm.all_to_all("token dispatch (all_to_all_single)", x_send, ex.send_split, ex.recv_split)
        # 3. the expert step, local slots then copies, in a graph of its own
        grad = need_x or any(need_w)
        with torch.enable_grad() if grad else contextlib.nullcontext():
            xr = x_recv.detach().requires_grad_(need_x)
            wl = tuple(w.detach().requires_grad_(n) for w, n in zip(weights, need_w))
            wc = tuple(w.requires_grad_(n) for w, n in zip(wf, need_w))
            with comm.timed("expert compute (forward)"):
                xc = xr.index_select(0, ex.order)
                n_local = sum(ex.local_counts)
                parts = []
                if n_local:
                    parts.append(ex.step(xc[:n_local], ex.local_counts, wl))
                if sum(ex.copy_counts):
                    parts.append(ex.step(xc[n_local:], ex.copy_counts, wc))
                if parts:
                    yc = torch.cat(parts)
                    y_recv = torch.empty_like(yc).index_copy(0, ex.order, yc)
                else:
                    y_recv = xr.new_zeros((0, ex.hidden))
        # 4. rows back to the ranks they came from
        y_send = comm.all_to_all("result return (all_to_all_single)", y_recv.detach(), ex.recv_split, ex.send_split)
        ctx.ex = ex
        if grad:
            ctx.inner = (xr, y_recv, wl, wc)  # not save_for_backward: y_recv must keep its own graph
        return y_send

    @staticmethod
    def backward(ctx: Any, dy_send: Tensor):
        ex: Exchange = ctx.ex
        comm = ex.comm
        xr, y_recv, wl, wc = ctx.inner
        del ctx.inner
        n_w = len(wl)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        dy_recv = comm.all_to_all(
            "gradient dispatch (all_to_all_single)", dy_send.contiguous(), ex.send_split, ex.recv_split
        )
        inputs = [t for t in (xr, *wl, *wc) if t.requires_grad]
        grads: dict[int, Tensor | None] = {}
        if inputs and y_recv.grad_fn is not None:
            with comm.timed("expert compute (backward)"):
                got = torch.autograd.grad(y_recv, inputs, dy_recv, allow_unused=True)
            grads = {id(t): g for t, g in zip(inputs, got)}

        def grad_of(t: Tensor) -> Tensor:
            g = grads.get(id(t))
            return torch.zeros_like(t) if g is None else g

        dx = None
        if need_x:
            dx = comm.all_to_all("gradient return (all_to_all_single)", grad_of(xr), ex.recv_split, ex.send_split)
        dwl = [grad_of(w) if n else None for w, n in zip(wl, need_w)]
        which = [j for j in range(n_w) if need_w[j]]
        if which:  # the copies' gradients go back to the lenders, who add them to their own
            bufs = [(e, s, j, torch.empty_like(wl[j][s]), dst) for e, s, dst in ex.lent for j in which]
            comm.p2p(
                "expert weight gradient return (batch_isend_irecv)",
                [(grad_of(wc[j])[n], src, n_w * e + j) for n, (e, src) in enumerate(ex.copies) for j in which],
                [(b, dst, n_w * e + j) for e, s, j, b, dst in bufs],
            )
            for _e, s, j, b, _dst in bufs:
                dwl[j][s] += b
        multi = ex.summed if ex.summed is not None else np.arange(ex.num_experts)
        if which and ex.replica_of is not None and multi.size:  # replicas: every slot gets its expert's gradient
            # only experts with several replicas need the sum (identical on every rank, so is the shape): a single
            # replica already holds its expert's whole gradient (its borrowed copies' gradients were added above)
            pos = np.full(ex.num_experts, -1, dtype=np.int64)
            pos[multi] = np.arange(multi.size)
            at = pos[ex.replica_of]
            rows = torch.from_numpy(np.flatnonzero(at >= 0)).to(wl[0].device)
            dst = torch.from_numpy(at[at >= 0]).to(wl[0].device)
            for j in which:
                g = dwl[j]
                full = g.new_zeros((multi.size,) + tuple(g.shape[1:])).index_add_(0, dst, g.index_select(0, rows))
                comm.all_reduce("replica gradient sum (all_reduce)", full)
                dwl[j] = g.index_copy(0, rows, full.index_select(0, dst))
        return (dx, None, *dwl)


def exchange(x_send: Tensor, ex: Exchange, weights: tuple[Tensor, ...]) -> Tensor:
    """:class:`ExpertExchange` applied: ``y_send [n_send, hidden]`` (differentiable in ``x_send`` and ``weights``)."""
    return ExpertExchange.apply(x_send, ex, *weights)
