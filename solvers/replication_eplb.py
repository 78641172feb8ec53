"""``eplb``: DeepSeek EPLB (github deepseek-ai/EPLB, ``eplb.py``), our own vectorised numpy implementation.

The reference loops over layers, items and packs in Python; here every step works on all rows (layers, or
layers x nodes) at once:

- ``replicate_rows``: EPLB hands the ``R - E`` redundant slots out one at a time to the expert with the most
  load per replica (``argmax w / cnt``, first index on ties). Expert e's j-th extra replica is taken when
  ``w_e / j`` is the largest value left, and those values fall with j, so the greedy order is simply the
  descending order of all ``w_e / j`` (ties: lower expert, then lower j): one sort instead of ``R - E`` argmaxes.
- ``pack_rows``: balanced packing (heaviest item first onto the lightest pack with room, lowest pack id on
  ties) is sequential in the items but independent across rows: one loop over items, vectorised over rows.
- ``eplb_plan``: the hierarchical policy (groups packed to nodes, replicas within a node, replicas packed to
  GPUs) or the global one (one node), index bookkeeping as in the reference.

Loads are scaled by a power of two (exact) and computed in float32, as the reference does, so every
comparison it makes comes out the same and the outputs are identical on tie-free inputs (group sums of
non-integer float32 loads may round differently from torch's reduction; integer loads below 2**24 are exact).
``solvers/placement_eplb.py`` uses the same two routines for the placement family.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moebalance.registry import register
from moebalance.replication import ReplicationProblem, ReplicationSolution, count_moves, log2phy_from_phy2log
from moebalance.solution import Status

__all__ = ["replicate_rows", "pack_rows", "eplb_plan", "to_float32", "solve_eplb"]


def to_float32(weight: np.ndarray) -> np.ndarray:
    """``weight`` scaled by a power of two so its largest entry lies in [1, 2), as float32 (the scaling is
    exact, so float32 rounding and every comparison are those of the unscaled data)."""
    w = np.asarray(weight, dtype=np.float64)
    top = float(w.max()) if w.size else 0.0
    if top > 0:
        w = np.ldexp(w, -int(np.frexp(top)[1]) + 1)
    return w.astype(np.float32)


def replicate_rows(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's ``replicate_experts`` on every row of ``weight [N, E]``: ``(phy2log [N, num_phy], rank
    [N, num_phy], logcnt [N, E])``. Slots ``0..E-1`` hold experts ``0..E-1``; slot ``E + i`` holds the expert
    that received the i-th redundant replica; ``rank`` is the replica's index within its expert."""
    N, E = weight.shape
    extra = num_phy - E
    assert extra >= 0
    phy2log = np.broadcast_to(np.arange(num_phy, dtype=np.int64), (N, num_phy)).copy()
    rank = np.zeros((N, num_phy), dtype=np.int64)
    if extra == 0:
        return phy2log, rank, np.ones((N, E), dtype=np.int64)
    # how many extras one expert can take: w_e / j >= t for the final threshold t > sum(w) / num_phy
    total = weight.astype(np.float64).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(total > 0, weight.max(axis=1) * num_phy / np.where(total > 0, total, 1.0), extra)
    K = int(min(extra, np.ceil(need.max()) + 2))
    while True:
        j = np.arange(1, K + 1, dtype=weight.dtype)
        value = weight[:, :, None] / j  # [N, E, K] same dtype as the reference's weight / logcnt
        flat = value.reshape(N, E * K)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :extra]  # ties: lower (expert, j) first
        e, jj = np.divmod(top, K)
        if K == extra or not np.any(jj == K - 1):
            break
        K = min(extra, 2 * K)  # an expert used every candidate: widen (never hit for positive loads)
    phy2log[:, E:] = e
    rank[:, E:] = jj + 1
    logcnt = 1 + np.bincount((e + E * np.arange(N)[:, None]).ravel(), minlength=N * E).reshape(N, E)
    return phy2log, rank, logcnt


def pack_rows(
    weight: np.ndarray, num_packs: int, capacity: Any = None, initial: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """EPLB's ``balanced_packing`` on every row of ``weight [N, n]``: ``(pack [N, n], rank_in_pack [N, n])``.

    Items, heaviest first (stable on ties), go to the lightest pack with room (lowest id on ties).
    ``capacity`` ``[num_packs]`` items per pack (default ``n / num_packs`` each, and then, as in the reference,
    one item per pack means item i in pack i); ``initial`` ``[N, num_packs]`` load already in each pack.
    """
    N, n = weight.shape
    if capacity is None:
        assert n % num_packs == 0
        per = n // num_packs
        if per == 1 and initial is None:
            return (np.broadcast_to(np.arange(n, dtype=np.int64), (N, n)).copy(), np.zeros((N, n), dtype=np.int64))
        cap = np.full(num_packs, per, dtype=np.int64)
    else:
        cap = np.asarray(capacity, dtype=np.int64)
        assert cap.shape == (num_packs,) and cap.sum() >= n
    load = (
        np.zeros((N, num_packs), dtype=weight.dtype)
        if initial is None
        else np.array(np.broadcast_to(initial, (N, num_packs)), dtype=weight.dtype)
    )
    count = np.zeros((N, num_packs), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    pack = np.empty((N, n), dtype=np.int64)
    rank = np.empty((N, n), dtype=np.int64)
    rows = np.arange(N)
    inf = np.array(np.inf, dtype=weight.dtype)
    for t in range(n):
        item = order[:, t]
        p = np.argmin(np.where(count < cap, load, inf), axis=1)
        pack[rows, item] = p
        rank[rows, item] = count[rows, p]
        load[rows, p] += weight[rows, item]
        count[rows, p] += 1
    return pack, rank


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def replicate_to_target(
    weight: np.ndarray, num_phy: int, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`replicate_rows`, but each expert first gets ``ceil(w / target)`` replicas (``target [N]``
    per row; rows where that needs more than ``num_phy`` slots fall back to EPLB's counts), and the slots
    left go greedily to the most load per replica. Slots list each expert's replicas together."""
    N, E = weight.shape
    w = weight.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = w / np.where(target > 0, target, np.inf)[:, None]
    # clipped before the cast: a tiny target (or huge loads) never overflows int64; > num_phy falls back below
    base = np.maximum(
        1, np.ceil(np.minimum(np.nan_to_num(ratio, nan=0.0, posinf=num_phy + 1.0), num_phy + 1.0) - 1e-9)
    ).astype(np.int64)
    over = base.sum(axis=1) > num_phy
    base[over] = 1
    left = num_phy - base.sum(axis=1)
    K = int(left.max()) if left.size else 0
    cnt = base.copy()
    if K > 0:
        j = base[:, :, None] + np.arange(K)[None, None, :]  # count before each further replica
        flat = (w[:, :, None] / j).reshape(N, -1)
        order = np.argsort(-flat, axis=1, kind="stable")
        take = np.arange(E * K)[None, :] < left[:, None]
        e = order // K
        np.add.at(cnt, (np.broadcast_to(np.arange(N)[:, None], e.shape)[take], e[take]), 1)
    phy2log = np.stack([np.repeat(np.arange(E), c) for c in cnt])
    rank = np.arange(num_phy)[None, :] - np.take_along_axis(np.cumsum(cnt, axis=1) - cnt, phy2log, axis=1)
    return phy2log, rank, cnt


def eplb_plan(
    weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, theta: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's ``rebalance_experts_hierarchical`` on ``weight [L, E]``: ``(phy2log [L, R], phyrank [L, R],
    logcnt [L, E])``. ``num_groups = num_nodes = 1`` is the global policy.

    ``theta`` (not EPLB): replica counts from :func:`replicate_to_target` with target ``theta`` times the
    node's mean GPU load instead of EPLB's greedy (a different start for ``eplb+``)."""
    w = to_float32(weight)
    L, E = w.shape
    gsize = E // num_groups
    gpn = num_groups // num_nodes
    S = num_replicas // num_gpus
    # 1. pack groups to nodes
    tokens_per_group = w.reshape(L, num_groups, gsize).sum(axis=2, dtype=np.float32)
    gpack, grank = pack_rows(tokens_per_group, num_nodes)
    log2mlog = (((gpack * gpn + grank) * gsize)[:, :, None] + np.arange(gsize)).reshape(L, E)
    mlog2log = _inverse(log2mlog)
    # 2. replicate within nodes: rows are (layer, node)
    tokens_per_mlog = np.take_along_axis(w, mlog2log, axis=1).reshape(L * num_nodes, E // num_nodes)
    if theta is None:
        phy2mlog, phyrank, mlogcnt = replicate_rows(tokens_per_mlog, num_replicas // num_nodes)
    else:
        target = theta * tokens_per_mlog.astype(np.float64).sum(axis=1) / (num_gpus // num_nodes)
        phy2mlog, phyrank, mlogcnt = replicate_to_target(tokens_per_mlog, num_replicas // num_nodes, target)
    # 3. pack replicas to GPUs within each node
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack, rip = pack_rows(tokens_per_phy, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * S + rip)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(L, num_nodes, -1)
    pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * (E // num_nodes))[None, :, None]).reshape(L, -1)
    phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    rank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(L, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(L, -1), log2mlog, axis=1)
    return phy2log, rank, logcnt


def eplb_for(
    problem: ReplicationProblem, weight: np.ndarray | None = None, theta: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(``phy2log [L, R]``, ``log2phy [L, E, X]``) of EPLB on ``weight [L, E]`` (default: the problem's loads
    summed over its window) under the problem's groups, nodes and GPUs."""
    w = problem.summed_weight() if weight is None else weight
    phy2log, rank, _ = eplb_plan(
        w, problem.num_replicas, problem.num_groups, problem.num_nodes, problem.num_gpus, theta=theta
    )
    return phy2log, log2phy_from_phy2log(phy2log, problem.num_experts, order=rank)


@register(
    ReplicationProblem,
    "eplb",
    deterministic=True,
    description="DeepSeek EPLB (vectorised): replicate hot experts, pack replicas to GPUs; plans on the "
    "window's summed loads and ignores old plans",
    per_step=True,
)
def solve_eplb(problem: ReplicationProblem, *, time_limit: float | None = None) -> ReplicationSolution:
    """DeepSeek's EPLB; a window is planned on its summed loads; ``old_phy2log`` and ``max_moves`` are ignored
    (the shared check then reports a plan over the limit as infeasible)."""
    phy2log, log2phy = eplb_for(problem)
    policy = "hierarchical" if problem.num_groups % problem.num_nodes == 0 and problem.num_groups > 1 else "global"
    message = f"EPLB, {policy} policy"
    if problem.max_moves is not None:
        assert problem.old_phy2log is not None  # max_moves needs old_phy2log (ReplicationProblem checks)
        moves = count_moves(problem.old_phy2log, phy2log, problem.num_experts, problem.num_gpus)
        if moves.max() > problem.max_moves:
            message += (
                f"; EPLB ignores move budgets and its plan moves up to {int(moves.max())} replicas per "
                f"layer (max_moves={problem.max_moves}): {BUDGET_METHODS} honour the budget"
            )
    return ReplicationSolution(
        method="eplb",
        status=Status.FEASIBLE,
        assignment=phy2log,
        log2phy=log2phy,
        stats={"policy": policy},
        message=message,
    )


#: the replication methods that honour ``max_moves``
BUDGET_METHODS = "'eplb+', 'migrate', 'milp' and 'lp' (which keeps the old plan)"
