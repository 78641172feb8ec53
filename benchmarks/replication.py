"""Replication on real DeepSeek-V3 loads: certified gaps of eplb / eplb+, planning time next to the reference
transcription, a held-out window, migration under a move budget, per-batch dispatch, and step times.

    .venv/bin/python benchmarks/replication.py [--data DIR] [--out benchmarks/results/replication.json]
                                               [--milp-layers 3] [--milp-time 20] [--quick]

Data: ``deepseek_v3_expert_counts.json`` (12 serving runs, layers 3-60, 256 experts). Setting: 32 GPUs,
8 groups on 4 nodes (hierarchical), 256 / 288 / 320 slots. Each run's loads are normalised per layer to sum 1
before planning windows (so a long run does not outweigh a short one). Writes JSON, PNG plots and a Markdown
table under ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import moebalance as mb  # noqa: E402
from moebalance._machine import cpu_name  # noqa: E402
from moebalance.replication import ReplicationProblem, gpu_loads, layer_bounds  # noqa: E402

G, GROUPS, NODES = 32, 8, 4
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "routing"


def load_runs(folder: Path) -> dict[str, np.ndarray]:
    d = json.loads((folder / "deepseek_v3_expert_counts.json").read_text())
    return {k: np.asarray(v, dtype=np.float64)[3:] for k, v in d.items()}


def balancedness(problem: ReplicationProblem, phy2log: np.ndarray) -> np.ndarray:
    """``[L]`` mean / max GPU load (averaged over the window's batches)."""
    lo = gpu_loads(problem.weight, phy2log, G)
    return (lo.mean(axis=2) / lo.max(axis=2)).mean(axis=0)


def section_gaps(runs, slots_list, progress) -> dict:
    out = {}
    for R in slots_list:
        rows = []
        for name, W in runs.items():
            p = ReplicationProblem(W, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES)
            a = mb.solve(p, "eplb")
            b = mb.solve(p, "eplb+")
            lb = layer_bounds(p)
            la = gpu_loads(p.weight, a.assignment, G).max(axis=2)[0]
            lbb = gpu_loads(p.weight, b.assignment, G).max(axis=2)[0]
            rows.append(
                {
                    "run": name,
                    "eplb_gap": ((la - lb) / la).tolist(),
                    "eplbp_gap": ((lbb - lb) / lbb).tolist(),
                    "eplb_bal": balancedness(p, a.assignment).tolist(),
                    "eplbp_bal": balancedness(p, b.assignment).tolist(),
                    "bound_bal": ((p.weight.sum(axis=2)[0] / G) / lb).tolist(),
                    "eplb_time": a.wall_time,
                    "eplbp_time": b.wall_time,
                    "eplbp_never_worse": bool(np.all(lbb <= la * (1 + 1e-12))),
                    "total_gap_eplb": a.gap,
                    "total_gap_eplbp": b.gap,
                }
            )
            progress(f"gaps R={R} {name}: eplb {a.gap:.4%} eplb+ {b.gap:.4%} ({b.wall_time:.2f}s)")
        ge = np.concatenate([r["eplb_gap"] for r in rows])
        gp = np.concatenate([r["eplbp_gap"] for r in rows])
        out[str(R)] = {
            "runs": rows,
            "median_layer_gap_eplb": float(np.median(ge)),
            "median_layer_gap_eplbp": float(np.median(gp)),
            "max_layer_gap_eplb": float(ge.max()),
            "max_layer_gap_eplbp": float(gp.max()),
            "eplbp_never_worse": all(r["eplbp_never_worse"] for r in rows),
            "eplb_time_median": float(np.median([r["eplb_time"] for r in rows])),
            "eplbp_time_median": float(np.median([r["eplbp_time"] for r in rows])),
        }
    return out


def section_lp_milp(runs, milp_layers, milp_time, progress) -> dict:
    name = "decode_in1000out1000"
    W = runs[name]
    out = {}
    p = ReplicationProblem(W, 288, num_gpus=G, num_groups=GROUPS, num_nodes=NODES)
    s = mb.solve(p, "lp", time_limit=60)
    out["lp"] = {
        "run": name,
        "status": str(s.status),
        "bound": s.bound,
        "lp_only": s.stats.get("lp_layer_bounds") and float(np.sum(s.stats["lp_layer_bounds"])),
        "combinatorial": float(layer_bounds(p).sum()),
        "wall_time": s.wall_time,
    }
    progress(f"lp: {s.status} bound {s.bound:.6g} ({s.wall_time:.1f}s)")
    # the MILP on the layers where eplb+ is furthest from the bound
    b = mb.solve(p, "eplb+")
    lb = layer_bounds(p)
    lay = gpu_loads(p.weight, b.assignment, G).max(axis=2)[0]
    worst = np.argsort(-(lay - lb) / lay)[:milp_layers]
    res = []
    for l in sorted(worst.tolist()):
        q = ReplicationProblem(W[l : l + 1], 288, num_gpus=G, num_groups=GROUPS, num_nodes=NODES)
        m = mb.solve(q, "milp", time_limit=milp_time)
        res.append(
            {
                "layer": l + 3,
                "status": str(m.status),
                "objective": m.objective,
                "bound": m.bound,
                "gap": m.gap,
                "eplbp": float(lay[l]),
                "combinatorial_bound": float(lb[l]),
                "wall_time": m.wall_time,
            }
        )
        progress(f"milp layer {l + 3}: {m.status} gap {m.gap} ({m.wall_time:.1f}s)")
    out["milp"] = res
    return out


def section_timing(runs, progress) -> dict:
    import torch

    # the repository root: DeepSeek's loop is a test oracle
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.oracles.eplb_reference import rebalance_experts as reference

    out = {}
    W = runs["decode_in1000out1000"]
    for label, (groups, nodes) in {"hierarchical": (GROUPS, NODES), "global": (1, 1)}.items():
        for R in (256, 288, 320):
            t = time.perf_counter()
            ref = reference(torch.tensor(W), R, groups, nodes, G, stable=True)
            t_ref = time.perf_counter() - t
            times = []
            for _ in range(3):
                t = time.perf_counter()
                ours = mb.rebalance_experts(W, R, groups, nodes, G)
                times.append(time.perf_counter() - t)
            same = all(np.array_equal(x.numpy(), y) for x, y in zip(ref, ours))
            p = ReplicationProblem(W, R, num_gpus=G, num_groups=groups, num_nodes=nodes)
            tp = mb.solve(p, "eplb+").wall_time
            out[f"{label}_{R}"] = {
                "reference_s": t_ref,
                "eplb_s": min(times),
                "speedup": t_ref / min(times),
                "eplb_plus_s": tp,
                "identical": same,
            }
            progress(
                f"timing {label} R={R}: reference {t_ref:.3f}s eplb {min(times):.4f}s "
                f"x{t_ref / min(times):.0f} identical={same}"
            )
    return out


def _norm(W: np.ndarray) -> np.ndarray:
    return W / W.sum(axis=1, keepdims=True)


def section_window(runs, progress) -> dict:
    names = sorted(runs)
    train = names[0::2]
    test = names[1::2]
    Wtr = np.stack([_norm(runs[n]) for n in train])  # [B, L, E]
    Wte = np.stack([_norm(runs[n]) for n in test])
    out = {"train": train, "test": test}
    for R in (288, 320):
        pw = ReplicationProblem(Wtr, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES)
        a = mb.solve(pw, "eplb")  # plans on the summed loads
        b = mb.solve(pw, "eplb+")  # optimises the window's mean
        held = ReplicationProblem(Wte, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES)
        ea, eb = held.evaluate(a.assignment), held.evaluate(b.assignment)
        lbt = float(layer_bounds(held).sum())
        out[str(R)] = {
            "eplb_summed_heldout": ea.objective,
            "eplbp_window_heldout": eb.objective,
            "heldout_bound": lbt,
            "train_eplb": a.objective,
            "train_eplbp": b.objective,
            "improvement": 1 - eb.objective / ea.objective,
        }
        progress(
            f"window R={R}: held-out eplb(summed) {ea.objective:.5f} eplb+(window) {eb.objective:.5f} bound {lbt:.5f}"
        )
    return out


def section_migration(runs, progress) -> dict:
    W_old, W_new = runs["prefill_in1024"], runs["decode_in1000out1000"]
    R = 288
    old = mb.solve(ReplicationProblem(W_old, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES), "eplb").assignment
    base = ReplicationProblem(W_new, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES, old_phy2log=old)
    stay = base.evaluate(old).objective
    free = mb.solve(base, "eplb+")
    eplb_new = mb.solve(base, "eplb")
    rows = []
    for budget in (0, 3, 7, 14, 29, 58, 144):
        p = ReplicationProblem(
            W_new, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES, old_phy2log=old, max_moves=budget
        )
        s = mb.solve(p, "eplb+")
        m = mb.solve(p, "migrate")
        gain = (stay - s.objective) / (stay - free.objective)
        rows.append(
            {
                "max_moves": budget,
                "eplbp": s.objective,
                "migrate": m.objective,
                "kept_gain": float(gain),
                "max_moves_used": int(s.moves.max()),
                "feasible": s.feasible,
                "eplbp_time": s.wall_time,
            }
        )
        progress(
            f"migration budget {budget}: eplb+ {s.objective:.6g} ({gain:.1%} of the gain) migrate {m.objective:.6g}"
        )
    return {
        "old_run": "prefill_in1024",
        "new_run": "decode_in1000out1000",
        "stay": stay,
        "unconstrained_eplbp": free.objective,
        "unconstrained_moves": free.moves.tolist(),
        "eplb_new": eplb_new.objective,
        "eplb_new_moves_max": int(eplb_new.moves.max()),
        "rows": rows,
    }


def section_dispatch(runs, progress) -> dict:
    """Static plans (planned on the training runs) serving held-out batches: even split vs the dispatch LP,
    next to EP without replicas and LLEP / llep+ (the placement family), and the hybrid (replicas with the
    dispatch LP, then llep+ spilling replica units to other GPUs at the price of a weight copy), under one
    cost model. Step time of a layer: its slowest GPU, ``token_time * tokens + gemm_time * busy slots`` (plus
    ``weight_time`` per copied expert for the spilling methods)."""
    from moebalance.solvers.replication_lp import dispatch

    from moebalance.placement import CostModel, PlacementProblem

    names = sorted(runs)
    train, test = names[0::2], names[1::2]
    Wtr = np.stack([_norm(runs[n]) for n in train])
    # DeepSeek-V3 expert (hidden 7168, ffn 2048, bf16); 4e14 FLOP/s, 4.5e11 B/s links, 20 us per GEMM (assumed)
    cost = CostModel.from_shapes(7168, 2048, 2, 4e14, 4.5e11, 2e-5)
    R = 288
    S = R // G
    plan_a = mb.solve(ReplicationProblem(Wtr, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES), "eplb").assignment
    plan_b = mb.solve(ReplicationProblem(Wtr, R, num_gpus=G, num_groups=GROUPS, num_nodes=NODES), "eplb+").assignment
    tokens = 8192 * 8
    out = {"cost_model": cost.to_dict(), "tokens_per_batch": tokens, "runs": {}}

    def step(share):  # share [L, R] tokens per slot
        busy = (share.reshape(share.shape[0], G, S) > 0).sum(axis=2)
        lo = share.reshape(share.shape[0], G, S).sum(axis=2)
        return float((cost.token_time * lo + cost.gemm_time * busy).max(axis=1).sum())

    for name in test[:2]:
        W = _norm(runs[name]) * tokens  # one batch: 8192 tokens, top-8
        L = W.shape[0]
        t = {}
        for m in ("ep", "llep", "llep+"):
            t[f"{m}_no_replicas"] = sum(
                mb.solve(PlacementProblem(np.rint(W[l]).astype(np.int64), G, cost=cost), m).objective for l in range(L)
            )
        for label, plan in (("eplb", plan_a), ("eplb+", plan_b)):
            cnt = np.stack([np.bincount(plan[l], minlength=W.shape[1]) for l in range(L)])
            even = np.take_along_axis(W / cnt, plan, axis=1)
            t[f"{label}_even"] = step(even)
            share, _, _ = dispatch(W, plan, G)
            t[f"{label}_dispatch_lp"] = step(share)
        # hybrid: eplb+ replicas with the dispatch LP, then llep+ may spill replica units (home: the slot's GPU)
        hyb = 0.0
        for l in range(L):
            units = np.rint(share[l]).astype(np.int64)
            pp = PlacementProblem(units, G, home=np.arange(R) // S, cost=cost)
            hyb += min(mb.solve(pp, "llep+").objective, mb.solve(pp, "ep").objective)
        t["hybrid_eplb+_lp_llep+"] = hyb
        out["runs"][name] = t
        progress(f"dispatch {name}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items()))
    return out


def _save(fig, path: Path) -> str:
    """Lay out, write (110 dpi) and close ``fig``; returns the path as a string."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def plots(res: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=False)
    for ax, R in zip(axes, ("256", "288", "320")):
        run = res["gaps"][R]["runs"][0]
        x = np.arange(3, 3 + len(run["eplb_bal"]))
        ax.plot(x, run["eplb_bal"], label="eplb")
        ax.plot(x, run["eplbp_bal"], label="eplb+")
        ax.plot(x, run["bound_bal"], "k--", label="bound (best possible)")
        ax.set_title(f"{run['run']}, {R} slots")
        ax.set_xlabel("layer")
        ax.set_ylabel("balancedness (mean / max GPU load)")
        ax.legend()
    files.append(_save(fig, folder / "replication_balancedness.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = res["migration"]["rows"]
    ax.plot([r["max_moves"] for r in rows], [r["eplbp"] for r in rows], "o-", label="eplb+ under the budget")
    ax.plot([r["max_moves"] for r in rows], [r["migrate"] for r in rows], "s--", label="migrate")
    ax.axhline(res["migration"]["stay"], color="r", ls=":", label="keep the old plan")
    ax.axhline(res["migration"]["unconstrained_eplbp"], color="g", ls=":", label="eplb+ unconstrained")
    ax.set_xlabel("max_moves per layer (of 288 slots)")
    ax.set_ylabel("sum over layers of the max GPU load")
    ax.legend()
    files.append(_save(fig, folder / "replication_migration.png"))
    return files


def table(res: dict) -> str:
    lines = [
        "| slots | median layer gap eplb | median layer gap eplb+ | max layer gap eplb | max layer gap eplb+ | "
        "eplb+ never worse | eplb time (median) | eplb+ time (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for R, g in res["gaps"].items():
        lines.append(
            f"| {R} | {g['median_layer_gap_eplb']:.3%} | {g['median_layer_gap_eplbp']:.3%} | "
            f"{g['max_layer_gap_eplb']:.3%} | {g['max_layer_gap_eplbp']:.3%} | {g['eplbp_never_worse']} | "
            f"{g['eplb_time_median'] * 1e3:.1f} ms | {g['eplbp_time_median'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        "| policy, slots | reference transcription | eplb | speed-up | identical | eplb+ |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in res["timing"].items():
        lines.append(
            f"| {k} | {v['reference_s'] * 1e3:.0f} ms | {v['eplb_s'] * 1e3:.1f} ms | {v['speedup']:.0f}x | "
            f"{v['identical']} | {v['eplb_plus_s'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        "| window (held-out runs) | eplb on summed loads | eplb+ on the window | bound | improvement |",
        "|---|---|---|---|---|",
    ]
    for R in ("288", "320"):
        v = res["window"][R]
        lines.append(
            f"| {R} slots | {v['eplb_summed_heldout']:.5f} | {v['eplbp_window_heldout']:.5f} | "
            f"{v['heldout_bound']:.5f} | {v['improvement']:.3%} |"
        )
    mig = res["migration"]
    lines += [
        "",
        f"Migration ({mig['old_run']} plan -> {mig['new_run']} loads, 288 slots): keep old "
        f"{mig['stay']:.6g}, eplb+ unconstrained {mig['unconstrained_eplbp']:.6g}",
        "",
        "| max_moves | eplb+ | migrate | share of the unconstrained gain kept |",
        "|---|---|---|---|",
    ]
    for r in mig["rows"]:
        lines.append(f"| {r['max_moves']} | {r['eplbp']:.6g} | {r['migrate']:.6g} | {r['kept_gain']:.1%} |")
    lines += [
        "",
        "| held-out batch | " + " | ".join(next(iter(res["dispatch"]["runs"].values())).keys()) + " |",
        "|---" * (1 + len(next(iter(res["dispatch"]["runs"].values())))) + "|",
    ]
    for name, t in res["dispatch"]["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v * 1e3:.3f} ms" for v in t.values()) + " |")
    lm = res["lp_milp"]
    lines += [
        "",
        f"LP ({lm['lp']['run']}, 288 slots): bound {lm['lp']['bound']:.6g} (LP alone "
        f"{lm['lp']['lp_only']:.6g}, combinatorial {lm['lp']['combinatorial']:.6g}), "
        f"{lm['lp']['wall_time']:.1f} s",
        "",
        "| layer | milp status | milp gap | milp objective | milp bound | eplb+ | combinatorial bound | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in lm["milp"]:
        gap = "n/a" if r["gap"] is None else f"{r['gap']:.3%}"
        bound = "n/a" if r["bound"] is None else f"{r['bound']:.6g}"
        lines.append(
            f"| {r['layer']} | {r['status']} | {gap} | {r['objective']:.6g} | {bound} | {r['eplbp']:.6g} | "
            f"{r['combinatorial_bound']:.6g} | {r['wall_time']:.1f} s |"
        )
    return "\n".join(lines)


def section_limits(runs, progress) -> dict:
    """Wall time of ``lp``/``milp`` under time limits (model building included) and the LP's peak memory on a
    16-batch, 58-layer window (16 runs of real loads as batches)."""
    import resource
    import tracemalloc

    names = sorted(runs)
    W = np.stack([runs[names[b % len(names)]] for b in range(16)])  # [16, L, E], runs repeated when fewer
    out = {"window": list(W.shape), "weight_MiB": W.nbytes / 2**20, "rows": []}
    tracemalloc.start()
    t = time.perf_counter()
    sol = mb.solve(ReplicationProblem(W, 288, GROUPS, NODES, G), "lp")
    wall = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    out["lp_untimed"] = {
        "wall_s": wall,
        "status": sol.status,
        "bound": sol.bound,
        "objective": sol.objective,
        "python_peak_MiB": peak / 2**20,
        "process_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    progress(f"limits: lp untimed {wall:.1f}s, python peak {peak / 2**20:.0f} MiB")
    t = time.perf_counter()
    import ortools.linear_solver.python.model_builder  # noqa: F401  (one-time load, shown apart)

    out["ortools_import_s"] = time.perf_counter() - t
    progress(f"limits: OR-Tools import {out['ortools_import_s']:.2f}s (one-time, not in the rows)")
    for label, data in (("16x58 window", W), ("one batch, 58 layers", W[0])):
        for method in ("lp", "milp"):
            for limit in (0.2, 1.0):
                fresh = ReplicationProblem(data, 288, GROUPS, NODES, G)  # nothing computed on it yet
                t = time.perf_counter()
                sol = mb.solve(fresh, method, time_limit=limit)
                wall = time.perf_counter() - t
                out["rows"].append(
                    {
                        "problem": label,
                        "method": method,
                        "time_limit": limit,
                        "wall_s": wall,
                        "status": sol.status,
                        "within": wall <= 1.1 * limit + 0.5,
                    }
                )
                progress(f"limits: {label} {method} time_limit={limit}: {wall:.2f}s {sol.status}")
    return out


def table_limits(res: dict) -> str:
    lu = res["lp_untimed"]
    lines = [
        f"Window {res['window']} ({res['weight_MiB']:.1f} MiB of loads), 288 slots: lp without a limit "
        f"{lu['wall_s']:.1f} s, Python peak {lu['python_peak_MiB']:.0f} MiB, process max RSS "
        f"{lu['process_maxrss_MiB']:.0f} MiB; OR-Tools' one-time import {res['ortools_import_s']:.2f} s "
        f"(not in the rows)",
        "",
        "| problem | method | time_limit | wall (solve, building and the shared check) | status | "
        "<= 1.1 x limit + 0.5 s |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['time_limit']} s | {r['wall_s']:.2f} s | {r['status']} | {r['within']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "replication.json")
    ap.add_argument("--milp-layers", type=int, default=3)
    ap.add_argument("--milp-time", type=float, default=20.0)
    ap.add_argument("--quick", action="store_true", help="4 runs, 1 MILP layer of 5 s")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--limits",
        action="store_true",
        help="only the time-limit and memory rows (lp/milp on a 16-batch, 58-layer window); writes "
        "replication_limits.json/.md beside --out",
    )
    args = ap.parse_args(argv)
    runs = load_runs(args.data)
    if args.limits:
        res = {"machine": cpu_name(), **section_limits(runs, print)}
        out = args.out.with_name("replication_limits.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1, default=float))
        md = f"Machine: {res['machine']}\n\n" + table_limits(res) + "\n"
        out.with_suffix(".md").write_text(md)
        print(md)
        return 0
    if args.quick:
        runs = {k: runs[k] for k in ("decode_in1000out1000", "decode_in1800out100", "prefill_in1024", "prefill_in2048")}
        args.milp_layers, args.milp_time = 1, 5.0
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        if not args.no_progress:
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    res = {
        "machine": cpu_name(),
        "setting": {"num_gpus": G, "num_groups": GROUPS, "num_nodes": NODES, "layers": "3-60", "runs": sorted(runs)},
    }
    res["timing"] = section_timing(runs, progress)
    res["gaps"] = section_gaps(runs, (256, 288, 320), progress)
    res["window"] = section_window(runs, progress)
    res["migration"] = section_migration(runs, progress)
    res["dispatch"] = section_dispatch(runs, progress)
    res["lp_milp"] = section_lp_milp(runs, args.milp_layers, args.milp_time, progress)
    res["total_s"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1, default=float))
    md = table(res)
    res["plots"] = plots(res, args.out.parent)
    args.out.with_suffix(".md").write_text(f"Machine: {res['machine']}; total {res['total_s']:.0f} s\n\n" + md + "\n")
    print(md)
    print(f"wrote {args.out} and {', '.join(res['plots'])} in {res['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
