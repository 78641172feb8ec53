"""Do time limits cover everything? ``solve``'s wall time against ``time_limit`` for every method that declares
``supports_time_limit`` (the bound is ``time_limit * 1.1 + 0.5`` s).

    python benchmarks/time_limits.py                      # 4096x64 and 16384x64, k=8, time_limit=1
    python benchmarks/time_limits.py --sizes 4096 --time-limit 0.5

Prints one table (method, size, wall time, within bound, status, gap) and writes JSON
(``--out``, default ``benchmarks/results/time_limits.json``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "time_limits.json"


def _methods(family: str) -> list[tuple[str, dict[str, Any]]]:
    import moebalance as mb

    out = [(m, {}) for m in mb.available_methods(family) if mb.method_info(family, m).supports_time_limit]
    if family == "routing" and any(m == "mip" for m, _ in out):
        out += [("mip", {"backend": "HIGHS"}), ("mip", {"backend": "CBC"})]
    return out


def run(sizes: list[int], experts: int, k: int, time_limit: float) -> dict[str, Any]:
    import moebalance as mb
    from moebalance._machine import cpu_name
    from moebalance.generate import routing_problem

    rows = []
    for T in sizes:
        p = routing_problem(T, experts, k, kind="zipf", seed=0)
        for method, options in _methods("routing"):
            t0 = time.perf_counter()
            sol = mb.solve(p, method, time_limit=time_limit, **options)
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "method": method + (f"/{options['backend']}" if options else ""),
                    "T": T,
                    "E": experts,
                    "k": k,
                    "time_limit": time_limit,
                    "wall_s": round(wall, 3),
                    "within": wall <= time_limit * 1.1 + 0.5,
                    "status": sol.status.value,
                    "gap": sol.gap,
                    "feasible": sol.feasible,
                }
            )
            r = rows[-1]
            print(
                f"{r['method']:<11} {T:>6}x{experts:<3} wall {wall:6.2f} s  within={r['within']!s:<5} "
                f"{r['status']:<10} gap={'-' if sol.gap is None else f'{sol.gap:.3g}'}",
                flush=True,
            )
    return {"machine": cpu_name(), "time_limit": time_limit, "bound": "time_limit * 1.1 + 0.5", "rows": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[4096, 16384],
        help="token counts T, comma-separated (default 4096,16384)",
    )
    ap.add_argument("--experts", type=int, default=64, help="experts E (default 64)")
    ap.add_argument("-k", type=int, default=8, help="experts per token (default 8)")
    ap.add_argument("--time-limit", type=float, default=1.0, help="seconds (default 1)")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON output path")
    args = ap.parse_args(argv)
    result = run(args.sizes, args.experts, args.k, args.time_limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
