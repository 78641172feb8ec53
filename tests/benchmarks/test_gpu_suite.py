"""benchmarks/gpu_suite.sh in its dry-run mode (CPU, Triton interpreter, tiny shapes): every section runs and
writes sane numbers; FLOP counts are recomputed here from the shapes; the target logic; the import bootstrap."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
SECTIONS = ("env", "kernels", "layer", "bip", "calibration", "ep")
STEPS = ("env", "kernels", "layer", "bip", "calibration", "ep", "pytest")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "GPU_SUITE_BLOCK")}
    env["PYTHON"] = sys.executable
    return env


def _report_module():
    spec = importlib.util.spec_from_file_location("gpu_report_under_test", ROOT / "benchmarks" / "gpu_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    r = subprocess.run(
        ["bash", str(SUITE), "--dry-run", "--out-dir", str(out)],
        env=_env(),
        cwd=str(out),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu_suite_dry-run-cpu.json").read_text())
    return out, res, r.stdout


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _times_ok(d: dict) -> bool:
    return all(_positive(d[k]) for k in ("median_ms", "min_ms")) and d["min_ms"] <= d["median_ms"] and d["runs"] >= 1


def test_files_steps_and_banner(dry):
    out, res, stdout = dry
    assert sorted(p.name for p in out.iterdir()) == sorted(f"gpu_suite_dry-run-cpu.{e}" for e in ("json", "md", "log"))
    assert res["dry_run"] is True and res["measured_on_gpu"] is False and res["device_slug"] == "dry-run-cpu"
    assert [s["name"] for s in res["steps"]] == list(STEPS)
    assert all(s["rc"] == 0 and s["wall_s"] >= 0 for s in res["steps"]), res["steps"]
    for s in SECTIONS:
        assert isinstance(res[s], dict) and res[s]["section"] == s and res[s]["dry_run"] is True, s
    md = (out / "gpu_suite_dry-run-cpu.md").read_text()
    assert "DRY RUN" in md
    for head in (
        "## Targets",
        "## Kernels",
        "## MoELayer",
        "## BIP balancer step",
        "## Cost model",
        "## Expert parallelism",
        "## gpu-marked tests",
        "## Ceilings",
    ):
        assert head in md, head
    log = (out / "gpu_suite_dry-run-cpu.log").read_text()
    assert "=== [pytest] rc=0" in log and "gpu_suite: done" in log


def test_bip_balancer_step(dry):
    """The bip step runs the balancer on the suite's device (the CPU in a dry run) over a stream of batches: a
    step time per budget, loads near capacity, and (numba is in the test environment) the certified gap of its
    prices against the exact optimum, never negative, with fast's times beside it."""
    bp = dry[1]["bip"]
    assert bp["device"] == "cpu" and bp["dry_run"] is True and (bp["T"], bp["E"], bp["k"]) == (512, 16, 2)
    assert [r["iterations"] for r in bp["rows"]] == [1, 2]
    for r in bp["rows"]:
        assert _positive(r["step_s"]) and 1.0 <= r["max_load_ratio_median"] < 2.0
        if bp["exact"]:
            assert 0.0 <= r["gap_median"] <= r["gap_max"] < 0.05
            assert _positive(r["fast_cold_s"]) and _positive(r["fast_warm_s"])
        else:
            assert r["gap_median"] is None and r["fast_cold_s"] is None


def test_env_bootstrap_and_ceilings(dry):
    env = dry[1]["env"]
    # moebalance and its mapped sub-packages come from this checkout's folders (the bootstrap's mapping)
    assert Path(env["imports"]["moebalance.solvers"]) == ROOT / "solvers" / "__init__.py"
    assert Path(env["imports"]["moebalance.kernels"]) == ROOT / "kernels" / "__init__.py"
    assert Path(env["imports"]["moebalance.integrations"]) == ROOT / "integrations" / "__init__.py"
    # the dry run hides what the GPU machine lacks
    assert env["packages"]["ortools"] is None and env["packages"]["cvxpy"] is None
    assert env["packages"]["torch"] and env["packages"]["numpy"]
    mm, cp = env["ceilings"]["matmul"], env["ceilings"]["copy"]
    assert mm["flops"] == 2 * mm["n"] ** 3 and _times_ok(mm)
    assert mm["tflops"] == pytest.approx(mm["flops"] / (mm["median_ms"] / 1e3) / 1e12)
    assert _positive(cp["bytes_per_s"]) and cp["bytes_read_plus_written"] % 8 == 0


def test_kernels_grid_flops_and_times(dry):
    k = dry[1]["kernels"]
    s = k["settings"]
    assert k["complete"] is True and k["cases_planned"] == len(k["rows"])
    assert dry[1]["calibration"]["complete"] is True
    T, H, F = s["tokens"], s["hidden"], s["ffn"]
    cases = {(r["experts"], r["k"], r["routing"]) for r in k["rows"]}
    assert cases == {(E, kk, rt) for E in s["experts"] for kk in s["top_k"] for rt in ("balanced", "skewed")}
    for r in k["rows"]:
        P = T * r["k"]
        gate_up, down = 2 * (2 * P * H * F), 2 * P * F * H  # two [P,H]x[H,F] GEMMs, one [P,F]x[F,H]
        assert r["gemm_flops_fwd"] == gate_up + down and r["gemm_flops_bwd"] == 2 * (gate_up + down)
        assert r["dense_flops_fwd"] == 2 * P * H * (3 * F) == r["gemm_flops_fwd"]  # the yardstick's work
        assert r["pairs"] == P and r["dense_shape"] == [P, H, 3 * F]
        if r["routing"] == "skewed":
            assert r["hot_share"] == pytest.approx(0.8, abs=0.02)
        else:
            assert r["load_max_over_mean"] == pytest.approx(1.0, abs=r["experts"] / P)
        for name in ("triton", "torch_loop", "torch_grouped_mm", "dense"):
            m = r["methods"][name]
            assert "error" not in m and "skipped" not in m, (name, m)
            for phase, mult in (("fwd", 1), ("bwd", 2), ("fwd_bwd", 3)):
                assert _times_ok(m[phase]), (name, phase)
                assert m[f"{phase}_tflops"] == pytest.approx(
                    mult * r["gemm_flops_fwd"] / (m[phase]["median_ms"] / 1e3) / 1e12
                )
            if name != "dense":
                assert m["fwd_rel_err_vs_fp32"] < 1e-4
        assert r["triton_correct"] is True
        assert all(e < 1e-4 for e in r["methods"]["triton"]["grad_rel_err_vs_fp32"].values())
        m = r["methods"]
        assert r["triton_fwd_share_of_dense"] == pytest.approx(m["triton"]["fwd_tflops"] / m["dense"]["fwd_tflops"])
        assert r["triton_fwd_speedup_vs_loop"] == pytest.approx(
            m["torch_loop"]["fwd"]["median_ms"] / m["triton"]["fwd"]["median_ms"]
        )


def test_targets_are_computed_but_not_claimed(dry):
    res = dry[1]
    targets = res["targets"]
    assert {t["target"] for t in targets} == {"fwd_vs_dense", "fwd_vs_loop", "bwd_vs_dense"}
    big = max(res["kernels"]["settings"]["experts"])
    for t in targets:
        assert t["status"] == "dry run: not a measurement"
        assert t["met"] == (t["value"] >= t["threshold"] and t["triton_correct"])
        if t["target"] == "fwd_vs_loop":
            assert t["case"]["experts"] >= big
        else:
            assert t["case"]["experts"] == 8 and t["case"]["routing"] == "balanced"
    assert sum(t["target"] == "fwd_vs_loop" for t in targets) == 2  # both routings at the largest E


def test_layer_every_balancer(dry):
    ly = dry[1]["layer"]
    s = ly["settings"]
    got = {(r["balancer"], r["backend"]) for r in ly["rows"]}
    assert got == {(b, be) for b in ("none", "aux_loss", "loss_free", "bip") for be in ("triton", "torch")}
    for r in ly["rows"]:
        assert "error" not in r, r
        assert _times_ok(r["eval_fwd"]) and _times_ok(r["train_step"])
        assert r["gemm_flops_fwd"] == 2 * s["tokens"] * s["top_k"] * s["hidden"] * s["ffn"] * 3
        assert r["eval_rel_diff_triton_vs_torch"] < 1e-4
        assert r["train_steps"] == s["repeats"] + s["warmup"]
    by = {(r["balancer"], r["backend"]): r for r in ly["rows"]}
    # the skewed batch is imbalanced; without a bias update nothing changes. The BIP balancer prices the batch
    # itself and routes it within capacity, so it is balanced from its first step on
    none_first = by[("none", "triton")]["max_vio_first_step"]
    assert none_first > 0.5
    assert by[("none", "triton")]["max_vio_last_step"] == none_first
    assert by[("bip", "triton")]["max_vio_first_step"] < 0.25 * none_first
    assert by[("bip", "triton")]["max_vio_last_step"] < 0.25 * none_first


def test_calibration_and_simulator(dry):
    cal = dry[1]["calibration"]
    s = cal["settings"]
    assert cal["simulator_module"] in ("moebalance.simulate", "moebalance.evaluation.simulate")
    assert {(r["experts"], r["rows_per_expert"]) for r in cal["gemm_sweep"]} == {
        (g, n) for g in s["groups"] for n in s["rows"]
    }
    for r in cal["gemm_sweep"]:
        assert r["rows"] == r["experts"] * r["rows_per_expert"]
        assert r["flops_fwd"] == 6 * r["rows"] * s["hidden"] * s["ffn"] and _times_ok(r["fwd"])
    f = cal["fit_forward"]
    assert f["token_time"] >= 0 and f["gemm_time"] >= 0 and f["samples"] == len(cal["gemm_sweep"])
    assert _positive(cal["hardware_measured"]["device_flops"]) and cal["device_flops_source"]
    assert _positive(cal["copy"]["device_to_device"]["bytes_per_s"])
    assert "lp" in cal["methods"] and "llep" in cal["methods"]  # scipy's LP stays; ortools' MILP is left out
    assert "milp" in cal["methods_missing_backend"] and "ortools" in cal["methods_missing_backend"]["milp"]
    scen = {r["scenario"] for r in cal["simulator"]}
    assert scen == {"balanced"} | {f"{p}:{n}" for p in (30, 50, 80, 95) for n in (1, 4, 16)}
    for r in cal["simulator"]:
        assert _positive(r["speedup_assumed_hw"]) and _positive(r["speedup_measured_hw"]), r
        assert _positive(r["makespan_measured_hw_s"])
    for r in cal["measured_makespans"]:
        assert _positive(r["llep_speedup_measured_compute"])
        for m in ("ep", "llep"):
            assert sum(r[m]["device_rows"]) == s["devices"] * s["tokens_per_device"] * s["top_k"]
            assert all(_positive(t) for t in r[m]["measured_s"])


def test_ep_world_size_one(dry):
    ep = dry[1]["ep"]
    assert ep["backend"] == "gloo" and ep["world_size"] == 1
    replicated = ["replicated", "replicated-lp", "replicated-llep"]
    assert [r["placement"] for r in ep["rows"]] == ["ep", "llep", "llep+", *replicated]
    by = {r["placement"]: r for r in ep["rows"]}
    for name in replicated:
        rebalance = by[name]["rebalance"]
        assert rebalance.startswith("RebalanceReport(") and "method='eplb'" in rebalance, name  # the re-plan ran
    # each row ran its own split over the replicas: even shares, the dispatch LP, LLEP over the slots
    assert by["replicated"]["plan_used"] == "replicas (even)"
    assert by["replicated-lp"]["plan_used"] == "replicas (lp)"
    assert by["replicated-llep"]["plan_used"].startswith("replicas (") and "llep" in by["replicated-llep"]["plan_used"]
    assert _times_ok(ep["layer"]["fwd"]) and _times_ok(ep["layer"]["fwd_bwd"])
    for r in ep["rows"]:
        assert "error" not in r, r
        assert r["out_rel_diff_vs_layer"] < 1e-5 and r["dx_rel_diff_vs_layer"] < 1e-4
        assert _times_ok(r["fwd"]) and _times_ok(r["fwd_bwd"]) and r["phases_s"]


def test_gpu_marked_tests_collected_and_skipped_without_gpu(dry):
    pt = dry[1]["pytest_gpu"]
    assert pt["tests"] >= 2 and pt["failures"] == 0 and pt["errors"] == 0
    assert pt["skipped"] == pt["tests"]  # no GPU here: every gpu-marked test skips, none is silently deselected


def test_missing_backends_listed(dry):
    missing = " ".join(dry[1]["missing"])
    assert "ortools" in missing and "cvxpy" in missing
    assert "section" not in missing  # every section produced results


def test_only_and_bad_arguments(tmp_path):
    r = subprocess.run(
        ["bash", str(SUITE), "--dry-run", "--only", "nosuchstep"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 2 and "unknown step" in r.stderr
    r = subprocess.run(["bash", str(SUITE), "--bogus"], env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    r = subprocess.run(
        ["bash", str(SUITE), "--dry-run", "--only", "env", "--out-dir", str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_suite_dry-run-cpu_only-env.json").read_text())
    assert [s["name"] for s in res["steps"]] == ["env"] and res["env"]["section"] == "env"
    assert res["kernels"] is None and any("'kernels'" in m for m in res["missing"])
    assert all(t["status"].startswith("unmeasured") for t in res["targets"])


def test_target_logic_on_gpu_numbers():
    rep = _report_module()

    def row(E, rt, **kw):
        return {"experts": E, "k": 2, "routing": rt, "tokens": 32768, "triton_correct": True, **kw}

    kernels = {
        "rows": [
            row(8, "balanced", triton_fwd_share_of_dense=0.61, triton_bwd_share_of_dense=0.49),
            row(8, "skewed", triton_fwd_share_of_dense=0.1),  # the dense targets apply to balanced routing only
            row(64, "balanced", triton_fwd_speedup_vs_loop=1.5),
            row(256, "skewed", triton_fwd_speedup_vs_loop=3.0, triton_correct=False),
            row(256, "balanced"),  # no number measured
        ]
    }
    got = {(t["target"], t["case"]["experts"], t["case"]["routing"]): t for t in rep.compute_targets(kernels, False)}
    assert set(got) == {
        ("fwd_vs_dense", 8, "balanced"),
        ("bwd_vs_dense", 8, "balanced"),
        ("fwd_vs_loop", 64, "balanced"),
        ("fwd_vs_loop", 256, "skewed"),
        ("fwd_vs_loop", 256, "balanced"),
    }
    assert got[("fwd_vs_dense", 8, "balanced")]["status"] == "met"
    assert got[("bwd_vs_dense", 8, "balanced")]["status"] == "not met"
    assert got[("fwd_vs_loop", 64, "balanced")]["status"] == "met"  # the threshold itself meets it
    assert got[("fwd_vs_loop", 256, "skewed")]["met"] is False
    assert "tolerance" in got[("fwd_vs_loop", 256, "skewed")]["status"]
    assert got[("fwd_vs_loop", 256, "balanced")]["status"] == "unmeasured"
    assert all(t["status"].startswith("unmeasured") for t in rep.compute_targets(None, False))


def test_bootstrap_maps_the_checkout_and_hides_blocked_modules(tmp_path):
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").symlink_to(ROOT / "benchmarks" / "gpu_bootstrap.py")
    env = {**_env(), "PYTHONPATH": str(boot), "MOEBALANCE_CHECKOUT": str(ROOT), "GPU_SUITE_BLOCK": "ortools,cvxpy"}
    code = (
        "import importlib.util as u, json, moebalance.solvers, moebalance.kernels\n"
        "print(json.dumps([moebalance.solvers.__file__, moebalance.kernels.__file__,\n"
        "                  u.find_spec('ortools') is None, u.find_spec('numpy') is None]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    solvers, kernels, ortools_hidden, numpy_hidden = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(solvers) == ROOT / "solvers" / "__init__.py" and Path(kernels) == ROOT / "kernels" / "__init__.py"
    assert ortools_hidden is True and numpy_hidden is False


def test_report_of_a_run_cut_short(tmp_path):
    """A kernels step stopped by its limit after one failed case: the report renders and says what is missing."""
    rep = _report_module()
    part = {
        "section": "kernels",
        "dry_run": False,
        "device": {"device_type": "cuda", "name": "NVIDIA H200"},
        "settings": {
            "tokens": 32768,
            "hidden": 2048,
            "ffn": 1024,
            "dtype": "bfloat16",
            "repeats": 20,
            "warmup": 3,
            "experts": [8],
            "top_k": [2],
        },
        "complete": False,
        "cases_planned": 2,
        "timing": "CUDA events, median",
        "rows": [
            {
                "tokens": 32768,
                "hidden": 2048,
                "ffn": 1024,
                "experts": 8,
                "k": 2,
                "routing": "balanced",
                "methods": {},
                "triton_correct": False,
                "error": "OutOfMemoryError: boom",
            }
        ],
    }
    (tmp_path / "kernels.json").write_text(json.dumps(part))
    (tmp_path / "steps.jsonl").write_text('{"name": "kernels", "rc": 124, "wall_s": 200.0, "timeout_s": 200}\n')
    res = rep.build(tmp_path, "nvidia-h200", dry=False)
    assert res["measured_on_gpu"] is True and res["env"] is None
    assert any("stopped before its end: 1 of 2" in m for m in res["missing"])
    assert any("'env'" in m for m in res["missing"])
    t = [t for t in res["targets"] if t["target"] == "fwd_vs_dense"]
    assert len(t) == 1 and t[0]["value"] is None and t[0]["status"] == "unmeasured"
    md = rep.render_markdown(res)
    assert "OutOfMemoryError" in md and "| kernels | 124 |" in md
