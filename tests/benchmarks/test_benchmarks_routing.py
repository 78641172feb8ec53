"""benchmarks/routing_solvers.py: its --quick run (structure, exact methods agree with mcf) and its skip rule."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import moebalance as mb

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "routing_solvers.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_routing_solvers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bench = _load_script()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )  # a hang guard
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_quick_json_structure(quick):
    proc, res, md = quick
    assert res["benchmark"] == "routing_solvers" and res["config"]["quick"] is True
    mach = res["machine"]
    assert mach["cpu_model"] and mach["cores"] >= 1
    for pkg in ("numpy", "scipy", "ortools", "cvxpy"):
        assert mach["versions"][pkg], pkg
    methods = set(mb.available_methods("routing"))
    assert set(res["config"]["methods"]) == methods
    assert set(res["config"]["exact_methods"]) == {m for m in methods if mb.method_info("routing", m).exact}
    grid = bench.QUICK_GRID
    expected = {(T, E, k) for T in grid["tokens"] for E in grid["experts"] for k in grid["k"]}
    assert {(i["T"], i["E"], i["k"]) for i in res["instances"]} == expected
    for inst in res["instances"]:
        assert set(inst["results"]) == methods
        for r in inst["results"].values():
            assert {"status", "wall_time", "objective", "bound", "own_gap", "gap_to_opt", "peak_rss_mib"} <= set(r)
    assert [t["name"] for t in res["targets"]] == ["speedup", "fast_small", "fast_large"]
    assert all(t["met"] is None for t in res["targets"])  # the target instance is not in the quick grid
    assert res["warnings"] == []
    # the printed and the written markdown carry the same tables
    assert "| T | E | k | top-k max/cap | mcf |" in md and md.splitlines()[0] in proc.stdout


def test_quick_exact_methods_match_mcf(quick):
    _, res, _ = quick
    exact = res["config"]["exact_methods"]
    assert "mcf" in exact and len(exact) >= 2
    for inst in res["instances"]:
        opt = inst["results"]["mcf"]["objective"]
        assert inst["optimum"] == opt and opt is not None
        for m in exact:
            r = inst["results"][m]
            assert r["status"] == "optimal", (inst["name"], m, r)
            assert abs(r["objective"] - opt) <= 1e-6 * abs(opt), (inst["name"], m)
        for m, r in inst["results"].items():
            if r["bound"] is not None:  # every certified bound lies above the optimum (maximisation)
                assert r["bound"] >= opt * (1 - 1e-9), (inst["name"], m)
            if r["feasible"]:
                assert r["gap_to_opt"] >= -1e-9, (inst["name"], m)
        assert inst["results"]["topk"]["status"] == "infeasible"  # skewed scores overload top-k


def _rec(T, E, k, **kw):
    return {"T": T, "E": E, "k": k, "skipped": None, "exceeded": False, "wall_time": 1.0, "peak_rss_mib": 100.0, **kw}


def test_skip_reason_rules():
    cap, mem = 60.0, 10 * 1024.0
    assert bench.skip_reason("bip", 1024, 16, 8, [], cap, mem) is None
    hist = [_rec(1024, 64, 8, exceeded=True, wall_time=65.0)]
    assert bench.skip_reason("bip", 4096, 64, 8, hist, cap, mem) == "skipped (>60 s at T=1024, E=64)"
    assert bench.skip_reason("bip", 1024, 256, 8, hist, cap, mem) == "skipped (>60 s at T=1024, E=64)"
    assert bench.skip_reason("bip", 4096, 64, 2, hist, cap, mem) is None  # another k
    assert bench.skip_reason("bip", 4096, 16, 8, hist, cap, mem) is None  # fewer experts
    # a skip propagates to larger instances with its original reason
    hist2 = hist + [_rec(4096, 64, 8, skipped="skipped (>60 s at T=1024, E=64)")]
    assert bench.skip_reason("bip", 16384, 64, 8, hist2, cap, mem) == "skipped (>60 s at T=1024, E=64)"
    # linear predictions from the largest smaller T
    reason = bench.skip_reason("lp", 16384, 64, 8, [_rec(4096, 64, 8, wall_time=20.0)], cap, mem)
    assert reason == "skipped (predicted >= 80 s from 20.0 s at T=4096, E=64)"
    assert bench.skip_reason("lp", 16384, 64, 8, [_rec(4096, 64, 8, wall_time=10.0)], cap, mem) is None
    assert "GiB" in bench.skip_reason("mip", 16384, 64, 8, [_rec(4096, 64, 8, peak_rss_mib=3000.0)], cap, mem)


def _result(bip_status, bip_time):
    res = {
        "mcf": {"status": "optimal", "wall_time": 0.5, "feasible": True, "gap_to_opt": 0.0},
        "bip": {"status": bip_status, "wall_time": bip_time, "feasible": True, "gap_to_opt": 0.0},
    }
    inst = {"T": 4096, "E": 64, "k": 8, "results": res}
    return {"instances": [inst], "config": {"exact_methods": ["bip", "mcf"]}}


def test_evaluate_targets_lines():
    speed, _, _ = bench.evaluate_targets(_result("optimal", 60.0))
    assert speed["met"] is True and speed["fastest_exact"] == "mcf" and speed["ratio"] == pytest.approx(120.0)
    assert not speed["ratio_is_lower_bound"] and speed["line"].startswith("target met")
    speed, _, _ = bench.evaluate_targets(_result("time_limit", 40.0))  # unfinished bip: 80x lower bound
    assert speed["met"] is None and speed["ratio_is_lower_bound"] and "NOT met as measured" in speed["line"]
    speed = bench.evaluate_targets(_result("time_limit", 70.0))[0]  # unfinished, yet >= 100x: met
    assert speed["met"] is True and ">= 140x (a lower bound)" in speed["line"]
    speed = bench.evaluate_targets(_result("optimal", 40.0))[0]  # finished in 80x the time: not met
    assert speed["met"] is False and speed["line"].startswith("target NOT met: ")


def test_fast_targets_lines():
    res = _result("optimal", 60.0)
    inst = res["instances"][0]
    inst["topk_floor_s"] = 0.002
    inst["results"]["fast"] = {"status": "optimal", "wall_time": 0.04, "feasible": True, "gap_to_opt": 0.0}
    small = bench.evaluate_targets(res)[1]
    assert small["name"] == "fast_small" and small["ratio"] == pytest.approx(0.5 / 0.04)
    assert small["met"] is True and small["aim_met"] is False and small["floor_ratio"] == pytest.approx(20.0)
    assert small["line"].startswith("target met: fast 40.0 ms vs mcf 500 ms: 12.5x")
    inst["results"]["fast"]["wall_time"] = 0.1
    assert bench.evaluate_targets(res)[1]["met"] is False
    inst["results"]["fast"]["status"] = "feasible"  # not proven optimal: never met
    assert bench.evaluate_targets(res)[1]["met"] is False
    assert bench.evaluate_targets(res)[2]["met"] is None  # the large instance is not in this result


def test_scaling_plot_is_written(tmp_path):
    res = {
        "methods": ["mcf", "fast"],
        "k": 8,
        "machine": {"cpu_model": "cpu", "cores": 2},
        "rows": [
            {
                "T": T,
                "E": E,
                "topk_floor_s": 1e-3 * T / 1024,
                "results": {"mcf": {"wall_time": 0.1 * T / 1024}, "fast": {"wall_time": 0.01 * T / 1024}},
            }
            for T, E in [(1024, 64), (4096, 64), (16384, 64), (16384, 16), (16384, 256)]
        ],
    }
    path = tmp_path / "scaling.png"
    bench.plot_scaling(res, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
