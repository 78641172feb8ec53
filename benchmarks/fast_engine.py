"""The exact routing engine ``fast`` on its hard cases: massive ties against ``mcf``, warm starts of any
magnitude, time limits and Ctrl-C inside the compiled loops, and the first call after a fresh install.

    python benchmarks/fast_engine.py                       # every section
    python benchmarks/fast_engine.py --sections ties,stops
    python benchmarks/fast_engine.py --sections first      # first call vs warm, from an empty numba cache

Sections:
  ties   fast vs mcf side by side on tie-heavy scores (identical rows, uniform 1/E, integer scores) at 4096x64,
         k = 8 and 32, and zipf for reference; with ``--slow-paths`` also the compiled paths without the
         hand-over to the flow (the degenerate path itself: up to ~20 s).
  warm   warm starts of 1e-3 .. 1e12 times the score range: fast's objective against mcf's.
  stops  the compiled loops under a deadline (1 s) and a SIGINT (0.3 s in) on the degenerate path (hand-over
         off, so that the loops run long): seconds past the deadline, seconds from the signal to
         KeyboardInterrupt.
  first  fresh processes with an empty numba cache (NUMBA_CACHE_DIR in a temporary folder, the checkout's own
         cache untouched): the first ``solve(p, "fast", time_limit=5)`` (answered by mcf while the loops compile
         in the background), then, cache on disk, a new process's first call under the limit and without one,
         and the warm call after it; and a first call without a limit from an empty cache (the compile inline).

Writes JSON (``--out``, default ``benchmarks/results/fast_engine.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = HERE / "results" / "fast_engine.json"


def _tie_scores(kind: str, T: int, E: int, k: int, seed: int = 0):
    import numpy as np

    from moebalance.generate import routing_problem

    rng = np.random.default_rng(seed)
    if kind == "identical":
        return np.tile(rng.random(E), (T, 1))
    if kind == "uniform":
        return np.full((T, E), 1.0 / E)
    if kind == "integer":
        return rng.integers(0, 5, size=(T, E)).astype(float)
    if kind == "identical_int":
        return np.tile(rng.integers(0, 3, size=E).astype(float), (T, 1))
    return routing_problem(T, E, k, kind="zipf", seed=seed).scores


def ties(slow_paths: bool) -> list[dict[str, Any]]:
    from moebalance.solvers.routing_fast import fast_route, warm_up

    import moebalance as mb

    warm_up()
    rows = []
    for T, E in ((4096, 64), (16384, 64)):
        for k in (8, 32):
            for kind in ("zipf", "identical", "uniform", "integer", "identical_int"):
                p = mb.RoutingProblem(_tie_scores(kind, T, E, k), k, capacity_factor=1.0)
                row: dict[str, Any] = {"kind": kind, "T": T, "E": E, "k": k}
                for m in ("mcf", "fast"):
                    t0 = time.perf_counter()
                    sol = mb.solve(p, m)
                    row[f"{m}_s"] = round(time.perf_counter() - t0, 3)
                    row[f"{m}_objective"] = sol.objective
                    row[f"{m}_status"] = sol.status.value
                row["fast_engine"] = sol.stats.get("engine")
                if slow_paths and T == 4096:
                    t0 = time.perf_counter()
                    a, _, st = fast_route(p.scores, k, p.capacity, handover=False)
                    row["paths_only_s"] = round(time.perf_counter() - t0, 3)
                    row["paths_only_objective"] = float(p.evaluate(a).objective)
                rows.append(row)
                print(
                    f"ties  {kind:<13} {T}x{E} k={k:<2}  mcf {row['mcf_s']:6.2f} s  fast {row['fast_s']:6.2f} s"
                    f"  (engine {row['fast_engine']})"
                    + (f"  paths only {row['paths_only_s']:6.2f} s" if "paths_only_s" in row else "")
                    + f"  same optimum: {abs(row['fast_objective'] - row['mcf_objective']) <= 1e-9 * max(1, abs(row['mcf_objective']))}",
                    flush=True,
                )
    return rows


def warm() -> list[dict[str, Any]]:
    import numpy as np
    from moebalance.solvers.routing_fast import warm_up

    import moebalance as mb
    from moebalance.generate import routing_problem

    warm_up()
    rows = []
    rng = np.random.default_rng(0)
    for T, E, k in ((4096, 64, 8), (2000, 32, 4)):
        for seed in range(4):
            p = routing_problem(T, E, k, kind="zipf", imbalance=1.5, seed=seed)
            span = float(p.scores.max() - p.scores.min())
            ref = mb.solve(p, "mcf").objective
            for mag in (1e-3, 1.0, 1e3, 1e6, 1e9, 1e12):
                for shape in ("random", "ramp", "const"):
                    base = {"random": rng.random(E), "ramp": np.arange(E, dtype=float), "const": np.ones(E)}[shape]
                    t0 = time.perf_counter()
                    sol = mb.solve(p, "fast", warm_start=mag * span * base)
                    rows.append(
                        {
                            "T": T,
                            "E": E,
                            "k": k,
                            "seed": seed,
                            "magnitude": mag,
                            "shape": shape,
                            "loss": (ref - sol.objective) / abs(ref),
                            "status": sol.status.value,
                            "seconds": round(time.perf_counter() - t0, 3),
                        }
                    )
    worst = max(r["loss"] for r in rows)
    bad = sum(r["loss"] > 1e-9 or r["status"] != "optimal" for r in rows)
    print(
        f"warm  {len(rows)} warm-started solves, {bad} off the optimum (worst relative loss {worst:.2e}); "
        f"slowest {max(r['seconds'] for r in rows):.2f} s",
        flush=True,
    )
    return rows


def stops() -> list[dict[str, Any]]:
    import numpy as np
    from moebalance.solvers.routing_fast import fast_route, warm_up

    warm_up()
    rows = []
    rng = np.random.default_rng(0)
    for k in (8, 32):
        s = np.tile(rng.random(64), (4096, 1))
        cap = np.full(64, 4096 * k // 64)
        t0 = time.perf_counter()
        a, _, st = fast_route(s, k, cap, deadline=t0 + 1.0, handover=False)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "case": f"deadline 1 s, identical rows 4096x64 k={k}, hand-over off",
                "wall_s": round(wall, 3),
                "stopped": st.get("stopped"),
                "within": wall <= 1.1 + 0.5,
            }
        )
        print(f"stops {rows[-1]['case']}: returned after {wall:.3f} s ({st.get('stopped') or 'finished'})", flush=True)
        import moebalance as mb

        p = mb.RoutingProblem(s, k, capacity=cap)
        t0 = time.perf_counter()
        sol = mb.solve(p, "fast", time_limit=1.0)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "case": f"solve(time_limit=1), identical rows 4096x64 k={k}",
                "wall_s": round(wall, 3),
                "status": sol.status.value,
                "engine": sol.stats.get("engine"),
                "within": wall <= 1.1 + 0.5,
            }
        )
        print(f"stops {rows[-1]['case']}: {wall:.3f} s, {sol.status.value} ({sol.stats.get('engine')})", flush=True)
        sent: dict[str, float] = {}

        def fire(sent=sent) -> None:
            time.sleep(0.3)
            sent["at"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=fire, daemon=True).start()
        try:
            fast_route(s, k, cap, handover=False)
            late = None
        except KeyboardInterrupt:
            late = time.perf_counter() - sent["at"]
        rows.append(
            {
                "case": f"SIGINT 0.3 s in, identical rows 4096x64 k={k}, hand-over off",
                "seconds_after_signal": None if late is None else round(late, 4),
            }
        )
        print(
            f"stops {rows[-1]['case']}: KeyboardInterrupt "
            f"{'never (finished first)' if late is None else f'{late * 1000:.1f} ms after the signal'}",
            flush=True,
        )
    return rows


_FIRST = r"""
import json, sys, time
t0 = time.perf_counter()
import moebalance as mb
from moebalance.generate import routing_problem
from moebalance.solvers import routing_fast as F
p = routing_problem(4096, 64, 8, kind="zipf", seed=0)
out = {"import_s": time.perf_counter() - t0}
limit = None if sys.argv[1] == "none" else float(sys.argv[1])
for call in ("first", "second", "third"):
    if call == "third":
        time.sleep(3.0)  # a background load, if one started, has had time to finish
    t = time.perf_counter()
    sol = mb.solve(p, "fast", time_limit=limit)
    out[call] = {"wall_s": time.perf_counter() - t, "status": sol.status.value, "objective": sol.objective,
                 "engine": sol.stats.get("engine"), "engine_load_s": sol.stats.get("engine_load_s")}
out["mcf_objective"] = mb.solve(p, "mcf").objective
print(json.dumps(out))
"""


def _fresh_call(cache: str, limit: str) -> dict[str, Any]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", _FIRST, limit], env=env, capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def _wait_for_cache(cache: str, timeout: float = 900.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        for _dirpath, _, files in os.walk(cache):
            if any(f.startswith("moebalance_fast_engine") and f.endswith(".json") for f in files):
                return time.perf_counter() - t0
        time.sleep(1.0)
    raise RuntimeError("the background compile did not finish")


def first() -> list[dict[str, Any]]:
    rows = []

    def row(case: str, r: dict[str, Any], call: str = "first") -> None:
        c = r[call]
        same = abs(c["objective"] - r["mcf_objective"]) <= 1e-9 * max(1.0, abs(r["mcf_objective"]))
        rows.append(
            {
                "case": case,
                "wall_s": round(c["wall_s"], 3),
                "status": c["status"],
                "engine": c["engine"],
                "engine_load_s": c["engine_load_s"],
                "optimal": same and c["status"] == "optimal",
            }
        )
        print(
            f"first {case:<58} {c['wall_s']:7.3f} s  {c['status']:<8} optimum={same!s:<5} engine={c['engine']}"
            + (f" (load {c['engine_load_s']:.2f} s)" if c["engine_load_s"] else ""),
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="moebalance-numba-") as cache:
        r = _fresh_call(cache, "5")
        row("empty cache, first call, time_limit=5", r)
        row("empty cache, second call in that process, time_limit=5", r, "second")
        row("empty cache, third call in that process (3 s later), time_limit=5", r, "third")
        waited = _wait_for_cache(cache)
        print(f"first (the background compile finished {waited:.0f} s after that process ended)", flush=True)
        r = _fresh_call(cache, "5")
        row("cache on disk, new process, first call, time_limit=5", r)
        row("cache on disk, same process, second call, time_limit=5", r, "second")
        row("cache on disk, same process, third call (3 s later), time_limit=5", r, "third")
        r = _fresh_call(cache, "none")
        row("cache on disk, new process, first call, no limit", r)
        row("cache on disk, same process, second call (warm), no limit", r, "second")
    with tempfile.TemporaryDirectory(prefix="moebalance-numba-") as cache:
        r = _fresh_call(cache, "none")
        row("empty cache, first call, no limit (compiles inline)", r)
        row("empty cache, second call in that process (warm), no limit", r, "second")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--sections", default="ties,warm,stops,first", help="comma-separated: ties, warm, stops, first (default: all)"
    )
    ap.add_argument("--slow-paths", action="store_true", help="ties: also time the paths without the hand-over")
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="JSON output path")
    args = ap.parse_args(argv)
    from moebalance._machine import cpu_name

    result: dict[str, Any] = {"machine": cpu_name()}
    for name in args.sections.split(","):
        name = name.strip()
        if name == "ties":
            result["ties"] = ties(args.slow_paths)
        elif name == "warm":
            result["warm"] = warm()
        elif name == "stops":
            result["stops"] = stops()
        elif name == "first":
            result["first"] = first()
        else:
            raise SystemExit(f"unknown section {name!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
