"""Benchmark: the layer's ``bip`` balancer step (torch, fixed budget, no host sync) on a stream of batches.

Each batch is a fresh draw of one router (the same Zipf expert popularity, new tokens): T tokens, E experts,
top-k. For each inner-iteration budget the balancer runs over the stream warm-started batch to batch, and
for every batch after a burn-in it records the step time (median over the stream) and the certified gap of
its prices (``BIPBalancer.certificate()``: their Lagrangian bound against the exact optimum of the batch by
``fast``, off the hot path), and the max load / capacity of top-k of ``scores - bias``. The exact ``fast``
solve of the same batch (cold, and warm-started from the balancer's prices) runs beside it, in the same
process, for the ratio.

    python benchmarks/bip_balancer.py                     # T=4096 E=64 k=8, CPU tensors
    python benchmarks/bip_balancer.py --device cuda       # on a GPU (when one is lent; gpu_suite.sh's bip step)
    python benchmarks/bip_balancer.py --dry-run           # tiny shapes: the plumbing only

Writes JSON (``--out``, default ``benchmarks/results/bip_balancer_<device>.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent

__all__ = ["run", "main"]


def run(
    T: int = 4096,
    E: int = 64,
    k: int = 8,
    batches: int = 24,
    burn_in: int = 4,
    budgets: tuple[int, ...] = (1, 2, 4, 8),
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """The measurements (see the module docstring) as a JSON-ready dict."""
    import importlib.util

    import torch
    from moebalance.solvers import _fast_kernels
    from moebalance.solvers.balancers import BIPBalancer
    from moebalance.solvers.routing_fast import warm_up

    import moebalance as mb
    from moebalance._machine import cpu_name
    from moebalance.generate import routing_scores
    from moebalance.routing import RoutingProblem, expert_capacity

    # the exact optimum (the certified gap, and fast's columns) needs numba or, past 20 000 score entries,
    # OR-Tools: a GPU machine without them measures the step and the loads only
    exact = _fast_kernels.HAVE_NUMBA or T * E <= 20_000 or importlib.util.find_spec("ortools") is not None
    if exact:
        warm_up()
    stream = routing_scores(T * batches, E, kind="zipf", imbalance=1.0, seed=seed).reshape(batches, T, E)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for it in budgets:
        bal = BIPBalancer(E, k, capacity_factor=1.0, iterations=it)
        steps, gaps, ratios, fast_cold, fast_warm = [], [], [], [], []
        for b in range(batches):
            x = torch.as_tensor(stream[b], device=device)
            sync()
            t0 = time.perf_counter()
            bias = bal.update(x)
            sync()
            dt = time.perf_counter() - t0
            if b < burn_in:
                continue
            steps.append(dt)
            q = bias.detach().cpu().double().numpy()
            sel = np.argpartition(-(stream[b] - q), k - 1, axis=1)[:, :k]
            cap = expert_capacity(T, k, E, 1.0)
            ratios.append(float(np.bincount(sel.ravel(), minlength=E).max() / cap))
            if not exact:
                continue
            cert = bal.certificate()
            gaps.append(cert["gap"])
            p = RoutingProblem(stream[b], k)
            t0 = time.perf_counter()
            mb.solve(p, "fast")
            fast_cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mb.solve(p, "fast", warm_start=q)
            fast_warm.append(time.perf_counter() - t0)
        med = lambda v: float(np.median(v)) if v else None  # noqa: E731
        rows.append(
            {
                "iterations": it,
                "step_s": med(steps),
                "gap_median": med(gaps),
                "gap_max": float(np.max(gaps)) if gaps else None,
                "max_load_ratio_median": med(ratios),
                "fast_cold_s": med(fast_cold),
                "fast_warm_s": med(fast_warm),
            }
        )
    return {
        "benchmark": "bip_balancer",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device if device == "cpu" else torch.cuda.get_device_name(0),
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "T": T,
        "E": E,
        "k": k,
        "batches": batches,
        "burn_in": burn_in,
        "seed": seed,
        "exact": bool(exact),
        "note": None
        if exact
        else "numba and OR-Tools missing: no exact optimum, so no certified gap and no "
        "fast columns (step time and loads only)",
        "rows": rows,
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        f"bip balancer step, T={res['T']} E={res['E']} k={res['k']}, device {res['device']} "
        f"({res['batches'] - res['burn_in']} batches after {res['burn_in']} of burn-in, warm-started)",
        "",
        "| iterations | step (median) | certified gap (median / max) | max load / capacity | "
        "fast cold | fast warm-started |",
        "|---|---|---|---|---|---|",
    ]

    def f(v, spec, scale=1.0, unit=""):
        return "-" if v is None else f"{v * scale:{spec}}{unit}"

    for r in res["rows"]:
        lines.append(
            f"| {r['iterations']} | {f(r['step_s'], '.2f', 1e3, ' ms')} | {f(r['gap_median'], '.2e')} / "
            f"{f(r['gap_max'], '.2e')} | {f(r['max_load_ratio_median'], '.3f')} | "
            f"{f(r['fast_cold_s'], '.1f', 1e3, ' ms')} | {f(r['fast_warm_s'], '.1f', 1e3, ' ms')} |"
        )
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes (T=512, E=16, k=2, 6 batches): plumbing only")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.tokens, args.experts, args.k, args.batches = 512, 16, 2, 6
    for name in ("tokens", "experts", "k", "batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    if args.k >= args.experts:
        ap.error("--k must be below --experts")
    res = run(
        args.tokens,
        args.experts,
        args.k,
        batches=args.batches,
        burn_in=min(4, args.batches - 1),
        device=args.device,
        budgets=(1, 2) if args.dry_run else (1, 2, 4, 8),
    )
    res["dry_run"] = bool(args.dry_run)
    res["section"] = "bip"  # gpu_suite.sh's report reads it as its section "bip"
    out = args.out or HERE / "results" / f"bip_balancer_{'cpu' if args.device == 'cpu' else 'gpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = render(res)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
