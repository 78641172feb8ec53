"""Demo part: the placement problem on a recorded DeepSeek-V3 layer, every method with its gap."""

from __future__ import annotations

from typing import Callable

__all__ = ["run"]


def run(quick: bool, section: Callable[[str], None]) -> None:
    import numpy as np

    from .compare import compare
    from .placement import PlacementProblem
    from .registry import available_methods
    from .simulate import DEFAULT_ROUTING_DIR, real_layers

    P = 8
    try:
        model, layers = real_layers("deepseek-v3", DEFAULT_ROUTING_DIR)
        name, loads = max(layers, key=lambda nl: nl[1].max() / nl[1].mean())  # the most imbalanced layer
        source = f"DeepSeek-V3 {name} (recorded, {DEFAULT_ROUTING_DIR})"
    except ValueError as exc:  # the shared data folder is not beside this checkout
        rng = np.random.default_rng(0)
        loads = rng.zipf(1.6, 256).clip(max=2000) * 64
        source = f"synthetic Zipf loads ({exc})"
    section(f"Placement on {P} devices: {len(loads)} experts, {int(loads.sum())} token-expert pairs")
    print(f"loads: {source}")
    problem = PlacementProblem(loads, P)
    methods = [m for m in available_methods(problem) if not (quick and m in ("milp", "lp-cvxpy"))]
    table = compare(problem, methods, time_limit=10.0)
    print(table)
    ep = next(s for s in table.solutions if s.method == "ep")
    for s in table.solutions:
        if s.method in ("llep", "llep+", "eplb") and s.feasible:
            print(f"{s.method:6s} makespan {s.objective:.0f} tokens vs ep {ep.objective:.0f}: "
                  f"{ep.objective / s.objective:.2f}x faster, {len(s.weight_transfers or [])} expert copies")
