"""Demo part: the placement problem on a recorded DeepSeek-V3 layer, every method with its gap."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["run"]


def run(quick: bool, section: Callable[[str], None]) -> None:
    import numpy as np

    from moebalance.comparison import compare
    from moebalance.placement import PlacementProblem
    from moebalance.registry import available_methods

    from .simulate import DEFAULT_ROUTING_DIR, MODELS, Hardware, _spread, real_layers

    P, tokens_per_device = 8, 16384
    model = MODELS["deepseek-v3"]
    try:
        _, layers = real_layers("deepseek-v3", DEFAULT_ROUTING_DIR)
        name, loads = max(layers, key=lambda nl: nl[1].max() / nl[1].mean())  # the most imbalanced layer
        source = f"DeepSeek-V3 {name} (recorded, {DEFAULT_ROUTING_DIR})"
    except ValueError as exc:  # the shared data folder is not beside this checkout
        rng = np.random.default_rng(0)
        loads = rng.zipf(1.6, 256).clip(max=2000) * 64
        source = f"synthetic Zipf loads ({exc})"
    # one step: the recorded shares scaled to P devices x tokens_per_device tokens x k experts each
    loads = _spread(P * tokens_per_device * model.k, loads)
    cost = Hardware().cost(model)
    section(f"Placement on {P} devices: {len(loads)} experts, {int(loads.sum())} token-expert pairs in one step")
    print(
        f"loads: {source}\ncost model: DeepSeek-V3 expert shapes on assumed H200-class numbers (not measured): {cost}"
    )
    problem = PlacementProblem(loads, P, cost=cost)
    methods = [m for m in available_methods(problem) if not (quick and m in ("milp", "lp-cvxpy"))]
    # the MILP of 256 experts on 8 devices does not close its gap in minutes: a short limit, and what it cost
    limit = 5.0
    table = compare(problem, methods, time_limit=limit)
    print(table)
    from .demo import limited_rows

    for line in limited_rows(table, limit):
        print(line)
    ep = next(s for s in table.solutions if s.method == "ep")
    for s in table.solutions:
        if s.method in ("llep", "llep+", "eplb") and s.feasible and isinstance(s, problem.solution_type):
            print(
                f"{s.method:6s} makespan {1e3 * s.objective:.3f} ms vs ep {1e3 * ep.objective:.3f} ms: "
                f"{ep.objective / s.objective:.2f}x faster, {len(s.weight_transfers or [])} expert copies"
            )
