"""The routing family's declaration: what the registry, io, the CLI and ``compare`` know of it."""

from __future__ import annotations

import argparse
from typing import Any

from ..family import Family, Generator, declare
from . import io
from .problem import RoutingProblem
from .solution import RoutingSolution

__all__ = ["FAMILY"]


def _summary(problem: RoutingProblem, solution: RoutingSolution) -> list[str]:
    loads = solution.loads
    if loads is None:
        return []
    return [f"loads      max {loads.max()} / capacity {problem.capacity.max()} (min load {loads.min()})"]


def _generate(args: argparse.Namespace) -> tuple[Any, str]:
    import numpy as np

    from .generate import routing_problem

    problem = routing_problem(
        args.tokens,
        args.experts,
        args.k,
        kind=args.kind,
        imbalance=args.imbalance,
        hot_experts=args.hot_experts,
        capacity_factor=args.capacity_factor,
        seed=args.seed,
    )
    top = np.argpartition(-problem.scores, problem.k - 1, axis=1)[:, : problem.k]
    loads = np.bincount(top.ravel(), minlength=problem.num_experts)
    return problem, f"; plain top-k max/mean load {loads.max() / loads.mean():.2f}"


_GENERATOR = Generator(
    arguments=(
        (
            ("--kind",),
            dict(
                default="zipf", choices=["hot", "zipf", "dirichlet", "uniform"], help="popularity skew (default zipf)"
            ),
        ),
        (("--tokens", "-T"), dict(type=int, default=1024, help="tokens T (default 1024)")),
        (("--experts", "-E"), dict(type=int, default=64, help="experts E (default 64)")),
        (("--k", "-k"), dict(type=int, default=8, help="experts per token (default 8)")),
        (("--imbalance",), dict(type=float, default=1.0, help="strength of the skew (0 = balanced)")),
        (("--hot-experts",), dict(type=int, default=1, help="number of hot experts for --kind hot")),
        (
            ("--capacity-factor",),
            dict(type=float, default=1.0, help="capacity per expert = ceil(factor * T * k / E) (default 1.0)"),
        ),
        (("--seed",), dict(type=int, default=0, help="random seed (default 0)")),
    ),
    make=_generate,
)

FAMILY = declare(
    Family(
        name="routing",
        problem=RoutingProblem,
        solution=RoutingSolution,
        auto=("fast", "mcf", "lp", "greedy"),
        to_dict=io.to_dict,
        from_dict=io.from_dict,
        solution_fields=io.SOLUTION_FIELDS,
        untagged_files=True,
        summary=_summary,
        generator=_GENERATOR,
        description="scores [T, E] for top-k under capacity",
    )
)
