"""Replicated experts and live rebalancing for the expert-parallel runtime.

Each of the ``P`` ranks holds ``S`` expert slots (``num_local_slots``; ``P * S - E`` of them are redundant, vLLM's
``num_redundant_experts``). A :class:`ReplicaLayout` is a replication plan (``phy2log [P * S]``: logical expert of
every slot; slot ``j`` lives on rank ``j // S``, the model of :class:`~moebalance.ReplicationProblem`), and
:meth:`ReplicaLayout.assignment` splits each expert's tokens over its replicas (evenly, or by the per-batch
dispatch LP of :func:`moebalance.solvers.replication_lp.dispatch`), as an ``[E, P]`` assignment the exchange runs.

:class:`Rebalancer` keeps the loads of the last ``window_size`` steps and, every ``step_interval`` steps, asks
``solve`` for a new replication plan with the user's method (``old_phy2log`` and ``max_moves`` set, so
migration-aware methods keep the move budget); it relabels the new plan's ranks and slots so the fewest weights
travel (two assignment problems, :func:`scipy.optimize.linear_sum_assignment`), skips a plan whose predicted gain
(judged step by step on the window, with the split the layer runs) is below ``min_gain``, and :func:`move_slots` moves the weights (and optimizer state) between ranks.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moebalance.solution import Status

from .comm import Communicator, ExpertParallelError
from .planning import USABLE, agree, plans_on_every_rank

__all__ = [
    "ReplicaLayout",
    "Rebalancer",
    "RebalanceReport",
    "relabel",
    "rank_moves",
    "move_slots",
    "start_move",
    "PendingMove",
    "balancedness",
]

SPLITS = ("even", "lp")


def balancedness(device_loads: Any) -> float:
    """mean / max of per-rank loads (1.0: perfectly even; 1.0 too when nothing ran)."""
    d = np.asarray(device_loads, dtype=np.float64)
    return float(d.mean() / d.max()) if d.size and d.max() > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class ReplicaLayout:
    """``phy2log [P * S]`` int64: the logical expert of each slot; slot ``j`` is on rank ``j // S``."""

    phy2log: np.ndarray
    num_experts: int
    world: int

    def __post_init__(self) -> None:
        a = np.asarray(self.phy2log, dtype=np.int64).reshape(-1)
        E, P = self.num_experts, self.world
        if a.size % P or a.size < E:
            raise ValueError(f"`phy2log` must have a multiple of {P} slots, at least {E}; got {a.size}")
        if a.min() < 0 or a.max() >= E or np.bincount(a, minlength=E).min() == 0:
            raise ValueError("`phy2log` must hold every expert 0..E-1 at least once and nothing else")
        object.__setattr__(self, "phy2log", a)

    @classmethod
    def initial(cls, num_experts: int, world: int, slots: int) -> ReplicaLayout:
        """Home blocks first (rank r: experts ``r E/P .. (r+1) E/P - 1``), the redundant slots of rank r holding
        the next ranks' experts in turn (one replica each of experts ``(r+1) E/P, ...``)."""
        E, P, S = num_experts, world, slots
        n = E // P
        a = np.empty((P, S), dtype=np.int64)
        for r in range(P):
            a[r, :n] = np.arange(r * n, (r + 1) * n)
            a[r, n:] = (np.arange(S - n) + (r + 1) * n) % E
        return cls(a.reshape(-1), E, P)

    @property
    def slots(self) -> int:
        return self.phy2log.size // self.world

    @property
    def logcnt(self) -> np.ndarray:
        """``[E]`` replicas per expert."""
        return np.bincount(self.phy2log, minlength=self.num_experts)

    @property
    def log2phy(self) -> np.ndarray:
        """``[E, X]`` slots of each expert in increasing order, -1 padded."""
        cnt = self.logcnt
        out = np.full((self.num_experts, int(cnt.max())), -1, dtype=np.int64)
        order = np.argsort(self.phy2log, kind="stable")
        starts = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        pos = np.arange(order.size) - np.repeat(starts, cnt)
        out[self.phy2log[order], pos] = order
        return out

    def local(self, rank: int) -> np.ndarray:
        """``[S]`` logical experts of this rank's slots."""
        S = self.slots
        return self.phy2log[rank * S : (rank + 1) * S]

    def slot_of(self, rank: int) -> np.ndarray:
        """``[E]`` the first local slot holding each expert on ``rank`` (-1: none)."""
        out = np.full(self.num_experts, -1, dtype=np.int64)
        mine = self.local(rank)
        for s in range(mine.size - 1, -1, -1):
            out[mine[s]] = s
        return out

    def slot_shares(self, loads: Any, split: str = "even") -> np.ndarray:
        """``[P * S]`` pairs each slot computes: every expert's ``loads[e]`` split over its replicas.

        ``even``: ``loads[e] // cnt[e]`` per replica, the remainder one each to the replicas on the least-loaded
        ranks so far (experts in decreasing load); ``lp``: the dispatch LP's fractional split (min max rank load
        for this batch), rounded per expert by largest remainder."""
        w = np.asarray(loads, dtype=np.int64)
        E, P, S = self.num_experts, self.world, self.slots
        rank_of = np.arange(self.phy2log.size) // S
        if split == "lp":
            from moebalance.solvers.replication_lp import dispatch

            frac = dispatch(w[None].astype(np.float64), self.phy2log[None], P)[0][0]
            base = np.floor(frac).astype(np.int64)
            for e in range(E):
                slots = np.flatnonzero(self.phy2log == e)
                rest = int(w[e] - base[slots].sum())
                top = slots[np.argsort(-(frac[slots] - base[slots]), kind="stable")[:rest]]
                base[top] += 1
            return base
        cnt = self.logcnt
        share = w[self.phy2log] // cnt[self.phy2log]
        rank_load = np.bincount(rank_of, weights=share, minlength=P)
        for e in np.argsort(-w, kind="stable"):
            rest = int(w[e] - (w[e] // cnt[e]) * cnt[e])
            if rest:
                slots = np.flatnonzero(self.phy2log == e)
                top = slots[np.argsort(rank_load[rank_of[slots]], kind="stable")[:rest]]
                share[top] += 1
                np.add.at(rank_load, rank_of[top], 1)
        return share

    def assignment(self, loads: Any, split: str = "even") -> np.ndarray:
        """``[E, P]`` pairs of each expert per rank under :meth:`slot_shares`."""
        return self.collapse(
            self.slot_shares(loads, split)[:, None]
            * np.eye(self.world, dtype=np.int64)[np.arange(self.phy2log.size) // self.slots]
        )[0]

    def collapse(self, slot_assignment: np.ndarray, slot_transfers: Any = ()) -> tuple[np.ndarray, list]:
        """A plan over the slots (``[P * S, P]`` pairs of each slot per rank, ``[(slot, src, dst)]`` weight copies:
        a placement method run with the slots as its experts) as the exchange's plan over experts: ``([E, P]
        assignment, [(expert, src, dst)] copies)``. A copy to a rank that holds a replica of the expert is
        dropped (its tokens run on that replica), and each rank borrows an expert from one lender only."""
        x = np.zeros((self.num_experts, self.world), dtype=np.int64)
        np.add.at(x, self.phy2log, np.asarray(slot_assignment, dtype=np.int64))
        held = {(int(e), int(j // self.slots)) for j, e in enumerate(self.phy2log)}
        copies: dict[tuple[int, int], int] = {}
        for slot, src, dst in slot_transfers:
            e = int(self.phy2log[int(slot)])
            if (e, int(dst)) not in held:
                copies[e, int(dst)] = min(int(src), copies.get((e, int(dst)), int(src)))
        return x, sorted(((e, src, dst) for (e, dst), src in copies.items()), key=lambda t: (t[0], t[2]))


def relabel(old: np.ndarray, new: np.ndarray, world: int) -> np.ndarray:
    """``new`` with its ranks and then each rank's slots permuted so the most slots keep their expert.

    The objective of a replication plan does not change when ranks or slots within a rank are permuted
    (``num_nodes == 1``), so first the new ranks go to the old ranks whose experts they share most (an
    assignment problem on ``sum_e min(old count, new count)``), which minimises the weights that cross ranks;
    then within each rank the slots keep their old expert where they can (in-rank copies avoided)."""
    from scipy.optimize import linear_sum_assignment

    E = int(max(old.max(), new.max())) + 1
    S = old.size // world
    o, n = old.reshape(world, S), new.reshape(world, S)
    co = np.stack([np.bincount(r, minlength=E) for r in o])
    cn = np.stack([np.bincount(r, minlength=E) for r in n])
    overlap = np.minimum(co[:, None, :], cn[None, :, :]).sum(axis=2)  # [old rank, new rank]
    rows, cols = linear_sum_assignment(-overlap)
    out = n[cols[np.argsort(rows)]].copy()
    for r in range(world):
        same = (o[r][:, None] == out[r][None, :]).astype(np.int64)
        i, j = linear_sum_assignment(-same)
        out[r, i] = out[r, j].copy()
    return out.reshape(-1)


def rank_moves(old: np.ndarray, new: np.ndarray, world: int) -> int:
    """Replicas a rank must receive from another rank (``ReplicationProblem``'s moves)."""
    E = int(max(old.max(), new.max())) + 1
    S = old.size // world
    co = np.stack([np.bincount(r, minlength=E) for r in old.reshape(world, S)])
    cn = np.stack([np.bincount(r, minlength=E) for r in new.reshape(world, S)])
    return int(old.size - np.minimum(co, cn).sum())


def _transfers(old: np.ndarray, new: np.ndarray, world: int) -> list[tuple[int, int, int, int, int]]:
    """``[(dst rank, dst slot, expert, src rank, src slot)]`` for every slot whose expert changes: from the same
    rank when it held the expert, else from the holder rank that has sent least so far (lowest rank on ties)."""
    S = old.size // world
    o = old.reshape(world, S)
    sent = np.zeros(world, dtype=np.int64)
    out = []
    for j in np.flatnonzero(old != new):
        r, s, e = int(j // S), int(j % S), int(new[j])
        here = np.flatnonzero(o[r] == e)
        if here.size:
            out.append((r, s, e, r, int(here[0])))
            continue
        holders = [q for q in range(world) if (o[q] == e).any()]
        q = min(holders, key=lambda h: (sent[h], h))
        sent[q] += 1
        out.append((r, s, e, q, int(np.flatnonzero(o[q] == e)[0])))
    return out


_MOVE_TAG = 1 << 20  # move tags sit above the exchange's weight-copy tags (``n_weights * expert + j``)
_move_seq = itertools.count()  # every rank starts its moves in the same order: the same number on every rank
_IN_FLIGHT: list[PendingMove] = []
"""Every posted move until it is waited for: a transfer whose works and buffers are freed mid-flight (a layer
dropped with a move pending) leaves gloo's transport waiting for it, and the group's next collective times out."""


class PendingMove:
    """A weight move in flight (:func:`start_move`): :meth:`wait` completes it. Until then the slot tensors and
    the layout are untouched, so compute that does not use the moved slots overlaps the transfer."""

    def __init__(self, comm: Communicator, works: list, local: list, fresh: list, tensors: list[Tensor]):
        self.comm, self.works, self.local, self.fresh, self.tensors = comm, works, local, fresh, tensors
        self.bytes = int(sum(b.numel() * b.element_size() for _, bufs in fresh for b in bufs))
        self.done = False
        if works:  # kept alive until waited for (or, when abandoned, until its transfers have completed)
            _IN_FLIGHT[:] = [m for m in _IN_FLIGHT if not m._completed()]
            _IN_FLIGHT.append(self)

    def _completed(self) -> bool:
        try:
            return all(w.is_completed() for w in self.works)
        except RuntimeError:  # a failed transfer: its owner's wait raises
            return True

    def wait(self) -> int:
        """Wait for every transfer, confirm with one all-reduce that every rank received everything, then write the
        slots (a rank that died or stalled makes the others raise :class:`ExpertParallelError` within the
        timeout, their weights unchanged). Returns the bytes this rank received. Idempotent."""
        if self.done:
            return self.bytes
        self.done = True  # a failure below leaves the weights as they were; the move is abandoned
        if self in _IN_FLIGHT:
            _IN_FLIGHT.remove(self)

        def finish() -> None:
            for w in self.works:
                w.wait()

        self.comm.run("expert weight move (batch_isend_irecv wait)", finish)
        ok = torch.ones(1, dtype=torch.int64)
        self.comm.all_reduce("weight move commit (all_reduce)", ok)
        if int(ok) != self.comm.world:
            raise self.comm.error("a rank failed its part of the weight move; weights unchanged")
        with torch.no_grad():
            snap = {ss: [t[ss].clone() for t in self.tensors] for _, ss in self.local}
            for ds, ss in self.local:
                for t, v in zip(self.tensors, snap[ss]):
                    t[ds].copy_(v)
            for ds, bufs in self.fresh:
                for t, b in zip(self.tensors, bufs):
                    t[ds].copy_(b)
        self.works = self.fresh = []
        return self.bytes


def start_move(comm: Communicator, old: np.ndarray, new: np.ndarray, tensors: list[Tensor]) -> PendingMove:
    """Start making this rank's slot tensors (``[S, ...]`` each: weights, optimizer state) hold ``new``'s experts.

    Every rank derives the same transfers; remote ones are posted point to point at once (``batch_isend_irecv``
    of snapshots of the sent slots, into fresh buffers) and not waited for: the returned :class:`PendingMove`
    completes them. Tags carry a move sequence number, so moves of several layers and the exchange's own weight
    copies can be in flight between the same ranks together."""
    r, S = comm.rank, old.size // comm.world
    moves = _transfers(old, new, comm.world)
    n_t = len(tensors)
    base = _MOVE_TAG * (1 + next(_move_seq) % 1023)
    if n_t * old.size >= _MOVE_TAG:
        raise ValueError(f"{old.size} slots of {n_t} tensors exceed the weight move's tag space")
    sends, recvs, fresh = [], [], []
    for dst, ds, _e, src, ss in moves:
        tag = base + n_t * (dst * S + ds)
        if src == r and dst != r:
            sends += [(t[ss].detach().clone(), dst, tag + i) for i, t in enumerate(tensors)]
        elif dst == r and src != r:
            bufs = [torch.empty_like(t[ds]) for t in tensors]
            recvs += [(b, src, tag + i) for i, b in enumerate(bufs)]
            fresh.append((ds, bufs))
    works = comm.p2p_start("expert weight move (batch_isend_irecv)", sends, recvs)
    local = [(ds, ss) for dst, ds, e, src, ss in moves if dst == r and src == r]
    return PendingMove(comm, works, local, fresh, tensors)


def move_slots(comm: Communicator, old: np.ndarray, new: np.ndarray, tensors: list[Tensor]) -> int:
    """:func:`start_move` and wait for it: the slot tensors hold ``new``'s experts. Returns the bytes received."""
    return start_move(comm, old, new, tensors).wait()


@dataclasses.dataclass(frozen=True)
class RebalanceReport:
    """One rebalance decision (identical on every rank but ``bytes_moved``, this rank's share).

    step: the layer's step; method / status: the replication solve's; applied: the plan was executed;
    reason: why not (or ""); balancedness_before / _after: the mean over the window's steps of each step's mean / max
    rank load under the old and the new plan with the layer's split (the prediction); gain: ``1 - max_new /
    max_old``, the busiest rank's load averaged over those steps; moves: replicas that crossed ranks
    (after relabelling); moves_unrelabelled: as the solver numbered them; bytes_moved: weights (and optimizer
    state) this rank received; bytes_saved: the relabelling's saving, all ranks together; phy2log: the plan in
    force afterwards.
    """

    step: int
    method: str
    status: str
    applied: bool
    reason: str
    balancedness_before: float
    balancedness_after: float
    gain: float
    moves: int
    moves_unrelabelled: int
    bytes_moved: int
    bytes_saved: int
    phy2log: np.ndarray


class Rebalancer:
    """The load window and the re-planning policy of one replicated layer (see the module docstring).

    ``method``: any replication method of ``solve`` (the user's choice); ``options``: its ``solve`` options;
    ``max_moves``: the per-rebalance move budget (on the problem); ``min_gain``: skip plans predicted to cut the
    busiest rank's load by less than this fraction."""

    def __init__(
        self,
        method: str,
        num_experts: int,
        world: int,
        slots: int,
        *,
        window_size: int = 16,
        step_interval: int = 16,
        max_moves: int | None = None,
        min_gain: float = 0.05,
        options: dict[str, Any] | None = None,
        split: str = "even",
    ):
        from moebalance import ReplicationProblem, solve
        from moebalance._validate import as_int

        self.window_size = as_int(window_size, "window_size", minimum=1)
        self.step_interval = as_int(step_interval, "step_interval", minimum=1)
        if max_moves is not None:
            max_moves = as_int(max_moves, "max_moves", minimum=0)
        if (
            not isinstance(min_gain, (int, float))
            or isinstance(min_gain, bool)
            or not np.isfinite(min_gain)
            or not 0 <= min_gain < 1
        ):
            raise ValueError(f"`min_gain` must be a number in [0, 1), got {min_gain!r}")
        if not isinstance(method, str):
            raise ValueError(f"`replication` must be a method name, got {method!r}")
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}")
        self.method, self.max_moves, self.min_gain, self.split = method, max_moves, float(min_gain), split
        self.options = dict(options or {})
        self.E, self.P, self.S = num_experts, world, slots
        probe = ReplicationProblem(
            np.ones(num_experts),
            world * slots,
            num_gpus=world,
            old_phy2log=ReplicaLayout.initial(num_experts, world, slots).phy2log[None]
            if num_experts % world == 0
            else None,
        )
        sol = solve(probe, method, **self.options)
        if sol.status == Status.ERROR:
            raise ValueError(f"`replication`={method!r} fails on a uniform load: {sol.message}")
        self.replicated = plans_on_every_rank(probe, method, self.options)
        self.window: collections.deque = collections.deque(maxlen=self.window_size)
        self.last_step = 0

    def _step_loads(self, w: np.ndarray, phy2log: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(max, mean)`` rank load ``[B]`` of each window step ``w [B, E]`` under ``phy2log``: the even split's
        fractional shares (also for a placement method over the slots, which starts from them), or the per-batch
        dispatch LP (the ``lp`` split)."""
        mean = w.sum(axis=1) / self.P
        if self.split == "even":
            cnt = np.bincount(phy2log, minlength=self.E)
            rank = (w[:, phy2log] / cnt[phy2log]).reshape(len(w), self.P, -1).sum(axis=2)
            return rank.max(axis=1), mean
        from moebalance.solvers.replication_lp import dispatch

        return np.asarray(dispatch(w, np.tile(phy2log, (len(w), 1)), self.P)[2], dtype=np.float64), mean

    @staticmethod
    def _balancedness(mx: np.ndarray, mean: np.ndarray) -> float:
        """Mean over the steps of mean / max rank load (1.0 for a step with nothing routed)."""
        return float(np.mean(np.where(mx > 0, mean / np.where(mx > 0, mx, 1.0), 1.0)))

    def record(self, loads: np.ndarray) -> None:
        self.window.append(np.asarray(loads, dtype=np.float64))

    def due(self, step: int) -> bool:
        return bool(self.window) and step - self.last_step >= self.step_interval

    def plan(self, comm: Communicator, layout: ReplicaLayout, step: int) -> tuple[np.ndarray, RebalanceReport]:
        """``(new phy2log, report)``, identical on every rank (bytes not yet counted)."""
        from moebalance import ReplicationProblem, solve

        self.last_step = step
        old = layout.phy2log
        w = np.stack(list(self.window))  # [B, E]
        R = old.size
        out: dict[str, Any] = {}

        def compute() -> np.ndarray:
            p = ReplicationProblem(w[:, None, :], R, num_gpus=self.P, old_phy2log=old[None], max_moves=self.max_moves)
            sol = solve(p, self.method, **self.options)
            out.update(method=sol.method, status=sol.status.value, message=sol.message)
            ok = sol.status in USABLE and sol.assignment is not None
            new = np.asarray(sol.assignment, dtype=np.int64).reshape(-1) if ok else old
            return np.concatenate([new, [int(ok), list(Status).index(Status(sol.status))]])

        buf = agree(comm, self.replicated, R + 2, compute, what="replication plan broadcast")
        raw, ok = buf[:R], bool(buf[R])
        status = out.get("status", list(Status)[int(buf[R + 1])].value)
        new = relabel(old, raw, self.P) if ok else old
        # judged step by step on the window with the split the layer runs: the summed window averages the
        # per-step noise away, which no layout removes under an even split (a plan fitted to the sum can
        # predict a gain that the steps never see)
        max_old, mean_old = self._step_loads(w, old)
        max_new, mean_new = self._step_loads(w, new)
        before, after = self._balancedness(max_old, mean_old), self._balancedness(max_new, mean_new)
        gain = 1.0 - max_new.mean() / max_old.mean() if max_old.mean() > 0 else 0.0
        moves, moves_raw = rank_moves(old, new, self.P), rank_moves(old, raw, self.P)
        reason = ""
        if not ok:
            reason = f"{self.method} returned status {status} ({out.get('message', 'on rank 0')})"
        elif self.max_moves is not None and moves > self.max_moves:  # never: relabelling only removes moves
            reason = f"the plan moves {moves} replicas, over max_moves={self.max_moves}"
        elif gain < self.min_gain:
            reason = f"predicted gain {gain:.3f} below min_gain={self.min_gain}"
        applied = not reason
        rep = RebalanceReport(
            step,
            out.get("method", self.method),
            status,
            applied,
            reason,
            before,
            after,
            float(gain),
            moves if applied else 0,
            moves_raw if applied else 0,
            0,
            0,
            new if applied else old,
        )
        return (new if applied else old), rep


def check_layout(value: Any, num_experts: int, world: int) -> ReplicaLayout:
    try:
        return ReplicaLayout(np.asarray(value), num_experts, world)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"`phy2log`: {exc}") from None


__all__ += ["check_layout", "SPLITS", "ExpertParallelError"]
