"""Launch a test module once per rank (gloo over localhost) and read back what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def launch_ranks(module: str, world: int, tmp: Path, timeout: float = 600.0) -> list[dict[str, np.ndarray]]:
    """Run ``python -m module rank world tmp`` for every rank; assert each exits 0 and return ``tmp/rank{r}.npz``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(r), str(world), str(tmp)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    results = []
    for r in range(world):
        with np.load(tmp / f"rank{r}.npz", allow_pickle=False) as z:
            results.append({k: z[k] for k in z.files})
    return results


def assert_close(a: np.ndarray, b: np.ndarray, what: str, rel: float) -> None:
    """``max |a - b| <= rel * max |b|``, naming ``what`` when it fails."""
    scale = max(float(np.abs(b).max()), 1e-30)
    err = float(np.abs(a - b).max())
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel} * {scale:.3e}"
