"""GPU suite, section ``ep``: expert parallelism (:class:`moebalance.integrations.distributed.ExpertParallelMoE`)
with world size 1 on NCCL (gloo in a dry run), against the single-device ``MoELayer`` it splits.

One process, a one-rank process group on 127.0.0.1 (no torchrun). For each placement (``ep``, ``llep``,
``llep+``) the layer is split from the same ``MoELayer`` and run on the same skewed batch: forward (no grad)
and forward+backward wall time (median after warm-up, synchronised), the phase times of one profiled step
(header all-gather, plan, weight copy, dispatch all-to-all, expert compute, return, and the backward's), and
the output's and input gradient's relative difference from the single-device layer (world size 1 must compute
the same function). With one rank every plan keeps all experts at home, so this measures the machinery's
overhead on NCCL and checks its collectives run there, not a speedup. The replicated rows (two redundant slots,
re-planned once by ``eplb`` from the batch) split each expert's tokens over its replicas evenly (``replicated``),
by the per-batch dispatch LP (``replicated-lp``) or by LLEP run over the slots (``replicated-llep``); with one
rank every split computes the same function, so they measure what each split's planning costs per step.

Default (GPU): 32768 tokens, hidden 2048, ffn 1024, E = 64, k = 8, bf16. ``--dry-run``: 64 tokens,
hidden = ffn = 32, E = 8, k = 2, float32, gloo on the CPU, Triton interpreter.

    python benchmarks/gpu_ep.py --out part.json [--dry-run]
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from typing import Any

from gpu_common import base_parser, device, is_dry, write_part

GPU = {
    "tokens": 32768,
    "hidden": 2048,
    "ffn": 1024,
    "experts": 64,
    "top_k": 8,
    "repeats": 10,
    "warmup": 3,
    "dtype": "bfloat16",
}
DRY = {"tokens": 64, "hidden": 32, "ffn": 32, "experts": 8, "top_k": 2, "repeats": 1, "warmup": 0, "dtype": "float32"}
PLACEMENTS = ("ep", "llep", "llep+")
# the replicated runtime on one rank: two redundant slots hold copies of the two hottest experts after a re-plan;
# one row per split of an expert's tokens over its replicas (row name: split)
REPLICATED = {"num_local_slots_extra": 2, "replication": "eplb"}
REPLICA_SPLITS = {"replicated": "even", "replicated-lp": "lp", "replicated-llep": "llep"}


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _wall(fn, dev, repeats: int, warmup: int) -> dict[str, float]:
    from gpu_common import timing_stats

    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return timing_stats(ts)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    dry = is_dry(args)
    dev = device(dry)
    import torch
    import torch.distributed as dist
    from moebalance.integrations.distributed import ExpertParallelMoE, init_process_group
    from moebalance.integrations.torch import MoEConfig, MoELayer

    cfg = dict(DRY if dry else GPU)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "gloo" if dev.type == "cpu" else "nccl"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL binds the rank to the current device
    t0 = time.perf_counter()
    init_process_group(backend, timeout=_dt.timedelta(seconds=60))
    init_s = time.perf_counter() - t0
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            hidden=cfg["hidden"],
            ffn=cfg["ffn"],
            num_experts=cfg["experts"],
            top_k=cfg["top_k"],
            dtype=dtype,
            backend="auto" if not dry else "triton",
        ),
        device=dev,
    )
    g = torch.Generator(device="cpu").manual_seed(11)
    u = torch.randn(cfg["hidden"], generator=g)
    u = u / u.norm()
    with torch.no_grad():
        layer.router.weight[:4] += 2.0 * u.to(dev, dtype)
    x = (torch.randn(cfg["tokens"], cfg["hidden"], generator=g) + u).to(dev, dtype)
    dy = torch.randn(x.shape, generator=g).to(dev, dtype)
    layer.train()
    xr = x.clone().requires_grad_(True)
    y_ref = layer(xr)
    (dx_ref,) = torch.autograd.grad(y_ref, xr, dy)
    y_ref = y_ref.detach()

    def layer_step() -> None:
        torch.autograd.grad(layer(xr), xr, dy)

    base = {"fwd": None, "fwd_bwd": _wall(layer_step, dev, cfg["repeats"], cfg["warmup"])}
    with torch.no_grad():
        base["fwd"] = _wall(lambda: layer(x), dev, cfg["repeats"], cfg["warmup"])
    rows: list[dict[str, Any]] = []
    cases = [(name, {"placement": name}) for name in PLACEMENTS]
    for name, split in REPLICA_SPLITS.items():
        options = {
            "num_local_slots": cfg["experts"] + REPLICATED["num_local_slots_extra"],
            "replication": REPLICATED["replication"],
            "replica_split": split,
        }
        cases.append((name, options))
    for placement, options in cases:
        row: dict[str, Any] = {"placement": placement}
        try:
            ep = ExpertParallelMoE.from_layer(layer, **options)
            if "replication" in options:  # re-plan once from this batch's loads: the hot experts get the copies
                with torch.no_grad():
                    ep(x)
                row["rebalance"] = str(ep.rebalance())[:300]
            xs = x.clone().requires_grad_(True)
            y = ep(xs)
            (dx,) = torch.autograd.grad(y, xs, dy)
            row["out_rel_diff_vs_layer"] = _rel(y.detach(), y_ref)
            row["dx_rel_diff_vs_layer"] = _rel(dx, dx_ref)
            with torch.no_grad():
                row["fwd"] = _wall(lambda ep=ep: ep(x), dev, cfg["repeats"], cfg["warmup"])
            row["fwd_bwd"] = _wall(
                lambda ep=ep, xs=xs: torch.autograd.grad(ep(xs), xs, dy), dev, cfg["repeats"], cfg["warmup"]
            )
            ep.profile = True
            torch.autograd.grad(ep(xs), xs, dy)
            ep.profile = False
            row["phases_s"] = dict(ep.last_timings)
            row["plan_used"] = getattr(ep.last_plan, "used", None)
            row["fwd_bwd_vs_layer"] = row["fwd_bwd"]["median_ms"] / base["fwd_bwd"]["median_ms"]
            row["fwd_vs_layer"] = row["fwd"]["median_ms"] / base["fwd"]["median_ms"]
            del ep
        except Exception as exc:  # report and go on with the next placement
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        rows.append(row)
        print(
            f"{placement}: fwd+bwd {row.get('fwd_bwd', {}).get('median_ms', float('nan')):.2f} ms "
            f"(layer {base['fwd_bwd']['median_ms']:.2f}), diff {row.get('out_rel_diff_vs_layer')}"
            + (f" ERROR {row['error']}" if "error" in row else ""),
            flush=True,
        )
    dist.barrier()
    backend_used = dist.get_backend()
    world = dist.get_world_size()
    dist.destroy_process_group()
    phases = sorted({k for r in rows for k in r.get("phases_s", {})})
    write_part(
        args.out,
        "ep",
        {
            "settings": cfg,
            "backend": backend_used,
            "world_size": world,
            "init_process_group_s": init_s,
            "layer": base,
            "rows": rows,
            "phases": phases,
        },
        dev,
        dry,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
