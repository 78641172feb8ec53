"""Benchmark: what ``balancer="bip"`` (prices refit on each training batch before its top-k, each expert's
capacity enforced) costs per training step of tiny transformers models on CPU, against ``"none"``,
``"bip"`` with ``enforce_capacity=False`` (``bip_topk``: the prices alone) and ``"bip_lagged"``, and how the
price fit and the capacity-enforced assignment scale with the batch's tokens T and experts E.

Per configuration the balancers train the same model (AdamW, forward + backward + step, one intra-op thread)
in interleaved rounds, on a skewed router (every token leaning to two experts, as a collapsing router does).
Each round runs every balancer on the same batch back to back; a balancer's overhead is the median over the
rounds (after 2 warm-up rounds, which also compile the CPU loops) of its step time over ``none``'s in the
same round. The whole table is run ``--repeats`` times from new models (the shared machine's speed drifts);
the summary gives each overhead's median and range over the runs. The price fit (``BIPBalancer.update`` on
float32 CPU tensors, 4 iterations) and :func:`~moebalance.solvers.routing_prices.capacity_topk` with its
prices are timed alone on Zipf-skewed scores.

    python benchmarks/bip_step_cost.py            # the table; JSON in benchmarks/results/bip_step_cost.json
    python benchmarks/bip_step_cost.py --dry-run  # tiny: the plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def skew(model: Any, mbt: Any) -> None:
    """Every token leans to experts 0 and 1 (a shared direction in the embeddings and the routers)."""
    import torch

    emb = model.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    with torch.no_grad():
        emb.add_(v * emb.norm(dim=1).mean())
        for _, _, router, _ in mbt._find_blocks(model):
            router.weight.mul_(8.0)
            router.weight[:2] += 2.0 * v / router.weight.shape[1] ** 0.5


def step_costs(configs: list[tuple[str, int, int]], batch: int, seq: int, rounds: int) -> list[dict[str, Any]]:
    import torch
    from moebalance.integrations import transformers as mbt
    from transformers import AutoModelForCausalLM

    out = []
    for arch, E, k in configs:
        models, opts = {}, {}
        for bal in ("none", "bip", "bip_topk", "bip_lagged"):
            torch.manual_seed(0)
            m = AutoModelForCausalLM.from_config(mbt.tiny_config(arch, experts=E, top_k=k)).float()
            skew(m, mbt)
            if bal == "bip_topk":
                mbt.enable(m, balancer="bip", enforce_capacity=False)
            else:
                mbt.enable(m, balancer=bal)
            m.train()
            models[bal], opts[bal] = m, torch.optim.AdamW(m.parameters(), lr=1e-4)
        times: dict[str, list[float]] = {b: [] for b in models}
        for r in range(rounds + 2):
            ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(r))
            for bal, m in models.items():
                t0 = time.perf_counter()
                m(ids, labels=ids).loss.backward()
                opts[bal].step()
                opts[bal].zero_grad()
                if r >= 2:
                    times[bal].append(time.perf_counter() - t0)
        med = {b: statistics.median(v) for b, v in times.items()}
        # each round runs every balancer on the same batch back to back: the median of those paired ratios is
        # the overhead, robust to the shared machine's speed drifting between rounds
        paired = {
            b: statistics.median(x / y for x, y in zip(times[b], times["none"])) - 1 for b in models if b != "none"
        }
        out.append(
            {
                "arch": arch,
                "experts": E,
                "top_k": k,
                "tokens": batch * seq,
                "rounds": rounds,
                "step_s": med,
                "bip_overhead": paired["bip"],
                "bip_topk_overhead": paired["bip_topk"],
                "bip_lagged_overhead": paired["bip_lagged"],
                "overhead_of_medians": {b: med[b] / med["none"] - 1 for b in paired},
            }
        )
        print(
            f"{arch:12s} E={E:3d} k={k} T={batch * seq}: none {med['none'] * 1e3:7.1f} ms  bip "
            f"{med['bip'] * 1e3:7.1f} ms ({paired['bip']:+.1%})  bip_topk {med['bip_topk'] * 1e3:7.1f} ms "
            f"({paired['bip_topk']:+.1%})  bip_lagged {med['bip_lagged'] * 1e3:7.1f} ms "
            f"({paired['bip_lagged']:+.1%})",
            flush=True,
        )
    return out


def fit_scaling(sizes: list[tuple[int, int, int]], repeats: int) -> list[dict[str, Any]]:
    import torch
    from moebalance.solvers.balancers import BIPBalancer
    from moebalance.solvers.routing_prices import capacity_topk

    from moebalance.generate import routing_scores
    from moebalance.routing import expert_capacity

    out = []
    for T, E, k in sizes:
        s = torch.tensor(routing_scores(T, E, kind="zipf", imbalance=1.0, seed=0), dtype=torch.float32)
        cap = expert_capacity(T, k, E, 1.0)
        ts, tc = [], []
        for _ in range(repeats):
            b = BIPBalancer(E, k)  # from zero prices each time: the first batch of a run, the hardest
            t0 = time.perf_counter()
            q = b.update(s)
            t1 = time.perf_counter()
            capacity_topk(s - q, k, cap)
            ts.append(t1 - t0)
            tc.append(time.perf_counter() - t1)
        med, medc = statistics.median(ts), statistics.median(tc)
        out.append({"tokens": T, "experts": E, "top_k": k, "fit_s": med, "capacity_s": medc})
        print(f"price fit T={T:6d} E={E:4d} k={k}: {med * 1e3:8.2f} ms  capacity {medc * 1e3:8.2f} ms", flush=True)
    return out


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--rounds", type=int, default=60, help="timed steps per balancer (the median is reported)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the whole step table (each from new models)")
    ap.add_argument("--out", default=str(HERE / "results" / "bip_step_cost.json"))
    a = ap.parse_args(argv)
    import torch

    from moebalance._machine import cpu_name

    torch.set_num_threads(1)
    if a.dry_run:
        runs = [step_costs([("mixtral", 8, 2)], 2, 8, 1)]
        fits = fit_scaling([(256, 8, 2)], 2)
    else:
        configs = [("mixtral", 8, 2), ("qwen3_moe", 16, 2), ("olmoe", 64, 8), ("deepseek_v3", 16, 2)]
        runs = []
        for i in range(a.repeats):
            print(f"run {i + 1} of {a.repeats}", flush=True)
            runs.append(step_costs(configs, 8, 64, a.rounds))
        fits = fit_scaling([(T, E, k) for T in (1024, 4096, 16384) for E, k in ((16, 2), (64, 8), (256, 8))], 5)
    summary = []
    for j, row in enumerate(runs[0]):
        per = {b: [run[j][f"{b}_overhead"] for run in runs] for b in ("bip", "bip_topk", "bip_lagged")}
        summary.append(
            {
                "arch": row["arch"],
                "experts": row["experts"],
                "top_k": row["top_k"],
                "none_ms": [run[j]["step_s"]["none"] * 1e3 for run in runs],
                **{
                    f"{b}_overhead": {"median": statistics.median(v), "min": min(v), "max": max(v)}
                    for b, v in per.items()
                },
                "bip_within_10pct": all(x <= 0.10 for x in per["bip"]),
            }
        )
    print("\nbip's step overhead over the runs (median [min, max]):")
    for r in summary:
        o = r["bip_overhead"]
        print(
            f"  {r['arch']:12s} E={r['experts']:3d} k={r['top_k']}: {o['median']:+.1%} [{o['min']:+.1%}, {o['max']:+.1%}]"
            f"  <= 10% in every run: {'yes' if r['bip_within_10pct'] else 'no'}"
        )
    if not a.dry_run:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": "cpu",
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": 1},
            "rounds": a.rounds,
            "summary": summary,
            "runs": runs,
            "fit": fits,
        }
        Path(a.out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
