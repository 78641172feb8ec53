"""The replication family's shared check: feasibility, objective and mapping tables of a plan ``phy2log``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..solution import Evaluation
from .tables import _counts, count_moves, gpu_loads, log2phy_from_phy2log

if TYPE_CHECKING:
    from .problem import ReplicationProblem

__all__ = ["check_replication"]


def check_replication(problem: ReplicationProblem, assignment: Any, solution: Any = None) -> Evaluation:
    """The shared check of ``phy2log [L, R]``: shape and ids, every expert replicated, the group/node
    constraint, the migration limit; objective and fields recomputed from the data alone."""
    B, L, E = problem.shape
    R, G = problem.num_replicas, problem.num_gpus
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
        return Evaluation(False, float("nan"), [f"expert ids must lie in [0, {E}), got range [{a.min()}, {a.max()}]"])
    violations: list[str] = []
    cnt = _counts(a, E)
    missing = int(np.count_nonzero(cnt == 0))
    if missing:
        violations.append(f"{missing} (layer, expert) pair(s) without a replica")
    if problem.hierarchical:
        S = R // G
        node = np.arange(R) // (S * (G // problem.num_nodes))
        group = a // (E // problem.num_groups)
        # each (layer, group) must see a single node: min node == max node
        key = (np.arange(L)[:, None] * problem.num_groups + group).ravel()
        nodes = np.broadcast_to(node, (L, R)).ravel()
        lo = np.full(L * problem.num_groups, problem.num_nodes, dtype=np.int64)
        hi = np.full(L * problem.num_groups, -1, dtype=np.int64)
        np.minimum.at(lo, key, nodes)
        np.maximum.at(hi, key, nodes)
        split = int(np.count_nonzero((hi >= 0) & (lo != hi)))
        if split:
            violations.append(f"{split} (layer, group) pair(s) spread over more than one node")
    moves = None
    if problem.old_phy2log is not None:
        moves = count_moves(problem.old_phy2log, a, E, G)
        if problem.max_moves is not None and moves.max() > problem.max_moves:
            violations.append(
                f"{int(np.count_nonzero(moves > problem.max_moves))} layer(s) move more than "
                f"max_moves={problem.max_moves} replicas (worst {int(moves.max())})"
            )
    loads = gpu_loads(problem.weight, a, G)  # [B, L, G]
    objective = float(loads.max(axis=2).sum(axis=1).mean())
    mean = loads.mean(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mean > 0, loads.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)
    fields = {
        "phy2log": a,
        "log2phy": _log2phy(problem, a, cnt, solution),
        "logcnt": cnt,
        "gpu_loads": loads.mean(axis=0),
        "moves": moves,
    }
    return Evaluation(not violations, objective, violations, fields, float(ratio.max()))


def _log2phy(problem: ReplicationProblem, a: np.ndarray, cnt: np.ndarray, solution: Any) -> np.ndarray:
    """A solver's own ``log2phy`` when it lists exactly each expert's slots, else the slots in increasing order."""
    hint = getattr(solution, "log2phy", None)
    E = problem.num_experts
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
