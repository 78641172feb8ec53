"""Benchmark: the layer's ``bip`` balancer step (torch, fixed budget, no host sync) on a stream of batches.

Each batch is a fresh draw of one router (the same Zipf expert popularity, new tokens): T tokens, E experts,
top-k. For each inner-iteration budget the balancer runs over the stream warm-started batch to batch, and
for every batch after a burn-in it records the step time (median over the stream) and the certified gap of
its prices (``BIPBalancer.certificate()``: their Lagrangian bound against the exact optimum of the batch by
``fast``, off the hot path), and the max load / capacity of top-k of ``scores - bias``. The exact ``fast``
solve of the same batch (cold, and warm-started from the balancer's prices) runs beside it, in the same
process, for the ratio.

    python benchmarks/bip_balancer.py                     # T=4096 E=64 k=8, CPU tensors
    python benchmarks/bip_balancer.py --device cuda       # on a GPU (when one is lent)

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


def run(T: int = 4096, E: int = 64, k: int = 8, batches: int = 24, burn_in: int = 4,
        budgets: tuple[int, ...] = (1, 2, 4, 8), device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The measurements (see the module docstring) as a JSON-ready dict."""
    import torch

    import moebalance as mb
    from moebalance.generate import routing_scores
    from moebalance.routing import RoutingProblem
    from moebalance.solvers.balancers import BIPBalancer
    from moebalance.solvers.routing_fast import warm_up

    from moebalance._machine import cpu_name

    warm_up()
    stream = routing_scores(T * batches, E, kind="zipf", imbalance=1.0, seed=seed).reshape(batches, T, E)
    sync = (torch.cuda.synchronize if device.startswith("cuda") else (lambda: None))
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
            cert = bal.certificate()
            gaps.append(cert["gap"])
            q = bias.detach().cpu().double().numpy()
            sel = np.argpartition(-(stream[b] - q), k - 1, axis=1)[:, :k]
            ratios.append(float(np.bincount(sel.ravel(), minlength=E).max() / cert["capacity"]))
            p = RoutingProblem(stream[b], k)
            t0 = time.perf_counter()
            mb.solve(p, "fast")
            fast_cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mb.solve(p, "fast", warm_start=q)
            fast_warm.append(time.perf_counter() - t0)
        rows.append({"iterations": it, "step_s": float(np.median(steps)), "gap_median": float(np.median(gaps)),
                     "gap_max": float(np.max(gaps)), "max_load_ratio_median": float(np.median(ratios)),
                     "fast_cold_s": float(np.median(fast_cold)), "fast_warm_s": float(np.median(fast_warm))})
    return {"benchmark": "bip_balancer", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device if device == "cpu" else torch.cuda.get_device_name(0),
            "cpu": cpu_name(), "torch": torch.__version__, "T": T, "E": E, "k": k, "batches": batches,
            "burn_in": burn_in, "seed": seed, "rows": rows}


def render(res: dict[str, Any]) -> str:
    lines = [f"bip balancer step, T={res['T']} E={res['E']} k={res['k']}, device {res['device']} "
             f"({res['batches'] - res['burn_in']} batches after {res['burn_in']} of burn-in, warm-started)",
             "", "| iterations | step (median) | certified gap (median / max) | max load / capacity | "
             "fast cold | fast warm-started |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['iterations']} | {r['step_s'] * 1e3:.2f} ms | {r['gap_median']:.2e} / {r['gap_max']:.2e} | "
                     f"{r['max_load_ratio_median']:.3f} | {r['fast_cold_s'] * 1e3:.1f} ms | "
                     f"{r['fast_warm_s'] * 1e3:.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for name in ("tokens", "experts", "k", "batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be a positive integer")
    if args.k >= args.experts:
        ap.error("--k must be below --experts")
    res = run(args.tokens, args.experts, args.k, batches=args.batches, burn_in=min(4, args.batches - 1),
              device=args.device)
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
