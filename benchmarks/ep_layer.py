"""Benchmark: expert parallelism across processes, ``ep`` vs ``llep`` vs ``llep+``.

Two modes.

``--mode layer`` (default), one process per device, launched with torchrun::

    torchrun --standalone --nproc-per-node 4 benchmarks/ep_layer.py --small          # CPU, gloo
    torchrun --standalone --nproc-per-node 8 benchmarks/ep_layer.py                  # one 8-GPU node, nccl

Each rank runs :class:`moebalance.integrations.distributed.ExpertParallelMoE` on its own tokens, for every
scenario of the LLEP paper (``pct:n``: pct% of the tokens into n hot experts, homed on rank 0) and every
placement method, and reports per rank: median forward and forward+backward wall time, the time of each phase
(one extra profiled step: plan, weight copy, dispatch, expert compute, return, and the backward's phases), rows
computed, expert copies, and peak memory (CUDA: ``max_memory_allocated`` above the memory held before the step;
CPU: the peak resident set above the resident set before the step, read from /proc after resetting the peak).
Rank 0 prints a table and writes ``benchmarks/results/ep_layer_<device>_P<N>.json``.

Routing is real: the router is set to map hidden unit e onto expert e and each token's input lights the units
of the k distinct experts :func:`scenario_routing` picked for it (``--hidden`` must be >= ``--experts``).
``pct:n`` means pct% of the tokens go to the n hot experts, as the LLEP authors' test generator does, but with
k distinct experts per token as a real router gives: a hot token puts ``min(n, k)`` of its k slots there, so
the hot share of the slots is ``pct * min(n, k) / k`` (recorded in the JSON). The simulator's ``style="even"``
loads put pct% of the *slots* there, which for ``n < k`` no top-k router can produce. Every rank routes with the
same pattern (its own random tokens), so the global loads are about P times one rank's; the hot experts are the
first ones, homed on rank 0 (and the next ranks when n > E/P).

On CPU the script restarts itself once with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every tensor
above 64 KiB on its own and returns it on free: the peak resident set then follows live tensors.

``--mode calibrate``, a single process (no torchrun), for one device (the GPU later)::

    python benchmarks/ep_layer.py --mode calibrate --model gpt-oss-120b --devices 8 --tokens 32768   # GPU
    python benchmarks/ep_layer.py --mode calibrate --small                                            # CPU

For every scenario and method it solves the placement of ``P`` simulated devices (loads from the simulator's
:func:`moebalance.evaluation.simulate.scenario_loads`), then runs each device's workload (its rows of each expert it
computes, through :func:`moebalance.kernels.expert_ffn`) on this one device and times it: the measured
compute makespan of the plan is the slowest device's time. It fits ``time = token_time * rows + gemm_time *
GEMMs`` over all workloads (non-negative least squares) and writes ``benchmarks/results/ep_cost_model_<device>.json``
with that :class:`moebalance.CostModel` and the matching ``Hardware`` of the simulator (effective FLOP/s
``6 * hidden * ffn / token_time``, ``gemm_overhead = gemm_time``; the link bandwidth is assumed unless given).
The simulator reads it as ``moebalance.evaluation.simulate.simulate(..., hardware=Hardware(**json["hardware"]))``; this
script does so and prints the measured compute speedups beside the simulated ones (and, for gpt-oss-120b at
P=8, the LLEP paper's Figure 4 range).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_SCENARIOS = tuple(f"{pct}:{n}" for pct in (30, 50, 80, 95) for n in (1, 4, 16))
METHODS = ("ep", "llep", "llep+")
# the LLEP paper's Figure 4 speedups over EP, gpt-oss-120b, P=8, 32K tokens per device (range over its runs)
PAPER_FIG4 = {30: (1.73, 2.41), 95: (5.19, 6.11)}


# ---------------------------------------------------------------------------------------------------------
# routing of a scenario, realised through the layer's own router
# ---------------------------------------------------------------------------------------------------------


def scenario_routing(scenario: str, T: int, E: int, k: int, seed: int) -> np.ndarray:
    """``eidx [T, k]``, k distinct experts per token, for ``balanced`` or ``pct:n``.

    ``pct:n`` (the realisable form of the LLEP authors' test generator): ``round(pct% * T)`` hot tokens each
    put ``h = min(n, k)`` slots into the hot experts ``0..n-1`` (round robin, so the n share them evenly) and
    their other ``k - h`` slots into distinct random cold experts; the other tokens pick k distinct random cold
    experts. ``balanced``: k distinct random experts per token. The hot share of the slots is ``pct * h / k``.
    """
    rng = np.random.default_rng(seed)
    if scenario == "balanced":
        return np.argsort(rng.random((T, E)), axis=1)[:, :k]
    try:
        pct, n = float(scenario.split(":")[0]), int(scenario.split(":")[1])
    except (ValueError, IndexError):
        raise ValueError(f"scenario must be 'balanced' or 'pct:n', got {scenario!r}") from None
    if not (0 <= pct <= 100 and 1 <= n and E - n >= k):
        raise ValueError(f"scenario {scenario!r} needs 0 <= pct <= 100, n >= 1 and E - n >= k (E={E}, k={k})")
    h = min(n, k)
    hot_tokens = round(T * pct / 100)
    cold = n + np.argsort(rng.random((T, E - n)), axis=1)  # a random order of the cold experts per token
    eidx = cold[:, :k].copy()
    i = np.arange(hot_tokens)[:, None]
    eidx[:hot_tokens, :h] = (i * h + np.arange(h)[None, :]) % n  # distinct within a token since h <= n
    return eidx[rng.permutation(T)]


def routing_inputs(eidx: np.ndarray, hidden: int, E: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [T, hidden], router weight [E, hidden])`` whose top-k routing is exactly ``eidx``."""
    if hidden < E:
        raise ValueError(f"`--hidden` ({hidden}) must be >= `--experts` ({E}) to route scenarios exactly")
    g = torch.Generator().manual_seed(seed)
    T, k = eidx.shape
    x = 0.01 * torch.randn(T, hidden, generator=g)
    strength = 0.8 + 0.4 * torch.rand(T, k, generator=g)  # gate values differ between a token's experts
    x.scatter_add_(1, torch.from_numpy(eidx), strength)
    w = torch.zeros(E, hidden)
    w[:, :E] = 4.0 * torch.eye(E)
    return x, w


# ---------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak bytes above the starting point: CUDA allocator statistics, or the process's peak RSS on Linux."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        self.peak = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # writing 5 resets the kernel's peak-RSS counter (VmHWM) of this process
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
                self.base = _proc_kb("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            hwm = _proc_kb("VmHWM")
            self.peak = None if hwm is None else (hwm - self.base) * 1024


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _slug(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


# ---------------------------------------------------------------------------------------------------------
# mode "layer": the distributed layer under torchrun
# ---------------------------------------------------------------------------------------------------------


def _init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    import torch.distributed as dist
    from moebalance.integrations.distributed import init_process_group

    if "RANK" not in os.environ:  # run directly: a one-process group on 127.0.0.1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    init_process_group(timeout=_dt.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def run_layer(args: argparse.Namespace) -> dict[str, Any]:
    import torch.distributed as dist
    from moebalance.integrations.distributed import ExpertParallelMoE
    from moebalance.integrations.torch import MoEConfig, MoELayer

    rank, world, device = _init_distributed(args.timeout)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = getattr(torch, args.dtype)
    H, F, E, k, T = args.hidden, args.ffn, args.experts, args.top_k, args.tokens
    options = {
        "min_chunk": args.min_chunk,
        "alpha": args.alpha,
        "imbalance_threshold": args.imbalance_threshold or None,
    }
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden=H, ffn=F, num_experts=E, top_k=k, dtype=dtype), device=device)
    records = []
    it = args.scenarios
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        it = tqdm(args.scenarios, desc="ep_layer", unit="scenario")
    for sc in it:
        eidx = scenario_routing(sc, T, E, k, seed=1000 + rank)
        x, w_router = routing_inputs(eidx, H, E, seed=2000 + rank)
        x = x.to(device=device, dtype=dtype)
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3000 + rank)).to(device, dtype)
        for method in args.methods:
            ep = ExpertParallelMoE.from_layer(layer, placement=method, **options)
            with torch.no_grad():
                ep.router.weight.copy_(w_router.to(device, dtype))
            xs = x.clone().requires_grad_(not args.forward_only)

            def step(ep=ep, xs=xs, dy=dy) -> tuple[float, float]:
                _sync(device)
                t0 = time.perf_counter()
                y = ep(xs)
                _sync(device)
                t1 = time.perf_counter()
                if not args.forward_only:
                    y.backward(dy)
                    _sync(device)
                return t1 - t0, time.perf_counter() - t0

            for _ in range(args.warmup):
                step()
            fwd, total = [], []
            for _ in range(args.iters):
                dist.barrier()
                a, b = step()
                fwd.append(a)
                total.append(b)
            dist.barrier()
            with PeakMemory(device) as mem:
                step()
            dist.barrier()
            ep.profile = True
            step()
            ep.profile = False
            loads = ep.last_stats.loads.cpu().numpy()
            hot = int(sc.split(":")[1]) if ":" in sc else 0
            rec = {
                "scenario": sc,
                "method": method,
                "used": ep.last_plan.used,
                "fwd_s": statistics.median(fwd),
                "step_s": statistics.median(total),
                "phases_s": dict(ep.last_timings),
                "peak_bytes": mem.peak,
                "rows": ep.last_exchange["received"],
                "copies": len(ep.last_exchange["copies"]),
                "hot_share": float(loads[:hot].sum() / max(loads.sum(), 1)) if hot else 0.0,
                "imbalance": float(ep.last_plan.assignment.sum(axis=0).max() / max(loads.sum() / world, 1)),
                "ep_imbalance": float(
                    np.bincount(np.arange(E) // (E // world), weights=loads, minlength=world).max()
                    / max(loads.sum() / world, 1)
                ),
            }
            records.append(rec)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, records)
    result: dict[str, Any] = {}
    if rank == 0:
        rows = []
        for i, rec in enumerate(gathered[0]):
            per = [g[i] for g in gathered]
            comp = [
                p["phases_s"].get("expert compute (forward)", 0.0) + p["phases_s"].get("expert compute (backward)", 0.0)
                for p in per
            ]
            rows.append(
                {
                    "scenario": rec["scenario"],
                    "method": rec["method"],
                    "used": rec["used"],
                    "step_s": max(p["step_s"] for p in per),
                    "fwd_s": max(p["fwd_s"] for p in per),
                    "compute_s_max": max(comp),
                    "compute_s_min": min(comp),
                    "rows_max": max(p["rows"] for p in per),
                    "rows_mean": float(np.mean([p["rows"] for p in per])),
                    "copies": sum(p["copies"] for p in per),
                    "peak_bytes_max": max((p["peak_bytes"] or 0) for p in per)
                    if per[0]["peak_bytes"] is not None
                    else None,
                    "plan_s": max(p["phases_s"].get("plan", 0.0) for p in per),
                    "hot_share": rec["hot_share"],
                    "ep_imbalance": rec["ep_imbalance"],
                    "per_rank": per,
                }
            )
        for r in rows:
            base = (
                next(b for b in rows if b["scenario"] == r["scenario"] and b["method"] == "ep")
                if "ep" in args.methods
                else None
            )
            r["speedup_step"] = base["step_s"] / r["step_s"] if base else None
            r["speedup_compute"] = base["compute_s_max"] / r["compute_s_max"] if base and r["compute_s_max"] else None
            r["memory_ratio"] = (
                r["peak_bytes_max"] / base["peak_bytes_max"]
                if base and r["peak_bytes_max"] and base["peak_bytes_max"]
                else None
            )
        result = {
            "benchmark": "ep_layer",
            "mode": "layer",
            "device": _device_name(device),
            "backend": dist.get_backend(),
            "world_size": world,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "settings": {k_: v for k_, v in vars(args).items() if k_ not in ("out",)},
            "rows": rows,
        }
        _print_layer(result, args)
        out = Path(args.out) if args.out else RESULTS / f"ep_layer_{_slug(device)}_P{world}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {out}")
    dist.barrier()
    dist.destroy_process_group()
    return result


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def _print_layer(result: dict[str, Any], args: argparse.Namespace) -> None:
    what = "forward" if args.forward_only else "forward+backward"
    print(
        f"\nExpertParallelMoE, {result['world_size']} ranks, {result['backend']} on {result['device']}; "
        f"hidden={args.hidden} ffn={args.ffn} E={args.experts} k={args.top_k} {args.tokens} tokens/rank "
        f"{args.dtype}; times: slowest rank, median of {args.iters} ({what})"
    )
    head = [
        "scenario",
        "hot share",
        "EP max/mean",
        "method",
        "step ms",
        "fwd ms",
        "speedup",
        "compute ms max/min",
        "compute speedup",
        "rows max/mean",
        "copies",
        "peak MB",
        "mem ratio",
        "plan ms",
    ]
    body = []
    for r in result["rows"]:
        body.append(
            [
                r["scenario"],
                f"{r['hot_share']:.2f}",
                f"{r['ep_imbalance']:.2f}",
                r["method"] + ("" if r["used"] == r["method"] else f"->{r['used']}"),
                _ms(r["step_s"]),
                _ms(r["fwd_s"]),
                _x(r["speedup_step"]),
                f"{_ms(r['compute_s_max'])}/{_ms(r['compute_s_min'])}",
                _x(r["speedup_compute"]),
                f"{r['rows_max']}/{r['rows_mean']:.0f}",
                str(r["copies"]),
                "-" if r["peak_bytes_max"] is None else f"{r['peak_bytes_max'] / 2**20:.1f}",
                _x(r["memory_ratio"]),
                _ms(r["plan_s"]),
            ]
        )
    print(_table(head, body))


# ---------------------------------------------------------------------------------------------------------
# mode "calibrate": single-device compute time of every simulated device's workload, and a cost model
# ---------------------------------------------------------------------------------------------------------


def _time(fn: Any, device: torch.device, iters: int, warmup: int, stat: str = "median") -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return min(ts) if stat == "min" else statistics.median(ts)


def _fit(samples: list[tuple[int, int, float]]) -> dict[str, float]:
    """Non-negative least squares ``t = token_time * rows + gemm_time * gemms``; R^2 of the fit."""
    from scipy.optimize import nnls

    A = np.array([[n, g] for n, g, _ in samples], dtype=np.float64)
    b = np.array([t for _, _, t in samples], dtype=np.float64)
    coef, _ = nnls(A, b)
    pred = A @ coef
    ss = float(((b - b.mean()) ** 2).sum())
    return {
        "token_time": float(coef[0]),
        "gemm_time": float(coef[1]),
        "r2": 1.0 - float(((b - pred) ** 2).sum()) / ss if ss > 0 else 1.0,
        "samples": len(samples),
    }


def run_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from moebalance.kernels import expert_ffn

    from moebalance import CostModel, PlacementProblem, solve
    from moebalance.evaluation.simulate import MODELS, Hardware, ModelPreset, scenario_loads, simulate
    from moebalance.plan import makespan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model:
        preset = MODELS[args.model]
    else:
        preset = ModelPreset("custom", args.experts, args.top_k, args.hidden, args.ffn)
    E, k, H, F, P, T = preset.experts, preset.k, preset.hidden, preset.ffn, args.devices, args.tokens
    hw0 = Hardware(dtype_bytes=torch.finfo(dtype).bits / 8)
    if args.cost_file:  # plan with a measured cost model from an earlier calibration
        hw0 = Hardware(**json.loads(Path(args.cost_file).read_text(encoding="utf-8"))["hardware"])
    cost = hw0.cost(preset)
    g = torch.Generator(device="cpu").manual_seed(0)
    scale = 0.05
    wg = (scale * torch.randn(E, H, F, generator=g)).to(device, dtype)
    wu = (scale * torch.randn(E, H, F, generator=g)).to(device, dtype)
    wd = (scale * torch.randn(E, F, H, generator=g)).to(device, dtype)
    max_rows = P * T * k
    x_all = torch.randn(min(max_rows, args.max_rows), H, generator=g).to(device, dtype)
    timed: dict[tuple, tuple[float, float]] = {}  # (expert counts) -> (forward s, forward+backward s)

    def measure(counts: dict[int, int]) -> tuple[float, float]:
        key = tuple(sorted(counts.items()))
        if key in timed:
            return timed[key]
        es = [e for e, _ in key]
        cs = [c for _, c in key]
        n = sum(cs)
        if n > x_all.shape[0]:
            raise ValueError(f"a workload of {n} rows exceeds --max-rows {x_all.shape[0]}")
        xs = x_all[:n]
        w = [t[es].contiguous() for t in (wg, wu, wd)]
        fwd = _time(lambda: expert_ffn(xs, cs, *w), device, args.iters, args.warmup, args.stat)
        wr = [t.requires_grad_() for t in (w[0].clone(), w[1].clone(), w[2].clone())]
        xr = xs.clone().requires_grad_()
        dy = torch.randn_like(xs)  # a dense gradient (torch._grouped_mm's backward rejects sum()'s expanded one)

        def fb() -> None:
            expert_ffn(xr, cs, *wr).backward(dy)
            xr.grad = None
            for t in wr:
                t.grad = None

        both = _time(fb, device, args.iters, args.warmup, args.stat) if not args.forward_only else float("nan")
        timed[key] = (fwd, both)
        return timed[key]

    # warm up once on a mid-size workload (first calls pay for lazy initialisation), then forget it
    measure({e: max(1, T * k // E) for e in range(min(E, 4))})
    timed.clear()
    rows, samples_f, samples_b = [], [], []
    it = [(sc, m) for sc in args.scenarios for m in args.methods]
    if not args.no_progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="calibrate", unit="plan")
    for sc, method in it:
        loads = scenario_loads(sc, preset, P, T)
        problem = PlacementProblem(
            loads,
            P,
            cost=cost,
            alpha=args.alpha,
            min_chunk=args.min_chunk,
            imbalance_threshold=args.imbalance_threshold or None,
        )
        sol = solve(problem, method)
        x = np.asarray(sol.assignment)
        per_dev = []
        for p in range(P):
            counts = {int(e): int(x[e, p]) for e in np.flatnonzero(x[:, p])}
            if not counts:
                per_dev.append((0, 0, 0.0, 0.0))
                continue
            f_s, b_s = measure(counts)
            per_dev.append((sum(counts.values()), len(counts), f_s, b_s))
            samples_f.append((sum(counts.values()), len(counts), f_s))
            samples_b.append((sum(counts.values()), len(counts), b_s))
        rows.append(
            {
                "scenario": sc,
                "method": method,
                "status": sol.status.value,
                "assignment_col_sums": x.sum(axis=0).tolist(),
                "device_rows": [d[0] for d in per_dev],
                "device_gemms": [d[1] for d in per_dev],
                "device_fwd_s": [d[2] for d in per_dev],
                "device_fwd_bwd_s": [d[3] for d in per_dev],
                "makespan_fwd_s": max(d[2] for d in per_dev),
                "makespan_fwd_bwd_s": max(d[3] for d in per_dev),
                "_problem": problem,
                "_x": x,
            }
        )
    fit_f = _fit(samples_f)
    fit_b = _fit(samples_b) if not args.forward_only else None
    dtype_bytes = torch.finfo(dtype).bits / 8
    hardware = {
        "device_flops": 6.0 * H * F / fit_f["token_time"] if fit_f["token_time"] > 0 else float("inf"),
        "link_bandwidth": args.link_bandwidth or Hardware.link_bandwidth,
        "gemm_overhead": fit_f["gemm_time"],
        "dtype_bytes": dtype_bytes,
    }
    fitted = CostModel(token_time=fit_f["token_time"], gemm_time=fit_f["gemm_time"])
    for r in rows:
        base = next(b for b in rows if b["scenario"] == r["scenario"] and b["method"] == "ep")
        r["speedup_measured_fwd"] = base["makespan_fwd_s"] / r["makespan_fwd_s"] if r["makespan_fwd_s"] else None
        r["speedup_measured_fwd_bwd"] = (
            base["makespan_fwd_bwd_s"] / r["makespan_fwd_bwd_s"]
            if r["makespan_fwd_bwd_s"] and not args.forward_only
            else None
        )
        prob = PlacementProblem(r["_problem"].expert_loads, P, cost=fitted)
        bprob = PlacementProblem(base["_problem"].expert_loads, P, cost=fitted)
        r["speedup_fitted_compute"] = makespan(bprob, base["_x"]) / makespan(prob, r["_x"])
    # the simulator with the measured hardware (its cost model adds the assumed all-to-all time per token)
    sim = simulate(
        preset,
        P,
        T,
        scenarios=args.scenarios,
        methods=args.methods,
        hardware=Hardware(**hardware),
        alpha=args.alpha,
        min_chunk=args.min_chunk,
        imbalance_threshold=args.imbalance_threshold or None,
    )
    simmap = {(r["scenario"], r["method"]): r["speedup"] for r in sim.rows}
    for r in rows:
        r["speedup_simulated"] = simmap.get((r["scenario"], r["method"]))
        del r["_problem"], r["_x"]
    result = {
        "benchmark": "ep_layer",
        "mode": "calibrate",
        "device": _device_name(device),
        "dtype": args.dtype,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": preset.name,
        "shapes": {"hidden": H, "ffn": F, "experts": E, "top_k": k},
        "devices": P,
        "tokens_per_device": T,
        "measured": "single-device expert FFN (moebalance.kernels.expert_ffn) time of each simulated device's "
        "workload; no communication",
        "cost_model": {
            "token_time": fit_f["token_time"],
            "gemm_time": fit_f["gemm_time"],
            "weight_time": 3.0 * H * F * dtype_bytes / hardware["link_bandwidth"],
            "token_transfer_time": 0.0,
        },
        "cost_model_forward_backward": (
            None if fit_b is None else {"token_time": fit_b["token_time"], "gemm_time": fit_b["gemm_time"]}
        ),
        "hardware": hardware,
        "link_bandwidth_source": "given (--link-bandwidth)"
        if args.link_bandwidth
        else "assumed (moebalance.evaluation.simulate.Hardware default), not measured",
        "fit": {"forward": fit_f, "forward_backward": fit_b},
        "settings": {k_: v for k_, v in vars(args).items() if k_ not in ("out",)},
        "rows": rows,
    }
    _print_calibrate(result, args)
    out = Path(args.out) if args.out else RESULTS / f"ep_cost_model_{_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"wrote {out}")
    return result


def _print_calibrate(result: dict[str, Any], args: argparse.Namespace) -> None:
    s, f = result["shapes"], result["fit"]["forward"]
    print(
        f"\nSingle-device workloads of {result['devices']} simulated devices on {result['device']}: "
        f"{result['model']} shapes (hidden={s['hidden']} ffn={s['ffn']} E={s['experts']} k={s['top_k']}), "
        f"{result['tokens_per_device']} tokens/device, {result['dtype']}"
    )
    print(
        f"fit (forward): token_time={f['token_time']:.3e} s, gemm_time={f['gemm_time']:.3e} s, R^2={f['r2']:.4f} "
        f"over {f['samples']} workloads -> device_flops={result['hardware']['device_flops']:.3e} FLOP/s"
    )
    paper = result["model"] == "gpt-oss-120b" and result["devices"] == 8
    head = [
        "scenario",
        "method",
        "makespan fwd ms",
        "fwd+bwd ms",
        "speedup fwd",
        "speedup fwd+bwd",
        "fitted",
        "simulated",
    ] + (["paper Fig.4"] if paper else [])
    body = []
    for r in result["rows"]:
        pct = int(float(r["scenario"].split(":")[0])) if ":" in r["scenario"] else None
        ref = PAPER_FIG4.get(pct) if paper and r["method"] == "llep" else None
        body.append(
            [
                r["scenario"],
                r["method"],
                _ms(r["makespan_fwd_s"]),
                _ms(r["makespan_fwd_bwd_s"]),
                _x(r["speedup_measured_fwd"]),
                _x(r["speedup_measured_fwd_bwd"]),
                _x(r["speedup_fitted_compute"]),
                _x(r["speedup_simulated"]),
            ]
            + ([f"{ref[0]}-{ref[1]}" if ref else ""] if paper else [])
        )
    print(_table(head, body))


# ---------------------------------------------------------------------------------------------------------


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--mode", choices=("layer", "calibrate"), default="layer")
    p.add_argument("--small", action="store_true", help="small shapes for a CPU run (overrides the shape flags)")
    p.add_argument("--model", default=None, help="calibrate: a simulator preset (e.g. gpt-oss-120b)")
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--ffn", type=int, default=2880)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32768, help="tokens per rank (layer) / per device (calibrate)")
    p.add_argument("--devices", type=int, default=8, help="calibrate: simulated devices P")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--methods", type=_list, default=list(METHODS))
    p.add_argument("--scenarios", type=_list, default=["balanced", *PAPER_SCENARIOS])
    p.add_argument("--min-chunk", type=int, default=1024, help="LLEP's minimum spilled GEMM size")
    p.add_argument("--alpha", type=float, default=1.0, help="LLEP's capacity factor")
    p.add_argument("--imbalance-threshold", type=float, default=1.3, help="LLEP's EP fallback; 0 disables it")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="calibrate on CPU: torch threads (one: a busy machine stalls multi-threaded ops)",
    )
    p.add_argument(
        "--stat",
        choices=("median", "min"),
        default="median",
        help="calibrate: statistic of the --iters timings (min resists a busy shared machine)",
    )
    p.add_argument("--timeout", type=float, default=120.0, help="process-group timeout, seconds")
    p.add_argument("--link-bandwidth", type=float, default=None, help="calibrate: bytes/s to record (else assumed)")
    p.add_argument("--cost-file", default=None, help="calibrate: plan with the hardware of an earlier calibration")
    p.add_argument("--max-rows", type=int, default=1 << 22, help="calibrate: largest workload (rows)")
    p.add_argument("--out", default=None, help="JSON path (default under benchmarks/results/)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.small:
        args.hidden, args.ffn, args.experts, args.top_k = 64, 128, 32, 4
        args.tokens = 512 if args.mode == "layer" else 256
        args.min_chunk = 64
        args.model = None
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return args


def _fixed_mmap_threshold() -> None:
    """Restart once with a fixed glibc mmap threshold (before any process group exists), so that peak RSS
    measures tensors; glibc's default threshold grows after frees and then serves them from the resident heap."""
    if platform.system() == "Linux" and not torch.cuda.is_available() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _fixed_mmap_threshold()
    args = parse_args(argv)
    if args.mode == "layer":
        run_layer(args)
    else:
        run_calibrate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
