"""The LLEP authors' planning loop, transcribed: the test oracle of ``llep`` (arXiv 2601.17111, Algorithms 2-4).

Reference: SalesforceAIResearch/LeastLoadedEP, ``llep/gpt_oss_llep.py`` (``compute_llep_lpt_plan``); the rules are
listed in :mod:`moebalance.solvers.placement_llep`, whose fast planners must equal this loop range for range.
"""

from __future__ import annotations

from typing import Any

from moebalance.solvers._llep_plan import LLEPPlan, _ep_plan, llep_uses_ep

__all__ = ["llep_plan_reference"]


def llep_plan_reference(
    expert_loads: Any,
    num_devices: int,
    home: Any = None,
    *,
    alpha: float = 1.0,
    min_chunk: int = 1024,
    imbalance_threshold: float | None = None,
) -> LLEPPlan:
    """A direct, pure-Python transcription of the paper's loop (the reference code's control flow).

    Slow on purpose: every spilled chunk rebuilds and sorts the list of other devices. The oracle the tests hold
    :func:`~moebalance.solvers.placement_llep.llep_plan` and :class:`~moebalance.solvers.placement_llep.LLEPPlanner`
    to (range for range), and the baseline in ``benchmarks/placement.py`` and ``benchmarks/hot_path.py``.
    """
    loads = [int(v) for v in expert_loads]
    E = len(loads)
    P = int(num_devices)
    homes = [e // (E // P) for e in range(E)] if home is None else [int(h) for h in home]
    total = sum(loads)
    balanced = total // P if P > 0 else total
    cap = int(alpha * balanced) if balanced > 0 else total
    cap = max(cap, 1)
    native = [0] * P
    for e in range(E):
        native[homes[e]] += loads[e]
    if llep_uses_ep(native, imbalance_threshold):
        return _ep_plan(loads, homes, P, cap)
    pending = list(native)
    assigned = [0] * P
    ranges: dict[int, list[tuple[int, int, int]]] = {}
    transfers: list[tuple[int, int, int]] = []

    def others_by_load(n: int) -> list[tuple[int, int, int]]:
        rows = [(g, assigned[g] + pending[g], cap - assigned[g] - pending[g]) for g in range(P) if g != n]
        return sorted(rows, key=lambda r: r[1])

    for e, L in sorted(enumerate(loads), key=lambda t: -t[1]):
        if L == 0:
            continue
        n = homes[e]
        pending[n] -= L
        room = cap - (assigned[n] + pending[n])
        rs: list[tuple[int, int, int]] = []
        if room >= L:  # case 1
            rs.append((n, 0, L))
            assigned[n] += L
        elif room > 0:  # case 2
            rs.append((n, 0, room))
            assigned[n] += room
            rem, off = L - room, room
            while rem > 0:
                cand = others_by_load(n)
                if not cand:
                    rs[0] = (n, 0, rs[0][2] + rem)
                    assigned[n] += rem
                    break
                done = False
                for g, _, avail in cand:
                    if avail <= 0:
                        continue
                    chunk = min(rem, avail)
                    if chunk < min_chunk and rem > chunk:
                        continue
                    rs.append((g, off, off + chunk))
                    assigned[g] += chunk
                    transfers.append((e, n, g))
                    off += chunk
                    rem -= chunk
                    done = True
                    break
                if not done:
                    g = cand[0][0]
                    rs.append((g, off, off + rem))
                    assigned[g] += rem
                    transfers.append((e, n, g))
                    rem = 0
        else:  # case 3
            cand = others_by_load(n)
            rem, off = L, 0
            for g, _, avail in cand:
                if rem <= 0:
                    break
                if avail <= 0:
                    continue
                chunk = min(rem, avail)
                if chunk < min_chunk and rem > chunk:
                    continue
                rs.append((g, off, off + chunk))
                assigned[g] += chunk
                transfers.append((e, n, g))
                off += chunk
                rem -= chunk
            if rem > 0:
                if cand:
                    g = cand[0][0]
                    rs.append((g, off, off + rem))
                    assigned[g] += rem
                    transfers.append((e, n, g))
                else:
                    rs.append((n, 0, L))
                    assigned[n] += L
        ranges[e] = rs
    return LLEPPlan(ranges, transfers, assigned, cap, False)
