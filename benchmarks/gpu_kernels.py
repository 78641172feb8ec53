"""GPU suite, section ``kernels``: the Triton expert kernels against a dense matmul and the per-expert loop.

For every case (E experts, top-k, routing) of one layer shape, on the same random inputs, in one run:

- ``triton``: :func:`moebalance.kernels.moe_experts` with ``backend="triton"`` (routing metadata, gathered
  gate/up GEMM with fused SwiGLU, down GEMM, deterministic combine, and the Triton backward);
- ``torch_loop``: the torch path looping over experts (what the LLEP reference code does): the baseline;
- ``torch_grouped_mm``: the torch path with ``torch._grouped_mm`` where torch has it (bf16 on sm_90);
- ``dense``: one ``[P, hidden] @ [hidden, 3 * ffn]`` matmul (P = T * k pairs), exactly the FLOPs of the three
  expert GEMMs: the yardstick. Its backward computes both input gradients.

Times: forward (no grad), backward alone (``autograd.grad`` with ``retain_graph`` on one forward's graph, the
gradients of x, gates and the three weights) and forward+backward. FLOPs: forward ``2 * P * hidden * ffn * 3``,
backward twice that; TFLOP/s divide these by the median time, so every method is compared on the same work.
Before timing, every method's output and the Triton gradients are compared with a float32 reference on the
upcast inputs (``||out - ref|| / ||ref||``); a case whose Triton error exceeds the tolerance is flagged.

Default (GPU): T = 32768 tokens, hidden 2048, ffn 1024 (OLMoE's expert), E in {8, 64, 256}, k in {2, 8}, routing
balanced (pair p = t*k + j to expert p mod E) and skewed (80% of the pairs into experts 0-3, capped at 4/k when
k > 4; the share used is recorded), bf16. ``--dry-run``: T = 64, hidden = ffn = 32, E in {8, 16}, k = 2,
float32, CPU, Triton interpreter.

    python benchmarks/gpu_kernels.py --out part.json [--dry-run] [--experts 8 64] [--top-k 2]
"""

from __future__ import annotations

from typing import Any

from gpu_common import Timer, base_parser, dense_flops, device, expert_flops, generator, is_dry, randn, write_part

GPU = {
    "tokens": 32768,
    "hidden": 2048,
    "ffn": 1024,
    "experts": [8, 64, 256],
    "top_k": [2, 8],
    "repeats": 20,
    "warmup": 3,
    "dtype": "bfloat16",
    "block_m": None,
}
DRY = {
    "tokens": 64,
    "hidden": 32,
    "ffn": 32,
    "experts": [8, 16],
    "top_k": [2],
    "repeats": 1,
    "warmup": 0,
    "dtype": "float32",
    "block_m": 16,
}
ROUTINGS = ("balanced", "skewed")
METHODS = ("triton", "torch_loop", "torch_grouped_mm", "dense")
TOL = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4}


def _rel(a, b) -> float:
    import torch

    return float(
        torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30)
    )


def _case(T: int, H: int, F: int, E: int, k: int, routing: str, dtype, dev, timer: Timer, block_m) -> dict[str, Any]:
    import torch
    from moe_layer import make_routing
    from moebalance.kernels import grouped_mm_available, moe_experts

    g = generator(dev, 1000 * E + 10 * k + (routing == "skewed"))
    mk = lambda *s, scale=1.0: randn(s, g, dev, dtype, scale)  # noqa: E731
    x = mk(T, H).requires_grad_(True)
    w = [
        mk(E, H, F, scale=H**-0.5).requires_grad_(True),
        mk(E, H, F, scale=H**-0.5).requires_grad_(True),
        mk(E, F, H, scale=F**-0.5).requires_grad_(True),
    ]
    eidx, share = make_routing(T, E, k, routing, seed=E + k, device=dev)
    gates = torch.softmax(randn((T, k), g, dev, torch.float32), -1).requires_grad_(True)
    dy = mk(T, H)
    P = T * k
    loads = torch.bincount(eidx.reshape(-1), minlength=E).float()
    fwd_flops = expert_flops(T, k, H, F)
    row: dict[str, Any] = {
        "tokens": T,
        "hidden": H,
        "ffn": F,
        "experts": E,
        "k": k,
        "routing": routing,
        "pairs": P,
        "hot_share": round(share, 4),
        "load_max_over_mean": float(loads.max() / loads.mean()),
        "gemm_flops_fwd": fwd_flops,
        "gemm_flops_bwd": 2 * fwd_flops,
        "dense_shape": [P, H, 3 * F],
        "dense_flops_fwd": dense_flops(P, H, 3 * F),
        "methods": {},
    }
    inputs = (x, gates, *w)

    # the float32 reference on upcast inputs: forward and every gradient
    xr, gr = x.detach().float().requires_grad_(True), gates.detach().float().requires_grad_(True)
    wr = [t.detach().float().requires_grad_(True) for t in w]
    with torch.enable_grad():
        ref_y = moe_experts(xr, eidx, gr, *wr, backend="torch", torch_impl="loop")
        ref_g = torch.autograd.grad(ref_y, (xr, gr, *wr), dy.float())
    ref_y = ref_y.detach()
    del xr, gr, wr

    def moe(**kw):
        fwd = lambda: moe_experts(x, eidx, gates, *w, **kw)  # noqa: E731
        return fwd, inputs

    methods: dict[str, Any] = {
        "triton": moe(backend="triton", block_m=block_m),
        "torch_loop": moe(backend="torch", torch_impl="loop"),
    }
    if grouped_mm_available(x, w[0]) and grouped_mm_available(x.new_empty(0, F), w[2]):
        methods["torch_grouped_mm"] = moe(backend="torch", torch_impl="grouped_mm")
    else:
        methods["torch_grouped_mm"] = f"torch._grouped_mm unavailable for {dtype} on {dev.type}"
    a = mk(P, H).requires_grad_(True)
    b = mk(H, 3 * F, scale=H**-0.5).requires_grad_(True)
    db = mk(P, 3 * F)
    methods["dense"] = (lambda: a @ b, (a, b), db)

    for name in METHODS:
        m = methods[name]
        if isinstance(m, str):
            row["methods"][name] = {"skipped": m}
            continue
        fwd, ins = m[0], m[1]
        grad_out = m[2] if len(m) > 2 else dy
        rec: dict[str, Any] = {}
        try:
            with torch.no_grad():
                y = fwd()
            if name != "dense":
                rec["fwd_rel_err_vs_fp32"] = _rel(y, ref_y)
            del y
            with torch.no_grad():
                rec["fwd"] = timer(fwd)
            y = fwd()  # one graph, its backward timed alone
            grads = torch.autograd.grad(y, ins, grad_out, retain_graph=True)
            if name == "triton":
                rec["grad_rel_err_vs_fp32"] = {
                    n: _rel(gv, r) for n, gv, r in zip(("x", "gates", "w_gate", "w_up", "w_down"), grads, ref_g)
                }
            del grads
            rec["bwd"] = timer(
                lambda y=y, ins=ins, grad_out=grad_out: torch.autograd.grad(y, ins, grad_out, retain_graph=True)
            )
            del y
            rec["fwd_bwd"] = timer(
                lambda fwd=fwd, ins=ins, grad_out=grad_out: torch.autograd.grad(fwd(), ins, grad_out)
            )
        except torch.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            rec = {"skipped": f"out of memory: {exc}"[:300]}
        except Exception as exc:  # one broken method must not hide the others' numbers
            rec = {**rec, "error": f"{type(exc).__name__}: {exc}"[:500]}
        if "fwd" in rec:
            rec["fwd_tflops"] = fwd_flops / (rec["fwd"]["median_ms"] / 1e3) / 1e12
        if "bwd" in rec:
            rec["bwd_tflops"] = 2 * fwd_flops / (rec["bwd"]["median_ms"] / 1e3) / 1e12
        if "fwd_bwd" in rec:
            rec["fwd_bwd_tflops"] = 3 * fwd_flops / (rec["fwd_bwd"]["median_ms"] / 1e3) / 1e12
        row["methods"][name] = rec
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _ratios(row)
    tol = TOL[str(dtype).replace("torch.", "")]
    tri = row["methods"]["triton"]
    errs = [tri.get("fwd_rel_err_vs_fp32")] + list(tri.get("grad_rel_err_vs_fp32", {}).values())
    row["triton_tolerance"] = tol
    row["triton_correct"] = bool(
        errs[0] is not None and len(errs) == 6 and all(e is not None and e <= tol for e in errs)
    )
    return row


def _ratios(row: dict[str, Any]) -> None:
    m = row["methods"]
    tri, dense, loop, gmm = m["triton"], m["dense"], m["torch_loop"], m.get("torch_grouped_mm", {})
    for phase in ("fwd", "bwd"):
        if f"{phase}_tflops" in tri and f"{phase}_tflops" in dense:
            row[f"triton_{phase}_share_of_dense"] = tri[f"{phase}_tflops"] / dense[f"{phase}_tflops"]
    for phase in ("fwd", "bwd", "fwd_bwd"):
        if phase in tri and phase in loop:
            row[f"triton_{phase}_speedup_vs_loop"] = loop[phase]["median_ms"] / tri[phase]["median_ms"]
        if phase in tri and phase in gmm:
            row[f"triton_{phase}_speedup_vs_grouped_mm"] = gmm[phase]["median_ms"] / tri[phase]["median_ms"]


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--ffn", type=int, default=None)
    p.add_argument("--experts", type=int, nargs="*", default=None)
    p.add_argument("--top-k", type=int, nargs="*", default=None)
    p.add_argument("--routing", nargs="*", default=list(ROUTINGS), choices=ROUTINGS)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    args = p.parse_args(argv)
    dry = is_dry(args)
    dev = device(dry)
    import torch

    cfg = dict(DRY if dry else GPU)
    for key in ("tokens", "hidden", "ffn", "experts", "top_k", "repeats", "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["routing"] = list(args.routing)
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny matmuls gain nothing from threads; one keeps a shared CPU steady
    dtype = getattr(torch, cfg["dtype"])
    timer = Timer(dev, cfg["repeats"], cfg["warmup"])
    rows: list[dict[str, Any]] = []
    grid = [
        (E, k, rt)
        for E in cfg["experts"]
        for k in cfg["top_k"]
        for rt in cfg["routing"]
        if k <= E and not (rt == "skewed" and E <= 4)
    ]

    def save(complete: bool) -> None:  # after every case: a step stopped by its time limit keeps what it measured
        write_part(
            args.out,
            "kernels",
            {
                "settings": cfg,
                "methods": list(METHODS),
                "rows": rows,
                "complete": complete,
                "cases_planned": len(grid),
                "timing": "CUDA events, median"
                if dev.type == "cuda"
                else "perf_counter, median (dry run: not a measurement)",
            },
            dev,
            dry,
        )

    for E in cfg["experts"]:
        for k in cfg["top_k"]:
            for routing in cfg["routing"]:
                if k > E or (routing == "skewed" and E <= 4):
                    continue
                try:
                    r = _case(
                        cfg["tokens"], cfg["hidden"], cfg["ffn"], E, k, routing, dtype, dev, timer, cfg["block_m"]
                    )
                except Exception as exc:  # e.g. out of memory building the case: record it, go on
                    r = {
                        "tokens": cfg["tokens"],
                        "hidden": cfg["hidden"],
                        "ffn": cfg["ffn"],
                        "experts": E,
                        "k": k,
                        "routing": routing,
                        "methods": {},
                        "triton_correct": False,
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(r)
                t = r["methods"].get("triton", {"error": r.get("error")})
                print(
                    f"E={E:<4} k={k} {routing:<8} triton fwd "
                    f"{t.get('fwd', {}).get('median_ms', float('nan')):.3f} ms "
                    f"({r.get('triton_fwd_share_of_dense', float('nan')):.2f} of dense, "
                    f"{r.get('triton_fwd_speedup_vs_loop', float('nan')):.2f}x loop), bwd "
                    f"{t.get('bwd', {}).get('median_ms', float('nan')):.3f} ms "
                    f"({r.get('triton_bwd_share_of_dense', float('nan')):.2f} of dense), "
                    f"correct={r['triton_correct']}" + (f" ERROR {t['error']}" if "error" in t else ""),
                    flush=True,
                )
                save(complete=False)
    save(complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
