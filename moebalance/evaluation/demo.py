"""``moebalance demo``: the library end to end on skewed instances, in well under a minute on a 2-core CPU.

Every row of its tables finishes within its time limit on such a machine; a row a limit stopped anyway (a slower
or busier machine) is followed by a line saying what the limit cost: its gap to the best bound."""

from __future__ import annotations

import importlib.util

import numpy as np

__all__ = ["run_demo", "limited_rows"]


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)))


def limited_rows(table, limit: float) -> list[str]:
    """One line per row that a time limit stopped: what the limit cost (its gap to the best bound), or that it
    stopped before any answer."""
    lines = []
    for s in table.solutions:
        if s.status.value != "time_limit":
            continue
        gap = table.gap_of(s)
        if gap is None:
            lines.append(f"{s.method}: stopped by its {limit:g} s limit before it had an answer")
        else:
            lines.append(
                f"{s.method}: stopped by its {limit:g} s limit; its answer is {100 * gap:.2f}% from the "
                f"best bound {table.best_bound:.6g} (what the limit cost, at most)"
            )
    return lines


def _routing(quick: bool) -> None:
    from moebalance.comparison import compare
    from moebalance.generate import routing_problem
    from moebalance.registry import available_methods, solve

    # sizes every method solves to optimality in a few seconds on a 2-core CPU (2048x64, top-8 took bip past 30 s)
    T, E, k = (512, 16, 2) if quick else (1024, 32, 4)
    limit = 10.0 if quick else 20.0
    _section(f"Routing: {T} tokens, {E} experts, top-{k}, capacity factor 1.0 (Zipf-skewed router)")
    problem = routing_problem(T, E, k, kind="zipf", imbalance=1.0, seed=0)
    methods = [m for m in available_methods(problem) if not (quick and m in ("bip", "mip", "cvxpy"))]
    table = compare(problem, methods, time_limit=limit, progress=True)
    print(table)
    print(
        "(gap: distance to the best proven bound of all methods; topk ignores capacity, so it is infeasible "
        "but its objective is a bound)"
    )
    for line in limited_rows(table, limit):
        print(line)
    fast = next((s for s in table.solutions if s.method == "fast"), None)
    if fast is not None and fast.stats.get("engine"):
        print(f"fast ran on engine: {fast.stats['engine']}")
    best = solve(problem, "mcf" if "mcf" in methods else "lp")
    assert isinstance(best, problem.solution_type)  # what solve returns for the family
    red = problem.scores - best.bias
    top = np.argpartition(-red, k - 1, axis=1)[:, :k]
    plain = np.argpartition(-problem.scores, k - 1, axis=1)[:, :k]
    cap = problem.capacity.max()
    print(
        f"plain top-k: busiest expert gets {np.bincount(plain.ravel(), minlength=E).max()} tokens "
        f"(capacity {cap});  top-k of scores - bias ({best.method}'s prices): busiest "
        f"{np.bincount(top.ravel(), minlength=E).max()}, bias reproduces the optimum for "
        f"{100 * best.stats['bias_reproduces']:.1f}% of tokens"
    )


def _balancers(quick: bool) -> None:
    from moebalance.solvers.balancers import BIPBalancer, LossFreeBalancer

    E, k, T, steps = 16, 2, 1024, (20 if quick else 60)
    _section(f"Online balancers over {steps} batches of {T} tokens (E={E}, top-{k}, same skewed router)")
    rng = np.random.default_rng(1)
    skew = np.log(1.0 / (rng.permutation(E) + 1.0))
    balancers = {
        "none": None,
        "loss_free (u=1e-2)": LossFreeBalancer(E, k, rate=1e-2),
        "bip (4 inner iterations)": BIPBalancer(E, k, iterations=4),
    }
    print(f"{'balancer':26s} MaxVio at step 1   step {steps // 2:<4d}   step {steps}")
    for name, bal in balancers.items():
        vios = []
        for _step in range(steps):
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
    print(next_steps())
    return 0


def command_path() -> str:
    """How to type the ``moebalance`` command from here: ``moebalance`` when the PATH finds this install's
    command, else its path (``.venv/bin/moebalance`` after ``make demo``), relative to the current folder when
    it lies inside it."""
    import os
    import shutil
    import sys
    from pathlib import Path

    here = Path(sys.executable).parent / ("moebalance.exe" if os.name == "nt" else "moebalance")
    found = shutil.which("moebalance")
    if not here.exists():
        return "moebalance" if found else f"{sys.executable} -m moebalance"
    if found and Path(found).resolve() == here.resolve():
        return "moebalance"
    try:  # the venv's own path (not the interpreter it links to), relative to here when it is below here
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


def next_steps() -> str:
    """The closing lines of the demo: the next commands, with the path of the command that runs them."""
    import os

    mb = command_path()
    venv = os.path.dirname(os.path.dirname(mb)) if os.sep in mb else ""
    lines = ["", "=== Next " + "=" * 70]
    if mb != "moebalance" and venv and not mb.endswith("-m moebalance"):
        lines.append(f"`moebalance` is {mb} (or run `source {venv}/bin/activate` once to put it on the PATH):")
    cmds = [
        (f"{mb} gen p.npz -T 1024 -E 64 -k 8", "a problem file (or moebalance.io.save_problem on your own)"),
        (f"{mb} compare p.npz --time-limit 10", "every method on it, each gap to the best bound"),
        (f"{mb} solve p.npz --json sol.json", "one method's checked answer (--method, default auto)"),
        (f"{mb} plot p.npz sol.json --out p.png", "loads before and after, as a PNG"),
        (f"{mb} --help", "every command; docs/cli.md and the README for more"),
    ]
    width = max(len(c) for c, _ in cmds)
    lines += [f"  {c:{width}s}   # {why}" for c, why in cmds]
    return "\n".join(lines)
