"""Benchmark: time and gap of every routing method on skewed instances.

Grid: T in {1024, 4096, 16384} tokens, E in {16, 64, 256} experts, k in {1, 2, 8}. Each instance is
``moebalance.generate.routing_problem(T, E, k, kind="zipf", imbalance=1.0, seed=0)``: softmax router scores
from Gaussian logits plus a log-Zipf per-expert popularity, capacity ``ceil(capacity_factor * T * k / E)``.

For every method (``moebalance.available_methods("routing")``) it records the wall time, the gap to the exact
optimum (``mcf``, the reference, run on every instance) and the method's own certified gap (its Solution's
bound). Methods run with ``time_limit=--time-cap`` (60 s). Skip rule, per method except the reference: once a
run took longer than the cap or stopped at its time limit, every instance with the same k and at least as many
tokens and experts is skipped; an instance whose time (linear in T from the last smaller T) or memory is
predicted above the caps is skipped too. The target instance T=4096, E=64, k=8 always runs every method.

Each run happens in a forked child, so its peak memory (VmHWM) is measured and a run that passes the memory
cap or a hard wall limit is killed instead of taking the machine down.

    python benchmarks/routing_solvers.py                 # full grid (~30-40 min on 2 cores)
    python benchmarks/routing_solvers.py --quick         # smoke test (small instances, < 30 s)
    python benchmarks/routing_solvers.py --targets --methods mcf,fast,topk   # the two target instances
    python benchmarks/routing_solvers.py --scaling       # time vs T and E of mcf and fast, PNG plot

Writes JSON (``--out``, default ``benchmarks/results/routing_solvers.json``) and a markdown table beside it
(same name, ``.md``), and prints the table and one "target met / NOT met" line per target.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import moebalance as mb
from moebalance._machine import cpu_name

__all__ = ["main", "run_benchmark", "skip_reason", "render_markdown", "evaluate_targets"]

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "routing_solvers.json"
QUICK_OUT = HERE / "results" / "routing_solvers_quick.json"

FULL_GRID = {"tokens": (1024, 4096, 16384), "experts": (16, 64, 256), "k": (1, 2, 8)}
QUICK_GRID = {"tokens": (256, 512), "experts": (8, 16), "k": (2,)}
REFERENCE = "mcf"  # exact, no time limit, fast: the optimum every gap is measured to
COLUMN_ORDER = ("mcf", "fast", "lp", "cvxpy", "bip", "mip", "greedy", "topk")
GENERATOR = {"function": "moebalance.generate.routing_problem", "kind": "zipf", "imbalance": 1.0}

TARGET = {"T": 4096, "E": 64, "k": 8}
TARGET_SPEEDUP = 100.0  # fastest exact method vs bip
# fast vs a plain full-graph min-cost flow (mcf) in the same run, at two sizes
FAST_TARGETS = (
    {"name": "fast_small", "T": 4096, "E": 64, "k": 8, "speedup": 10.0, "aim_s": 0.010, "aim_floor_ratio": 5.0},
    {"name": "fast_large", "T": 65536, "E": 256, "k": 8, "speedup": 10.0},
)
TARGET_INSTANCES = [(t["T"], t["E"], t["k"]) for t in FAST_TARGETS]
SCALING_OUT = HERE / "results" / "routing_solvers_scaling.json"
SCALING_T = (1024, 4096, 16384, 65536)  # at E=64, k=8
SCALING_E = (16, 64, 256)  # at T=16384, k=8
REL_TOL = 1e-6  # cross-checks between methods
MiB = 2**20


# ------------------------------------------------------------------------------------------ machine ---
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load and library versions: timings mean nothing without them."""
    cpu = cpu_name()
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for pkg in ("moebalance", "numpy", "scipy", "ortools", "cvxpy", "highspy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu,
        "cores": cores,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


# ------------------------------------------------------------------------------------- one run ----
def _finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _plain(v: Any) -> Any:
    """JSON-ready copy of a stats value (numpy scalars and arrays, non-finite floats -> None)."""
    if isinstance(v, dict):
        return {str(a): _plain(b) for a, b in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return _plain(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return _finite(v)
    return v if v is None or isinstance(v, str) else str(v)


def summarize(sol: mb.Solution) -> dict[str, Any]:
    """The numbers of a Solution the benchmark keeps (the assignment and bias stay behind)."""
    return {
        "status": sol.status.value,
        "objective": _finite(sol.objective),
        "bound": _finite(sol.bound),
        "own_gap": _finite(sol.gap),
        "wall_time": float(sol.wall_time),
        "feasible": sol.feasible,
        "load_ratio": _finite(sol.stats.get("load_ratio")),
        "message": sol.message,
        "stats": _plain({k: v for k, v in sol.stats.items() if k != "violations"}),
    }


def _vm_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _child(problem: Any, method: str, time_limit: float | None, conn: Any, repeats: int = 1) -> None:
    try:
        walls = []
        for _ in range(max(1, repeats)):
            out = summarize(mb.solve(problem, method, time_limit=time_limit))
            walls.append(out["wall_time"])
        if len(walls) > 1:  # the median of the runs; every run's time is kept
            out["wall_times"] = walls
            out["wall_time"] = float(np.median(walls))
    except Exception as exc:  # a ValueError here is a benchmark bug; record it, keep going
        out = {"status": "error", "message": f"{type(exc).__name__}: {exc}", "wall_time": None}
    hwm = _vm_kib("self", "VmHWM")
    out["peak_rss_mib"] = None if hwm is None else round(hwm / 1024, 1)
    conn.send(out)
    conn.close()


def run_method(
    problem: Any, method: str, time_limit: float | None, hard_limit: float, mem_limit_mib: float, repeats: int = 1
) -> dict[str, Any]:
    """Solve in a forked child; kill it past ``hard_limit`` seconds or ``mem_limit_mib`` resident memory.
    With ``repeats`` > 1 the child solves that many times and reports the median wall time (``wall_times``:
    each run's).

    The child inherits the problem (no copy) and the imported back-ends; its peak resident memory (VmHWM)
    counts the pages it shares with this process, so it overstates what the method itself needs.
    """
    if "fork" not in mp.get_all_start_methods():  # no fork (macOS default, Windows): run here, unguarded
        walls = []
        for _ in range(max(1, repeats)):
            out = summarize(mb.solve(problem, method, time_limit=time_limit))
            walls.append(out["wall_time"])
        if len(walls) > 1:
            out["wall_times"], out["wall_time"] = walls, float(np.median(walls))
        out["peak_rss_mib"] = None
        return out
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(problem, method, time_limit, send, repeats), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    peak = 0
    killed = None
    try:
        while True:
            if recv.poll(0.2):
                try:
                    out = recv.recv()
                except EOFError:  # died without answering (e.g. a crash in a back-end)
                    proc.join()
                    return {
                        "status": "error",
                        "message": f"process exited with code {proc.exitcode}",
                        "wall_time": time.perf_counter() - t0,
                        "peak_rss_mib": round(peak / 1024, 1),
                    }
                proc.join()
                return out
            rss = _vm_kib(proc.pid, "VmRSS") or 0
            peak = max(peak, rss)
            elapsed = time.perf_counter() - t0
            if rss > mem_limit_mib * 1024:
                killed = f"killed (memory {rss / 2**20:.1f} GiB > {mem_limit_mib / 1024:g} GiB)"
            elif elapsed > hard_limit:
                killed = f"killed (still running after {hard_limit:g} s)"
            if killed:
                proc.kill()
                proc.join()
                return {
                    "status": "killed",
                    "message": killed,
                    "wall_time": elapsed,
                    "peak_rss_mib": round(peak / 1024, 1),
                }
    finally:
        recv.close()


# ----------------------------------------------------------------------------------- skip rule ----
def skip_reason(
    method: str, T: int, E: int, k: int, history: list[dict[str, Any]], cap: float, mem_limit_mib: float
) -> str | None:
    """Why ``method`` should not run on (T, E, k), given its earlier records, or None to run it.

    ``history``: this method's earlier records, dicts with T, E, k, and either ``skipped`` (a reason) or
    ``exceeded`` (it ran longer than ``cap`` or hit its time limit), ``wall_time`` and ``peak_rss_mib``.
    An instance with the same k and at least as many tokens and experts is at least as hard, so a smaller
    one that exceeded the cap (or was skipped, for a reason that then carries over) rules it out; otherwise time
    and memory are predicted linearly in T from the largest smaller T with the same (E, k) and compared with
    the caps. Every reason names the instance (T, E) its evidence comes from.
    """
    for r in history:
        if r["k"] != k or r["T"] > T or r["E"] > E or (r["T"], r["E"]) == (T, E):
            continue
        if r.get("skipped"):
            return r["skipped"]
        if r.get("exceeded"):
            return f"skipped (>{cap:g} s at T={r['T']}, E={r['E']})"
    ran = [r for r in history if r["k"] == k and r["E"] == E and r["T"] < T and not r.get("skipped")]
    if ran:
        prev = max(ran, key=lambda r: r["T"])
        factor = T / prev["T"]
        wall = prev.get("wall_time")
        if wall is not None and wall * factor > cap:
            return f"skipped (predicted >= {wall * factor:.0f} s from {wall:.1f} s at T={prev['T']}, E={E})"
        peak = prev.get("peak_rss_mib")
        if peak is not None and peak * factor > mem_limit_mib:
            return (
                f"skipped (predicted {peak * factor / 1024:.1f} GiB > {mem_limit_mib / 1024:g} GiB "
                f"from T={prev['T']}, E={E})"
            )
    return None


# ------------------------------------------------------------------------------------ the grid ----
def _quiet_backends() -> None:
    """Import the back-ends once, before forking: the children share them, and cvxpy's import-time warnings
    about OR-Tools solvers it cannot use (it resets its logger level on import) are not ours to print."""
    logging.disable(logging.WARNING)
    try:
        for name in (
            "ortools.sat.python.cp_model",
            "ortools.linear_solver.pywraplp",
            "ortools.graph.python.min_cost_flow",
            "scipy.optimize",
            "cvxpy",
        ):
            try:
                __import__(name)
            except ImportError:
                pass
    finally:
        logging.disable(logging.NOTSET)
    logging.getLogger("__cvxpy__").setLevel(logging.ERROR)
    # fast's compiled loops load (or, the first time ever, compile) once per process: do it before forking,
    # so every child measures the steady state a training loop sees from its second step on
    if "fast" in mb.available_methods("routing"):
        from moebalance.solvers.routing_fast import warm_up

        warm_up()


def _cross_check(inst: dict[str, Any], exact: set[str]) -> list[str]:
    """Relations every correct result obeys: bounds above the optimum, feasible answers not above it,
    proven optima equal to it."""
    opt = inst["optimum"]
    if opt is None:
        return [f"{inst['name']}: no optimum (reference {REFERENCE} failed)"]
    tol = REL_TOL * max(abs(opt), 1.0)
    bad = []
    for m, r in inst["results"].items():
        if r.get("skipped") or r["status"] in ("killed", "error"):
            continue
        obj, bound = r.get("objective"), r.get("bound")
        if bound is not None and bound < opt - tol:
            bad.append(f"{inst['name']} {m}: bound {bound:.10g} below the optimum {opt:.10g}")
        if r.get("feasible") and obj is not None and obj > opt + tol:
            bad.append(f"{inst['name']} {m}: feasible objective {obj:.10g} above the optimum {opt:.10g}")
        if m in exact and r["status"] == "optimal" and obj is not None and abs(obj - opt) > tol:
            bad.append(f"{inst['name']} {m}: claims optimal at {obj:.10g}, optimum is {opt:.10g}")
    return bad


def topk_floor(problem: Any, repeats: int = 3) -> float:
    """Seconds to read the scores and take a plain top-k (``argpartition``), the best of ``repeats``: the floor
    no routing method can beat."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.argpartition(-problem.scores, problem.k - 1, axis=1)[:, : problem.k]
        best = min(best, time.perf_counter() - t0)
    return best


def run_benchmark(
    tokens: tuple[int, ...],
    experts: tuple[int, ...],
    ks: tuple[int, ...],
    *,
    methods: list[str] | None = None,
    capacity_factor: float = 1.0,
    time_cap: float = 60.0,
    mem_limit_gib: float = 10.0,
    seed: int = 0,
    progress: bool = True,
    instances: list[tuple[int, int, int]] | None = None,
    repeats: int | None = 1,
) -> dict[str, Any]:
    """Run the grid (or the explicit ``instances`` (T, E, k)) and return the JSON-ready result (see the
    module docstring). ``repeats``: solves per method and instance, the median reported (None: 7 up to
    2**20 score entries, 3 above)."""
    from tqdm.auto import tqdm

    from moebalance.generate import routing_problem

    _quiet_backends()
    available = mb.available_methods("routing")
    methods = list(available if methods is None else methods)
    unknown = sorted(set(methods) - set(available))
    if unknown:
        raise ValueError(f"unknown or uninstalled `methods` {unknown}; available: {', '.join(available)}")
    if REFERENCE not in available:
        raise ValueError(f"the reference method {REFERENCE!r} (OR-Tools) is not installed")
    methods = [m for m in COLUMN_ORDER if m in methods] + [m for m in methods if m not in COLUMN_ORDER]
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)
    exact = {m for m in methods if mb.method_info("routing", m).exact}
    mem_limit_mib = mem_limit_gib * 1024
    hard_limit = 3 * time_cap + 60  # model building is outside the back-ends' time limits
    combos = (
        [(T, E, k) for E in sorted(experts) for k in sorted(ks) for T in sorted(tokens) if k <= E]
        if instances is None
        else list(instances)
    )
    history: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    instances = []
    bar = tqdm(total=len(combos) * len(methods), desc="routing", unit="run", disable=not progress)
    for T, E, k in combos:
        forced = (T, E, k) == (TARGET["T"], TARGET["E"], TARGET["k"])
        problem = routing_problem(
            T,
            E,
            k,
            capacity_factor=capacity_factor,
            kind=GENERATOR["kind"],
            imbalance=GENERATOR["imbalance"],
            seed=seed,
        )
        inst: dict[str, Any] = {
            "name": f"T={T} E={E} k={k}",
            "T": T,
            "E": E,
            "k": k,
            "capacity": int(problem.capacity[0]),
            "seed": seed,
            "target": forced,
            "load_average": list(os.getloadavg()),
            "topk_floor_s": topk_floor(problem),
            "results": {},
        }
        for m in methods:
            bar.set_postfix_str(f"T={T} E={E} k={k} {m}")
            reason = (
                None if (forced or m == REFERENCE) else skip_reason(m, T, E, k, history[m], time_cap, mem_limit_mib)
            )
            if reason:
                rec: dict[str, Any] = {"status": "skipped", "skipped": reason}
            else:
                limit = None if m == REFERENCE else time_cap  # mcf has no limit (its stats say so)
                rec = run_method(
                    problem,
                    m,
                    limit,
                    20 * hard_limit if m == REFERENCE else hard_limit,
                    mem_limit_mib,
                    _repeats(repeats, T, E),
                )
                wall = rec.get("wall_time")
                rec["exceeded"] = bool(
                    rec["status"] in ("time_limit", "killed") or (wall is not None and wall > time_cap)
                )
            inst["results"][m] = rec
            history[m].append(
                {
                    "T": T,
                    "E": E,
                    "k": k,
                    **{f: rec.get(f) for f in ("skipped", "exceeded", "wall_time", "peak_rss_mib")},
                }
            )
            bar.update(1)
        ref = inst["results"][REFERENCE]
        opt = ref.get("objective") if ref["status"] == "optimal" else None
        inst["optimum"] = opt
        for r in inst["results"].values():
            obj = r.get("objective")
            r["gap_to_opt"] = None if opt is None or obj is None else (opt - obj) / max(abs(opt), 1e-12)
        topk = inst["results"].get("topk", {})
        inst["topk_load_ratio"] = topk.get("load_ratio")
        instances.append(inst)
    bar.close()
    warnings = [w for inst in instances for w in _cross_check(inst, exact)]
    result = {
        "benchmark": "routing_solvers",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {
            "tokens": list(tokens),
            "experts": list(experts),
            "k": list(ks),
            "methods": methods,
            "repeats": "7 up to 2**20 score entries, 3 above (median)" if repeats is None else repeats,
            "exact_methods": sorted(exact),
            "reference": REFERENCE,
            "capacity_factor": capacity_factor,
            "time_cap_s": time_cap,
            "hard_limit_s": hard_limit,
            "mem_limit_gib": mem_limit_gib,
            "seed": seed,
            "generator": GENERATOR,
            "target": TARGET,
        },
        "instances": instances,
        "warnings": warnings,
    }
    result["targets"] = evaluate_targets(result)
    return result


# ------------------------------------------------------------------------------------- targets ----
def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets: bip vs the fastest exact method at T=4096, E=64, k=8, then ``fast`` vs ``mcf``
    (:func:`_fast_targets`), each with ``met`` (True/False/None = not measured) and a line."""
    inst = next(
        (i for i in result["instances"] if (i["T"], i["E"], i["k"]) == (TARGET["T"], TARGET["E"], TARGET["k"])), None
    )
    where = f"T={TARGET['T']}, E={TARGET['E']}, k={TARGET['k']}"
    if inst is None:
        return [
            {"name": n, "met": None, "line": f"target NOT measured: {n} ({where} is not in this grid)"}
            for n in ("speedup",)
        ] + _fast_targets(result)
    res = inst["results"]
    exact = set(result["config"]["exact_methods"])
    out = []
    # speedup: fastest proven-optimal exact method vs bip
    proven = {m: r for m, r in res.items() if m in exact and r["status"] == "optimal"}
    bip = res.get("bip", {})
    name = "speedup"
    if not proven:
        out.append(
            {"name": name, "met": False, "line": f"target NOT met: no exact method proved optimality at {where}"}
        )
    elif bip.get("wall_time") is None or bip["status"] in ("skipped", "error"):
        out.append(
            {
                "name": name,
                "met": None,
                "line": f"target NOT measured: bip did not run at {where} ({bip.get('skipped') or bip.get('message')})",
            }
        )
    else:
        best = min(proven, key=lambda m: proven[m]["wall_time"])
        ratio = bip["wall_time"] / proven[best]["wall_time"]
        finished = bip["status"] == "optimal"
        ok = ratio >= TARGET_SPEEDUP
        # an unfinished bip only bounds the ratio from below: a small lower bound decides nothing
        met = ok if (finished or ok) else None
        if finished:
            bip_txt, ratio_txt = f"bip {bip['wall_time']:.2f} s", f"{ratio:.0f}x"
        else:
            bip_txt = f"bip unfinished ({bip['status']}, not proven optimal) after {bip['wall_time']:.2f} s"
            ratio_txt = f">= {ratio:.0f}x (a lower bound)"
        verdict = {True: "target met", False: "target NOT met", None: "target NOT met as measured (undecided)"}
        out.append(
            {
                "name": name,
                "met": met,
                "ratio": ratio,
                "ratio_is_lower_bound": not finished,
                "fastest_exact": best,
                "fastest_time": proven[best]["wall_time"],
                "bip_time": bip["wall_time"],
                "bip_status": bip["status"],
                "line": f"{verdict[met]}: fastest exact method {best} {proven[best]['wall_time']:.3f} s vs "
                f"{bip_txt}: {ratio_txt} (need >= {TARGET_SPEEDUP:g}x) at {where}",
            }
        )
    out += _fast_targets(result)
    return out


def _fast_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Target: ``fast`` at least 10x faster than ``mcf`` (both proven optimal, same run) at T=4096, E=64, k=8
    and at T=65536, E=256, k=8; the aims (<= 10 ms, <= 5x the top-k floor) are reported beside the first."""
    out = []
    for tg in FAST_TARGETS:
        where = f"T={tg['T']}, E={tg['E']}, k={tg['k']}"
        inst = next((i for i in result["instances"] if (i["T"], i["E"], i["k"]) == (tg["T"], tg["E"], tg["k"])), None)
        if inst is None:
            out.append(
                {
                    "name": tg["name"],
                    "met": None,
                    "line": f"target NOT measured: {tg['name']} ({where} is not in this grid)",
                }
            )
            continue
        fast, mcf = inst["results"].get("fast", {}), inst["results"].get(REFERENCE, {})
        if fast.get("status") != "optimal" or mcf.get("status") != "optimal":
            out.append(
                {
                    "name": tg["name"],
                    "met": False if fast.get("status") else None,
                    "line": f"target NOT met: fast {fast.get('status')} / mcf {mcf.get('status')} at {where}",
                }
            )
            continue
        ratio = mcf["wall_time"] / fast["wall_time"]
        floor = inst.get("topk_floor_s")
        met = ratio >= tg["speedup"]
        rec = {
            "name": tg["name"],
            "met": met,
            "ratio": ratio,
            "fast_s": fast["wall_time"],
            "mcf_s": mcf["wall_time"],
            "topk_floor_s": floor,
            "fast_peak_rss_mib": fast.get("peak_rss_mib"),
        }
        extra = ""
        if floor:
            rec["floor_ratio"] = fast["wall_time"] / floor
            extra = f"; {rec['floor_ratio']:.1f}x the top-k floor ({floor * 1e3:.1f} ms)"
        if "aim_s" in tg:
            rec["aim_met"] = bool(
                fast["wall_time"] <= tg["aim_s"] and rec.get("floor_ratio", math.inf) <= tg["aim_floor_ratio"]
            )
            extra += (
                f"; aim (<= {tg['aim_s'] * 1e3:g} ms and <= {tg['aim_floor_ratio']:g}x the floor) "
                f"{'met' if rec['aim_met'] else 'NOT met'}"
            )
        rec["line"] = (
            f"target {'met' if met else 'NOT met'}: fast {fast['wall_time'] * 1e3:.1f} ms vs mcf "
            f"{mcf['wall_time'] * 1e3:.0f} ms: {ratio:.1f}x (need >= {tg['speedup']:g}x) at {where}" + extra
        )
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------- scaling ----
def _repeats(repeats: int | None, T: int, E: int) -> int:
    """Solves per measurement: ``repeats``, or (None) 7 up to 2**20 score entries and 3 above."""
    return (7 if T * E <= 2**20 else 3) if repeats is None else max(1, int(repeats))


def run_scaling(
    tokens: tuple[int, ...] = SCALING_T,
    experts: tuple[int, ...] = SCALING_E,
    k: int = 8,
    *,
    methods: list[str] | None = None,
    seed: int = 0,
    mem_limit_gib: float = 10.0,
    time_cap: float = 600.0,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Time of each exact method (default: every installed one without a time limit issue: mcf, fast) against
    T (at E=64) and against E (at T=16384), with the top-k floor; each run in a forked child, the median of
    ``repeats`` solves (see :func:`_repeats`)."""
    from moebalance.generate import routing_problem

    _quiet_backends()
    methods = methods or [m for m in ("mcf", "fast") if m in mb.available_methods("routing")]
    points = [(T, 64) for T in tokens] + [(16384, E) for E in experts if (16384, E) not in [(T, 64) for T in tokens]]
    rows = []
    for T, E in points:
        problem = routing_problem(T, E, k, kind=GENERATOR["kind"], imbalance=GENERATOR["imbalance"], seed=seed)
        row: dict[str, Any] = {"T": T, "E": E, "k": k, "topk_floor_s": topk_floor(problem), "results": {}}
        for m in methods:
            r = run_method(problem, m, None, time_cap, mem_limit_gib * 1024, _repeats(repeats, T, E))
            row["results"][m] = {
                f: r.get(f) for f in ("status", "wall_time", "wall_times", "objective", "peak_rss_mib")
            }
        opt = [r["objective"] for r in row["results"].values() if r["status"] == "optimal"]
        row["agree"] = bool(opt) and max(opt) - min(opt) <= REL_TOL * max(1.0, abs(max(opt)))
        rows.append(row)
        print(
            f"T={T:6d} E={E:4d}  floor {row['topk_floor_s'] * 1e3:8.1f} ms  "
            + "  ".join(
                f"{m} {row['results'][m]['wall_time'] * 1e3 if row['results'][m]['wall_time'] else float('nan'):9.1f} ms"
                for m in methods
            ),
            flush=True,
        )
    return {
        "benchmark": "routing_solvers_scaling",
        "machine": machine_info(),
        "methods": methods,
        "k": k,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    """Two panels: time vs T (E=64) and time vs E (T=16384), log-log, one line per method plus the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (axis, fixed, fval) in zip(axes, (("T", "E", 64), ("E", "T", 16384))):
        rows = sorted((r for r in result["rows"] if r[fixed] == fval), key=lambda r: r[axis])
        xs = [r[axis] for r in rows]
        for m in result["methods"]:
            ax.plot(xs, [r["results"][m]["wall_time"] for r in rows], marker="o", label=m)
        ax.plot(xs, [r["topk_floor_s"] for r in rows], "k--", label="top-k floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds")
        ax.set_title(f"time vs {axis} ({fixed}={fval}, k={result['k']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"exact routing methods on {result['machine']['cpu_model']} ({result['machine']['cores']} cores, shared)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------ markdown ----
def _g(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.1e}" if abs(v) < 1e-2 else f"{v:.3f}"


def _t(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _cell(r: dict[str, Any], what: str) -> str:
    if r.get("skipped"):
        return r["skipped"] if what == "time" else "skipped"  # the reason is in the time table
    st = r["status"]
    if st in ("killed", "error"):
        return f"{st}: {r.get('message', '')[:60]}"
    tag = {"optimal": "", "feasible": "", "time_limit": " (time limit)", "infeasible": " infeasible"}.get(st, st)
    if what == "time":
        return f"{_t(r.get('wall_time'))} s{tag}"
    if st == "infeasible":
        return f"infeasible (max/cap {r.get('load_ratio') or 0:.2f})"
    return _g(r.get("gap_to_opt") if what == "gap" else r.get("own_gap"))


def render_markdown(result: dict[str, Any]) -> str:
    """Three tables (wall time; gap to the mcf optimum; each method's own certified gap), targets and notes."""
    cfg, mach = result["config"], result["machine"]
    methods = cfg["methods"]
    v = mach["versions"]
    lines = [
        "## Routing solvers benchmark",
        "",
        f"Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['memory_gib']} GiB "
        f"(load average at start {', '.join(f'{x:.2f}' for x in mach['load_average_at_start'] or [])}); "
        + ", ".join(f"{p} {v[p]}" for p in ("numpy", "scipy", "ortools", "cvxpy", "highspy") if v.get(p))
        + ".",
        f'Instances: `routing_problem(T, E, k, kind="{cfg["generator"]["kind"]}", imbalance='
        f"{cfg['generator']['imbalance']}, seed={cfg['seed']})` (softmax of Gaussian logits + log-Zipf expert "
        f"popularity), capacity factor {cfg['capacity_factor']:g}. Every method but mcf runs with "
        f"time_limit={cfg['time_cap_s']:g} s; wall time includes model building. Exact methods: "
        f"{', '.join(cfg['exact_methods'])}; the optimum is mcf's.",
        "",
    ]
    head = ["T", "E", "k", "top-k max/cap"]
    for what, title in (
        ("time", "Wall time (s)"),
        ("gap", "Gap to the optimum, (opt - objective) / opt"),
        ("own", "Certified gap from each method's own bound (Solution.gap)"),
    ):
        lines += [
            f"### {title}",
            "",
            "| " + " | ".join(head + methods) + " |",
            "|" + "---|" * (len(head) + len(methods)),
        ]
        for inst in result["instances"]:
            row = [
                str(inst["T"]),
                str(inst["E"]),
                str(inst["k"]),
                "-" if inst["topk_load_ratio"] is None else f"{inst['topk_load_ratio']:.2f}",
            ]
            row += [_cell(inst["results"][m], what) for m in methods]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += ["### Targets", ""] + [f"- {t['line']}" for t in result["targets"]] + [""]
    cap = f"{cfg['time_cap_s']:g} s"
    loads = [i["load_average"][0] for i in result["instances"] if i.get("load_average")]
    lines += [
        f'Notes: "skipped (>{cap} at T=.., E=..)" means the method took longer than {cap} (or stopped at '
        "its time limit) on that instance, which has the same k and no more tokens or experts; "
        '"predicted" skips extrapolate time or memory linearly in T from that instance. The target '
        'instance runs every method regardless; mcf (the reference) always runs. "(time limit)" marks a '
        "run stopped by its limit: its answer, if any, is not proven optimal. Wall time includes model "
        "building, so a limited run can take longer than the limit. top-k ignores capacity: its answer "
        "is infeasible and its objective is an upper bound. Own gaps below ~1e-8 are the integer scaling "
        "of mcf/bip (score resolution ~1e-9)."
        + (
            f" The machine was shared: 1-minute load average {min(loads):.1f}-{max(loads):.1f} on "
            f"{mach['cores']} cores while instances ran."
            if loads
            else ""
        ),
        "",
    ]
    if result["warnings"]:
        lines += ["### Cross-check warnings", ""] + [f"- {w}" for w in result["warnings"]] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- CLI ----
def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small smoke-test grid (< 30 s)")
    ap.add_argument(
        "--targets",
        action="store_true",
        help="only the issue-13 target instances (T=4096 E=64 k=8 and T=65536 E=256 k=8)",
    )
    ap.add_argument(
        "--scaling",
        action="store_true",
        help="time vs T and E of each exact method (mcf, fast) with the top-k floor: JSON and PNG",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON path (default {DEFAULT_OUT.relative_to(HERE.parent)}; --quick: "
        f"{QUICK_OUT.relative_to(HERE.parent)}); the markdown table goes beside it as .md",
    )
    ap.add_argument("--capacity-factor", type=float, default=1.0)
    ap.add_argument("--time-cap", type=float, default=60.0, help="time_limit per method and the skip threshold (s)")
    ap.add_argument("--mem-limit-gib", type=float, default=10.0, help="kill/skip runs above this memory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=_ints, default=None, help="override T values, e.g. 1024,4096")
    ap.add_argument("--experts", type=_ints, default=None)
    ap.add_argument("--k", type=_ints, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset (mcf always runs)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="solves per method and instance, the median reported (default: 1 on the grid; "
        "--targets and --scaling: 7 up to 2**20 score entries, 3 above)",
    )
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="run nothing: rewrite the markdown table beside an existing result JSON and print it",
    )
    args = ap.parse_args(argv)
    if args.render is not None:
        result = json.loads(args.render.read_text())
        md = render_markdown(result)
        args.render.with_suffix(".md").write_text(md + "\n")
        print(md)
        return result
    if not (args.capacity_factor > 0 and math.isfinite(args.capacity_factor)):
        ap.error("--capacity-factor must be a positive number")
    if not args.time_cap > 0:
        ap.error("--time-cap must be positive")
    if args.scaling:
        out = args.out or SCALING_OUT
        res = run_scaling(
            args.tokens or SCALING_T,
            args.experts or SCALING_E,
            (args.k or (8,))[0],
            methods=args.methods.split(",") if args.methods else None,
            seed=args.seed,
            mem_limit_gib=args.mem_limit_gib,
            repeats=args.repeats,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
        plot_scaling(res, out.with_suffix(".png"))
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return res
    grid = QUICK_GRID if args.quick else FULL_GRID
    default_out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.targets:
        default_out = HERE / "results" / "routing_solvers_targets.json"
    out = args.out or default_out
    result = run_benchmark(
        args.tokens or grid["tokens"],
        args.experts or grid["experts"],
        args.k or grid["k"],
        methods=args.methods.split(",") if args.methods else None,
        capacity_factor=args.capacity_factor,
        time_cap=args.time_cap,
        mem_limit_gib=args.mem_limit_gib,
        seed=args.seed,
        progress=not args.no_progress,
        instances=TARGET_INSTANCES if args.targets else None,
        repeats=args.repeats if args.repeats is not None else (None if args.targets else 1),
    )
    result["config"]["quick"] = bool(args.quick)
    result["config"]["command"] = " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv))
    md = render_markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
