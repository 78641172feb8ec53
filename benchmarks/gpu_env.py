"""GPU suite, section ``env``: what the machine has, and its two ceilings measured in this run.

- versions (python, torch, triton, CUDA), the device (name, capability, multiprocessors, memory), nvidia-smi's
  clocks and driver, which Python packages the package may want are importable (ortools, cvxpy and highspy are
  not on the GPU machine), and where ``moebalance`` and its mapped sub-packages were imported from (the
  checkout, through ``gpu_bootstrap``);
- ceilings (METHOD.md "two numbers first"): a large device-to-device copy (bytes read plus bytes written per
  second) and a large dense matmul (``[n, n] @ [n, n]`` in the suite's dtype, random normal inputs), each the
  median of many event-timed runs after warm-up.

    python benchmarks/gpu_env.py --out part.json [--dry-run]
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
from typing import Any

from gpu_common import Timer, base_parser, dense_flops, device, is_dry, module_available, write_part

PACKAGES = (
    "numpy",
    "scipy",
    "torch",
    "triton",
    "tqdm",
    "matplotlib",
    "pytest",
    "hypothesis",
    "ortools",
    "cvxpy",
    "highspy",
)


def packages() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PACKAGES:
        if not module_available(name):
            out[name] = None
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "importable (no metadata)"
    return out


def imports() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("moebalance", "moebalance.solvers", "moebalance.kernels", "moebalance.integrations"):
        try:
            out[name] = importlib.import_module(name).__file__
        except Exception as exc:  # the report shows why the package does not import
            out[name] = f"FAILED: {exc!r}"
    return out


def nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"available": False}
    fields = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw,memory.used"
    try:
        r = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": True, "error": repr(exc)}
    return {"available": True, "fields": fields, "rows": r.stdout.strip().splitlines(), "rc": r.returncode}


def ceilings(dev, dtype, dry: bool) -> dict[str, Any]:
    import torch

    timer = Timer(dev, repeats=3 if dry else 30, warmup=1 if dry else 5)
    n_copy = (1 << 20) if dry else (1 << 29)  # bf16: 1 GiB each way, many times the 60 MB L2
    src = torch.randn(n_copy, device=dev, dtype=dtype)
    dst = torch.empty_like(src)
    t = timer(lambda dst=dst, src=src: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()
    assert torch.equal(dst, src), "device copy produced wrong data"
    copy = {"bytes_read_plus_written": nbytes, **t, "bytes_per_s": nbytes / (t["median_ms"] / 1e3)}
    del src, dst
    n = 256 if dry else 8192
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = timer(lambda: a @ b)
    flops = dense_flops(n, n, n)
    mm = {"n": n, "flops": flops, **t, "tflops": flops / (t["median_ms"] / 1e3) / 1e12}
    return {"copy": copy, "matmul": mm}


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    args = p.parse_args(argv)
    dry = is_dry(args)
    dev = device(dry)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.float32 if dry else torch.bfloat16
    data = {
        "dtype": str(dtype).replace("torch.", ""),
        "packages": packages(),
        "imports": imports(),
        "nvidia_smi": nvidia_smi(),
        "ceilings": ceilings(dev, dtype, dry),
    }
    c = data["ceilings"]
    print(
        f"copy {c['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read+write); matmul n={c['matmul']['n']} "
        f"{c['matmul']['tflops']:.2f} TFLOP/s; packages {data['packages']}"
    )
    write_part(args.out, "env", data, dev, dry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
