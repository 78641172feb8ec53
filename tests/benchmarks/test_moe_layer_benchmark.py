"""benchmarks/moe_layer.py: the routing generator, and a smoke run of the script on CPU (--small)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_layer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_layer_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("T,E,k,share", [(1000, 8, 2, 0.8), (999, 128, 4, 0.8), (640, 256, 8, 0.5), (50, 6, 4, 0.8)])
def test_make_routing(bench, T, E, k, share):
    eidx, got = bench.make_routing(T, E, k, "skewed", seed=1)
    assert eidx.shape == (T, k) and int(eidx.min()) >= 0 and int(eidx.max()) < E
    assert all(len(set(row)) == k for row in eidx.tolist())  # distinct experts per token
    assert got == pytest.approx(float((eidx < 4).float().mean()))
    # the 80% share, capped where k distinct experts cannot fit 80% of them in 4 (and floored where E - 4 < k)
    want = max(min(share, 4 / k), (k - (E - 4)) / k)
    assert got == pytest.approx(want, abs=1.0 / (T * k) + 1e-9)
    eidx, _ = bench.make_routing(T, E, k, "balanced")
    loads = torch.bincount(eidx.reshape(-1), minlength=E)
    assert int(loads.max() - loads.min()) <= 1 and all(len(set(row)) == k for row in eidx.tolist())


def test_small_run_writes_json_and_table(bench, tmp_path):
    out = tmp_path / "moe.json"
    bench.main(
        [
            "--small",
            "--shapes",
            "tiny",
            "--tokens",
            "96",
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("Device:")
    assert data["device"] and data["device_type"] in ("cpu", "cuda") and data["small"] is True
    rows = {(r["routing"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {(r, m) for r in bench.ROUTINGS for m in bench.METHODS}
    H, F, E, k = bench.SMALL_SHAPES["tiny"]
    for (_routing, method), r in rows.items():
        if method == "triton" and not torch.cuda.is_available():
            assert "CUDA" in r["skipped"]
            continue
        if method == "torch_grouped_mm" and "skipped" in r:
            continue
        assert r["gemm_flops_fwd"] == 2 * 96 * k * H * F * 3
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["fwd_tflops"] == pytest.approx(r["gemm_flops_fwd"] / (r["fwd_ms"] * 1e-3) / 1e12)
        assert r["fwd_bwd_tflops"] == pytest.approx(3 * r["gemm_flops_fwd"] / (r["fwd_bwd_ms"] * 1e-3) / 1e12)
        if method not in ("dense", "torch_loop") and "max_rel_diff_vs_first" in r:
            assert r["max_rel_diff_vs_first"] < 1e-4  # every MoE method computed the same output
    assert rows[("skewed", "dense")]["fwd_share_of_dense"] == pytest.approx(1.0)
    assert rows[("skewed", "torch_loop")]["hot_share"] == pytest.approx(0.8, abs=0.01)
