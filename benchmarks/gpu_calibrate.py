"""GPU suite, section ``calibration``: the simulator's cost model measured on one GPU, and the simulator re-run on it.

1. GEMM time against tokens per expert: :func:`moebalance.kernels.expert_ffn` (the Triton expert FFN, the
   per-device step of expert parallelism) on ``G`` experts of ``n`` rows each, for a sweep of ``n`` and
   ``G in {1, 8}``; forward and forward+backward, median of event-timed runs. A non-negative least-squares fit
   ``t = token_time * rows + gemm_time * G`` gives the simulator's :class:`~moebalance.CostModel` terms and its
   ``Hardware`` (``device_flops = 6 * hidden * ffn / token_time``, ``gemm_overhead = gemm_time``).
2. Weight copy bandwidth: one step's worth of expert weights (8 experts' ``w_gate, w_up, w_down``) copied
   device to device, host (pinned) to device and device to host; payload bytes per second. LLEP copies weights
   between GPUs over NVLink, which one GPU cannot measure: the simulator keeps its assumed link bandwidth, and
   the JSON says so (``link_bandwidth_source``).
3. The simulator's speedup over EP on the LLEP paper's scenarios (x% of the tokens into n experts) for the
   paper's model (gpt-oss-120b, P = 8 devices, 32768 tokens per device), under the assumed hardware and under
   the measured one, beside the paper's Figure 4 range for LLEP.
4. The measured compute makespan of the ``ep`` and ``llep`` plans of each scenario: each plan's two devices of
   highest fitted cost run their workloads (their experts' rows) on this GPU; the LLEP speedup is EP's slowest
   measured device over LLEP's (compute only: no all-to-all, no weight copy).

Methods whose back-end is missing on the machine (e.g. ``lp-cvxpy``, ``milp``) are left out and listed.
``--dry-run``: a 32-expert toy model (hidden = ffn = 32, k = 2, 4 devices, 64 tokens per device), float32, CPU,
Triton interpreter, makespans for one scenario.

    python benchmarks/gpu_calibrate.py --out part.json [--dry-run]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gpu_common import Timer, base_parser, device, generator, import_simulator, is_dry, randn, write_part

# the LLEP paper's Figure 4 speedups of LLEP over EP, gpt-oss-120b, P=8, 32K tokens per device
PAPER_FIG4 = {30: (1.73, 2.41), 95: (5.19, 6.11)}
WANTED_METHODS = ("ep", "eplb", "eplb-home", "llep", "llep+", "lp")
GPU = {
    "model": "gpt-oss-120b",
    "devices": 8,
    "tokens_per_device": 32768,
    "rows": [128, 512, 2048, 8192, 32768],
    "groups": [1, 8],
    "repeats": 10,
    "warmup": 2,
    "dtype": "bfloat16",
    "min_chunk": 1024,
    "copy_experts": 8,
    "measure_scenarios": None,
}
DRY = {
    "model": None,
    "devices": 4,
    "tokens_per_device": 64,
    "rows": [16, 64],
    "groups": [1, 4],
    "repeats": 1,
    "warmup": 0,
    "dtype": "float32",
    "min_chunk": 16,
    "copy_experts": 2,
    "measure_scenarios": ["80:1"],
}


def nnls2(samples: list[tuple[float, float, float]]) -> dict[str, float]:
    """Non-negative least squares ``t = a * rows + b * gemms`` over ``(rows, gemms, t)``; R^2 of the fit."""
    A = np.array([[r, g] for r, g, _ in samples], dtype=np.float64)
    y = np.array([t for _, _, t in samples], dtype=np.float64)
    try:
        from scipy.optimize import nnls

        coef = nnls(A, y)[0]
    except ImportError:  # pragma: no cover - scipy is a dependency; kept for a bare machine
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        if (coef < 0).any():
            j = int(np.argmax(coef))
            coef = np.zeros(2)
            coef[j] = max(0.0, float(A[:, j] @ y / (A[:, j] @ A[:, j])))
    pred = A @ coef
    ss = float(((y - y.mean()) ** 2).sum())
    return {
        "token_time": float(coef[0]),
        "gemm_time": float(coef[1]),
        "r2": 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else 1.0,
        "samples": len(samples),
    }


def placement_methods() -> tuple[list[str], dict[str, str]]:
    """The wanted placement methods installed here, and ``{method: why not}`` for the others."""
    from moebalance import available_methods

    try:
        have = set(available_methods("placement"))
        every = available_methods("placement", installed_only=False)
    except Exception as exc:  # a registry whose API moved: keep the methods that need no optional back-end
        return [m for m in WANTED_METHODS if m != "lp"], {"lp": f"registry lookup failed: {exc!r}"}
    use = [m for m in WANTED_METHODS if m in have]
    missing = {}
    for m in every:
        if m not in have:
            try:
                from moebalance import method_info

                method_info("placement", m)
            except ValueError as exc:
                missing[m] = str(exc)
    return use, missing


def gemm_sweep(cfg, H: int, F: int, dev, dtype, timer: Timer, dry: bool) -> list[dict[str, Any]]:
    import torch
    from moebalance.kernels import expert_ffn

    G_max, n_max = max(cfg["groups"]), max(cfg["rows"])
    g = generator(dev, 3)
    w = [
        randn((G_max, H, F), g, dev, dtype, H**-0.5),
        randn((G_max, H, F), g, dev, dtype, H**-0.5),
        randn((G_max, F, H), g, dev, dtype, F**-0.5),
    ]
    x_all = randn((G_max * n_max, H), g, dev, dtype)
    out = []
    for G in cfg["groups"]:
        for n in cfg["rows"]:
            xs = x_all[: G * n]
            ws = [t[:G] for t in w]
            counts = [n] * G
            counts_dev = torch.tensor(counts, device=dev)  # the GPU path: no host check of the counts
            rec: dict[str, Any] = {"experts": G, "rows_per_expert": n, "rows": G * n, "flops_fwd": 6 * G * n * H * F}
            with torch.no_grad():
                rec["fwd"] = timer(
                    lambda xs=xs, counts_dev=counts_dev, ws=ws: expert_ffn(xs, counts_dev, *ws, backend="triton")
                )
            if not dry or G == 1:
                xr = xs.clone().requires_grad_(True)
                wr = [t.clone().requires_grad_(True) for t in ws]
                dy = torch.randn_like(xs)
                rec["fwd_bwd"] = timer(
                    lambda xr=xr, wr=wr, counts_dev=counts_dev, dy=dy: torch.autograd.grad(
                        expert_ffn(xr, counts_dev, *wr, backend="triton"), (xr, *wr), dy
                    )
                )
                del xr, wr
            rec["fwd_tflops"] = rec["flops_fwd"] / (rec["fwd"]["median_ms"] / 1e3) / 1e12
            out.append(rec)
    return out


def copy_bandwidth(cfg, H: int, F: int, dev, dtype, timer: Timer) -> dict[str, Any]:
    import torch

    n = cfg["copy_experts"]
    shapes = [(n, H, F), (n, H, F), (n, F, H)]
    src = [torch.randn(*s, device=dev, dtype=dtype) for s in shapes]
    dst = [torch.empty_like(t) for t in src]
    nbytes = sum(t.numel() * t.element_size() for t in src)

    def d2d() -> None:
        for a, b in zip(dst, src):
            a.copy_(b, non_blocking=True)

    out: dict[str, Any] = {"experts": n, "payload_bytes": nbytes, "bytes_per_expert": nbytes // n}
    t = timer(d2d)
    out["device_to_device"] = {**t, "bytes_per_s": nbytes / (t["median_ms"] / 1e3)}
    if dev.type == "cuda":
        host = [t_.cpu().pin_memory() for t_ in src]

        def h2d() -> None:
            for a, b in zip(dst, host):
                a.copy_(b, non_blocking=True)

        def d2h() -> None:
            for a, b in zip(host, src):
                a.copy_(b, non_blocking=True)

        t = timer(h2d)
        out["host_to_device_pinned"] = {**t, "bytes_per_s": nbytes / (t["median_ms"] / 1e3)}
        t = timer(d2h)
        out["device_to_host_pinned"] = {**t, "bytes_per_s": nbytes / (t["median_ms"] / 1e3)}
    else:
        out["host_to_device_pinned"] = {"skipped": "no CUDA device (dry run)"}
        out["device_to_host_pinned"] = {"skipped": "no CUDA device (dry run)"}
    return out


def measured_makespans(cfg, sim, preset, cost, scenarios, dev, dtype, timer: Timer) -> list[dict[str, Any]]:
    """EP's and LLEP's plans per scenario; the two devices of highest fitted cost of each run on this GPU."""
    import torch
    from moebalance.kernels import expert_ffn

    from moebalance import PlacementProblem, solve

    E, H, F, P, T = preset.experts, preset.hidden, preset.ffn, cfg["devices"], cfg["tokens_per_device"]
    g = generator(dev, 5)
    w = [
        randn((E, H, F), g, dev, dtype, H**-0.5),
        randn((E, H, F), g, dev, dtype, H**-0.5),
        randn((E, F, H), g, dev, dtype, F**-0.5),
    ]
    plans = {}
    for sc in scenarios:
        loads = sim.scenario_loads(sc, preset, P, T)
        prob = PlacementProblem(loads, P, cost=cost, min_chunk=cfg["min_chunk"])
        for m in ("ep", "llep"):
            s = solve(prob, m)
            if not s.feasible or s.assignment is None:
                plans[(sc, m)] = None
                continue
            x = np.asarray(s.assignment)
            pred = [sum(cost.token_time * x[e, p] + cost.gemm_time for e in np.flatnonzero(x[:, p])) for p in range(P)]
            plans[(sc, m)] = (x, pred)
    rows_max = max((int(v[0].sum(axis=0).max()) for v in plans.values() if v is not None), default=1)
    x_all = randn((rows_max, H), g, dev, dtype)
    out = []
    with torch.no_grad():
        for sc in scenarios:
            rec: dict[str, Any] = {"scenario": sc}
            for m in ("ep", "llep"):
                v = plans[(sc, m)]
                if v is None:
                    rec[m] = {"skipped": "no feasible plan"}
                    continue
                x, pred = v
                devs = [int(p) for p in np.argsort(pred)[::-1][:2]]
                times = {}
                for p in devs:
                    es = np.flatnonzero(x[:, p])
                    if not len(es):
                        times[p] = 0.0
                        continue
                    counts = torch.tensor([int(x[e, p]) for e in es], device=dev)
                    ws = [t[torch.as_tensor(es, device=dev)] for t in w]
                    xs = x_all[: int(counts.sum())]
                    ffn = lambda xs=xs, counts=counts, ws=ws: expert_ffn(xs, counts, *ws, backend="triton")
                    times[p] = timer(ffn)["median_ms"] / 1e3
                rec[m] = {
                    "devices_measured": devs,
                    "measured_s": [times[p] for p in devs],
                    "predicted_s": [float(pred[p]) for p in devs],
                    "makespan_measured_s": max(times.values()),
                    "device_rows": x.sum(axis=0).astype(int).tolist(),
                }
            if (
                "makespan_measured_s" in rec.get("ep", {})
                and "makespan_measured_s" in rec.get("llep", {})
                and rec["llep"]["makespan_measured_s"] > 0
            ):
                rec["llep_speedup_measured_compute"] = (
                    rec["ep"]["makespan_measured_s"] / rec["llep"]["makespan_measured_s"]
                )
            out.append(rec)
            print(f"  measured {sc}: llep speedup (compute) {rec.get('llep_speedup_measured_compute')}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    dry = is_dry(args)
    dev = device(dry)
    import dataclasses

    import torch

    from moebalance import CostModel

    sim = import_simulator()
    cfg = dict(DRY if dry else GPU)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])
    dtype_bytes = torch.finfo(dtype).bits / 8
    preset = sim.MODELS[cfg["model"]] if cfg["model"] else sim.ModelPreset("dry-toy", 32, 2, 32, 32)
    H, F = preset.hidden, preset.ffn
    timer = Timer(dev, cfg["repeats"], cfg["warmup"])

    sweep = gemm_sweep(cfg, H, F, dev, dtype, timer, dry)
    fit_f = nnls2([(r["rows"], r["experts"], r["fwd"]["median_ms"] / 1e3) for r in sweep])
    fb = [(r["rows"], r["experts"], r["fwd_bwd"]["median_ms"] / 1e3) for r in sweep if "fwd_bwd" in r]
    fit_fb = nnls2(fb) if len(fb) >= 2 else None
    print(
        f"fit forward: token_time {fit_f['token_time']:.3e} s, gemm_time {fit_f['gemm_time']:.3e} s, "
        f"R^2 {fit_f['r2']:.4f}",
        flush=True,
    )
    copies = copy_bandwidth(cfg, H, F, dev, dtype, timer)

    assumed = sim.Hardware(dtype_bytes=dtype_bytes)
    fitted_flops = fit_f["token_time"] > 0 and fit_f["r2"] > 0.5
    measured = sim.Hardware(
        device_flops=6.0 * H * F / fit_f["token_time"] if fitted_flops else assumed.device_flops,
        link_bandwidth=assumed.link_bandwidth,
        gemm_overhead=fit_f["gemm_time"],
        dtype_bytes=dtype_bytes,
    )
    flops_source = (
        "measured: 6 * hidden * ffn / token_time of the forward fit"
        if fitted_flops
        else f"ASSUMED (simulator default): the fit is unusable (token_time {fit_f['token_time']:.3g} s, "
        f"R^2 {fit_f['r2']:.3f})"
    )
    methods, missing = placement_methods()
    scenarios = ["balanced", *sim.PAPER_SCENARIOS]
    results = {}
    for name, hw in (("assumed", assumed), ("measured", measured)):
        res = sim.simulate(
            preset,
            cfg["devices"],
            cfg["tokens_per_device"],
            scenarios=scenarios,
            methods=methods,
            hardware=hw,
            min_chunk=cfg["min_chunk"],
        )
        results[name] = {(r["scenario"], r["method"]): r for r in res.rows}
    sim_rows = []
    for sc in scenarios:
        for m in methods:
            a, b = results["assumed"].get((sc, m), {}), results["measured"].get((sc, m), {})
            pct = int(float(sc.split(":")[0])) if ":" in sc else None
            ref = (
                PAPER_FIG4.get(pct) if (m == "llep" and preset.name == "gpt-oss-120b" and cfg["devices"] == 8) else None
            )
            sim_rows.append(
                {
                    "scenario": sc,
                    "method": m,
                    "status": b.get("status"),
                    "speedup_assumed_hw": a.get("speedup"),
                    "speedup_measured_hw": b.get("speedup"),
                    "makespan_measured_hw_s": b.get("makespan_s"),
                    "imbalance": b.get("imbalance"),
                    "paper_fig4_range": list(ref) if ref else None,
                }
            )
    data = {
        "settings": {**cfg, "model": preset.name, "hidden": H, "ffn": F, "experts": preset.experts, "top_k": preset.k},
        "simulator_module": sim.__name__,
        "gemm_sweep": sweep,
        "fit_forward": fit_f,
        "fit_forward_backward": fit_fb,
        "copy": copies,
        "hardware_assumed": dataclasses.asdict(assumed),
        "hardware_measured": dataclasses.asdict(measured),
        "device_flops_source": flops_source,
        "link_bandwidth_source": "assumed (simulator default): NVLink GPU-to-GPU copies cannot be measured on one "
        "GPU; the device-to-device and host copies above are for reference",
        "cost_model_measured": dataclasses.asdict(
            CostModel(token_time=fit_f["token_time"], gemm_time=fit_f["gemm_time"])
        ),
        "methods": methods,
        "methods_missing_backend": missing,
        "simulator": sim_rows,
        "measured_makespans": [],
        "complete": False,
    }
    for r in sim_rows:
        if r["method"] == "llep":
            print(
                f"  simulated {r['scenario']}: llep speedup assumed {r['speedup_assumed_hw']}, "
                f"measured hw {r['speedup_measured_hw']}, paper {r['paper_fig4_range']}"
            )
    write_part(args.out, "calibration", data, dev, dry)  # the fit and the simulator survive a stop below
    mscen = cfg["measure_scenarios"] or scenarios
    data["measured_makespans"] = measured_makespans(cfg, sim, preset, measured.cost(preset), mscen, dev, dtype, timer)
    data["complete"] = True
    write_part(args.out, "calibration", data, dev, dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
