"""The one shared evaluator of placement plans: every method's makespan, per-device load and memory come from here.

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

from typing import Any, Iterable

import numpy as np

from .check import CheckResult

__all__ = [
    "check_placement",
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


def _foreign_mask(problem: Any) -> np.ndarray:
    E, P = problem.shape
    mask = np.ones((E, P), dtype=bool)
    mask[np.arange(E), problem.home] = False
    return mask


def device_times(problem: Any, assignment: Any) -> np.ndarray:
    """``[P]`` time of each device under ``problem.cost`` (see :class:`moebalance.CostModel`)."""
    x = as_assignment(problem, assignment).astype(np.float64)
    c = problem.cost
    used = x > 0
    foreign = _foreign_mask(problem)
    t = c.token_time * x.sum(axis=0) + c.gemm_time * used.sum(axis=0)
    if c.weight_time:
        t = t + c.weight_time * (used & foreign).sum(axis=0)
    if c.token_transfer_time:
        t = t + c.token_transfer_time * np.where(foreign, x, 0.0).sum(axis=0)
    return t


def makespan(problem: Any, assignment: Any) -> float:
    """The objective: the largest device time."""
    return float(device_times(problem, assignment).max())


def token_ranges(problem: Any, assignment: Any) -> dict[int, list[tuple[int, int, int]]]:
    """``{expert: [(device, start, end), ...]}`` tiling ``[0, load)`` of every expert with tokens.

    Canonical order: the home device first, then the other devices in increasing order. Needs a plan that
    conserves tokens (rows summing to the loads, no negative entry).
    """
    x = as_assignment(problem, assignment)
    home = problem.home
    out: dict[int, list[tuple[int, int, int]]] = {}
    rows, cols = np.nonzero(x)
    if rows.size == 0:
        return out
    vals = x[rows, cols]
    # home entries sort before the others of the same expert
    key = np.where(cols == home[rows], -1, cols)
    order = np.lexsort((key, rows))
    rows, cols, vals = rows[order].tolist(), cols[order].tolist(), vals[order].tolist()
    start = 0
    prev = -1
    for e, p, v in zip(rows, cols, vals):
        if e != prev:
            prev, start = e, 0
            ranges: list[tuple[int, int, int]] = []
            out[e] = ranges
        ranges.append((p, start, start + v))
        start += v
    return out


def weight_transfers(problem: Any, assignment: Any) -> list[tuple[int, int, int]]:
    """``[(expert, src, dst), ...]``: one weight copy per (expert, foreign device computing its tokens)."""
    x = as_assignment(problem, assignment)
    rows, cols = np.nonzero((x > 0) & _foreign_mask(problem))
    home = problem.home
    return [(e, int(home[e]), p) for e, p in zip(rows.tolist(), cols.tolist())]


def assignment_from_ranges(problem: Any, ranges: dict[int, Iterable[tuple[int, int, int]]]) -> np.ndarray:
    """``[E, P]`` token counts of a ``token_ranges`` dict (ranges of one expert on one device add up)."""
    E, P = problem.shape
    x = np.zeros((E, P), dtype=np.int64)
    for e, rs in ranges.items():
        for p, s, t in rs:
            x[int(e), int(p)] += int(t) - int(s)
    return x


def _check_ranges(problem: Any, x: np.ndarray, ranges: Any) -> list[str]:
    """Violations of a solver-supplied ``token_ranges``: each expert's ranges must tile [0, load) and match x."""
    E, P = problem.shape
    loads = problem.expert_loads
    bad: list[str] = []
    try:
        seen = set()
        for e, rs in ranges.items():
            e = int(e)
            if not 0 <= e < E:
                bad.append(f"token_ranges names expert {e} outside [0, {E})")
                continue
            seen.add(e)
            pos = 0
            for p, s, t in rs:
                if not (0 <= int(p) < P) or int(s) != pos or int(t) <= int(s):
                    bad.append(f"token_ranges of expert {e} do not tile [0, {loads[e]}) in order")
                    break
                pos = int(t)
            else:
                if pos != loads[e]:
                    bad.append(f"token_ranges of expert {e} cover {pos} tokens, load is {loads[e]}")
        missing = set(np.flatnonzero(loads > 0).tolist()) - seen
        if missing:
            bad.append(f"token_ranges miss {len(missing)} expert(s) with tokens (e.g. {min(missing)})")
        if not bad and not np.array_equal(assignment_from_ranges(problem, ranges), x):
            bad.append("token_ranges disagree with the assignment")
    except (TypeError, ValueError, AttributeError) as exc:
        bad.append(f"token_ranges malformed: {exc}")
    return bad


def check_placement(problem: Any, assignment: Any, token_ranges_hint: Any = None) -> CheckResult:
    """Check a plan against ``problem`` and evaluate it (the shared evaluator behind ``moebalance.check``).

    Constraints: integer, non-negative, tokens conserved per expert, ``max_tokens_per_device`` and
    ``max_foreign_experts``. ``objective`` is the makespan under ``problem.cost``; ``load_ratio`` is max / mean
    device time. ``extras`` holds ``device_loads`` ``[P]``, ``token_ranges`` and ``weight_transfers``.
    ``token_ranges_hint``, a solver's own order of ranges, is kept when it tiles every expert's tokens and
    matches the assignment (else it is a violation).
    """
    loads = problem.expert_loads
    try:
        x = as_assignment(problem, assignment)
    except ValueError as exc:
        return CheckResult(False, float("nan"), loads, float("nan"), [str(exc)])
    violations: list[str] = []
    if x.size and x.min() < 0:
        violations.append(f"{int(np.count_nonzero(x < 0))} negative token count(s)")
    rows = x.sum(axis=1)
    if not np.array_equal(rows, loads):
        e = int(np.flatnonzero(rows != loads)[0])
        violations.append(f"{int(np.count_nonzero(rows != loads))} expert(s) not conserved (e.g. expert {e}: "
                          f"{int(rows[e])} tokens placed, load {int(loads[e])})")
    dev_loads = x.sum(axis=0)
    C = problem.max_tokens_per_device
    if C is not None and dev_loads.max() > C:
        p = int(np.argmax(dev_loads))
        violations.append(f"{int(np.count_nonzero(dev_loads > C))} device(s) over max_tokens_per_device={C} "
                          f"(worst: device {p} computes {int(dev_loads[p])})")
    F = problem.max_foreign_experts
    if F is not None:
        nf = ((x > 0) & _foreign_mask(problem)).sum(axis=0)
        if nf.max() > F:
            p = int(np.argmax(nf))
            violations.append(f"{int(np.count_nonzero(nf > F))} device(s) over max_foreign_experts={F} "
                              f"(worst: device {p} hosts {int(nf[p])})")
    times = device_times(problem, x)
    mean = times.mean()
    ratio = float(times.max() / mean) if mean > 0 else 1.0
    extras: dict[str, Any] = {"device_loads": dev_loads, "weight_transfers": weight_transfers(problem, x)}
    if not violations:
        if token_ranges_hint is not None:
            bad = _check_ranges(problem, x, token_ranges_hint)
            violations += bad
            if not bad:
                extras["token_ranges"] = {int(e): [tuple(int(v) for v in r) for r in rs]
                                          for e, rs in token_ranges_hint.items()}
        if "token_ranges" not in extras and not violations:
            extras["token_ranges"] = token_ranges(problem, x)
    return CheckResult(not violations, float(times.max()), loads, ratio, violations, extras)


# memory --------------------------------------------------------------------------------------------------
def expert_weight_bytes(hidden: int, ffn: int, dtype_bytes: float) -> float:
    """Bytes of one SwiGLU expert's weights (gate, up, down: ``3 * hidden * ffn``)."""
    return 3.0 * hidden * ffn * dtype_bytes


def activation_bytes_per_token(hidden: int, ffn: int, dtype_bytes: float) -> float:
    """Bytes live per token inside an expert MLP: input and output rows, gate/up ``[2 * ffn]`` and the
    activated ``[ffn]`` (``(2 * hidden + 3 * ffn) * dtype_bytes``)."""
    return (2.0 * hidden + 3.0 * ffn) * dtype_bytes


def peak_memory(problem: Any, assignment: Any, *, hidden: int, ffn: int, dtype_bytes: float = 2.0,
                act_bytes_per_token: float | None = None) -> np.ndarray:
    """``[P]`` bytes per device: weights of its home experts and of the foreign experts it computes, plus the
    activations of every token it computes (``activation_bytes_per_token`` unless given)."""
    x = as_assignment(problem, assignment)
    E, P = problem.shape
    w = expert_weight_bytes(hidden, ffn, dtype_bytes)
    a = activation_bytes_per_token(hidden, ffn, dtype_bytes) if act_bytes_per_token is None else act_bytes_per_token
    n_home = np.bincount(problem.home, minlength=P)
    n_foreign = ((x > 0) & _foreign_mask(problem)).sum(axis=0)
    return (n_home + n_foreign) * w + x.sum(axis=0) * a
