"""Benchmark: forward and forward+backward time and TFLOP/s of the MoE expert computation.

Methods, measured side by side in one run on the same inputs:
  - ``triton``: :func:`moebalance.kernels.moe_experts` with ``backend="triton"`` (routing metadata, gathered
    gate/up GEMM with fused SwiGLU, down GEMM, deterministic combine; CUDA only);
  - ``torch_loop``: the torch path with a loop over experts (what the LLEP reference code does);
  - ``torch_grouped_mm``: the torch path with ``torch._grouped_mm`` (where torch has it for the dtype/device);
  - ``dense``: one dense matmul ``[P, hidden] @ [hidden, 3 * ffn]`` with the same FLOPs as the three expert
    GEMMs (P = T * k pairs), the yardstick; its forward+backward also computes both input gradients.

TFLOP/s counts the expert GEMMs only: forward ``2 * P * hidden * ffn * 3``, forward+backward three times that.
The MoE methods' times include everything they do (routing metadata, gathers, combine).

Shapes (hidden, ffn, E, k): gpt-oss-120b (2880, 2880, 128, 4), DeepSeek-V3 (7168, 2048, 256, 8),
Qwen3-30B-A3B (2048, 768, 128, 8), Mixtral-8x7B (4096, 14336, 8, 2); 16K and 32K tokens; routing "balanced"
(pair p = t*k + j goes to expert p mod E) and "skewed" (80% of the pairs in experts 0-3; with k > 5 a token
cannot put 80% of its k distinct experts in 4, so the share is capped at 4/k; the JSON records the share used).

Timing: CUDA events around each call after warm-up, ``torch.cuda.synchronize`` before reading them, median of
``--repeats`` runs (``time.perf_counter`` on CPU). Inputs are random normal (no zeros), bf16 on GPU.

    python benchmarks/moe_layer.py                   # the full grid (needs a CUDA GPU)
    python benchmarks/moe_layer.py --small           # tiny shapes; runs on CPU (torch paths + dense), ~15 s

Writes JSON (``--out``; default ``benchmarks/results/moe_layer_<device>.json``) and a markdown table beside it,
and prints the table and one "target met / NOT met" line per target (GPU runs of the full grid).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from moebalance.kernels import grouped_mm_available, moe_experts

from moebalance._machine import cpu_name

__all__ = ["main", "run_benchmark", "make_routing", "SHAPES", "SMALL_SHAPES", "evaluate_targets"]

HERE = Path(__file__).resolve().parent

SHAPES = {  # name: (hidden, ffn, num_experts, top_k)
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "DeepSeek-V3": (7168, 2048, 256, 8),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "Mixtral-8x7B": (4096, 14336, 8, 2),
}
SMALL_SHAPES = {"tiny": (64, 96, 8, 2), "tiny-k4": (48, 80, 16, 4)}
TOKENS = (16384, 32768)
SMALL_TOKENS = (256, 512)
ROUTINGS = ("balanced", "skewed")
METHODS = ("triton", "torch_loop", "torch_grouped_mm", "dense")
HOT_EXPERTS = 4
HOT_SHARE = 0.8
TARGET_DENSE_SHARE = 0.60  # triton forward >= 60% of dense TFLOP/s, balanced, 32K tokens
TARGET_LOOP_SPEEDUP = 1.5  # triton >= 1.5x the per-expert loop for E >= 64


def make_routing(T: int, E: int, k: int, kind: str, seed: int = 0, device: Any = "cpu") -> tuple[torch.Tensor, float]:
    """``eidx [T, k]`` (distinct experts per token) and the share of pairs in experts 0-3."""
    if kind == "balanced":
        p = torch.arange(T * k).view(T, k)
        eidx = p % E
    elif kind == "skewed":
        if E <= HOT_EXPERTS:
            raise ValueError(f"skewed routing needs more than {HOT_EXPERTS} experts, got E={E}")
        g = torch.Generator().manual_seed(seed)
        hot_total = round(min(HOT_SHARE, HOT_EXPERTS / k) * T * k)
        base, extra = divmod(hot_total, T)
        n_hot = torch.full((T,), base)
        n_hot[torch.randperm(T, generator=g)[:extra]] += 1  # hot pairs per token, as even as possible
        n_hot = n_hot.clamp(max=min(k, HOT_EXPERTS)).clamp(min=max(0, k - (E - HOT_EXPERTS)))
        hot = torch.rand(T, HOT_EXPERTS, generator=g).argsort(1)
        cold = torch.rand(T, E - HOT_EXPERTS, generator=g).argsort(1) + HOT_EXPERTS
        j = torch.arange(k)
        # token t takes its first n_hot[t] hot experts, then k - n_hot[t] cold ones
        from_hot = hot.gather(1, j.clamp(max=HOT_EXPERTS - 1).expand(T, k))
        from_cold = cold.gather(1, (j - n_hot[:, None]).clamp(min=0, max=E - HOT_EXPERTS - 1))
        eidx = torch.where(j < n_hot[:, None], from_hot, from_cold)
    else:
        raise ValueError(f"`kind` must be one of {ROUTINGS}, got {kind!r}")
    share = float((eidx < HOT_EXPERTS).float().mean())
    return eidx.to(device), share


def _timer(device: torch.device, repeats: int, warmup: int) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end) / 1e3)
        else:
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return run


def _methods(x, eidx, gates, w, device) -> dict[str, Any]:
    """name -> (forward callable, forward+backward callable) or a string saying why the method is skipped."""
    wg, wu, wd = w
    out: dict[str, Any] = {}
    P, H, F = eidx.numel(), wg.shape[1], wg.shape[2]

    def moe(**kw):
        fwd = lambda: moe_experts(x, eidx, gates, wg, wu, wd, **kw)  # noqa: E731
        dy = torch.randn_like(x)
        return fwd, lambda: torch.autograd.grad(fwd(), (x, gates, wg, wu, wd), dy)

    if device.type == "cuda":
        out["triton"] = moe(backend="triton")
    else:
        out["triton"] = "needs a CUDA device"
    out["torch_loop"] = moe(backend="torch", torch_impl="loop")
    if grouped_mm_available(x, wg) and grouped_mm_available(x.new_empty(0, F), wd):
        out["torch_grouped_mm"] = moe(backend="torch", torch_impl="grouped_mm")
    else:
        out["torch_grouped_mm"] = f"torch._grouped_mm unavailable for {x.dtype} on {device}"
    a = torch.randn(P, H, device=device, dtype=x.dtype, requires_grad=True)
    b = (torch.randn(H, 3 * F, device=device, dtype=x.dtype) / H**0.5).requires_grad_(True)
    db = torch.randn(P, 3 * F, device=device, dtype=x.dtype)
    out["dense"] = (lambda: a @ b, lambda: torch.autograd.grad(a @ b, (a, b), db))
    return out


def run_benchmark(
    shapes: dict[str, tuple[int, int, int, int]],
    tokens: tuple[int, ...],
    routings: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per (shape, tokens, routing, method) with times in ms and TFLOP/s."""
    from tqdm import tqdm

    timer = _timer(device, repeats, warmup)
    rows: list[dict[str, Any]] = []
    grid = [(n, T, r) for n in shapes for T in tokens for r in routings]
    for name, T, routing in tqdm(grid, disable=not progress, desc="moe_layer"):
        H, F, E, k = shapes[name]
        g = torch.Generator(device="cpu").manual_seed(T)
        mk = lambda *s, scale=1.0, g=g: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
        x = mk(T, H).requires_grad_(True)
        w = [
            mk(E, H, F, scale=H**-0.5).requires_grad_(True),
            mk(E, H, F, scale=H**-0.5).requires_grad_(True),
            mk(E, F, H, scale=F**-0.5).requires_grad_(True),
        ]
        eidx, share = make_routing(T, E, k, routing, seed=T, device=device)
        gates = torch.softmax(torch.randn(T, k, generator=g), -1).to(device).requires_grad_(True)
        flops = 2 * T * k * H * F * 3
        methods = _methods(x, eidx, gates, w, device)
        reference = None
        for method in METHODS:
            row = {
                "shape": name,
                "hidden": H,
                "ffn": F,
                "experts": E,
                "k": k,
                "tokens": T,
                "routing": routing,
                "hot_share": round(share, 4),
                "method": method,
                "dtype": str(dtype).replace("torch.", ""),
                "gemm_flops_fwd": flops,
            }
            m = methods[method]
            if isinstance(m, str):
                rows.append({**row, "skipped": m})
                continue
            fwd, fwd_bwd = m
            with torch.no_grad():
                y = fwd()
            if method != "dense":  # the MoE methods must agree before their times mean anything
                if reference is None:
                    reference = y.float()
                else:
                    err = float((y.float() - reference).abs().max() / reference.abs().max().clamp_min(1e-6))
                    row["max_rel_diff_vs_first"] = err
            del y
            try:
                with torch.no_grad():
                    t_f = timer(fwd)
                t_fb = timer(fwd_bwd)
            except torch.OutOfMemoryError as e:  # pragma: no cover - GPU only
                rows.append({**row, "skipped": f"out of memory: {e}"[:200]})
                torch.cuda.empty_cache()
                continue
            rows.append(
                {
                    **row,
                    "fwd_ms": t_f * 1e3,
                    "fwd_tflops": flops / t_f / 1e12,
                    "fwd_bwd_ms": t_fb * 1e3,
                    "fwd_bwd_tflops": 3 * flops / t_fb / 1e12,
                }
            )
        del x, w, methods
        if device.type == "cuda":
            torch.cuda.empty_cache()
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's forward TFLOP/s as a share of dense, and its speed-up over the per-expert loop."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault((r["shape"], r["tokens"], r["routing"]), {})[r["method"]] = r
    for case in by_case.values():
        dense, loop = case.get("dense", {}), case.get("torch_loop", {})
        for r in case.values():
            if "fwd_ms" not in r:
                continue
            if "fwd_tflops" in dense:
                r["fwd_share_of_dense"] = r["fwd_tflops"] / dense["fwd_tflops"]
            if "fwd_ms" in loop:
                r["fwd_speedup_vs_loop"] = loop["fwd_ms"] / r["fwd_ms"]
                r["fwd_bwd_speedup_vs_loop"] = loop["fwd_bwd_ms"] / r["fwd_bwd_ms"]


def evaluate_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's two targets, per case they apply to: met / not met / unmeasured."""
    out = []
    for r in rows:
        if r["method"] != "triton":
            continue
        if r["routing"] == "balanced" and r["tokens"] == 32768:
            v = r.get("fwd_share_of_dense")
            out.append(
                {
                    "target": f"triton forward >= {TARGET_DENSE_SHARE:.0%} of dense TFLOP/s",
                    "shape": r["shape"],
                    "tokens": r["tokens"],
                    "routing": r["routing"],
                    "value": v,
                    "status": "unmeasured" if v is None else ("met" if v >= TARGET_DENSE_SHARE else "NOT met"),
                }
            )
        if r["experts"] >= 64:
            v = r.get("fwd_speedup_vs_loop")
            out.append(
                {
                    "target": f"triton forward >= {TARGET_LOOP_SPEEDUP}x torch_loop",
                    "shape": r["shape"],
                    "tokens": r["tokens"],
                    "routing": r["routing"],
                    "value": v,
                    "status": "unmeasured" if v is None else ("met" if v >= TARGET_LOOP_SPEEDUP else "NOT met"),
                }
            )
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device_type": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info.update(device=cpu_name(), threads=torch.get_num_threads())
    return info


def render_markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    head = (
        f"Device: {info['device']} ({info['device_type']}), torch {info['torch']}, triton {info['triton']}\n\n"
        "| shape | tokens | routing | method | fwd ms | fwd TFLOP/s | fwd/dense | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| fwd speed-up vs loop |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['shape']} | {r['tokens']} | {r['routing']} | {r['method']} | skipped: {r['skipped']} | | | | | |"
            )
            continue
        share = f"{r['fwd_share_of_dense']:.2f}" if "fwd_share_of_dense" in r else ""
        sp = f"{r['fwd_speedup_vs_loop']:.2f}x" if "fwd_speedup_vs_loop" in r else ""
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['routing']} | {r['method']} | {r['fwd_ms']:.3f} | "
            f"{r['fwd_tflops']:.3g} | {share} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.3g} | {sp} |"
        )
    return head + "\n".join(lines) + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes and token counts; runs on CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float32", "float16"),
        help="default: bfloat16 on CUDA, float32 on CPU",
    )
    ap.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--tokens", nargs="*", type=int, default=None)
    ap.add_argument("--routing", nargs="*", default=list(ROUTINGS), choices=ROUTINGS)
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median; default 20)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own; 1 with --small, where tiny matmuls gain "
        "nothing from threads and one thread keeps timings steady on a shared machine)",
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON path (a .md table is written beside it)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    table = SMALL_SHAPES if args.small else SHAPES
    if args.shapes:
        unknown = set(args.shapes) - set(table)
        if unknown:
            ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {list(table)}")
        table = {n: table[n] for n in args.shapes}
    if not args.small and device.type != "cuda":
        ap.error("the full grid needs a CUDA GPU (it allocates tens of GiB); use --small on CPU")
    tokens = tuple(args.tokens) if args.tokens else (SMALL_TOKENS if args.small else TOKENS)
    repeats = args.repeats or (3 if args.small else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.small else 5)
    torch.backends.cuda.matmul.allow_tf32 = False
    threads = args.threads or (1 if args.small else None)
    if threads:
        torch.set_num_threads(threads)

    info = device_info(device)
    rows = run_benchmark(
        table, tokens, tuple(args.routing), device, dtype, repeats, warmup, progress=not args.no_progress
    )
    targets = evaluate_targets(rows) if not args.small else []
    result = {
        "benchmark": "moe_layer",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "small": args.small,
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "warmup": warmup,
        "timing": "CUDA events, median" if device.type == "cuda" else "perf_counter, median",
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        **info,
        "rows": rows,
        "targets": targets,
    }
    out = args.out or HERE / "results" / f"moe_layer{'_small' if args.small else ''}_{_slug(info['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, allow_nan=False, default=str) + "\n")
    md = render_markdown(rows, info)
    out.with_suffix(".md").write_text(md)
    print(md)
    for t in targets:
        v = "" if t["value"] is None else f" ({t['value']:.2f})"
        print(f"{t['status']:>10}: {t['target']} - {t['shape']} {t['tokens']} {t['routing']}{v}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
