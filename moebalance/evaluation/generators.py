"""Problem generators that need the evaluation layer (the simulator's model presets): ``moebalance gen`` offers
them beside the ones the families declare."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["generators", "scenario_generator"]


def generators() -> dict[str, Any]:
    """``{family name: Generator}`` of the generators defined here."""
    name, gen = scenario_generator()
    return {name: gen}


def scenario_generator() -> tuple[str, Any]:
    """``(family name, Generator)``: placement problems of the simulator's imbalance scenarios and model presets.

    The presets sit above the core, which may not import them, so this generator lives here and the CLI's `gen`
    adds it to the family the simulator's problems belong to."""
    from ..family import Generator
    from ..placement import PlacementProblem
    from .simulate import MODELS, Hardware, scenario_loads

    def make(args: argparse.Namespace) -> tuple[Any, str]:
        if args.model not in MODELS:
            raise ValueError(f"`--model` must be one of {', '.join(sorted(MODELS))}, got {args.model!r}")
        loads = scenario_loads(args.scenario, MODELS[args.model], args.devices, args.tokens, seed=args.seed)
        cost = Hardware().cost(MODELS[args.model]) if args.cost == "model" else None
        return PlacementProblem(loads, args.devices, cost=cost), ""

    arguments = (
        (
            ("--scenario",),
            dict(default="80:4", help="'pct:n' (pct%% of tokens into n experts), 'zipf:s' or 'balanced'"),
        ),
        (("--model",), dict(default="gpt-oss-120b", help="model preset giving E and k")),
        (("--devices", "-P"), dict(type=int, default=8, help="devices")),
        (
            ("--cost",),
            dict(
                default="model",
                choices=["model", "tokens"],
                help="'model' = CostModel.from_shapes of the model's experts on the simulator's assumed H200-class "
                "hardware (GEMM, weight-copy and transfer times count); 'tokens' = the makespan is the largest "
                "per-device token count",
            ),
        ),
        (("--tokens", "-T"), dict(type=int, default=1024, help="tokens per device (default 1024)")),
        (("--seed",), dict(type=int, default=0, help="random seed (default 0)")),
    )
    return PlacementProblem.kind, Generator(arguments, make)
