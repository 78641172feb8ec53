"""Balancers in real transformers architectures: tiny Mixtral, Qwen3-MoE, OLMoE and DeepSeek-V3 trained from
scratch on the bytes of the Python standard library's sources, once per balancer and seed.

Grid: 4 architectures x (16, 64 experts) x (top-2, top-8) x balancers x seeds. Balancers: ``none``; ``aux``,
the model's own auxiliary loss (``output_router_logits=True``, ``router_aux_loss_coef`` at the transformers
default of the architecture; DeepSeek-V3 has none in transformers, so there it is moebalance's
``balancer="aux_loss"``, the same Switch-style loss, at 1e-3); ``loss_free`` (``bias_update_rate``); ``bip``
(prices refit on the batch, each expert's capacity enforced); ``bip_topk`` (the same prices, plain top-k); and any other name of ``moebalance.integrations.transformers.BALANCERS`` given to ``--balancers``. Every
balancer of one (configuration, seed) starts from the same weights and sees the same batches.

Per MoE layer it records the batch MaxVio ``(max_e load_e - mean) / mean`` of every training step, and reports
AvgMaxVio (mean over steps), its mean over the first 10 steps, SupMaxVio (largest over steps), MaxVio over the
validation set (the loads summed over all validation tokens, as arXiv 2408.15664 measures it), the training
loss (the language-model loss, without the auxiliary term), the validation perplexity, and the uniform-random
floor: the expected MaxVio of routing each token to k experts drawn uniformly at random, at the same T, E, k.

    nice -n 10 python benchmarks/hf_training.py                 # the full grid (see docs/training.md for times)
    python benchmarks/hf_training.py --quick                    # smoke run: 1 configuration, a few steps
    nice -n 10 python benchmarks/hf_training.py --sweep         # loss_free rates and aux coefficients (seed 0)
    nice -n 10 python benchmarks/hf_training.py --sweep --seeds 1 --merge   # a second seed of the sweep
    python benchmarks/hf_training.py --balancers bip --merge    # re-run some balancers into the same JSON

Writes ``benchmarks/results/hf_training.json`` (``_quick`` / ``_sweep``), a Markdown table ``.md`` and PNG
plots ``hf_training*_maxvio.png`` / ``_loss.png``. The JSON is rewritten after every run, so an interrupted grid
keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
ARCHS = ("mixtral", "qwen3_moe", "olmoe", "deepseek_v3")
SHAPES = ((16, 2), (64, 8), (64, 2), (16, 8))  # (experts, top_k), in the order the grid runs them
BALANCERS = ("none", "aux", "loss_free", "bip")
DEEPSEEK_AUX = 1e-3  # DeepSeek-V3 has no router_aux_loss_coef in transformers: moebalance's aux_loss at this
SWEEP_RATES = (1e-4, 1e-3, 1e-2, 1e-1)
SWEEP_COEFS = (1e-3, 1e-2, 1e-1)
SWEEP_CONFIGS = (("mixtral", 16, 2), ("qwen3_moe", 64, 8), ("deepseek_v3", 64, 8))
WINDOWS = ((0, 10), (10, 50), (50, 150), (150, None))


# ---- data and floors ---------------------------------------------------------------------------------------
def corpus(train_bytes: int, val_bytes: int):
    """The balancer study's corpus: bytes of the standard library's ``*.py`` files, split by file."""
    from moebalance.evaluation.study import stdlib_corpus

    return stdlib_corpus(train_bytes, val_bytes)


def random_floor(tokens: int, experts: int, top_k: int, trials: int = 400, seed: int = 0) -> dict[str, float]:
    """MaxVio of uniformly random top-k routing (k distinct experts per token) of ``tokens`` tokens:
    ``{"mean", "p99"}`` over ``trials`` draws."""
    rng = np.random.default_rng(seed)
    mean = tokens * top_k / experts
    vio = np.empty(trials)
    for i in range(trials):
        pick = np.argpartition(rng.random((tokens, experts)), top_k - 1, axis=1)[:, :top_k]
        vio[i] = (np.bincount(pick.ravel(), minlength=experts).max() - mean) / mean
    return {"mean": float(vio.mean()), "p99": float(np.quantile(vio, 0.99))}


# ---- one training run --------------------------------------------------------------------------------------
def model_config(arch: str, experts: int, top_k: int, args: Any, aux: bool):
    from moebalance.integrations import transformers as mbt

    extra: dict[str, Any] = {"output_router_logits": aux}
    if arch == "deepseek_v3":  # DeepSeek-V3's 8 groups, 4 of them chosen per token
        extra.update(n_group=8, topk_group=4)
    return mbt.tiny_config(
        arch, hidden=args.hidden, layers=args.layers, experts=experts, top_k=top_k, ffn=args.ffn, vocab=256, **extra
    )


def lr_at(step: int, args: Any) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))


def train_run(
    arch: str,
    experts: int,
    top_k: int,
    balancer: str,
    seed: int,
    train: np.ndarray,
    val: np.ndarray,
    args: Any,
    *,
    rate: float | None = None,
    coef: float | None = None,
) -> dict[str, Any]:
    """Train one model; ``balancer`` is "aux" (the model's own loss) or a moebalance balancer name."""
    import torch
    from moebalance.integrations import transformers as mbt
    from transformers import AutoModelForCausalLM

    own_aux = balancer == "aux" and arch != "deepseek_v3"
    cfg = model_config(arch, experts, top_k, args, own_aux)
    opts: dict[str, Any] = {}
    name = balancer
    if balancer == "aux":
        coef = float(cfg.router_aux_loss_coef if own_aux and coef is None else (DEEPSEEK_AUX if coef is None else coef))
        if own_aux:
            cfg.router_aux_loss_coef = coef
            name = "none"
        else:
            name, opts = "aux_loss", {"aux_loss_coeff": coef}
    if balancer == "bip_topk":  # the price alone: top-k of scores - price, capacity not enforced
        name, opts = "bip", {"enforce_capacity": False}
    if balancer == "loss_free":
        rate = args.rate if rate is None else rate
        if rate is not None:  # else enable's default for the router kind (LOSS_FREE_RATES)
            opts["bias_update_rate"] = rate
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    mbt.enable(model, balancer=name, **opts)
    if balancer == "loss_free":
        rate = float(mbt._state(model).blocks[0].balancer.rate)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(1000 + seed)
    B, S = args.batch, args.seq
    losses, vio = [], []
    t0 = time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = rng.integers(0, train.size - S - 1, B)
        ids = torch.from_numpy(np.stack([train[s : s + S] for s in starts]).astype(np.int64))
        out = model(ids, labels=ids)
        loss = out.loss
        lm = loss - cfg.router_aux_loss_coef * out.aux_loss if own_aux else loss
        if name == "aux_loss":
            loss = loss + mbt.aux_loss(model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(lm.detach()))
        vio.append([s.max_vio for s in mbt.load_stats(model)])
    wall = time.perf_counter() - t0
    model.eval()
    n = min(args.val_seqs, (val.size - 1) // S)
    val_ids = torch.from_numpy(val[: n * S].astype(np.int64).reshape(n, S))
    val_loads, nll, count, batch_vio = None, 0.0, 0, []
    with torch.no_grad():
        for i in range(0, n, args.batch):
            ids = val_ids[i : i + args.batch]
            out = model(ids, labels=ids)
            lm = out.loss - cfg.router_aux_loss_coef * out.aux_loss if own_aux else out.loss
            stats = mbt.load_stats(model)
            loads = np.stack([s.loads for s in stats]).astype(np.float64)
            val_loads = loads if val_loads is None else val_loads + loads
            batch_vio.append([s.max_vio for s in stats])
            nll += float(lm) * ids.numel()  # the loss is a mean over the S - 1 shifted positions; same weight
            count += ids.numel()
    mean = val_loads.sum(1, keepdims=True) / experts
    val_global = ((val_loads.max(1, keepdims=True) - mean) / mean)[:, 0]
    v = np.asarray(vio)  # [steps, L]
    tail = max(1, args.steps // 10)
    val_loss = nll / count
    return {
        "arch": arch,
        "experts": experts,
        "top_k": top_k,
        "balancer": balancer,
        "seed": seed,
        "bias_update_rate": rate if balancer == "loss_free" else None,
        "aux_coef": coef if balancer == "aux" else None,
        "aux_kind": ("model" if own_aux else "moebalance") if balancer == "aux" else None,
        "max_vio": v.tolist(),
        "loss": losses,
        "per_layer": {
            "avg_max_vio": v.mean(0).tolist(),
            "first10_max_vio": v[:10].mean(0).tolist(),
            "sup_max_vio": v.max(0).tolist(),
            "val_max_vio_global": val_global.tolist(),
            "val_max_vio_batch": np.mean(batch_vio, axis=0).tolist(),
        },
        "avg_max_vio": float(v.mean()),
        "first10_max_vio": float(v[:10].mean()),
        "sup_max_vio": float(v.max()),
        "step0_max_vio": float(v[0].mean()),
        "windows": {
            f"{a}-{b if b is not None else args.steps}": float(v[a:b].mean()) for a, b in WINDOWS if a < args.steps
        },
        "val_max_vio_global": float(val_global.mean()),
        "train_loss_tail": float(np.mean(losses[-tail:])),
        "val_loss": val_loss,
        "val_ppl": float(np.exp(val_loss)),
        "wall_s": wall,
        "step_s": wall / args.steps,
        "val_tokens": int(count),
    }


def default_rate(arch: str) -> float:
    """enable's default ``bias_update_rate`` for the architecture's router."""
    from moebalance.integrations.transformers import LOSS_FREE_RATES

    return LOSS_FREE_RATES["grouped_sigmoid" if arch == "deepseek_v3" else "softmax"]


def run_key(r: dict) -> tuple:
    return (
        r["arch"],
        r["experts"],
        r["top_k"],
        r["balancer"],
        r["seed"],
        r.get("bias_update_rate"),
        r.get("aux_coef") if r.get("sweep") else None,
        bool(r.get("sweep")),
    )


# ---- summaries ---------------------------------------------------------------------------------------------
def summarize(runs: list[dict], floors: dict) -> list[dict]:
    """One row per (arch, E, k, balancer[, rate / coef]): means over seeds, and the seed spread."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        label = r["balancer"]
        if r["balancer"] == "loss_free" and not r.get("sweep") and r["bias_update_rate"] != default_rate(r["arch"]):
            label += f"({r['bias_update_rate']:g})"  # an earlier default, or --rate
        if r.get("sweep"):
            label += f"({r['bias_update_rate']:g})" if r["balancer"] == "loss_free" else f"({r['aux_coef']:g})"
        groups.setdefault((r["arch"], r["experts"], r["top_k"], label), []).append(r)
    rows = []
    for (arch, E, k, label), rs in groups.items():
        fl = floors[f"{E}x{k}"]
        row = {"arch": arch, "experts": E, "top_k": k, "balancer": label, "seeds": len(rs)}
        for f in (
            "avg_max_vio",
            "first10_max_vio",
            "sup_max_vio",
            "step0_max_vio",
            "val_max_vio_global",
            "train_loss_tail",
            "val_loss",
            "val_ppl",
            "step_s",
        ):
            vals = np.array([r[f] for r in rs])
            row[f] = float(vals.mean())
            row[f + "_spread"] = float(vals.max() - vals.min())
        row["windows"] = {w: float(np.mean([r["windows"][w] for r in rs])) for w in rs[0]["windows"]}
        row["floor"] = fl["batch"]["mean"]
        row["val_floor"] = fl["val"]["mean"]
        row["sup_over_floor"] = row["sup_max_vio"] / row["floor"]
        row["step0_over_floor"] = row["step0_max_vio"] / row["floor"]
        rows.append(row)
    return rows


def goal(rows: list[dict]) -> list[dict]:
    """Per configuration: bip's SupMaxVio within 1.5x of the floor, and its validation loss within seed noise
    of the aux run's (|difference| <= the larger of the two seed spreads)."""
    out = []
    for b in (r for r in rows if r["balancer"] == "bip"):
        aux = next(
            (
                r
                for r in rows
                if r["balancer"] == "aux"
                and (r["arch"], r["experts"], r["top_k"]) == (b["arch"], b["experts"], b["top_k"])
            ),
            None,
        )
        noise = max(b["val_loss_spread"], aux["val_loss_spread"]) if aux else None
        out.append(
            {
                "arch": b["arch"],
                "experts": b["experts"],
                "top_k": b["top_k"],
                "step0_over_floor": b["step0_over_floor"],
                "sup_over_floor": b["sup_over_floor"],
                "balance_met": b["sup_over_floor"] <= 1.5,
                "val_loss_minus_aux": None if aux is None else b["val_loss"] - aux["val_loss"],
                "seed_noise": noise,
                "quality_met": None if aux is None or b["seeds"] < 2 else abs(b["val_loss"] - aux["val_loss"]) <= noise,
            }
        )
    return out


def render_table(rows: list[dict]) -> str:
    lines = [
        "| model | E | k | balancer | AvgMaxVio | first 10 | SupMaxVio | Sup / floor | val MaxVio "
        "(set) | floor (batch / set) | train loss | val ppl | s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pm = lambda f, r=r: f"{r[f]:.2f} ± {r[f + '_spread'] / 2:.2f}" if r["seeds"] > 1 else f"{r[f]:.2f}"
        lines.append(
            f"| {r['arch']} | {r['experts']} | {r['top_k']} | {r['balancer']} | {pm('avg_max_vio')} | "
            f"{r['first10_max_vio']:.2f} | {pm('sup_max_vio')} | {r['sup_over_floor']:.1f} | "
            f"{r['val_max_vio_global']:.3f} | {r['floor']:.2f} / {r['val_floor']:.3f} | "
            f"{r['train_loss_tail']:.3f} | {r['val_ppl']:.3f} ± {r['val_ppl_spread'] / 2:.3f} | "
            f"{r['step_s']:.3f} |"
        )
    return "\n".join(lines)


def render_windows(rows: list[dict]) -> str:
    ws = list(rows[0]["windows"]) if rows else []
    lines = [
        "| model | E | k | balancer | " + " | ".join(f"AvgMaxVio steps {w}" for w in ws) + " | val ppl |",
        "|---|---|---|---|" + "---|" * (len(ws) + 1),
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['experts']} | {r['top_k']} | {r['balancer']} | "
            + " | ".join(f"{r['windows'][w]:.2f}" for w in ws)
            + f" | {r['val_ppl']:.3f} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], floors: dict, out_dir: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({(r["experts"], r["top_k"]) for r in runs}, key=lambda c: SHAPES.index(c) if c in SHAPES else 99)
    archs = [a for a in ARCHS if any(r["arch"] == a for r in runs)]
    paths = []
    for field, suffix, ylabel in (
        ("max_vio", "maxvio", "AvgMaxVio (mean over layers)"),
        ("loss", "loss", "training loss (nats / byte)"),
    ):
        fig, axes = plt.subplots(
            len(archs), len(configs), figsize=(3.6 * len(configs), 2.8 * len(archs)), squeeze=False, sharex=True
        )
        for i, arch in enumerate(archs):
            for j, (E, k) in enumerate(configs):
                ax = axes[i][j]
                labels: dict[str, list] = {}
                for r in runs:
                    if (r["arch"], r["experts"], r["top_k"]) == (arch, E, k):
                        lab = r["balancer"] + (
                            f"({r['bias_update_rate']:g})"
                            if r.get("sweep") and r["balancer"] == "loss_free"
                            else f"({r['aux_coef']:g})"
                            if r.get("sweep")
                            else ""
                        )
                        y = np.asarray(r[field], dtype=float)
                        labels.setdefault(lab, []).append(y.mean(1) if y.ndim == 2 else y)
                for lab, ys in labels.items():
                    y = np.mean(ys, axis=0)
                    w = max(1, len(y) // 40)
                    ax.plot(
                        np.arange(len(y) - w + 1) + w // 2,
                        np.convolve(y, np.ones(w) / w, mode="valid"),
                        label=lab,
                        lw=1,
                    )
                if field == "max_vio":
                    ax.axhline(floors[f"{E}x{k}"]["batch"]["mean"], color="k", ls="--", lw=0.8, label="random floor")
                    ax.set_yscale("log")
                ax.set_title(f"{arch} E={E} k={k}", fontsize=9)
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
        axes[-1][0].set_xlabel("step")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{stem}_{suffix}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


# ---- main --------------------------------------------------------------------------------------------------
def build_grid(args: Any) -> list[dict]:
    """The runs to do, in order: ``{"arch", "experts", "top_k", "balancer", "seed", "rate", "coef", "sweep"}``."""
    if args.sweep:
        grid = [
            dict(arch=a, experts=E, top_k=k, balancer="loss_free", seed=s, rate=u, coef=None, sweep=True)
            for a, E, k in SWEEP_CONFIGS
            for s in args.seeds
            for u in SWEEP_RATES
        ]
        grid += [
            dict(arch=a, experts=E, top_k=k, balancer="aux", seed=s, rate=None, coef=c, sweep=True)
            for a, E, k in SWEEP_CONFIGS
            for s in args.seeds
            for c in SWEEP_COEFS
        ]
        return grid
    shapes = [s for s in SHAPES if s[0] in args.experts and s[1] in args.top_k]
    return [
        dict(arch=a, experts=E, top_k=k, balancer=b, seed=s, rate=None, coef=None, sweep=False)
        for (E, k) in shapes
        for a in args.archs
        for s in args.seeds
        for b in args.balancers
    ]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: mixtral E=16 k=2, 12 steps, one seed")
    ap.add_argument("--sweep", action="store_true", help="loss_free rates x aux coefficients on 3 configurations")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    ap.add_argument("--experts", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--top-k", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--balancers", nargs="+", default=list(BALANCERS))
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (the sweep: 0)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="bytes per sequence")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=32, help="each expert's inner width")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rate", type=float, default=None, help="loss_free bias_update_rate (default: enable's)")
    ap.add_argument("--val-seqs", type=int, default=64)
    ap.add_argument("--merge", action="store_true", help="keep the runs of the existing JSON not re-run now")
    ap.add_argument(
        "--report",
        action="store_true",
        help="only re-render the table and plots from the existing JSON (e.g. of a cut-off grid)",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.sweep else [0, 1]
    if args.quick:
        args.archs, args.experts, args.top_k, args.seeds = ["mixtral"], [16], [2], [0]
        args.steps, args.val_seqs, args.warmup = 12, 8, 2
    for name in ("steps", "batch", "seq", "hidden", "layers", "ffn", "val_seqs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.lr > 0 or (args.rate is not None and not args.rate > 0):
        ap.error("--lr and --rate must be > 0")
    for E in args.experts:
        for k in args.top_k:
            if not 1 <= k <= E:
                ap.error(f"--top-k {k} must be between 1 and --experts {E}")
    return args


def report(result: dict, args: Any, stem: str, cpu: str) -> None:
    """Print and write the Markdown table and the plots of ``result`` (the JSON's content)."""
    floors = result["floors"]
    rows = result["summary"]
    plots = plot(result["runs"], floors, args.out, stem)
    table = render_table(rows)
    windows = render_windows(rows)
    goals = result["goal"]
    gl = [
        "| model | E | k | bip step 0 / floor | bip Sup / floor | balance (<= 1.5x) | val loss - aux | seed "
        "noise | quality |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in goals:
        d = "n/a" if g["val_loss_minus_aux"] is None else f"{g['val_loss_minus_aux']:+.4f}"
        n = "n/a" if g["seed_noise"] is None else f"{g['seed_noise']:.4f}"
        gl.append(
            f"| {g['arch']} | {g['experts']} | {g['top_k']} | {g['step0_over_floor']:.2f} | "
            f"{g['sup_over_floor']:.2f} | {'met' if g['balance_met'] else 'not met'} | {d} | {n} | "
            f"{ {True: 'met', False: 'not met', None: 'n/a'}[g['quality_met']] } |"
        )
    st = result["settings"]
    head = (
        f"{len(result['runs'])} runs{'' if result['complete'] else ' (grid cut off)'}, {st['steps']} steps "
        f"of {st['batch']}x{st['seq']} bytes, hidden {st['hidden']}, {st['layers']} MoE layers, expert width "
        f"{st['ffn']}; {cpu}, 1 thread; "
        f"wall {result['wall_time_s']:.0f} s, CPU {result['cpu_time_s']:.0f} s this invocation"
    )
    md = (
        "\n\n".join(
            [
                f"# {stem}\n\n{head}",
                table,
                "AvgMaxVio by window of steps:\n\n" + windows,
                "Goal (bip):\n\n" + "\n".join(gl),
            ]
        )
        + "\n"
    )
    (args.out / f"{stem}.md").write_text(md)
    print("\n" + md)
    print(f"wrote {args.out / (stem + '.json')}, {args.out / (stem + '.md')}, {', '.join(p.name for p in plots)}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    import transformers
    from moebalance.integrations import transformers as mbt
    from tqdm import tqdm

    from moebalance._machine import cpu_name

    valid = {"aux", "bip_topk", *mbt.BALANCERS}
    bad = [b for b in args.balancers if b not in valid]
    if bad:
        print(f"error: --balancers must be among {sorted(valid)}, got {bad}", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    stem = "hf_training" + ("_quick" if args.quick else "_sweep" if args.sweep else "")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    if args.report:
        if not path.is_file():
            print(f"error: --report needs {path}", file=sys.stderr)
            return 2
        report(json.loads(path.read_text()), args, stem, cpu_name())
        return 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    train, val, info = corpus(4 << 20, 512 << 10)
    grid = build_grid(args)
    T = args.batch * args.seq
    floors = {
        f"{E}x{k}": {"batch": random_floor(T, E, k), "val": random_floor(args.val_seqs * args.seq, E, k, trials=100)}
        for E, k in {(g["experts"], g["top_k"]) for g in grid}
    }
    kept: list[dict] = []
    if args.merge and path.is_file():
        old = json.loads(path.read_text())
        kept = old.get("runs", [])
        floors = {**old.get("floors", {}), **floors}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    runs: list[dict] = []

    def write(done: bool) -> dict:
        keys = {run_key(r) for r in runs}
        allruns = [r for r in kept if run_key(r) not in keys] + runs
        rows = summarize(allruns, floors)
        result = {
            "settings": settings,
            "corpus": info,
            "floors": floors,
            "runs": allruns,
            "summary": rows,
            "goal": goal(rows),
            "complete": done,
            "machine": {
                "cpu": cpu_name(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "threads": 1,
            },
            "wall_time_s": time.perf_counter() - t0,
            "cpu_time_s": time.process_time() - cpu0,
        }
        path.write_text(json.dumps(result) + "\n")
        return result

    bar = tqdm(grid, desc=stem, unit="run")
    for g in bar:
        bar.set_postfix_str(f"{g['arch']} E{g['experts']} k{g['top_k']} {g['balancer']} s{g['seed']}")
        r = train_run(
            g["arch"],
            g["experts"],
            g["top_k"],
            g["balancer"],
            g["seed"],
            train,
            val,
            args,
            rate=g["rate"],
            coef=g["coef"],
        )
        r["sweep"] = g["sweep"]
        runs.append(r)
        write(False)
    result = write(True)
    report(result, args, stem, cpu_name())
    return 0


if __name__ == "__main__":
    sys.exit(main())
