"""The placement family's shared check: every method's makespan, per-device load and constraints come from here."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..solution import Evaluation
from .plan import TokenRanges, _device_times, _foreign_mask, _is_plain_plan, _weight_transfers, as_assignment

__all__ = ["check_placement"]


def _check_ranges(problem: Any, x: np.ndarray, ranges: Any) -> tuple[TokenRanges | None, list[str]]:
    """A solver-supplied ``token_ranges`` as :class:`TokenRanges`, and its violations (each expert's ranges
    must tile [0, load) in order and match x)."""
    try:
        tr = TokenRanges.from_dict(ranges)
    except (TypeError, ValueError, AttributeError) as exc:
        return None, [f"token_ranges malformed: {exc}"]
    return tr, tr.validate(x, problem.expert_loads)


def check_placement(problem: Any, assignment: Any, token_ranges_hint: Any = None) -> Evaluation:
    """Check a plan against ``problem`` and evaluate it (the shared evaluator behind ``moebalance.check``).

    Constraints: integer, non-negative, tokens conserved per expert, ``max_tokens_per_device`` and
    ``max_foreign_experts``. ``objective`` is the makespan under ``problem.cost``; ``load_ratio`` is max / mean
    device time. ``extras`` holds ``device_loads`` ``[P]``, ``token_ranges`` and ``weight_transfers``.
    ``token_ranges_hint``, a solver's own order of ranges, is kept when it tiles every expert's tokens and
    matches the assignment (else it is a violation).
    """
    loads = problem.expert_loads
    try:
        x = assignment if _is_plain_plan(assignment, problem.shape) else as_assignment(problem, assignment)
    except ValueError as exc:
        return Evaluation(False, float("nan"), [str(exc)], {"loads": loads})
    if token_ranges_hint is not None:
        tr, bad = _check_ranges(problem, x, token_ranges_hint)
        if tr is not None and not bad:
            return _check_by_ranges(problem, x, tr)
    violations: list[str] = []
    if x.size and x.min() < 0:
        violations.append(f"{int(np.count_nonzero(x < 0))} negative token count(s)")
    rows = x.sum(axis=1)
    if not np.array_equal(rows, loads):
        e = int(np.flatnonzero(rows != loads)[0])
        violations.append(
            f"{int(np.count_nonzero(rows != loads))} expert(s) not conserved (e.g. expert {e}: "
            f"{int(rows[e])} tokens placed, load {int(loads[e])})"
        )
    dev_loads = x.sum(axis=0)
    C = problem.max_tokens_per_device
    if C is not None and dev_loads.max() > C:
        p = int(np.argmax(dev_loads))
        violations.append(
            f"{int(np.count_nonzero(dev_loads > C))} device(s) over max_tokens_per_device={C} "
            f"(worst: device {p} computes {int(dev_loads[p])})"
        )
    used = x > 0
    used_foreign = used & _foreign_mask(problem)
    F = problem.max_foreign_experts
    if F is not None:
        nf = used_foreign.sum(axis=0)
        if nf.max() > F:
            p = int(np.argmax(nf))
            violations.append(
                f"{int(np.count_nonzero(nf > F))} device(s) over max_foreign_experts={F} "
                f"(worst: device {p} hosts {int(nf[p])})"
            )
    times = _device_times(problem, x, used, used_foreign)
    mean = times.mean()
    ratio = float(times.max() / mean) if mean > 0 else 1.0
    extras: dict[str, Any] = {"device_loads": dev_loads, "weight_transfers": _weight_transfers(problem, used_foreign)}
    if not violations:
        if token_ranges_hint is not None:
            tr, bad = _check_ranges(problem, x, token_ranges_hint)
            violations += bad
            if not bad:
                extras["token_ranges"] = tr
        if "token_ranges" not in extras and not violations:
            extras["token_ranges"] = TokenRanges.from_assignment(x, problem.home)
    return Evaluation(not violations, float(times.max()), violations, {"loads": loads, **extras}, ratio)


def _check_by_ranges(problem: Any, x: np.ndarray, tr: TokenRanges) -> Evaluation:
    """The check of a plan ``x`` whose ranges ``tr`` were validated against it (they tile every expert's load
    and sum to ``x``, so ``x`` is non-negative and conserves tokens): the rest is derived from the ranges in
    O(ranges), with no pass over the dense ``[E, P]`` plan."""
    E, P = problem.shape
    loads = problem.expert_loads
    c = problem.cost
    violations: list[str] = []
    dev_loads = np.bincount(tr.device, weights=tr.end - tr.start, minlength=P).astype(np.int64)
    pairs = np.sort(tr.expert * P + tr.device)
    if pairs.shape[0] > 1:
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
    pe, pd = pairs // P, pairs % P
    foreign = problem.home[pe] != pd
    n_used = np.bincount(pd, minlength=P)
    n_foreign = np.bincount(pd[foreign], minlength=P)
    C = problem.max_tokens_per_device
    if C is not None and dev_loads.max() > C:
        p = int(np.argmax(dev_loads))
        violations.append(
            f"{int(np.count_nonzero(dev_loads > C))} device(s) over max_tokens_per_device={C} "
            f"(worst: device {p} computes {int(dev_loads[p])})"
        )
    F = problem.max_foreign_experts
    if F is not None and n_foreign.max() > F:
        p = int(np.argmax(n_foreign))
        violations.append(
            f"{int(np.count_nonzero(n_foreign > F))} device(s) over max_foreign_experts={F} "
            f"(worst: device {p} hosts {int(n_foreign[p])})"
        )
    times = c.token_time * dev_loads.astype(np.float64)
    if c.gemm_time:
        times = times + c.gemm_time * n_used
    if c.weight_time:
        times = times + c.weight_time * n_foreign
    if c.token_transfer_time:
        fr = problem.home[tr.expert] != tr.device
        times = times + c.token_transfer_time * np.bincount(tr.device[fr], weights=(tr.end - tr.start)[fr], minlength=P)
    mean = float(times.sum()) / P
    top = float(times.max())
    ratio = top / mean if mean > 0 else 1.0
    fe, fd = pe[foreign], pd[foreign]
    transfers = list(zip(fe.tolist(), problem.home[fe].tolist(), fd.tolist()))
    fields = {"loads": loads, "device_loads": dev_loads, "weight_transfers": transfers}
    if not violations:
        fields["token_ranges"] = tr
    return Evaluation(not violations, top, violations, fields, ratio)
