"""Benchmark: a tiny transformers model trained under expert parallelism: plain EP, LLEP, and replicated experts
with live rebalancing (even, dispatch-LP and LLEP splits over the replicas).

    nice -n 10 .venv/bin/python benchmarks/ep_hf_rebalance.py --world 2          # gloo on CPU, 2 ranks
    nice -n 10 .venv/bin/python benchmarks/ep_hf_rebalance.py --world 4
    python benchmarks/ep_hf_rebalance.py --world 4 --backend nccl                # one GPU per rank (unmeasured)

The script launches ``--world`` ranks itself (subprocesses joined on 127.0.0.1). Every runtime trains the same
model (``tiny_config("mixtral", experts=--experts)``, its routers skewed so that experts 0 and 1 draw most tokens,
as in the tests) from the same initialisation on the same token batches with AdamW, so routing is the same in
every run (a plan changes where an expert runs, never what it computes) and only the placement differs:

- ``ep``: ``expert_parallel=True`` (home experts);
- ``llep``: ``placement="llep"`` (per-step weight copies; ``min_chunk`` 64, no imbalance threshold);
- ``replicas``, ``replicas+lp``, ``replicas+llep``: ``ExpertParallel(num_local_slots=E/P + 1, split=...,
  replication="eplb", window_size=4, step_interval=4, min_gain=0.02)``, rebalanced with
  ``ep.maybe_rebalance(model, optimizer)`` after each optimizer step (weights and both Adam moments move
  asynchronously, ``async_moves=True``; the next forward waits for them).

Per step: balancedness (mean / max of per-rank pairs, averaged over the MoE layers, from each layer's plan),
step time (forward + backward + gradient all-reduce + optimizer step + rebalance, the moves' wait included);
per rebalance: applied, moves, bytes moved (all ranks) and bytes saved by the relabelling. Rank 0 prints a
markdown table and writes ``benchmarks/results/ep_hf_rebalance_P<N>.json``.
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


def build(args: argparse.Namespace):
    import torch
    from moebalance.integrations import transformers as mbt
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = mbt.tiny_config("mixtral", experts=args.experts, top_k=2, hidden=args.hidden, ffn=args.ffn, layers=2)
    model = AutoModelForCausalLM.from_config(cfg).float()
    emb = model.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    with torch.no_grad():  # every token leans to experts 0 and 1
        emb.add_(v * emb.norm(dim=1).mean())
        for _, _, router, _ in mbt._find_blocks(model):
            router.weight.mul_(8.0)
            router.weight[:2] += args.skew * v / router.weight.shape[1] ** 0.5
    return model


def run_rank(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from moebalance.integrations import ep
    from moebalance.integrations import transformers as mbt
    from moebalance.integrations.distributed import init_process_group

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
    E = args.experts
    slots = E // world + 1
    # asynchronous moves on gloo too (the default waits there): these moves are small (KiB to a few MiB)
    rep = dict(
        replication="eplb", window_size=4, step_interval=4, min_gain=0.02, num_local_slots=slots, async_moves=True
    )
    llep = {"min_chunk": 64, "imbalance_threshold": None}
    runtimes = {
        "ep": dict(expert_parallel=True),
        "llep": dict(expert_parallel=True, placement="llep", **llep),
        "replicas": dict(expert_parallel=ep.ExpertParallel(split="even", **rep)),
        "replicas+lp": dict(expert_parallel=ep.ExpertParallel(split="lp", **rep)),
        "replicas+llep": dict(expert_parallel=ep.ExpertParallel(split="llep", split_options=llep, **rep)),
    }
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, 256, (args.seqs, args.seq_len), generator=gen) for _ in range(args.steps)]
    out: dict = {"world": world, "steps": args.steps, "tokens_per_rank": args.seqs * args.seq_len, "runtimes": {}}
    for name, opts in runtimes.items():
        model = build(args).to(dev)
        mbt.enable(model, **opts)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        blocks = mbt._state(model).blocks
        bal, times, losses, reps, stay = [], [], [], [], []
        split = getattr(opts["expert_parallel"], "split", None)
        initial = ep.ReplicaLayout.initial(E, world, slots)
        for step, ids in enumerate(batches):
            ids = ids.to(dev)
            dist.barrier()
            t0 = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            mbt.allreduce_grads(model, average=True)
            opt.step()
            opt.zero_grad()
            done = ep.maybe_rebalance(model, opt)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            d = [b.shards.last_plan.device_loads for b in blocks]
            bal.append(float(np.mean([x.mean() / x.max() for x in d])))
            if split in ("even", "lp"):  # the same loads through the same split, had the layout stayed
                loads = [b.shards.last_plan.assignment.sum(1) for b in blocks]
                stay.append(float(np.mean([ep.balancedness(initial.assignment(w, split).sum(0)) for w in loads])))
            for layer, r in enumerate(done):
                moved = torch.tensor([r.bytes_moved], dtype=torch.float64, device=dev)
                dist.all_reduce(moved)
                reps.append(
                    {
                        "step": step + 1,
                        "layer": layer,
                        "applied": r.applied,
                        "moves": r.moves,
                        "moves_unrelabelled": r.moves_unrelabelled,
                        "bytes_moved": int(moved.item()),
                        "bytes_saved": r.bytes_saved,
                        "predicted_before": r.balancedness_before,
                        "predicted_after": r.balancedness_after,
                        "reason": r.reason,
                    }
                )
        for b in blocks:
            if b.shards.replicas is not None:
                b.shards.replicas.wait()
        first = next((r["step"] for r in reps if r["applied"]), None)
        out["runtimes"][name] = {
            "balancedness": bal,
            "loss": losses,
            "step_s": times,
            "step_s_median": float(np.median(times[1:])),
            "before": float(np.mean(bal[:first])) if first else float(np.mean(bal)),
            "after": float(np.mean(bal[first:])) if first else None,
            "initial_layout_after": float(np.mean(stay[first:])) if first and stay else None,
            "rebalances": reps,
        }
        mbt.disable(model)
    if rank == 0:
        path = ROOT / "benchmarks" / "results" / f"ep_hf_rebalance_P{world}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        print(table(out))
    os._exit(0)


def table(out: dict) -> str:
    rows = [
        f"P={out['world']}, {out['tokens_per_rank']} tokens per rank per step, {out['steps']} steps\n",
        "| runtime | balancedness before | after rebalancing | same steps, initial layout | rebalances applied "
        "(moves) | bytes moved, all ranks (saved by relabelling) | step ms (median) | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rt, r in out["runtimes"].items():
        app = [x for x in r["rebalances"] if x["applied"]]
        after = "-" if r["after"] is None else f"{r['after']:.3f}"
        stay = "-" if r.get("initial_layout_after") is None else f"{r['initial_layout_after']:.3f}"
        moved = sum(x["bytes_moved"] for x in app)
        saved = sum(x["bytes_saved"] for x in app)
        rows.append(
            f"| {rt} | {r['before']:.3f} | {after} | {stay} | {len(app)} ({sum(x['moves'] for x in app)}) | "
            + (f"{moved / 1024:.0f} KiB ({saved / 1024:.0f} KiB)" if app else "-")
            + f" | {1e3 * r['step_s_median']:.1f} | {r['loss'][-1]:.4f} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--seqs", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--skew", type=float, default=2.0, help="how much the routers lean to experts 0 and 1")
    ap.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        run_rank(args.rank, args.world, args.port, args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rank", str(r), "--port", str(port)], env=env)
        for r in range(args.world)
    ]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
