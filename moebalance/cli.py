"""The ``moebalance`` command line: demo, solve, compare, gen, simulate, study, report.

Every error is one line on stderr (``moebalance: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

__all__ = ["main", "build_parser"]


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"`--option` must look like NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def _cmd_solve(args: argparse.Namespace) -> int:
    from .io import load_problem, save_solution
    from .registry import solve

    problem = load_problem(args.file)
    sol = solve(problem, args.method, time_limit=args.time_limit, **_parse_options(args.option))
    print(repr(problem))
    print(f"method     {sol.method}\nstatus     {sol.status.value}\nobjective  {sol.objective:.10g}")
    print(f"bound      {'-' if sol.bound is None else format(sol.bound, '.10g')}")
    print(f"gap        {'-' if sol.gap is None else format(sol.gap, '.3e')}")
    print(f"wall time  {sol.wall_time:.4f} s\nmessage    {sol.message}")
    if problem.kind == "routing" and sol.loads is not None:
        print(f"loads      max {sol.loads.max()} / capacity {problem.capacity.max()} "
              f"(min load {sol.loads.min()})")
    if args.json:
        save_solution(sol, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .io import load_problem

    problem = load_problem(args.file)
    methods = args.methods.split(",") if args.methods else None
    table = compare(problem, methods, time_limit=args.time_limit, progress=not args.no_progress)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            f.write(table.to_json(indent=1))
        print(f"wrote {args.json}")
    return 0


def _cmd_gen(args: argparse.Namespace) -> int:
    from .generate import routing_problem
    from .io import save_problem

    if args.family == "placement":
        from .placement import PlacementProblem
        from .simulate import MODELS, Hardware, scenario_loads

        if args.model not in MODELS:
            raise ValueError(f"`--model` must be one of {', '.join(sorted(MODELS))}, got {args.model!r}")
        loads = scenario_loads(args.scenario, MODELS[args.model], args.devices, args.tokens, seed=args.seed)
        cost = Hardware().cost(MODELS[args.model]) if args.cost == "model" else None
        problem = PlacementProblem(loads, args.devices, cost=cost)
        save_problem(problem, args.output)
        print(f"wrote {args.output}: {problem!r}")
        return 0
    problem = routing_problem(args.tokens, args.experts, args.k, kind=args.kind, imbalance=args.imbalance,
                              hot_experts=args.hot_experts, capacity_factor=args.capacity_factor,
                              seed=args.seed)
    save_problem(problem, args.output)
    top = np.argpartition(-problem.scores, problem.k - 1, axis=1)[:, : problem.k]
    loads = np.bincount(top.ravel(), minlength=problem.num_experts)
    print(f"wrote {args.output}: {problem!r}; plain top-k max/mean load {loads.max() / loads.mean():.2f}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebalance",
        description="Solve MoE load-balancing assignment problems and see each method's gap to the optimum.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the library end to end: routing methods and their gaps, online balancers, "
                                    "placement on recorded DeepSeek-V3 loads, the MoE layer training")
    p.add_argument("--quick", action="store_true", help="smaller instances, skip the slowest methods")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("solve", help="solve a problem file with one method")
    p.add_argument("file", help="problem file (.npz or .json; schema in moebalance.io)")
    p.add_argument("--method", "-m", default="auto", help="method name (see `moebalance compare`); default auto")
    p.add_argument("--time-limit", type=float, default=None, help="seconds")
    p.add_argument("--option", "-o", action="append", default=[], metavar="NAME=VALUE",
                   help="method option, repeatable (VALUE parsed as JSON when it can be)")
    p.add_argument("--json", metavar="OUT", help="also write the solution as JSON")
    p.set_defaults(func=_cmd_solve)

    p = sub.add_parser("compare", help="solve a problem file with several methods and tabulate the gaps")
    p.add_argument("file", help="problem file (.npz or .json)")
    p.add_argument("--methods", help="comma-separated method names (default: every installed method)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per method (default 60)")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("gen", help="write a synthetic imbalanced routing (or placement) problem")
    p.add_argument("output", help="output file (.npz or .json)")
    p.add_argument("--family", default="routing", choices=["routing", "placement"],
                   help="routing: scores [T, E] for top-k under capacity; placement: expert loads of an "
                        "imbalance scenario on --devices devices (uses --tokens per device, --scenario, --model)")
    p.add_argument("--scenario", default="80:4",
                   help="placement: 'pct:n' (pct%% of tokens into n experts), 'zipf:s' or 'balanced'")
    p.add_argument("--model", default="gpt-oss-120b", help="placement: model preset giving E and k")
    p.add_argument("--devices", "-P", type=int, default=8, help="placement: devices")
    p.add_argument("--cost", default="model", choices=["model", "tokens"],
                   help="placement: 'model' = CostModel.from_shapes of the model's experts on the simulator's "
                        "assumed H200-class hardware (GEMM, weight-copy and transfer times count); 'tokens' = "
                        "the makespan is the largest per-device token count")
    p.add_argument("--kind", default="zipf", choices=["hot", "zipf", "dirichlet", "uniform"],
                   help="popularity skew (default zipf)")
    p.add_argument("--tokens", "-T", type=int, default=1024)
    p.add_argument("--experts", "-E", type=int, default=64)
    p.add_argument("--k", "-k", type=int, default=8)
    p.add_argument("--imbalance", type=float, default=1.0, help="strength of the skew (0 = balanced)")
    p.add_argument("--hot-experts", type=int, default=1, help="number of hot experts for --kind hot")
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_gen)

    from .report import add_report_command
    from .simulate import add_simulate_command
    from .study import add_study_command

    add_simulate_command(sub)
    add_study_command(sub)
    add_report_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as exc:
        print(f"moebalance: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moebalance: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
