"""The ``moebalance`` command line: demo, solve, compare, methods, gen, plot, simulate, study, report.

Every method name, option and output path is checked before anything is solved. Errors are one line on
stderr (``moebalance: error: ...``). Exit status:

====  ==========================================================================================================
0     done; ``solve``: the answer is feasible (``optimal``, ``feasible``, or ``time_limit`` with an answer)
1     ``solve``: status ``error``, or ``time_limit`` without an answer; ``compare``: no method gave a feasible
      answer
2     bad input or usage: a bad file, method, option, size or output path (nothing was solved or written)
3     ``solve``: the problem is infeasible (proven by the constructor) or the answer is ``infeasible``;
      ``compare``: the problem is proven infeasible
130   interrupted (Ctrl-C): one line on stderr, no output file written
====  ==========================================================================================================

Start-up is light: ``--help`` of every command imports numpy and the core only; the back-ends (torch, OR-Tools,
cvxpy, triton, matplotlib) load when a command needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INFEASIBLE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INFEASIBLE = 3
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"moebalance: error: {message} (see `{self.prog} --help`)\n")


# ---- checks made before anything runs -------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"`--option` must look like NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        if not name.isidentifier():
            raise ValueError(f"`--option` must look like NAME=VALUE with NAME an option name, got {pair!r}")
        if name in out:
            raise ValueError(f"`--option` {name!r} is given twice")
        try:
            out[name] = json.loads(value, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, RecursionError):
            out[name] = value
        except ValueError:  # NaN, Infinity: no option takes them
            raise ValueError(f"`--option` {name}: the value must be finite, got {value!r}") from None
        if isinstance(out[name], float) and not math.isfinite(out[name]):  # 1e999
            raise ValueError(f"`--option` {name}: the value must be finite, got {value!r}")
    return out


def check_output_path(path: str | os.PathLike, name: str, suffixes: Sequence[str] = ()) -> Path:
    """``path`` as a Path if a file can be written there (its folder exists and is writable), else ValueError.

    Nothing is created: the command writes the file only once it has something to write.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"`{name}` {str(p)!r} is a folder, not a file")
    if suffixes and p.suffix not in suffixes:
        raise ValueError(f"`{name}` must end in {' or '.join(suffixes)}, got {p.name!r}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"`{name}` {str(p)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"`{name}` {str(p)!r} is not writable")
    return p


def _write_atomic(path: Path, text: str) -> None:
    # a file appears whole or not at all (an interrupt in the middle leaves nothing), with the umask's mode
    from .io import write_atomic

    write_atomic(path, text)


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number of seconds, got {text!r}")
    return v


@contextlib.contextmanager
def _backend_quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Keep back-end banners and warnings off stdout while solving.

    C libraries (HiGHS, SCIP) print banners straight to file descriptor 1: it points to /dev/null meanwhile.
    Python warnings raised by back-ends (e.g. cvxpy's overflow RuntimeWarning) are collected; the caller prints
    one summary line on stderr. Every answer is checked by moebalance anyway.
    """
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # stdout is no real file (e.g. captured): nothing to guard
        fd = saved = -1
    devnull = os.open(os.devnull, os.O_WRONLY) if saved >= 0 else -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if saved >= 0:
                os.dup2(devnull, fd)
            yield caught
        finally:
            if saved >= 0:
                sys.stdout.flush()
                os.dup2(saved, fd)
                os.close(saved)
                os.close(devnull)


def _report_warnings(caught: list[warnings.WarningMessage]) -> None:
    if caught:
        first = caught[0]
        print(
            f"moebalance: note: {len(caught)} back-end warning(s) while solving; first: "
            f"{first.category.__name__}: {str(first.message).splitlines()[0] if str(first.message) else ''}",
            file=sys.stderr,
        )


# ---- commands ---------------------------------------------------------------------------------------------
def _cmd_solve(args: argparse.Namespace) -> int:
    from .family import family_of
    from .io import load_problem, save_solution_text
    from .registry import check_options, method_info, solve

    out = check_output_path(args.json, "--json", (".json",)) if args.json else None
    options = _parse_options(args.option)
    problem = load_problem(args.file)
    check_options(method_info(problem, args.method), options)  # as solve checks them, before it runs
    with _backend_quiet() as caught:
        sol = solve(problem, args.method, time_limit=args.time_limit, **options)
    _report_warnings(caught)
    print(repr(problem))
    print(f"method     {sol.method}\nstatus     {sol.status.value}\nobjective  {sol.objective:.10g}")
    print(f"bound      {'-' if sol.bound is None else format(sol.bound, '.10g')}")
    print(f"gap        {'-' if sol.gap is None else format(sol.gap, '.3e')}")
    load = float(sol.stats.get("engine_load_s", 0.0))
    extra = f" (plus a one-time engine load of {load:.2f} s)" if load else ""
    print(f"wall time  {sol.wall_time - load:.4f} s{extra}\nmessage    {sol.message}")
    fam = family_of(problem)
    if fam is not None and fam.summary is not None:
        for line in fam.summary(problem, sol):
            print(line)
    if out is not None:
        _write_atomic(out, save_solution_text(sol))
        print(f"wrote {out}")
    status = sol.status.value
    if status == "infeasible":
        return EXIT_INFEASIBLE
    if status == "error" or not sol.feasible:
        return EXIT_FAILED
    return EXIT_OK


def _cmd_compare(args: argparse.Namespace) -> int:
    from .comparison import compare
    from .io import load_problem

    out = check_output_path(args.json, "--json", (".json",)) if args.json else None
    problem = load_problem(args.file)
    methods = None  # every installed method that can solve the problem
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",")]
        if not all(methods):
            raise ValueError(f"`--methods` must be comma-separated method names, got {args.methods!r}")
    # compare checks every name (and that it can solve this problem) before the first method runs
    with _backend_quiet() as caught:
        table = compare(problem, methods, time_limit=args.time_limit, progress=not args.no_progress)
    _report_warnings(caught)
    print(table)
    if out is not None:
        _write_atomic(out, table.to_json(indent=1))
        print(f"wrote {out}")
    return EXIT_OK if any(s.feasible for s in table.solutions) else EXIT_FAILED


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import method_table, method_table_markdown

    if args.markdown:
        print(method_table_markdown(), end="")
        return EXIT_OK
    for r in method_table():
        flags = ",".join(f for f, v in r["flags"].items() if v) or "-"
        opts = " ".join(f"{k}={o['default']!r}" for k, o in r["options"].items())
        print(f"{r['family']:12s} {r['method']:10s} {r['file']:34s} {flags}  {opts}".rstrip())
    return EXIT_OK


def _cmd_gen(args: argparse.Namespace) -> int:
    from .io import problem_text

    out = check_output_path(args.output, "output", (".npz", ".json"))
    problem, note = _generators()[args.family].make(args)
    _write_bytes_atomic(out, problem_text(problem, out.suffix))
    print(f"wrote {out}: {problem!r}{note}")
    return EXIT_OK


def _generators() -> dict[str, Any]:
    """``{family name: Generator}``: what each family declares, plus the simulator's scenarios."""
    from .family import all_families

    families = all_families()
    out = {name: fam.generator for name, fam in families.items() if fam.generator is not None}
    from .evaluation.generators import generators as evaluation_generators

    for name, gen in evaluation_generators().items():
        out.setdefault(name, gen)
    # the family of untagged files (the first one) leads and is the default, the others follow by name
    return dict(sorted(out.items(), key=lambda item: (not families[item[0]].untagged_files, item[0])))


def _add_gen_arguments(p: argparse.ArgumentParser, generators: dict[str, Any]) -> None:
    """Every generator's options on one parser; an option two families share gets both help texts."""
    merged: dict[tuple[str, ...], tuple[dict[str, Any], list[str]]] = {}
    for name, gen in generators.items():
        for flags, kwargs in gen.arguments:
            if flags in merged:
                first, helps = merged[flags]
                if first.get("default") != kwargs.get("default"):
                    raise ValueError(f"generators disagree on the default of {flags[0]}")
                helps.append(f"{name}: {kwargs.get('help', '')}")
            else:
                merged[flags] = (dict(kwargs), [f"{name}: {kwargs.get('help', '')}"])
    for flags, (kwargs, helps) in merged.items():
        texts = {h.partition(": ")[2] for h in helps}
        kwargs["help"] = texts.pop() if len(texts) == 1 and len(generators) > 1 and len(helps) > 1 else "; ".join(helps)
        p.add_argument(*flags, **kwargs)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    from .io import write_atomic

    write_atomic(path, data)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluation.demo import run_demo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # back-end numerics; every answer is checked
        return run_demo(quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="moebalance",
        description="Solve MoE load-balancing assignment problems and see each method's gap to the optimum.",
        epilog="Exit status: 0 done (solve: a feasible answer), 1 solve: error or no answer / compare: no "
        "feasible answer, 2 bad input or usage, 3 infeasible, 130 interrupted. Every name, option and "
        "output path is checked before anything is solved.",
    )
    parser.add_argument(
        "--version", action="version", version=f"moebalance {__version__}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "demo",
        help="the library end to end: routing methods and their gaps, online balancers, "
        "placement on recorded DeepSeek-V3 loads, the MoE layer training",
    )
    p.add_argument("--quick", action="store_true", help="smaller instances, skip the slowest methods")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "solve",
        help="solve a problem file with one method",
        description="Solve a problem file with one method and print the checked answer. Exit "
        "status 0 for a feasible answer, 1 for error or no answer, 3 for infeasible.",
    )
    p.add_argument("file", help="problem file (.npz or .json; schema in docs/formats.md)")
    p.add_argument("--method", "-m", default="auto", help="method name (see `moebalance compare`); default auto")
    p.add_argument(
        "--time-limit",
        type=_positive_seconds,
        default=None,
        help="seconds for the whole solve, model building included (default: none)",
    )
    p.add_argument(
        "--option",
        "-o",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="method option, repeatable (VALUE parsed as JSON when it can be)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the solution as JSON to OUT (.json)")
    p.set_defaults(func=_cmd_solve)

    p = sub.add_parser("compare", help="solve a problem file with several methods and tabulate the gaps")
    p.add_argument("file", help="problem file (.npz or .json)")
    p.add_argument("--methods", help="comma-separated method names (default: every installed method)")
    p.add_argument("--time-limit", type=_positive_seconds, default=60.0, help="seconds per method (default 60)")
    p.add_argument("--json", metavar="OUT", help="also write the table as JSON to OUT (.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("methods", help="every registered method: family, adapter file, flags, options and defaults")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table of docs/methods.md")
    p.set_defaults(func=_cmd_methods)

    generators = _generators()
    first = next(iter(generators))
    p = sub.add_parser("gen", help=f"write a synthetic problem ({', '.join(generators)})")
    p.add_argument("output", help="output file (.npz or .json)")
    p.add_argument(
        "--family",
        default=first,
        choices=list(generators),
        help=f"the problem family (default {first}); each option below says which families read it",
    )
    _add_gen_arguments(p, generators)
    p.set_defaults(func=_cmd_gen)

    from .evaluation.plot_files import add_plot_command
    from .evaluation.report import add_report_command
    from .evaluation.simulate import add_simulate_command
    from .evaluation.study import add_study_command

    add_plot_command(sub)
    add_simulate_command(sub)
    add_study_command(sub)
    add_report_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see the module docstring)."""
    from .errors import InfeasibleError

    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("MOEBALANCE_PROGRESS", "1")  # long one-time work (e.g. a first compile) says so on stderr
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("moebalance: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InfeasibleError as exc:
        print(f"moebalance: infeasible: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except (ValueError, OSError, MemoryError) as exc:
        print(f"moebalance: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
