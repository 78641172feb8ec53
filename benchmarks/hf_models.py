"""Hugging Face models with moebalance: balancers while fine-tuning, and EP against LLEP over 2 gloo ranks.

Part 1: a tiny Mixtral and a tiny Qwen3-MoE (random init from config, routers skewed so that every token
prefers experts 0 and 1, as a badly balanced checkpoint would) fine-tuned on the balancer study's byte-level
text corpus (the standard library's Python sources) with each balancer; MaxVio (mean over the MoE layers) and
the loss per step, the validation loss at the end. Part 2: the same skewed Mixtral, wider, expert parallel over
2 gloo processes; the per-step time (forward + backward) of ``placement="ep"`` against ``"llep"``, side by side
in one run, with the computed rows per rank.

    python benchmarks/hf_models.py                 # ~5 minutes on a 2-core CPU
    python benchmarks/hf_models.py --steps 60 --ep-steps 6    # a smoke run

Writes ``benchmarks/results/hf_models.json`` and ``hf_models_maxvio.png`` / ``hf_models_loss.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
BALANCERS = ("none", "aux_loss", "loss_free", "bip")
ARCHS = ("mixtral", "qwen3_moe")


def corpus(train_bytes: int, val_bytes: int):
    """The study's corpus (``stdlib_corpus``), wherever the evaluation code lives now."""
    try:
        from moebalance.evaluation.study import stdlib_corpus
    except ImportError:
        from moebalance.study import stdlib_corpus
    return stdlib_corpus(train_bytes, val_bytes)


def skew(model, mbt, shift: float = 2.0, seed: int = 2) -> None:
    """A shared direction in the embeddings and routers leaning to it: every token prefers experts 0 and 1."""
    import torch

    emb = model.get_input_embeddings().weight
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(seed))
    v = v / v.norm()
    with torch.no_grad():
        emb.add_(v * emb.norm(dim=1).mean())
        for _, _, router, _ in mbt._find_blocks(model):
            router.weight.mul_(8.0)
            router.weight[:2] += shift * v / router.weight.shape[1] ** 0.5


def finetune(arch: str, balancer: str, train, val, args) -> dict:
    import torch
    from moebalance.integrations import transformers as mbt
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mbt.tiny_config(arch, hidden=args.hidden, ffn=args.ffn, vocab=256))
    skew(model, mbt)
    opts = {"bias_update_rate": args.rate} if balancer == "loss_free" else {}
    if balancer == "aux_loss":
        opts["aux_loss_coeff"] = args.aux_coeff
    mbt.enable(model, balancer=balancer, **opts)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(0)
    B, S = args.batch, args.seq
    losses, maxvio, t0 = [], [], time.perf_counter()
    for _step in range(args.steps):
        starts = rng.integers(0, train.size - S - 1, B)
        ids = torch.from_numpy(np.stack([train[s : s + S] for s in starts]).astype(np.int64))
        out = model(ids, labels=ids)
        loss = out.loss + (mbt.aux_loss(model) if balancer == "aux_loss" else 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        maxvio.append(float(np.mean([s.max_vio for s in mbt.load_stats(model)])))
    wall = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        n = (val.size - 1) // S
        ids = torch.from_numpy(val[: n * S].astype(np.int64).reshape(n, S)[: args.val_seqs])
        val_loss = float(model(ids, labels=ids).loss)
        val_vio = float(np.mean([s.max_vio for s in mbt.load_stats(model)]))
    tail = max(1, args.steps // 10)
    return {
        "arch": arch,
        "balancer": balancer,
        "loss": losses,
        "max_vio": maxvio,
        "val_loss": val_loss,
        "val_max_vio": val_vio,
        "final_loss": float(np.mean(losses[-tail:])),
        "final_max_vio": float(np.mean(maxvio[-tail:])),
        "first_max_vio": maxvio[0],
        "step_time_s": wall / args.steps,
    }


# ---------------------------------------------------------------------------------------------------------
# part 2: EP against LLEP over 2 gloo ranks (each rank a process)
# ---------------------------------------------------------------------------------------------------------


def _ep_worker(rank: int, world: int, store: str, out: str, args_json: str) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from moebalance.integrations import transformers as mbt
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    a = json.loads(args_json)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(11 + rank)
    ids = torch.randint(0, 256, (a["ep_batch"], a["ep_seq"]), generator=g)
    res = {}
    models = {}
    for placement in ("ep", "llep"):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(
            mbt.tiny_config("mixtral", hidden=a["ep_hidden"], ffn=a["ep_ffn"], layers=a["ep_layers"], vocab=256)
        )
        skew(m, mbt)
        opts = {"min_chunk": a["min_chunk"]} if placement == "llep" else {}
        mbt.enable(m, expert_parallel=True, placement=placement, **opts)
        models[placement] = m
        res[placement] = {"step_s": [], "rows": [], "transfers": [], "plan_s": [], "comm_s": {}}
    for step in range(a["ep_steps"] + 1):  # step 0 warms up; the placements alternate so drift hits both
        for placement, m in models.items():
            timings: dict = {}
            for b in mbt._state(m).blocks:
                b.shards.timings = timings  # seconds per communication phase, summed over the layers
            dist.barrier()
            t0 = time.perf_counter()
            m(ids).logits.float().square().mean().backward()
            mbt.allreduce_grads(m)
            dist.barrier()
            dt = time.perf_counter() - t0
            m.zero_grad(set_to_none=True)
            if step:
                blocks = mbt._state(m).blocks
                r = res[placement]
                r["step_s"].append(dt)
                r["rows"].append([int(b.shards.last_plan.assignment[:, rank].sum()) for b in blocks])
                r["transfers"].append(sum(len(b.shards.last_plan.weight_transfers) for b in blocks))
                r["plan_s"].append(sum(b.shards.last_plan.plan_time for b in blocks))
                for what, sec in timings.items():
                    r["comm_s"][what] = r["comm_s"].get(what, 0.0) + sec / a["ep_steps"]
    res["max_vio"] = [s.max_vio for s in mbt.load_stats(models["ep"])]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def ep_vs_llep(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(
            os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1"
        )
        payload = json.dumps({k: v for k, v in vars(args).items() if k not in ("out", "ep_worker")})
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--ep-worker", str(r), "2", f"{tmp}/store", tmp, payload], cwd=ROOT, env=env
            )
            for r in range(2)
        ]
        for p in procs:
            p.wait(timeout=900)
        if any(p.returncode for p in procs):
            raise RuntimeError(f"EP workers failed: return codes {[p.returncode for p in procs]}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(2)]
    out = {"max_vio_per_layer": ranks[0]["max_vio"]}
    for placement in ("ep", "llep"):
        steps = np.max([r[placement]["step_s"] for r in ranks], axis=0)  # a step ends when both ranks are done
        rows = np.array([r[placement]["rows"] for r in ranks])  # [P, steps, L]
        out[placement] = {
            "median_step_s": float(np.median(steps)),
            "step_s": steps.tolist(),
            "rows_per_rank_per_layer": rows[:, -1].tolist(),
            "max_over_mean_rows": float(np.mean(rows.max(0) / rows.mean(0))),
            "weight_transfers_per_step": float(np.mean(ranks[0][placement]["transfers"])),
            "plan_s_per_step": float(np.mean(ranks[0][placement]["plan_s"])),
            "comm_s_per_step_per_rank": [r[placement]["comm_s"] for r in ranks],
        }
    out["llep_speedup"] = out["ep"]["median_step_s"] / out["llep"]["median_step_s"]
    return out


def plot(runs: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for field, name, ylabel in (
        ("max_vio", "hf_models_maxvio.png", "MaxVio (mean over MoE layers)"),
        ("loss", "hf_models_loss.png", "training loss (nats / byte)"),
    ):
        fig, axes = plt.subplots(1, len(ARCHS), figsize=(11, 4), sharey=True)
        for ax, arch in zip(np.atleast_1d(axes), ARCHS):
            for r in (r for r in runs if r["arch"] == arch):
                y = np.asarray(r[field])
                w = max(1, len(y) // 30)
                ax.plot(np.convolve(y, np.ones(w) / w, mode="valid"), label=r["balancer"])
            ax.set_title(arch)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        np.atleast_1d(axes)[0].set_ylabel(ylabel)
        np.atleast_1d(axes)[0].legend()
        fig.tight_layout()
        p = out_dir / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps per (model, balancer)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rate", type=float, default=1e-2, help="loss_free bias update rate")
    ap.add_argument("--aux-coeff", type=float, default=1e-2)
    ap.add_argument("--val-seqs", type=int, default=64)
    ap.add_argument("--ep-steps", type=int, default=15)
    ap.add_argument("--ep-batch", type=int, default=8)
    ap.add_argument("--ep-seq", type=int, default=256)
    ap.add_argument("--ep-hidden", type=int, default=128)
    ap.add_argument("--ep-ffn", type=int, default=2048)
    ap.add_argument("--ep-layers", type=int, default=2)
    ap.add_argument("--min-chunk", type=int, default=32)
    ap.add_argument("--skip-ep", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--ep-worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ep_worker:
        r, w, store, out, payload = args.ep_worker
        _ep_worker(int(r), int(w), store, out, payload)
        return 0
    import torch
    import transformers

    from moebalance._machine import cpu_name

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train, val, info = corpus(2_000_000, 200_000)
    runs = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover

        def tqdm(x, **_):
            return x

    for arch, balancer in tqdm([(a, b) for a in ARCHS for b in BALANCERS], desc="fine-tuning"):
        runs.append(finetune(arch, balancer, train, val, args))
    ep = None if args.skip_ep else ep_vs_llep(args)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "ep_worker")}
    result = {
        "settings": settings,
        "corpus": info,
        "runs": runs,
        "ep_vs_llep": ep,
        "machine": {
            "cpu": cpu_name(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads_per_process": 1,
        },
        "wall_time_s": time.perf_counter() - t0,
    }
    (args.out / "hf_models.json").write_text(json.dumps(result, indent=1) + "\n")
    plots = plot(runs, args.out)
    print(f"\nFine-tuning, {args.steps} steps, batch {args.batch}x{args.seq} bytes ({cpu_name()}, 1 thread):")
    print(
        "| model | balancer | MaxVio first step | MaxVio last 10% | val MaxVio | train loss last 10% | val loss "
        "| s/step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['arch']} | {r['balancer']} | {r['first_max_vio']:.2f} | {r['final_max_vio']:.2f} | "
            f"{r['val_max_vio']:.2f} | {r['final_loss']:.3f} | {r['val_loss']:.3f} | {r['step_time_s']:.3f} |"
        )
    if ep:
        print(
            f"\nExpert parallel over 2 gloo ranks, skewed Mixtral (hidden {args.ep_hidden}, ffn {args.ep_ffn}, "
            f"{args.ep_layers} layers, {args.ep_batch}x{args.ep_seq} tokens per rank), {args.ep_steps} steps:"
        )
        print("| placement | median step (s) | max/mean rows per rank | weight copies / step | plan (s/step) |")
        print("|---|---|---|---|---|")
        for p in ("ep", "llep"):
            e = ep[p]
            print(
                f"| {p} | {e['median_step_s']:.3f} | {e['max_over_mean_rows']:.2f} | "
                f"{e['weight_transfers_per_step']:.1f} | {e['plan_s_per_step']:.4f} |"
            )
        print(f"LLEP speed-up over EP: {ep['llep_speedup']:.2f}x")
        for p in ("ep", "llep"):
            for r, c in enumerate(ep[p]["comm_s_per_step_per_rank"]):
                print(
                    f"  {p} rank {r} waits/communication (s/step): "
                    + ", ".join(f"{k} {v:.3f}" for k, v in sorted(c.items()))
                )
    print(f"\nwrote {args.out / 'hf_models.json'}, {', '.join(p.name for p in plots)} in {result['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
