"""``moebalance demo``: the library end to end on skewed instances, in about a minute on a laptop CPU."""

from __future__ import annotations

import importlib.util

import numpy as np

__all__ = ["run_demo"]


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)))


def _routing(quick: bool) -> None:
    from moebalance.comparison import compare
    from moebalance.generate import routing_problem
    from moebalance.registry import available_methods, solve

    T, E, k = (512, 16, 2) if quick else (2048, 64, 8)
    _section(f"Routing: {T} tokens, {E} experts, top-{k}, capacity factor 1.0 (Zipf-skewed router)")
    problem = routing_problem(T, E, k, kind="zipf", imbalance=1.0, seed=0)
    methods = [m for m in available_methods(problem) if not (quick and m in ("bip", "mip", "cvxpy"))]
    if "fast" in methods:  # numba compiles fast's loops once per machine (cached on disk): not a solve's time
        import time

        from moebalance.solvers.routing_fast import warm_up

        t0 = time.perf_counter()
        warm_up()
        print(f"fast's compiled loops loaded in {time.perf_counter() - t0:.1f} s (compiled on the first run on a "
              "machine, then cached)")
    table = compare(problem, methods, time_limit=30.0, progress=True)
    print(table)
    print("(gap: distance to the best proven bound of all methods; topk ignores capacity, so it is infeasible "
          "but its objective is a bound)")
    best = solve(problem, "mcf" if "mcf" in methods else "lp")
    red = problem.scores - best.bias
    top = np.argpartition(-red, k - 1, axis=1)[:, :k]
    plain = np.argpartition(-problem.scores, k - 1, axis=1)[:, :k]
    cap = problem.capacity.max()
    print(f"plain top-k: busiest expert gets {np.bincount(plain.ravel(), minlength=E).max()} tokens "
          f"(capacity {cap});  top-k of scores - bias ({best.method}'s prices): busiest "
          f"{np.bincount(top.ravel(), minlength=E).max()}, bias reproduces the optimum for "
          f"{100 * best.stats['bias_reproduces']:.1f}% of tokens")


def _balancers(quick: bool) -> None:
    from moebalance.solvers.balancers import BIPBalancer, LossFreeBalancer

    E, k, T, steps = 16, 2, 1024, (20 if quick else 60)
    _section(f"Online balancers over {steps} batches of {T} tokens (E={E}, top-{k}, same skewed router)")
    rng = np.random.default_rng(1)
    skew = np.log(1.0 / (rng.permutation(E) + 1.0))
    balancers = {"none": None, "loss_free (u=1e-2)": LossFreeBalancer(E, k, rate=1e-2),
                 "bip (4 inner iterations)": BIPBalancer(E, k, iterations=4)}
    print(f"{'balancer':26s} MaxVio at step 1   step {steps // 2:<4d}   step {steps}")
    for name, bal in balancers.items():
        vios = []
        for step in range(steps):
            logits = rng.normal(size=(T, E)) + skew
            s = np.exp(logits - logits.max(1, keepdims=True))
            s /= s.sum(1, keepdims=True)
            q = np.zeros(E) if bal is None else bal.bias
            top = np.argpartition(-(s - q), k - 1, axis=1)[:, :k]
            loads = np.bincount(top.ravel(), minlength=E)
            vios.append((loads.max() - loads.mean()) / loads.mean())
            if bal is not None:
                bal.update(s)
        print(f"{name:26s} {vios[0]:8.3f}           {vios[steps // 2 - 1]:8.3f}    {vios[-1]:8.3f}")


def _placement(quick: bool) -> None:
    if importlib.util.find_spec("moebalance.placement") is None:
        return
    from .demo_placement import run as run_placement

    run_placement(quick, _section)


def _layer(quick: bool) -> None:
    if importlib.util.find_spec("moebalance.integrations.torch") is None:
        return
    from .demo_layer import run as run_layer

    run_layer(quick, _section)


def run_demo(quick: bool = False) -> int:
    """Run every part of the demo; returns 0."""
    _routing(quick)
    _balancers(quick)
    if importlib.util.find_spec("moebalance.evaluation.demo_placement") is not None:
        _placement(quick)
    if importlib.util.find_spec("moebalance.evaluation.demo_layer") is not None:
        _layer(quick)
    print("\nNext: `moebalance gen p.npz && moebalance compare p.npz`, and the README.")
    return 0
