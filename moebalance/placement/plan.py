"""What a placement plan implies: device times, token ranges, weight transfers and memory (the check builds on it).

A plan is an assignment ``x`` ``[E, P]`` of token counts (``x[e, p]`` tokens of expert ``e`` computed on device
``p``). From it this module derives:

- ``device_times`` ``[P]``: the cost model's time per device; the objective is their maximum (the makespan);
- ``device_loads`` ``[P]``: tokens computed per device;
- ``token_ranges`` ``{expert: [(device, start, end), ...]}``: which contiguous slice of an expert's tokens
  (numbered 0..load-1 in routing order) each device computes; the home device first, then the helpers in
  increasing device order, unless a solver supplied its own order;
- ``weight_transfers`` ``[(expert, src, dst), ...]``: a copy of expert ``e``'s weights from its home ``src``
  to every other device ``dst`` that computes some of its tokens;
- ``peak_memory`` ``[P]``: bytes of expert weights plus activations of the tokens each device computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

__all__ = [
    "TokenRanges",
    "as_assignment",
    "device_times",
    "makespan",
    "token_ranges",
    "weight_transfers",
    "assignment_from_ranges",
    "peak_memory",
    "expert_weight_bytes",
    "activation_bytes_per_token",
]


def as_assignment(problem: Any, assignment: Any) -> np.ndarray:
    """``assignment`` as an int64 ``[E, P]`` array; ValueError when it has another shape or non-integer values."""
    E, P = problem.shape
    try:
        a = np.asarray(assignment)
    except Exception as exc:
        raise ValueError(f"`assignment` must be an integer array of shape ({E}, {P}): {exc}") from None
    if a.shape != (E, P) or a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"`assignment` must be an integer array of shape ({E}, {P}), got {a.dtype} {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ValueError("`assignment` must be finite")
        r = np.round(a)
        if not np.all(np.abs(a - r) <= 1e-9 * np.maximum(1.0, np.abs(a))):
            raise ValueError("`assignment` must hold integer token counts, got fractional values")
        a = r
    return a.astype(np.int64)


def _is_plain_plan(a: Any, shape: tuple[int, int]) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.int64 and a.shape == shape


def _foreign_mask(problem: Any) -> np.ndarray:
    """``[E, P]`` True where device p is not expert e's home (cached on the immutable problem, read-only)."""
    mask = getattr(problem, "_foreign_mask_cache", None)
    if mask is None:
        E, P = problem.shape
        mask = np.ones((E, P), dtype=bool)
        mask[np.arange(E), problem.home] = False
        mask.setflags(write=False)
        try:
            object.__setattr__(problem, "_foreign_mask_cache", mask)
        except AttributeError:
            pass
    return mask


class TokenRanges(Mapping):
    """Which contiguous slice of each expert's tokens each device computes, stored as four ``[n]`` arrays.

    ``expert``, ``device``, ``start``, ``end`` (int64), grouped by expert in increasing expert order, the ranges of
    one expert in token order. It reads as the mapping ``{expert: [(device, start, end), ...]}`` (experts with
    no tokens are absent), so code written for a dict works; building, checking and converting it are
    vectorised (``from_assignment``, ``validate``, ``counts``), which keeps the shared check linear in ``E * P``.
    """

    __slots__ = ("expert", "device", "start", "end", "_bounds", "_counts")

    def __init__(self, expert: Any, device: Any, start: Any, end: Any):
        self.expert = np.asarray(expert, dtype=np.int64)
        self.device = np.asarray(device, dtype=np.int64)
        self.start = np.asarray(start, dtype=np.int64)
        self.end = np.asarray(end, dtype=np.int64)
        self._bounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._counts: np.ndarray | None = None

    @classmethod
    def from_assignment(cls, x: np.ndarray, home: np.ndarray, overrides: Mapping | None = None) -> TokenRanges:
        """Canonical ranges of a conserving plan ``x`` ``[E, P]``: the home device first, then the others in
        increasing device order. ``overrides`` (``{expert: [(device, start, end), ...]}``) replaces the ranges of
        a few experts (a solver's own order); the result is validated by the check, not here."""
        rows, cols = np.nonzero(x)
        vals = x[rows, cols]
        if overrides:
            keep = ~np.isin(rows, np.fromiter(overrides.keys(), dtype=np.int64, count=len(overrides)))
            rows, cols, vals = rows[keep], cols[keep], vals[keep]
            extra = [(int(e), int(p), int(a), int(b)) for e, rs in overrides.items() for p, a, b in rs]
        else:
            extra = []
        key = np.where(cols == home[rows], -1, cols)
        order = np.lexsort((key, rows))
        rows, cols, vals = rows[order], cols[order], vals[order]
        ends = np.cumsum(vals)
        first = np.ones(rows.shape[0], dtype=bool)
        first[1:] = rows[1:] != rows[:-1]
        group_start = np.maximum.accumulate(np.where(first, np.arange(rows.shape[0]), 0)) if rows.size else rows
        base = (ends - vals)[group_start] if rows.size else ends
        start, end = ends - vals - base, ends - base
        if not extra:
            return cls(rows, cols, start, end)
        ex = np.asarray(extra, dtype=np.int64).reshape(-1, 4)
        e_all = np.concatenate([rows, ex[:, 0]])
        d_all = np.concatenate([cols, ex[:, 1]])
        s_all = np.concatenate([start, ex[:, 2]])
        t_all = np.concatenate([end, ex[:, 3]])
        o = np.lexsort((s_all, e_all))
        return cls(e_all[o], d_all[o], s_all[o], t_all[o])

    @classmethod
    def from_home(cls, loads: np.ndarray, home: np.ndarray, overrides: Mapping | None = None) -> TokenRanges:
        """Every expert with tokens computed whole on its home device, except the experts in ``overrides``
        (``{expert: [(device, start, end), ...]}``, e.g. the few a planner spilled), in O(E + ranges)."""
        loads = np.asarray(loads, dtype=np.int64)
        keep = loads > 0
        if overrides:
            keys = np.fromiter(overrides.keys(), dtype=np.int64, count=len(overrides))
            keep[keys] = False
            ex = np.asarray(
                [(int(e), int(p), int(a), int(b)) for e, rs in overrides.items() for p, a, b in rs], dtype=np.int64
            ).reshape(-1, 4)
        else:
            ex = np.zeros((0, 4), dtype=np.int64)
        e0 = np.flatnonzero(keep)
        e_all = np.concatenate([e0, ex[:, 0]])
        d_all = np.concatenate([np.asarray(home, dtype=np.int64)[e0], ex[:, 1]])
        s_all = np.concatenate([np.zeros_like(e0), ex[:, 2]])
        t_all = np.concatenate([loads[e0], ex[:, 3]])
        if ex.shape[0]:
            o = np.lexsort((s_all, e_all))
            e_all, d_all, s_all, t_all = e_all[o], d_all[o], s_all[o], t_all[o]
        return cls(e_all, d_all, s_all, t_all)

    @classmethod
    def from_dict(cls, ranges: Any) -> TokenRanges:
        """From ``{expert: [(device, start, end), ...]}`` (an existing TokenRanges is returned as is)."""
        if isinstance(ranges, TokenRanges):
            return ranges
        flat = [(int(e), int(p), int(a), int(b)) for e, rs in ranges.items() for p, a, b in rs]
        arr = np.asarray(flat, dtype=np.int64).reshape(-1, 4)
        o = np.lexsort((np.arange(arr.shape[0]), arr[:, 0]))  # stable by expert, keeping each expert's order
        arr = arr[o]
        return cls(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3])

    def counts(self, num_experts: int, num_devices: int) -> np.ndarray:
        """``[E, P]`` tokens per (expert, device) the ranges cover (an assignment; read-only, computed once)."""
        c = self._counts
        if c is None or c.shape != (num_experts, num_devices):
            c = np.zeros(num_experts * num_devices, dtype=np.int64)
            np.add.at(c, self.expert * num_devices + self.device, self.end - self.start)
            c = c.reshape(num_experts, num_devices)
            c.setflags(write=False)
            self._counts = c
        return c

    def validate(self, x: np.ndarray, loads: np.ndarray) -> list[str]:
        """Violations: each expert's ranges must tile ``[0, load)`` in order on valid devices and match ``x``."""
        E, P = x.shape
        e, d, s, t = self.expert, self.device, self.start, self.end
        n = e.shape[0]
        if n == 0:
            return (
                [] if not loads.any() else [f"token_ranges miss {int(np.count_nonzero(loads))} expert(s) with tokens"]
            )
        if e.min() < 0 or e.max() >= E:
            return [f"token_ranges name an expert outside [0, {E})"]
        if d.min() < 0 or d.max() >= P:
            return [f"token_ranges name a device outside [0, {P})"]
        bad: list[str] = []
        first = np.ones(n, dtype=bool)
        first[1:] = e[1:] != e[:-1]
        last = np.ones(n, dtype=bool)
        last[:-1] = first[1:]
        if (e[1:] < e[:-1]).any():
            bad.append("token_ranges are not grouped by expert")
        expected = np.concatenate(([0], t[:-1]))  # each range starts where the last one of its expert ended
        expected[first] = 0
        if (t <= s).any() or (s != expected).any():
            bad.append("token_ranges do not tile each expert's tokens in order")
        covered = np.zeros(E, dtype=np.int64)
        covered[e[last]] = t[last]
        if not np.array_equal(covered, loads):
            k = int(np.flatnonzero(covered != loads)[0])
            bad.append(f"token_ranges cover {int(covered[k])} tokens of expert {k}, its load is {int(loads[k])}")
        # an assignment that is this object's own (read-only) counts equals them by construction
        if not bad and x is not self._counts and not np.array_equal(self.counts(E, P), x):
            bad.append("token_ranges disagree with the assignment")
        return bad

    # the mapping view -----------------------------------------------------------------------------------------
    def _index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._bounds is None:
            e = self.expert
            first = np.ones(e.shape[0], dtype=bool)
            first[1:] = e[1:] != e[:-1]
            starts = np.flatnonzero(first)
            stops = np.append(starts[1:], e.shape[0])
            self._bounds = (e[starts], starts, stops)
        return self._bounds

    def __getitem__(self, expert: Any) -> list[tuple[int, int, int]]:
        keys, starts, stops = self._index()
        i = int(np.searchsorted(keys, int(expert)))
        if i >= keys.shape[0] or keys[i] != int(expert):
            raise KeyError(expert)
        a, b = starts[i], stops[i]
        return list(zip(self.device[a:b].tolist(), self.start[a:b].tolist(), self.end[a:b].tolist()))

    def __iter__(self) -> Iterator[int]:
        return iter(self._index()[0].tolist())

    def __len__(self) -> int:
        return int(self._index()[0].shape[0])

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, TokenRanges):
            return all(
                np.array_equal(getattr(self, f), getattr(other, f)) for f in ("expert", "device", "start", "end")
            )
        if isinstance(other, Mapping):
            return dict(self.items()) == {int(k): [tuple(r) for r in v] for k, v in other.items()}
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if self.expert.shape[0] <= 32:  # small: the mapping itself
            return f"TokenRanges({dict(self.items())})"
        return f"TokenRanges({len(self)} experts, {self.expert.shape[0]} ranges)"


def device_times(problem: Any, assignment: Any) -> np.ndarray:
    """``[P]`` time of each device under ``problem.cost`` (see :class:`moebalance.CostModel`)."""
    return _device_times(problem, as_assignment(problem, assignment))


def _device_times(
    problem: Any, x: np.ndarray, used: np.ndarray | None = None, used_foreign: np.ndarray | None = None
) -> np.ndarray:
    c = problem.cost
    if used is None:
        used = x > 0
    t = c.token_time * x.sum(axis=0, dtype=np.float64)
    if c.gemm_time:
        t = t + c.gemm_time * used.sum(axis=0)
    if c.weight_time:
        if used_foreign is None:
            used_foreign = used & _foreign_mask(problem)
        t = t + c.weight_time * used_foreign.sum(axis=0)
    if c.token_transfer_time:
        t = t + c.token_transfer_time * np.where(_foreign_mask(problem), x, 0).sum(axis=0, dtype=np.float64)
    return t


def makespan(problem: Any, assignment: Any) -> float:
    """The objective: the largest device time."""
    return float(device_times(problem, assignment).max())


def token_ranges(problem: Any, assignment: Any) -> TokenRanges:
    """:class:`TokenRanges` tiling ``[0, load)`` of every expert with tokens (reads as
    ``{expert: [(device, start, end), ...]}``).

    Canonical order: the home device first, then the other devices in increasing order. Needs a plan that
    conserves tokens (rows summing to the loads, no negative entry).
    """
    return TokenRanges.from_assignment(as_assignment(problem, assignment), problem.home)


def weight_transfers(problem: Any, assignment: Any) -> list[tuple[int, int, int]]:
    """``[(expert, src, dst), ...]``: one weight copy per (expert, foreign device computing its tokens)."""
    x = as_assignment(problem, assignment)
    return _weight_transfers(problem, (x > 0) & _foreign_mask(problem))


def _weight_transfers(problem: Any, used_foreign: np.ndarray) -> list[tuple[int, int, int]]:
    rows, cols = np.nonzero(used_foreign)
    return list(zip(rows.tolist(), problem.home[rows].tolist(), cols.tolist()))


def assignment_from_ranges(problem: Any, ranges: dict[int, Iterable[tuple[int, int, int]]]) -> np.ndarray:
    """``[E, P]`` token counts of a ``token_ranges`` dict (ranges of one expert on one device add up)."""
    E, P = problem.shape
    x = np.zeros((E, P), dtype=np.int64)
    for e, rs in ranges.items():
        for p, s, t in rs:
            x[int(e), int(p)] += int(t) - int(s)
    return x


# memory --------------------------------------------------------------------------------------------------
def expert_weight_bytes(hidden: int, ffn: int, dtype_bytes: float) -> float:
    """Bytes of one SwiGLU expert's weights (gate, up, down: ``3 * hidden * ffn``)."""
    return 3.0 * hidden * ffn * dtype_bytes


def activation_bytes_per_token(hidden: int, ffn: int, dtype_bytes: float) -> float:
    """Bytes live per token inside an expert MLP: input and output rows, gate/up ``[2 * ffn]`` and the
    activated ``[ffn]`` (``(2 * hidden + 3 * ffn) * dtype_bytes``)."""
    return (2.0 * hidden + 3.0 * ffn) * dtype_bytes


def peak_memory(
    problem: Any,
    assignment: Any,
    *,
    hidden: int,
    ffn: int,
    dtype_bytes: float = 2.0,
    act_bytes_per_token: float | None = None,
) -> np.ndarray:
    """``[P]`` bytes per device: weights of its home experts and of the foreign experts it computes, plus the
    activations of every token it computes (``activation_bytes_per_token`` unless given)."""
    x = as_assignment(problem, assignment)
    E, P = problem.shape
    w = expert_weight_bytes(hidden, ffn, dtype_bytes)
    a = activation_bytes_per_token(hidden, ffn, dtype_bytes) if act_bytes_per_token is None else act_bytes_per_token
    n_home = np.bincount(problem.home, minlength=P)
    n_foreign = ((x > 0) & _foreign_mask(problem)).sum(axis=0)
    return (n_home + n_foreign) * w + x.sum(axis=0) * a
