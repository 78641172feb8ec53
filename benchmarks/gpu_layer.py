"""GPU suite, section ``layer``: :class:`moebalance.integrations.torch.MoELayer` with each balancer.

For every balancer ("none", "aux_loss", "loss_free", "bip") and back-end ("triton"; "torch", which runs
``torch._grouped_mm`` on an H200 in bf16), on one skewed batch (experts 0-3 are favoured by the router: their
rows of the router weight get ``+2 u`` and every token ``+u``, for a random unit vector ``u``):

- ``eval_fwd``: the forward in eval mode without grad (routing, experts, statistics);
- ``train_step``: forward in training mode, ``loss = mean(y^2) + aux_loss``, backward (the router and the three
  expert weights), then the balancer's bias update that the forward does; no optimizer step, so the weights stay
  fixed and only the bias moves from step to step;
- the load statistics: ``max_vio`` ((max load - mean) / mean) of the first and of the last training step, and
  the Triton output's relative difference from the torch back-end on the same layer (eval mode).

Default (GPU): 32768 tokens, hidden 2048, ffn 1024, E = 64, k = 8 (OLMoE's layer), bf16. ``--dry-run``: 64 tokens,
hidden = ffn = 32, E = 8, k = 2, float32, CPU, Triton interpreter.

    python benchmarks/gpu_layer.py --out part.json [--dry-run]
"""

from __future__ import annotations

from typing import Any

from gpu_common import Timer, base_parser, device, expert_flops, is_dry, write_part

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
DRY = {"tokens": 64, "hidden": 32, "ffn": 32, "experts": 8, "top_k": 2, "repeats": 2, "warmup": 0, "dtype": "float32"}
BALANCERS = ("none", "aux_loss", "loss_free", "bip")
BACKENDS = ("triton", "torch")


def _layer(cfg: dict[str, Any], balancer: str, backend: str, dev, dtype, u):
    import torch
    from moebalance.integrations.torch import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(
        MoEConfig(
            hidden=cfg["hidden"],
            ffn=cfg["ffn"],
            num_experts=cfg["experts"],
            top_k=cfg["top_k"],
            balancer=balancer,
            backend=backend,
            dtype=dtype,
        ),
        device=dev,
    )
    with torch.no_grad():
        layer.router.weight[:4] += 2.0 * u.to(dtype)
    return layer


def run(cfg: dict[str, Any], dev, dtype) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator(device="cpu").manual_seed(7)
    u = torch.randn(cfg["hidden"], generator=g)
    u = (u / u.norm()).to(dev)
    x = (torch.randn(cfg["tokens"], cfg["hidden"], generator=g).to(dev) + u).to(dtype)
    timer = Timer(dev, cfg["repeats"], cfg["warmup"])
    flops = expert_flops(cfg["tokens"], cfg["top_k"], cfg["hidden"], cfg["ffn"])
    rows = []
    for balancer in BALANCERS:
        outs = {}
        for backend in BACKENDS:
            row: dict[str, Any] = {"balancer": balancer, "backend": backend, "gemm_flops_fwd": flops}
            try:
                layer = _layer(cfg, balancer, backend, dev, dtype, u)
                layer.eval()
                with torch.no_grad():
                    outs[backend] = layer(x).float()
                    row["eval_fwd"] = timer(lambda layer=layer: layer(x))
                layer.train()
                vio = []

                def step(layer=layer, vio=vio) -> None:
                    y = layer(x)
                    loss = y.float().square().mean() + layer.aux_loss
                    loss.backward()
                    layer.zero_grad(set_to_none=True)
                    vio.append(layer.last_stats.max_vio)

                row["train_step"] = timer(step)
                row["max_vio_first_step"] = float(vio[0])
                row["max_vio_last_step"] = float(vio[-1])
                row["train_steps"] = len(vio)
                row["bias_abs_max"] = float(layer.bias.abs().max())
                row["eval_fwd_tflops"] = flops / (row["eval_fwd"]["median_ms"] / 1e3) / 1e12
                row["train_step_tflops"] = 3 * flops / (row["train_step"]["median_ms"] / 1e3) / 1e12
                del layer
            except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
                row["skipped"] = f"out of memory: {exc}"[:300]
            except Exception as exc:  # report it and go on with the next balancer
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        if len(outs) == 2:
            ref = outs["torch"]
            diff = float((outs["triton"] - ref).norm() / ref.norm().clamp_min(1e-30))
            for r in rows[-2:]:
                r["eval_rel_diff_triton_vs_torch"] = diff
        for r in rows[-2:]:
            b = next((q for q in rows if q["balancer"] == "none" and q["backend"] == r["backend"]), None)
            if b and "train_step" in b and "train_step" in r:
                r["train_step_vs_none"] = r["train_step"]["median_ms"] / b["train_step"]["median_ms"]
        print(
            "  ".join(
                f"{r['balancer']}/{r['backend']}: train "
                f"{r.get('train_step', {}).get('median_ms', float('nan')):.2f} ms, max_vio "
                f"{r.get('max_vio_first_step', float('nan')):.2f}->"
                f"{r.get('max_vio_last_step', float('nan')):.2f}" + (f" ERROR {r['error']}" if "error" in r else "")
                for r in rows[-2:]
            ),
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    dry = is_dry(args)
    dev = device(dry)
    import torch

    cfg = dict(DRY if dry else GPU)
    for key in ("tokens", "repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(1)
    rows = run(cfg, dev, getattr(torch, cfg["dtype"]))
    write_part(
        args.out,
        "layer",
        {"settings": cfg, "balancers": list(BALANCERS), "backends": list(BACKENDS), "rows": rows},
        dev,
        dry,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
