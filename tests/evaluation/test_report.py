"""moebalance.evaluation.report: the report from small inputs of every kind, missing and unreadable inputs named instead of
crashing, the quick runs of missing inputs, and the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moebalance.evaluation import report
from moebalance.evaluation.report import build_report
from moebalance.evaluation.study import StudyConfig, run_study, write_outputs

SMALL = dict(devices=2, tokens_per_device=64, progress=False)


def _routing() -> dict:
    def res(t, gap, status="optimal", feasible=True):
        return {"status": status, "wall_time": t, "feasible": feasible, "gap_to_opt": gap, "own_gap": gap}

    insts = [
        {
            "name": "T=64 E=4 k=1",
            "T": 64,
            "E": 4,
            "k": 1,
            "topk_load_ratio": 2.0,
            "results": {
                "mcf": res(0.01, 0.0),
                "greedy": res(0.02, 3e-4, "feasible"),
                "topk": res(0.001, -0.2, "infeasible", False),
            },
        },
        {
            "name": "T=128 E=8 k=2",
            "T": 128,
            "E": 8,
            "k": 2,
            "topk_load_ratio": 3.0,
            "results": {
                "mcf": res(0.03, 0.0),
                "greedy": {"skipped": "skipped (>60 s at T=64, E=4)"},
                "topk": res(0.002, -0.3, "infeasible", False),
            },
        },
    ]
    return {
        "benchmark": "routing_solvers",
        "machine": {"cpu_model": "test cpu", "cores": 2, "load_average_at_start": [1.0, 1.0, 1.0]},
        "config": {
            "methods": ["mcf", "greedy", "topk"],
            "capacity_factor": 1.0,
            "time_cap_s": 60.0,
            "reference": "mcf",
            "quick": True,
        },
        "instances": insts,
        "warnings": [],
        "targets": [{"name": "fast_small", "met": True, "line": "target met: fast 3.0x faster than mcf (test)"}],
    }


def _placement() -> dict:
    gaps = {"ep": 1.5, "eplb": 0.3, "eplb-home": 0.6, "llep": 0.05, "llep+": 0.01}
    row = {
        "set": "toy P=4",
        "instance": "30:1",
        "best_plan": 1.01,
        "best_bound": 1.0,
        "milp_status": "optimal",
        **{f"{m}_gap": g for m, g in gaps.items()},
    }
    summary = {
        "toy P=4": {
            "instances": 1,
            **{f"{m}_median_gap": g for m, g in gaps.items()},
            "llep+_closes_median_vs_best_plan": 1.0,
            "llep+_closes_median_vs_bound": 0.8,
            "llep_time_median_ms": 0.3,
            "llep+_time_median_ms": 0.9,
        }
    }
    return {
        "hardware_assumed": {"device_flops": 6e14},
        "gap_table": {"rows": [row], "summary": summary},
        "milp_scaling": {
            "time_limit_s": 5.0,
            "rows": [
                {"E": 16, "P": 4, "status": "optimal", "time_s": 1.0, "gap": 0.0, "objective": 2.0, "llep+": 2.02}
            ],
        },
    }


def _calibration() -> dict:
    return {
        "device": "test cpu",
        "dtype": "float32",
        "model": "custom",
        "shapes": {"hidden": 16, "ffn": 32, "experts": 8, "top_k": 2},
        "hardware": {"device_flops": 1e10, "link_bandwidth": 1e10, "gemm_overhead": 1e-5, "dtype_bytes": 4.0},
        "fit": {"forward": {"r2": 0.9}},
        "link_bandwidth_source": "assumed",
    }


def _routing_data(folder: Path) -> Path:
    folder.mkdir()
    counts = {
        "olmoe": {"expert_counts": {"c4": {str(l): [10 + (e * 7 + l) % 50 for e in range(64)] for l in (0, 7)}}},
        "mistral": {"expert_counts": {"c4": {"0": [100, 90, 80, 120, 110, 95, 105, 300]}}},
    }
    (folder / "olmoe_mixtral_expert_counts.json").write_text(json.dumps(counts))
    return folder  # no DeepSeek file: the report must name it and go on


@pytest.fixture(scope="module")
def study_json(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    cfg = StudyConfig.quick(
        experts=(4,),
        top_k=(2,),
        steps=3,
        batch_size=2,
        seq_len=16,
        val_tokens=64,
        balancers=("none", "aux_loss:0.1", "loss_free:0.001", "bip"),
    )
    write_outputs(run_study(cfg, progress=False), folder, "balancer_study")
    return folder / "balancer_study.json"


def _images_exist(md: str, out: Path) -> list[str]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links
    for link in links:
        assert (out.parent / link).is_file(), link
    return links


def test_full_report_from_small_inputs(tmp_path, study_json):
    results = tmp_path / "results"
    results.mkdir()
    (results / "routing_solvers.json").write_text(json.dumps(_routing()))
    (results / "placement.json").write_text(json.dumps(_placement()))
    (results / "ep_cost_model_testcpu.json").write_text(json.dumps(_calibration()))
    (results / "balancer_study.json").write_text(study_json.read_text())
    out = tmp_path / "rep" / "report.md"
    res = build_report(out, results_dir=results, routing_dir=_routing_data(tmp_path / "routing"), **SMALL)
    md = out.read_text()
    assert md == res.markdown
    for title in ("## 1. Routing solvers", "## 2. Placement", "## 3. Simulated speedup", "## 4. Balancer"):
        assert title in md
    assert "not yet run" not in md
    assert set(res.inputs) == {"routing", "placement", "calibration", "study"}
    # the routing summary is computed from the instances: greedy ran once of two, its gap 3e-4; topk infeasible
    assert re.search(r"\| greedy \| 1/2 \| 3\.0e-04 \| 3\.0e-04 \|", md), md
    assert "| topk | 2/2 | - | - |" in md and "target met: fast 3.0x faster than mcf (test)" in md
    assert "| toy P=4 | 1 | 150.00% | 30.00% | 60.00% | 5.00% | 1.00% |" in md
    assert "Measured cost model from `ep_cost_model_testcpu.json`" in md and "calibrated-testcpu" in md
    assert "olmoe/all-layers" in md and "mixtral/all-layers" in md
    assert "routing data deepseek-v3" in res.missing  # named, not a crash
    assert "2408.15664" in md and "| 4 | 2 | bip |" in md
    links = _images_exist(md, out)
    assert {Path(p).name for p in links} >= {
        "routing_solvers.png",
        "placement_gaps.png",
        "balancer_study_maxvio.png",
        "simulate_assumed_speedup.png",
        "simulate_ep_cost_model_testcpu_speedup.png",
    }
    assert all(p.is_file() and p.parent == out.parent / "report_files" for p in res.plots)


def test_missing_and_unreadable_inputs_are_named(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "placement.json").write_text("{not json")
    out = tmp_path / "report.md"
    res = build_report(out, results_dir=results, routing_dir=tmp_path / "nowhere", **SMALL)
    md = out.read_text()
    assert "not yet run: python benchmarks/routing_solvers.py" in md
    assert "not yet run: python benchmarks/balancer_study.py" in md
    assert "not yet run: python benchmarks/ep_layer.py --mode calibrate --small" in md
    assert "Could not read" in md and res.missing["placement"].startswith("unreadable")
    assert all(k in res.missing for k in ("routing", "study", "calibration", "routing data olmoe"))
    assert "## 3. Simulated speedup" in md  # the simulator still runs the paper's scenarios
    _images_exist(md, out)


def test_run_quick_runs_only_the_in_package_study(tmp_path, monkeypatch, study_json):
    """--run-quick makes the quick study (in this process) beside --out, never runs a benchmark script (the
    report reads their JSON), and names each missing benchmark with the command that makes it."""
    import subprocess

    def no_subprocess(*a, **k):
        raise AssertionError("the report must not run subprocesses")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    calls = []
    monkeypatch.setattr(
        report,
        "_quick_study",
        lambda assets, progress: (
            calls.append(assets),
            (assets / "balancer_study_quick.json").write_text(study_json.read_text()),
        ),
    )
    empty = tmp_path / "results"
    empty.mkdir()
    out = tmp_path / "r" / "report.md"
    res = build_report(out, results_dir=empty, routing_dir=tmp_path / "nowhere", run_quick=True, **SMALL)
    assets = out.parent / "report_files"
    assert calls == [assets] and (assets / "balancer_study_quick.json").is_file()
    assert "(quick run)" in res.markdown and "## 4. Balancer training study" in res.markdown
    assert (
        "not yet run: python benchmarks/routing_solvers.py (quick: python benchmarks/routing_solvers.py "
        "--quick" in res.markdown
    )
    assert set(res.missing) >= {"routing", "placement"} and "study" not in res.missing
    assert not list(empty.iterdir())  # nothing written into the results folder


def test_relative_out_writes_only_below_the_current_directory(tmp_path, monkeypatch, study_json):
    """A relative --out lands under the current directory, not in the package's or repository's folders."""
    import moebalance

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        report,
        "_quick_study",
        lambda assets, progress: (assets / "balancer_study_quick.json").write_text(study_json.read_text()),
    )
    root = Path(moebalance.__file__).resolve().parents[1]  # the checkout (editable install) or site-packages

    def listing():
        return {
            p: p.stat().st_mtime_ns
            for folder in (root, root / "moebalance", root / "benchmarks" / "results")
            if folder.is_dir()
            for p in folder.iterdir()
        }

    before = listing()
    assert (
        report.main(
            [
                "--out",
                "rel/report.md",
                "--results",
                str(tmp_path),
                "--routing-data",
                "nowhere",
                "--run-quick",
                "--devices",
                "2",
                "--tokens-per-device",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (tmp_path / "rel" / "report.md").is_file()
    assert (tmp_path / "rel" / "report_files" / "balancer_study_quick.json").is_file()
    assert listing() == before


def test_command_line(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert (
        report.main(
            [
                "--out",
                str(out),
                "--results",
                str(tmp_path),
                "--routing-data",
                str(tmp_path / "x"),
                "--devices",
                "2",
                "--tokens-per-device",
                "64",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "missing routing: not yet run" in printed and f"wrote {out}" in printed
    assert report.main(["--out", str(tmp_path / "report.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moebalance report: error:") and "`out`" in err and "\n" not in err
    assert report.main(["--out", str(out), "--results", str(tmp_path / "missing")]) == 2
    assert "results_dir" in capsys.readouterr().err


def test_report_subcommand_registers():
    import argparse

    parser = argparse.ArgumentParser(prog="moebalance")
    report.add_report_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "--run-quick", "--devices", "4", "--out", "x.md"])
    assert args.func is report.run_report_command and args.run_quick and args.devices == 4
