"""Shared pieces of the GPU suite's scripts (``benchmarks/gpu_*.py``): the run mode, timing, device facts, output.

Every suite script takes ``--dry-run`` (or reads ``GPU_SUITE_DRY=1``, which ``gpu_suite.sh --dry-run`` sets): tiny
shapes, float32, on the CPU, with the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``). A dry run
checks that the scripts run end to end and write every field; its numbers are not measurements.

Timing (METHOD.md): warm-up calls first (compilation, autotuning and handle creation stay out), then ``repeats``
calls, each between two CUDA events (host clock on the CPU), with ``torch.cuda.synchronize`` before reading
them; the median is reported with the min and the inter-quartile spread. Inputs are random normal, never zeros.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpu_bootstrap  # noqa: F401  (the checkout's package mapping, also when run without the suite)

__all__ = [
    "is_dry",
    "base_parser",
    "device",
    "Timer",
    "timing_stats",
    "device_info",
    "slug",
    "write_part",
    "expert_flops",
    "dense_flops",
    "generator",
    "randn",
    "now",
    "import_simulator",
    "module_available",
]


def is_dry(args: argparse.Namespace | None = None) -> bool:
    if args is not None and getattr(args, "dry_run", False):
        return True
    return os.environ.get("GPU_SUITE_DRY", "0").lower() in ("1", "true", "yes", "on")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, float32, CPU (also GPU_SUITE_DRY=1)")
    p.add_argument("--out", type=Path, required=True, help="JSON file of this section")
    return p


def device(dry: bool):
    import torch

    if dry:
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton import (triton.jit reads it then)
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run the GPU suite with --dry-run on a CPU machine")
    return torch.device("cuda", torch.cuda.current_device())


def timing_stats(times_s: list[float]) -> dict[str, float]:
    """Median, min, quartiles and the relative inter-quartile spread of one method's timed calls (ms)."""
    ts = sorted(times_s)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) >= 2 else [ts[0]] * 3
    med = statistics.median(ts)
    return {
        "median_ms": med * 1e3,
        "min_ms": ts[0] * 1e3,
        "q1_ms": q[0] * 1e3,
        "q3_ms": q[2] * 1e3,
        "iqr_rel": (q[2] - q[0]) / med if med > 0 else 0.0,
        "runs": len(ts),
    }


class Timer:
    """``Timer(dev, repeats, warmup)(fn)`` -> :func:`timing_stats` of ``repeats`` calls of ``fn`` after warm-up."""

    def __init__(self, dev, repeats: int, warmup: int):
        self.dev, self.repeats, self.warmup = dev, int(repeats), int(warmup)

    def __call__(self, fn: Callable[[], Any]) -> dict[str, float]:
        import torch

        for _ in range(self.warmup):
            fn()
        times = []
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            for _ in range(self.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            torch.cuda.synchronize(self.dev)  # an asynchronous launch error raises here, not later
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return timing_stats(times)


def generator(dev, seed: int):
    """A seeded generator on ``dev``: inputs are drawn where they are used (drawing GiBs on the host is slow)."""
    import torch

    return torch.Generator(device=dev).manual_seed(seed)


def randn(shape, gen, dev, dtype, scale: float = 1.0):
    """Random normal ``shape`` times ``scale``, drawn on ``dev`` in ``dtype`` (never zeros)."""
    import torch

    t = torch.randn(*shape, generator=gen, device=dev, dtype=dtype)
    return t.mul_(scale) if scale != 1.0 else t


def expert_flops(tokens: int, k: int, hidden: int, ffn: int) -> int:
    """Forward FLOPs of the three SwiGLU expert GEMMs over ``tokens * k`` pairs: ``2 * P * hidden * ffn * 3``."""
    return 2 * tokens * k * hidden * ffn * 3


def dense_flops(rows: int, inner: int, cols: int) -> int:
    """FLOPs of one ``[rows, inner] @ [inner, cols]``."""
    return 2 * rows * inner * cols


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def device_info(dev) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device_type": dev.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            multiprocessors=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
        )
    else:
        from moebalance._machine import cpu_name

        info.update(name=cpu_name(), threads=torch.get_num_threads())
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become None (the JSON stays strict)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def write_part(path: Path, section: str, data: dict[str, Any], dev, dry: bool) -> None:
    """Write one section's JSON: ``{"section", "dry_run", "date", "device", "command", **data}``."""
    payload = {
        "section": section,
        "dry_run": dry,
        "date": now(),
        "device": device_info(dev),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        **data,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(payload), indent=1, allow_nan=False, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def import_simulator():
    """The simulator module: ``moebalance.evaluation.simulate`` (its new home) or ``moebalance.simulate``."""
    import importlib

    try:
        return importlib.import_module("moebalance.evaluation.simulate")
    except ModuleNotFoundError as exc:
        if exc.name not in ("moebalance.evaluation", "moebalance.evaluation.simulate"):
            raise
        return importlib.import_module("moebalance.simulate")
