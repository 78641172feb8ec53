"""The replication problem behind EPLB-style expert balancing, and the drop-in ``rebalance_experts``.

A serving engine gives every MoE layer ``R`` physical expert slots spread evenly over ``G`` GPUs (slot ``j`` on
GPU ``j // (R / G)``). A plan ``phy2log [L, R]`` says which logical expert each slot holds; every expert has
at least one replica and its load is split evenly over its replicas (DeepSeek EPLB's model). The step waits
for the busiest GPU, so the objective is the sum over layers of the largest GPU load (for a window of
batches: the mean over batches of that sum). Mapping tables follow DeepSeek EPLB (``eplb.rebalance_experts``):

- ``phy2log [L, R]``: logical expert of each physical slot;
- ``log2phy [L, E, X]``: the physical slots of each expert, ``-1`` padded (``X`` = most replicas of any expert);
- ``logcnt [L, E]``: number of replicas of each expert.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._validate import as_int, as_int_array
from .solution import Evaluation, Solution

__all__ = [
    "ReplicationProblem",
    "ReplicationSolution",
    "rebalance_experts",
    "log2phy_from_phy2log",
    "count_moves",
    "gpu_loads",
    "layer_bounds",
]


@dataclasses.dataclass(frozen=True, repr=False)
class ReplicationSolution(Solution):
    """A replication answer. ``assignment`` is ``phy2log [L, R]`` (int64 logical expert of every slot).

    phy2log:   ``[L, R]`` the assignment again (None without one).
    log2phy:   ``[L, E, X]`` slots of each expert, -1 padded; a solver's own order of an expert's slots (EPLB's
               replica ranks) is kept when it lists exactly that expert's slots, else slots in increasing order.
    logcnt:    ``[L, E]`` replicas per expert.
    gpu_loads: ``[L, G]`` load per GPU (each expert's load split evenly over its replicas); for a window, the
               mean over batches.
    moves:     ``[L]`` replicas copied onto a GPU relative to ``old_phy2log``; None without an old plan.
    """

    phy2log: np.ndarray | None = None
    log2phy: np.ndarray | None = None
    logcnt: np.ndarray | None = None
    gpu_loads: np.ndarray | None = None
    moves: np.ndarray | None = None


def _as_weight(weight: Any) -> tuple[np.ndarray, int]:
    """``weight`` as float64 ``[B, L, E]`` and its original number of dimensions (1, 2 or 3)."""
    if type(weight).__module__.startswith("torch"):
        if getattr(getattr(weight, "device", None), "type", None) == "meta":
            raise ValueError("`weight` is a meta tensor (it holds no data): pass the measured loads")
        try:
            weight = weight.detach().to("cpu").double().numpy()
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"`weight` must be a real numeric tensor: {exc}") from None
    try:
        arr = np.asarray(weight)
    except Exception as exc:
        raise ValueError(f"`weight` must be a numeric array [E], [L, E] or [B, L, E]: {exc}") from None
    if (
        arr.dtype == object
        or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool)
        or np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise ValueError(f"`weight` must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2, 3):
        raise ValueError(f"`weight` must have shape [E], [L, E] or [B, L, E], got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"`weight` must not be empty, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("`weight` must be finite: it contains NaN or inf")
    if arr.min() < 0:
        raise ValueError(f"`weight` must be non-negative, got minimum {arr.min():.6g}")
    ndim = arr.ndim
    while arr.ndim < 3:
        arr = arr[None]
    return arr, ndim


def _as_plan(value: Any, name: str, L: int, R: int, E: int) -> np.ndarray:
    """``value`` as an int64 ``[L, R]`` plan of expert ids in [0, E) holding every expert, else ValueError."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.ndim == 1 and L == 1:
        arr = arr[None]
    plan = as_int_array(arr, name, (L, R))
    if plan.size and (plan.min() < 0 or plan.max() >= E):
        raise ValueError(f"`{name}` must hold expert ids in [0, {E}), got range [{plan.min()}, {plan.max()}]")
    counts = _counts(plan, E)
    if np.any(counts == 0):
        layer, expert = np.argwhere(counts == 0)[0]
        raise ValueError(f"`{name}` misses expert {expert} in layer {layer}: every expert needs a replica")
    return plan


def _counts(phy2log: np.ndarray, E: int) -> np.ndarray:
    """``[L, E]`` replicas per expert."""
    L = phy2log.shape[0]
    return np.bincount((phy2log + E * np.arange(L)[:, None]).ravel(), minlength=L * E).reshape(L, E)


def _per_gpu_counts(phy2log: np.ndarray, E: int, G: int) -> np.ndarray:
    """``[L, G, E]`` replicas of each expert on each GPU."""
    L, R = phy2log.shape
    gpu = np.arange(R) // (R // G)
    idx = (np.arange(L)[:, None] * G + gpu[None, :]) * E + phy2log
    return np.bincount(idx.ravel(), minlength=L * G * E).reshape(L, G, E)


def count_moves(old_phy2log: np.ndarray, new_phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """``[L]`` replicas a GPU must copy in to go from ``old_phy2log`` to ``new_phy2log`` (both ``[L, R]``):
    ``R - sum_{gpu, expert} min(old count, new count)``."""
    old = _per_gpu_counts(np.asarray(old_phy2log), num_experts, num_gpus)
    new = _per_gpu_counts(np.asarray(new_phy2log), num_experts, num_gpus)
    return (new_phy2log.shape[1] - np.minimum(old, new).sum(axis=(1, 2))).astype(np.int64)


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[B, L, G]`` load per GPU of plan ``phy2log [L, R]`` under loads ``weight [B, L, E]``."""
    B, L, E = weight.shape
    R = phy2log.shape[1]
    cnt = _counts(phy2log, E)
    per_replica = weight / np.maximum(cnt, 1)[None]  # [B, L, E]
    slot = np.take_along_axis(per_replica, np.broadcast_to(phy2log[None], (B, L, R)), axis=2)
    return slot.reshape(B, L, num_gpus, R // num_gpus).sum(axis=3)


def log2phy_from_phy2log(phy2log: np.ndarray, num_experts: int, order: Any = None) -> np.ndarray:
    """``[L, E, X]`` slots of each expert (-1 padded) from ``phy2log [L, R]``.

    ``order`` ``[L, R]`` (optional): the rank of each slot among its expert's replicas (EPLB's ``phyrank``);
    default: slots in increasing order.
    """
    L, R = phy2log.shape
    cnt = _counts(phy2log, num_experts)
    X = int(cnt.max()) if cnt.size else 0
    if order is None:
        key = phy2log.astype(np.int64) * R + np.arange(R)[None, :]
        srt = np.argsort(key, axis=1, kind="stable")
        start = np.cumsum(cnt, axis=1) - cnt
        sorted_e = np.take_along_axis(phy2log, srt, axis=1)
        order = np.empty_like(phy2log)
        np.put_along_axis(order, srt, np.arange(R)[None, :] - np.take_along_axis(start, sorted_e, axis=1), axis=1)
    out = np.full((L, num_experts * X), -1, dtype=np.int64)
    np.put_along_axis(out, phy2log * X + order, np.broadcast_to(np.arange(R, dtype=np.int64), (L, R)), axis=1)
    return out.reshape(L, num_experts, X)


def _dhondt_threshold(w: np.ndarray, R: int) -> np.ndarray:
    """``[N]`` min over replica counts (>= 1 each, summing to ``R``) of the largest load per replica, for every
    row of ``w [N, E]``: the ``(R - E + 1)``-th largest of ``w_e / j`` (j >= 1), the first value the greedy
    D'Hondt allocation leaves untaken."""
    N, E = w.shape
    extra = R - E
    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(total > 0, w.max(axis=1) * R / np.where(total > 0, total, 1.0), 1.0)
    K = int(min(extra + 1, np.ceil(need.max()) + 2))
    k = min(extra, E * K - 1)
    # rows in chunks of at most ~2**21 candidate values (16 MiB): memory stays bounded whatever R is
    step = max(1, (1 << 21) // max(1, E * K))
    out = np.empty(N)
    div = np.arange(1, K + 1, dtype=np.float64)
    for lo in range(0, N, step):
        vals = (w[lo : lo + step, :, None] / div).reshape(-1, E * K)
        vals *= -1
        out[lo : lo + step] = -np.partition(vals, k, axis=1)[:, k]
    return out


def _pigeonhole(items: np.ndarray, G: int, S: int) -> np.ndarray:
    """``[N]`` bound on the largest GPU sum when the replica loads ``items [N, G*S]`` are fixed: among the
    ``kG + 1`` largest (k = 0: the largest alone), some GPU holds ``k + 1``; its other ``S - k - 1`` slots hold
    at least the smallest items."""
    srt = -np.sort(-items, axis=1)  # descending
    asc = srt[:, ::-1]
    cum_small = np.concatenate([np.zeros((items.shape[0], 1)), np.cumsum(asc, axis=1)], axis=1)
    best = np.zeros(items.shape[0])
    for k in range(0, S):
        top = k * G + 1
        if top > items.shape[1]:
            break
        part = srt[:, top - k - 1 : top].sum(axis=1)  # the k + 1 smallest of the top kG + 1
        best = np.maximum(best, part + cum_small[:, S - k - 1])
    return best


def _node_bound(group_load: np.ndarray, nodes: int, cap: int) -> np.ndarray:
    """``[N]`` min over assignments of groups to nodes (at most ``cap`` groups per node) of the largest node
    load, for ``group_load [N, Q]``: exact DP over subsets for Q <= 12, else the pigeonhole-free bound
    ``max(total / nodes, largest group)``."""
    N, Q = group_load.shape
    if Q > 12:
        return np.maximum(group_load.sum(axis=1) / nodes, group_load.max(axis=1))
    masks = np.arange(1 << Q)
    bits = (masks[:, None] >> np.arange(Q)) & 1
    sub_load = group_load @ bits.T  # [N, 2**Q]
    size = bits.sum(axis=1)
    pairs = [(m, s) for m in range(1 << Q) for s in _submasks(m) if size[s] <= cap]
    pm = np.array([p[0] for p in pairs])
    ps = np.array([p[1] for p in pairs])
    # masks on the first axis: every gather below copies whole rows of N values
    sub_t = np.ascontiguousarray(sub_load.T)  # [2**Q, N]
    f = np.where(size[:, None] <= cap, sub_t, np.inf)  # one node
    # pairs are listed by increasing m, each m with its submask 0 at least: a segmented min (reduceat) per m
    full = (1 << Q) - 1
    for it in range(nodes - 1):
        # with it + 2 nodes only masks of at most cap * (it + 2) groups are reachable; the last step needs all
        keep = (size[pm] <= cap * (it + 2)) & ((pm == full) if it == nodes - 2 else True)
        qm, qs = pm[keep], ps[keep]
        if qm.size == 0:
            return np.full(N, np.inf)
        starts = np.flatnonzero(np.r_[True, qm[1:] != qm[:-1]])
        cand = np.maximum(sub_t[qs], f[qm ^ qs])
        g = np.full_like(f, np.inf)
        g[qm[starts]] = np.minimum.reduceat(cand, starts, axis=0)
        f = g
    return f[-1]


def _submasks(m: int):
    s = m
    while True:
        yield s
        if s == 0:
            return
        s = (s - 1) & m


def layer_bounds(problem: ReplicationProblem) -> np.ndarray:
    """``[L]`` lower bound on each layer's term of the objective, valid for every plan.

    Per batch the largest of: the mean GPU load; the D'Hondt threshold (no plan has a smaller largest load
    per replica); with ``R == E`` (no replicas, fixed items) the pigeonhole bound; with nodes, the best split
    of the groups over nodes (each node's load spread evenly over its GPUs). A window takes the mean over
    batches of the per-batch bounds.
    """
    cached = getattr(problem, "_layer_bounds", None)
    if cached is not None:  # the problem is immutable: its bounds are computed once
        return cached.copy()
    B, L, E = problem.shape
    R, G = problem.num_replicas, problem.num_gpus
    w = problem.weight.reshape(B * L, E)
    lb = np.maximum(w.sum(axis=1) / G, _dhondt_threshold(w, R))
    if R == E:
        lb = np.maximum(lb, _pigeonhole(w, G, R // G))
    if problem.hierarchical:
        Q, N = problem.num_groups, problem.num_nodes
        gl = w.reshape(B * L, Q, E // Q).sum(axis=2)
        cap = (R // N) // (E // Q)
        lb = np.maximum(lb, _node_bound(gl, N, cap) / (G // N))
    out = lb.reshape(B, L).mean(axis=0)
    out.setflags(write=False)
    try:
        problem._layer_bounds = out
    except AttributeError:
        pass
    return out.copy()


#: most slots (layers x replicas) a problem may hold: its plans are int64 ``[L, R]`` arrays (2 GiB at the cap)
MAX_SLOTS = 2**28

_ORDER = ("num_groups", "num_nodes", "num_gpus")


def _eplb_order(args: tuple, num_groups: Any, num_nodes: Any, num_gpus: Any) -> tuple[Any, Any, Any]:
    """``(num_groups, num_nodes, num_gpus)`` from the positional ``args`` after ``num_replicas``: EPLB's order
    ``(num_groups, num_nodes, num_gpus)``, or the older ``(num_gpus,)`` alone (deprecated), plus keywords."""
    import warnings

    given = {"num_groups": num_groups, "num_nodes": num_nodes, "num_gpus": num_gpus}
    if len(args) == 1:
        names: tuple[str, ...] = ("num_gpus",)
    elif len(args) in (0, 3):
        names = _ORDER[: len(args)]
    else:
        raise TypeError(
            f"ReplicationProblem takes weight, num_replicas, then (num_groups, num_nodes, num_gpus) "
            f"positionally or by keyword; got {len(args)} more positional argument(s)"
        )
    for name, value in zip(names, args):
        if given[name] is not None:
            raise TypeError(f"ReplicationProblem got `{name}` both positionally and by keyword")
        given[name] = value
    if given["num_gpus"] is None:
        raise TypeError("ReplicationProblem needs `num_gpus`")
    if len(args) == 1:
        warnings.warn(
            "ReplicationProblem(weight, num_replicas, num_gpus) is deprecated: pass `num_gpus=` by "
            "keyword, or all three in rebalance_experts' order (weight, num_replicas, num_groups, "
            "num_nodes, num_gpus)",
            DeprecationWarning,
            stacklevel=3,
        )
    return (
        1 if given["num_groups"] is None else given["num_groups"],
        1 if given["num_nodes"] is None else given["num_nodes"],
        given["num_gpus"],
    )


def _weight_shape(weight: Any) -> tuple[int, ...]:
    """The shape of ``weight`` without copying it (() when it has none)."""
    shape = getattr(weight, "shape", None)
    if shape is None:
        try:
            shape = np.shape(weight)
        except Exception:
            return ()
    try:
        return tuple(int(n) for n in shape)
    except Exception:
        return ()


class ReplicationProblem:
    """Which logical expert each physical slot holds: minimise the largest GPU load per layer.

    Model (DeepSeek EPLB's): ``R`` slots per layer, ``R / G`` per GPU (slot ``j`` on GPU ``j // (R / G)``; two
    replicas of one expert may share a GPU); every expert has >= 1 replica and its load is split evenly over
    its replicas. With ``num_nodes > 1`` GPUs form nodes of ``G / num_nodes`` consecutive GPUs, experts form
    ``num_groups`` groups of consecutive ids, and all replicas of a group's experts stay on one node.

    minimise   mean_b sum_l max_g sum_{slots j on g} weight[b, l, phy2log[l, j]] / logcnt[l, phy2log[l, j]]
    subject to logcnt[l, e] >= 1; group/node constraint; moves[l] <= max_moves (with ``old_phy2log``).

    A *move* is a replica a GPU must copy in: ``moves[l] = R - sum_{g, e} min(old count, new count)``.

    Args:
      weight: ``[E]``, ``[L, E]`` loads, or a window ``[B, L, E]`` of recent batches (finite, >= 0).
      num_replicas: ``R``, physical slots per layer: a multiple of ``num_gpus`` and >= E; layers x ``R`` at most
        :data:`MAX_SLOTS`.
      num_groups: expert groups (must divide E; with ``num_nodes > 1`` a multiple of ``num_nodes``); default 1.
      num_nodes: server nodes; default 1.
      num_gpus: ``G``, a multiple of ``num_nodes`` (required).

    ``num_groups, num_nodes, num_gpus`` follow ``rebalance_experts``' order (EPLB's) when given positionally;
    ``ReplicationProblem(weight, num_replicas, num_gpus)`` (the older order) still works, with a
    DeprecationWarning; keywords always work.
      old_phy2log: ``[L, R]`` the plan in place, holding every expert (for moves), or None.
      max_moves: at most this many moves per layer (needs ``old_phy2log``), or None.
    """

    kind = "replication"
    sense = "min"
    solution_type = ReplicationSolution

    def __init__(
        self,
        weight: Any,
        num_replicas: int,
        *args: int,
        num_groups: int | None = None,
        num_nodes: int | None = None,
        num_gpus: int | None = None,
        old_phy2log: Any = None,
        max_moves: int | None = None,
    ):
        num_groups, num_nodes, num_gpus = _eplb_order(args, num_groups, num_nodes, num_gpus)
        R = as_int(num_replicas, "num_replicas", minimum=1)
        G = as_int(num_gpus, "num_gpus", minimum=1)
        groups = as_int(num_groups, "num_groups", minimum=1)
        nodes = as_int(num_nodes, "num_nodes", minimum=1)
        shape = _weight_shape(weight)
        L_ = shape[-2] if len(shape) >= 2 else 1
        if R > MAX_SLOTS or L_ * R > MAX_SLOTS:
            raise ValueError(
                f"`num_replicas` ({R}) is too large: a plan of {L_} layer(s) x {R} slots needs "
                f"{L_ * R * 8 / 2**30:.3g} GiB; at most {MAX_SLOTS} slots over all layers"
            )
        if G > R:
            raise ValueError(f"`num_gpus` ({G}) must be <= `num_replicas` ({R}): every GPU holds a slot")
        w, ndim = _as_weight(weight)
        B, L, E = w.shape
        if R % G:
            raise ValueError(f"`num_replicas` ({R}) must be a multiple of `num_gpus` ({G})")
        if R < E:
            raise ValueError(f"`num_replicas` ({R}) must be >= the number of experts ({E}): every expert needs a slot")
        if E % groups:
            raise ValueError(f"`num_groups` ({groups}) must divide the number of experts ({E})")
        if G % nodes:
            raise ValueError(f"`num_gpus` ({G}) must be a multiple of `num_nodes` ({nodes})")
        if nodes > 1 and groups % nodes:
            raise ValueError(
                f"`num_groups` ({groups}) must be a multiple of `num_nodes` ({nodes}) for the hierarchical model"
            )
        old = None if old_phy2log is None else _as_plan(old_phy2log, "old_phy2log", L, R, E)
        if max_moves is not None:
            max_moves = as_int(max_moves, "max_moves", minimum=0)
            if old is None:
                raise ValueError("`max_moves` needs `old_phy2log`: moves are counted from an old plan")
        # an overflowing objective cannot be certified
        with np.errstate(over="ignore"):
            overflow = not np.isfinite(w.sum(axis=2).sum(axis=1).max())
        if overflow:
            raise ValueError(
                "`weight` overflows: the objective (a sum over layers of GPU loads) cannot be represented as a float64"
            )
        self._w = w
        self._w.setflags(write=False)
        self._ndim = ndim
        self._R, self._G, self._groups, self._nodes = R, G, groups, nodes
        self._old = old
        if old is not None:
            old.setflags(write=False)
        self._max_moves = max_moves
        self._layer_bounds: np.ndarray | None = None

    # ---- data ---------------------------------------------------------------------------------------------
    @property
    def weight(self) -> np.ndarray:
        """``[B, L, E]`` loads (B = 1 unless a window was given); read-only."""
        return self._w

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(B, L, E)``."""
        return tuple(self._w.shape)

    @property
    def num_batches(self) -> int:
        return self._w.shape[0]

    @property
    def num_layers(self) -> int:
        return self._w.shape[1]

    @property
    def num_experts(self) -> int:
        return self._w.shape[2]

    @property
    def num_replicas(self) -> int:
        return self._R

    @property
    def num_gpus(self) -> int:
        return self._G

    @property
    def num_groups(self) -> int:
        return self._groups

    @property
    def num_nodes(self) -> int:
        return self._nodes

    @property
    def slots_per_gpu(self) -> int:
        return self._R // self._G

    @property
    def hierarchical(self) -> bool:
        """True when the group/node constraint binds (``num_nodes > 1``)."""
        return self._nodes > 1

    @property
    def old_phy2log(self) -> np.ndarray | None:
        return self._old

    @property
    def max_moves(self) -> int | None:
        return self._max_moves

    @property
    def window(self) -> bool:
        """True when ``weight`` was a window ``[B, L, E]``."""
        return self._ndim == 3

    def summed_weight(self) -> np.ndarray:
        """``[L, E]`` loads summed over the window (what EPLB plans on)."""
        return self._w.sum(axis=0)

    def __repr__(self) -> str:
        B, L, E = self.shape
        extra = f", window of {B}" if self.window else ""
        extra += f", {self._groups} groups on {self._nodes} nodes" if self.hierarchical else ""
        extra += f", max_moves={self._max_moves}" if self._max_moves is not None else ""
        return f"ReplicationProblem(L={L}, E={E}, R={self._R}, G={self._G}{extra})"

    # ---- the shared check ---------------------------------------------------------------------------------
    def evaluate(self, assignment: Any, solution: Any = None) -> Evaluation:
        """The shared check of ``phy2log [L, R]``: shape and ids, every expert replicated, the group/node
        constraint, the migration limit; objective and fields recomputed from the data alone."""
        B, L, E = self.shape
        R, G = self._R, self._G
        try:
            if type(assignment).__module__.startswith("torch"):
                assignment = assignment.detach().to("cpu").numpy()
            a = np.asarray(assignment)
        except Exception as exc:
            return Evaluation(False, float("nan"), [f"phy2log is not an array: {exc}"])
        if a.ndim == 1 and L == 1:
            a = a[None]
        if a.shape != (L, R) or not np.issubdtype(a.dtype, np.integer):
            return Evaluation(
                False, float("nan"), [f"phy2log must be an integer array of shape ({L}, {R}), got {a.dtype} {a.shape}"]
            )
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= E):
            return Evaluation(
                False, float("nan"), [f"expert ids must lie in [0, {E}), got range [{a.min()}, {a.max()}]"]
            )
        violations: list[str] = []
        cnt = _counts(a, E)
        missing = int(np.count_nonzero(cnt == 0))
        if missing:
            violations.append(f"{missing} (layer, expert) pair(s) without a replica")
        if self.hierarchical:
            S = R // G
            node = np.arange(R) // (S * (G // self._nodes))
            group = a // (E // self._groups)
            # each (layer, group) must see a single node: min node == max node
            key = (np.arange(L)[:, None] * self._groups + group).ravel()
            nodes = np.broadcast_to(node, (L, R)).ravel()
            lo = np.full(L * self._groups, self._nodes, dtype=np.int64)
            hi = np.full(L * self._groups, -1, dtype=np.int64)
            np.minimum.at(lo, key, nodes)
            np.maximum.at(hi, key, nodes)
            split = int(np.count_nonzero((hi >= 0) & (lo != hi)))
            if split:
                violations.append(f"{split} (layer, group) pair(s) spread over more than one node")
        moves = None
        if self._old is not None:
            moves = count_moves(self._old, a, E, G)
            if self._max_moves is not None and moves.max() > self._max_moves:
                violations.append(
                    f"{int(np.count_nonzero(moves > self._max_moves))} layer(s) move more than "
                    f"max_moves={self._max_moves} replicas (worst {int(moves.max())})"
                )
        loads = gpu_loads(self._w, a, G)  # [B, L, G]
        objective = float(loads.max(axis=2).sum(axis=1).mean())
        mean = loads.mean(axis=2)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(mean > 0, loads.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)
        fields = {
            "phy2log": a,
            "log2phy": self._log2phy(a, cnt, solution),
            "logcnt": cnt,
            "gpu_loads": loads.mean(axis=0),
            "moves": moves,
        }
        return Evaluation(not violations, objective, violations, fields, float(ratio.max()))

    def _log2phy(self, a: np.ndarray, cnt: np.ndarray, solution: Any) -> np.ndarray:
        hint = getattr(solution, "log2phy", None)
        E = self.num_experts
        if hint is not None:
            h = np.asarray(hint)
            L = a.shape[0]
            X = int(cnt.max())
            if h.shape == (L, E, X) and np.issubdtype(h.dtype, np.integer):
                # kept only when it lists exactly each expert's slots (padding at the end)
                valid = np.arange(X)[None, None, :] < cnt[:, :, None]
                if np.all((h >= 0) == valid):
                    ok = np.take_along_axis(a, np.where(valid, h, 0).reshape(L, -1), axis=1).reshape(L, E, X)
                    if np.all(np.where(valid, ok == np.arange(E)[None, :, None], True)) and np.all(
                        np.sort(np.where(valid, h, -1).reshape(L, -1), axis=1)[:, -a.shape[1] :]
                        == np.arange(a.shape[1])[None, :]
                    ):
                        return h.astype(np.int64)
        return log2phy_from_phy2log(a, E)

    def certify(self, solution: Any) -> tuple[float | None, dict[str, Any], dict[str, Any]]:
        """``(bound, stats, field corrections)``: a lower bound that holds for every plan (:func:`layer_bounds`,
        summed over layers); no field is corrected."""
        lb = float(layer_bounds(self).sum())
        return lb, {"combinatorial_bound": lb}, {}

    def objective_scale(self) -> float:
        """The natural magnitude of the objective: the sum over layers of the mean GPU load (a lower bound)."""
        return float(self._w.sum(axis=2).mean(axis=0).sum() / self._G)

    # ---- files --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of a replication problem file."""
        w = self._w if self._ndim == 3 else (self._w[0] if self._ndim == 2 else self._w[0, 0])
        return {
            "kind": "replication",
            "weight": w.tolist(),
            "num_replicas": self._R,
            "num_gpus": self._G,
            "num_groups": self._groups,
            "num_nodes": self._nodes,
            "old_phy2log": None if self._old is None else self._old.tolist(),
            "max_moves": self._max_moves,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicationProblem:
        """Inverse of :meth:`to_dict`; unknown keys or a wrong ``kind`` raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"`d` must be a dict, got {type(d).__name__}")
        if d.get("kind", "replication") != "replication":
            raise ValueError(f"`d` has kind {d.get('kind')!r}, expected 'replication'")
        allowed = {"kind", "weight", "num_replicas", "num_gpus", "num_groups", "num_nodes", "old_phy2log", "max_moves"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"`d` has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        for key in ("weight", "num_replicas", "num_gpus"):
            if key not in d:
                raise ValueError(f"`d` misses the key {key!r}")
        return cls(
            d["weight"],
            d["num_replicas"],
            num_gpus=d["num_gpus"],
            num_groups=d.get("num_groups", 1),
            num_nodes=d.get("num_nodes", 1),
            old_phy2log=d.get("old_phy2log"),
            max_moves=d.get("max_moves"),
        )


def rebalance_experts(
    weight: Any,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    method: str = "eplb",
    old_phy2log: Any = None,
    max_moves: int | None = None,
    time_limit: float | None = None,
    **options: Any,
) -> tuple[Any, Any, Any]:
    """Drop-in for DeepSeek EPLB's ``eplb.rebalance_experts``: ``(phy2log, log2phy, logcnt)``.

    Args:
      weight: ``[L, E]`` load statistics (numpy array or torch tensor; ``[E]`` is taken as one layer).
      num_replicas: physical slots per layer, a multiple of ``num_gpus``.
      num_groups, num_nodes, num_gpus: as EPLB: the hierarchical policy (groups packed to nodes, replicas
        within a node) when ``num_groups % num_nodes == 0``, else the global one.
      method: any replication method (``moebalance.available_methods("replication")``); ``"eplb"`` is our
        own implementation of DeepSeek's algorithm, with identical outputs on tie-free inputs.
      old_phy2log, max_moves: the plan in place and the most replicas copied per layer (migration-aware
        methods such as ``eplb+`` and ``migrate`` honour them).
      time_limit, **options: passed to :func:`moebalance.solve`.

    Returns:
      ``phy2log [L, R]``, ``log2phy [L, E, X]`` (-1 padded), ``logcnt [L, E]``: numpy int64 for numpy input;
      torch int64 on ``weight``'s device for torch input.

    Raises :class:`moebalance.errors.ArgumentError` (both a ValueError and an AssertionError, as EPLB asserted)
    for bad input and :class:`moebalance.InfeasibleError` when the method returns no
    feasible plan (e.g. ``eplb`` under a ``max_moves`` it cannot meet).
    """
    from .errors import ArgumentError, InfeasibleError
    from .registry import solve

    is_torch = type(weight).__module__.startswith("torch")
    try:
        if len(_weight_shape(weight)) == 3:
            raise ValueError("`weight` must be [L, E] for rebalance_experts; use ReplicationProblem for a window")
        groups = as_int(num_groups, "num_groups", minimum=1)
        nodes = as_int(num_nodes, "num_nodes", minimum=1)
        hierarchical = groups % nodes == 0
        problem = ReplicationProblem(
            weight,
            num_replicas,
            num_groups=groups if hierarchical else 1,
            num_nodes=nodes if hierarchical else 1,
            num_gpus=num_gpus,
            old_phy2log=old_phy2log,
            max_moves=max_moves,
        )
    except ArgumentError:
        raise
    except ValueError as exc:  # EPLB asserted its arguments: callers may catch AssertionError
        raise ArgumentError(str(exc)) from None
    try:
        sol = solve(problem, method, time_limit=time_limit, **options)
    except InfeasibleError:
        raise
    except ArgumentError:
        raise
    except ValueError as exc:  # an unknown method or option, a bad time limit
        raise ArgumentError(str(exc)) from None
    if not sol.feasible:
        hint = ""
        if problem.max_moves is not None:
            from .solvers.replication_eplb import BUDGET_METHODS

            hint = f"; under max_moves, {BUDGET_METHODS} honour the budget"
        raise InfeasibleError(f"method {sol.method!r} returned no feasible plan ({sol.status}): {sol.message}{hint}")
    assert isinstance(sol, problem.solution_type)  # what solve returns for the family
    out = (sol.phy2log, sol.log2phy, sol.logcnt)
    if is_torch:
        import torch

        return tuple(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.int64, device=weight.device) for x in out)  # type: ignore[return-value]
    return out
