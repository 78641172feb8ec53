"""Benchmark: replicated experts with live rebalancing against plain EP and LLEP, on the shared real loads.

    nice -n 10 .venv/bin/python benchmarks/ep_rebalance.py --world 2          # gloo on CPU, 2 ranks
    nice -n 10 .venv/bin/python benchmarks/ep_rebalance.py --world 4
    python benchmarks/ep_rebalance.py --world 8 --backend nccl                # one GPU per rank

The script launches ``--world`` ranks itself (subprocesses joined on 127.0.0.1). Each step every rank routes
``--tokens`` tokens whose top-k experts are drawn from one recorded load vector (DeepSeek-V3 layer 10 of the
first decode run, OLMoE layer 0 on c4, Mixtral layer 0 on c4; read from ``--data``, default
``../shared/data/routing``): the router maps hidden unit e onto expert e and each token lights the units of its k
experts, so the routing is real and follows the recorded distribution. Three runtimes run the same steps:

- ``ep``: home experts only (``placement="ep"``);
- ``llep``: home experts plus per-step LLEP weight copies (``placement="llep"``);
- ``replicas`` (even), ``replicas+lp``, ``replicas+llep``: ``E/P + E/(4P)`` slots per rank (a quarter redundant),
  ``replication="eplb"``, a window of 4 steps and a rebalance every 4 steps (``min_gain`` 0.02), weights and SGD
  momentum moved asynchronously; each expert's tokens split over its replicas evenly, by the per-batch dispatch
  LP, or by LLEP run over the slots (``replica_split="llep"``, which may also lend a slot for the step).

Per runtime it reports the balancedness (mean / max of per-rank pairs) of each step, its mean before the first
rebalance and after it, and (replicas with the even or LP split) the mean over the same later steps had the initial
layout stayed (``initial_layout_after``: the same loads through the same split; the steps before and after differ,
so only this pair isolates what the rebalance did), the bytes moved per rebalance (all ranks), and the median forward+backward step time.
Rank 0 prints a markdown table and writes ``benchmarks/results/ep_rebalance_P<N>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_sources(data: Path) -> dict[str, np.ndarray]:
    ds = json.loads((data / "deepseek_v3_expert_counts.json").read_text())
    om = json.loads((data / "olmoe_mixtral_expert_counts.json").read_text())
    first = sorted(ds)[0]
    return {
        "deepseek-v3 (E=256, k=8)": np.asarray(ds[first][10], dtype=float),
        "olmoe (E=64, k=8)": np.asarray(om["olmoe"]["expert_counts"]["c4"]["0"], dtype=float),
        "mixtral (E=8, k=2)": np.asarray(om["mistral"]["expert_counts"]["c4"]["0"], dtype=float),
    }


TOP_K = {"deepseek-v3 (E=256, k=8)": 8, "olmoe (E=64, k=8)": 8, "mixtral (E=8, k=2)": 2}


def tokens_for(loads: np.ndarray, k: int, T: int, hidden: int, rng: np.random.Generator):
    """``x [T, hidden]`` whose top-k under the identity router are k distinct experts drawn from ``loads``."""
    import torch

    p = loads / loads.sum()
    x = rng.normal(0, 0.01, size=(T, hidden))
    for t in range(T):
        x[t, rng.choice(loads.size, size=k, replace=False, p=p)] += 1.0 + rng.random(k)
    return torch.tensor(x, dtype=torch.float32)


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch
    from moebalance.integrations.distributed import ExpertParallelMoE, init_process_group
    from moebalance.integrations.ep import ReplicaLayout, balancedness
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.set_num_threads(1)
    init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    dev = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if args.backend == "nccl":
        torch.cuda.set_device(dev)
    out: dict = {"world": world, "steps": args.steps, "tokens_per_rank": args.tokens, "sources": {}}
    for name, loads in load_sources(Path(args.data)).items():
        E, k = loads.size, TOP_K[name]
        n = E // world
        hidden = max(E, 16)
        torch.manual_seed(0)
        layer = MoELayer(
            MoEConfig(hidden=hidden, ffn=args.ffn, num_experts=E, top_k=k, backend="torch", dtype=torch.float32)
        ).to(dev)
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, :E] = 4.0 * torch.eye(E)
        runtimes = {
            "ep": dict(placement="ep"),
            "llep": dict(placement="llep"),
        }
        rep_opts = dict(
            num_local_slots=n + max(1, n // 4), replication="eplb", window_size=4, step_interval=4, min_gain=0.02
        )
        runtimes["replicas"] = dict(rep_opts, replica_split="even")
        runtimes["replicas+lp"] = dict(rep_opts, replica_split="lp")
        runtimes["replicas+llep"] = dict(rep_opts, replica_split="llep")
        res = {}
        for rt, opts in runtimes.items():
            ep = ExpertParallelMoE.from_layer(layer, **opts)
            opt = torch.optim.SGD([p for p in ep.parameters()], lr=0.0, momentum=0.9)  # lr 0: fixed routing
            rng = np.random.default_rng(1000 + rank)
            bal, times, reps, stay = [], [], [], []
            initial = ReplicaLayout.initial(E, world, ep.num_local_slots) if ep.replicas is not None else None
            for step in range(args.steps):
                x = tokens_for(loads, k, args.tokens, hidden, rng).to(dev)
                torch.distributed.barrier()
                t0 = time.perf_counter()
                y = ep(x)
                y.square().mean().backward()
                ep.allreduce_router_grad()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                opt.step()
                opt.zero_grad()
                d = ep.last_plan.device_loads
                bal.append(float(d.mean() / d.max()))
                if initial is not None and ep.replica_split in ("even", "lp"):
                    stay.append(
                        balancedness(initial.assignment(ep.last_plan.assignment.sum(1), ep.replica_split).sum(0))
                    )
                if rt.startswith("replicas"):
                    rep = ep.maybe_rebalance(opt)
                    if rep is not None:
                        moved = torch.tensor([rep.bytes_moved], dtype=torch.float64, device=dev)
                        torch.distributed.all_reduce(moved)
                        reps.append(
                            {
                                "step": step + 1,
                                "applied": rep.applied,
                                "moves": rep.moves,
                                "bytes_moved": int(moved.item()),
                                "bytes_saved": rep.bytes_saved,
                                "predicted_before": rep.balancedness_before,
                                "predicted_after": rep.balancedness_after,
                                "reason": rep.reason,
                            }
                        )
            first = next((r["step"] for r in reps if r["applied"]), None)
            res[rt] = {
                "balancedness": bal,
                "step_s_median": float(np.median(times[1:])),
                "before": float(np.mean(bal[:first])) if first else float(np.mean(bal)),
                "after": float(np.mean(bal[first:])) if first else None,
                "initial_layout_after": float(np.mean(stay[first:])) if first and stay else None,
                "rebalances": reps,
            }
        out["sources"][name] = res
    if rank == 0:
        path = ROOT / "benchmarks" / "results" / f"ep_rebalance_P{world}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(table(out))
    os._exit(0)


def table(out: dict) -> str:
    rows = [
        f"P={out['world']}, {out['tokens_per_rank']} tokens per rank per step, {out['steps']} steps\n",
        "| loads | runtime | balancedness before | after rebalancing | same steps, initial layout | "
        "bytes moved per rebalance (saved) | step time (ms, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in out["sources"].items():
        for rt, r in res.items():
            moved = [(x["bytes_moved"], x["bytes_saved"]) for x in r["rebalances"] if x["applied"]]
            after = "-" if r["after"] is None else f"{r['after']:.3f}"
            stay = "-" if r.get("initial_layout_after") is None else f"{r['initial_layout_after']:.3f}"
            rows.append(
                f"| {name} | {rt} | {r['before']:.3f} | {after} | {stay} | "
                f"{', '.join(f'{m / 1024:.0f} KiB ({v / 1024:.0f})' for m, v in moved) or '-'} | "
                f"{1e3 * r['step_s_median']:.1f} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per rank per step")
    ap.add_argument("--ffn", type=int, default=32)
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "routing"), help="folder of the shared routing loads"
    )
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        run_rank(args.rank, args.world, args.port, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(r), "--port", str(port)], env=env)
        for r in range(args.world)
    ]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
