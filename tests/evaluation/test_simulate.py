"""The scale simulator: scenario loads, recorded routing, result rows, plots and the CLI subcommand."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

import moebalance as mb
from moebalance.evaluation.simulate import (
    DEFAULT_ROUTING_DIR,
    MODELS,
    ModelPreset,
    add_simulate_command,
    real_layers,
    scenario_loads,
    simulate,
)

SMALL = MODELS["gpt-oss-20b"]  # E=32, k=4


def test_scenario_totals_and_shapes():
    for sc in ["balanced", "30:1", "50:4", "95:16", "zipf:1.2"]:
        loads = scenario_loads(sc, SMALL, 4, 1000)
        assert loads.shape == (32,) and loads.sum() == 4 * 1000 * 4 and loads.min() >= 0
    hot = scenario_loads("30:4", SMALL, 4, 1000)
    assert hot[:4].sum() == 4800 and hot[:4].max() - hot[:4].min() <= 1  # 30% of 16000, evenly
    assert hot[4:].max() - hot[4:].min() <= 1
    assert np.array_equal(
        scenario_loads("zipf:1.2", SMALL, 4, 1000, seed=5), scenario_loads("zipf:1.2", SMALL, 4, 1000, seed=5)
    )


def test_reference_style_hand_computed():
    # E=8, k=2, one rank of T=10 tokens, 30% hot into 1 expert: 3 hot tokens send both slots to expert 0 (6);
    # the 7 cold tokens send slots (i + j) % 7, i = 3..9, j = 0, 1: every cold expert twice
    model = ModelPreset("toy", 8, 2, 4, 4)
    assert scenario_loads("30:1", model, 1, 10, style="reference").tolist() == [6, 2, 2, 2, 2, 2, 2, 2]
    assert scenario_loads("30:1", model, 3, 10, style="reference").tolist() == [18, 6, 6, 6, 6, 6, 6, 6]
    # with n > k only the first k hot experts get tokens (the authors' generator cycles j % n for j < k)
    ref = scenario_loads("50:16", SMALL, 2, 1000, style="reference")
    assert ref[:4].tolist() == [1000] * 4 and ref[4:16].sum() == 0


@pytest.mark.parametrize("bad", ["hot", "30:0", "30:32", "120:1", "zipf:x"])
def test_bad_scenarios(bad):
    with pytest.raises(ValueError):
        scenario_loads(bad, SMALL, 4, 100)


def test_simulate_rows_relations(tmp_path):
    res = simulate("gpt-oss-20b", [4, 3], 2048, scenarios=["balanced", "95:1"])
    methods = ["ep", "eplb", "eplb-home", "llep", "llep+", "lp"]
    assert len(res.rows) == 2 * 2 * len(methods)
    by = {(r["devices"], r["scenario"], r["method"]): r for r in res.rows}
    for r in res.rows:
        assert r["status"] in ("feasible", "optimal")
        assert r["gap_to_lp"] >= -1e-9  # nothing beats the LP bound
        assert r["planning_s"] >= 0 and r["peak_gib"] > 0
    for P in (4, 3):  # P=3 does not divide E=32: uneven home blocks
        ep, llep = by[(P, "95:1", "ep")], by[(P, "95:1", "llep")]
        assert ep["speedup"] == 1.0
        assert llep["speedup"] > 1.5 and llep["peak_gib"] < ep["peak_gib"]
        assert by[(P, "95:1", "llep+")]["makespan_s"] <= llep["makespan_s"]
        assert by[(P, "balanced", "llep")]["speedup"] == pytest.approx(1.0)  # fallback to EP
    data = json.loads(res.to_json())
    assert data["settings"]["devices"] == [4, 3] and len(data["rows"]) == len(res.rows)
    assert "speedup" in res.table()
    paths = res.plot(tmp_path)
    assert [p.name for p in paths] == ["simulate_speedup.png", "simulate_peak_memory.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_package_level_simulate_is_the_function_not_a_module():
    # no module doubles as a function: `moebalance.simulate` is the function of moebalance.evaluation.simulate,
    # and there is no module of that name to shadow it
    import importlib.util
    import types

    import moebalance.evaluation.simulate as sim_module

    assert importlib.util.find_spec("moebalance.simulate") is None
    assert mb.simulate is sim_module.simulate and not isinstance(mb.simulate, types.ModuleType)
    assert not callable(sim_module)
    res = mb.simulate("gpt-oss-20b", 4, 128, scenarios=["80:1"], methods=["llep"])
    assert {r["method"] for r in res.rows} == {"ep", "llep"}


def test_more_devices_than_experts():
    res = simulate("mixtral-8x7b", 16, 256, scenarios=["50:1"], methods=["llep"])
    assert {r["method"] for r in res.rows} == {"ep", "llep"}
    assert all(r["makespan_s"] > 0 for r in res.rows)


def _fake_routing(folder):
    counts = [[0] * 256, list(range(256)), [5] * 128 + [1] * 128]  # layer 0 dense (all zero)
    (folder / "deepseek_v3_expert_counts.json").write_text(json.dumps({"runA": counts}))
    return folder


def test_real_layers_from_path_option(tmp_path):
    model, layers = real_layers("deepseek-v3:runA", _fake_routing(tmp_path))
    assert model.name == "deepseek-v3" and [n for n, _ in layers] == ["runA/layer1", "runA/layer2"]
    with pytest.raises(ValueError, match="unknown DeepSeek-V3 run"):
        real_layers("deepseek-v3:nope", tmp_path)
    with pytest.raises(ValueError, match="not found"):
        real_layers("olmoe", tmp_path)
    with pytest.raises(ValueError, match="`real`"):
        real_layers("llama", tmp_path)


def test_whole_model_rows_sum_layers(tmp_path):
    res = simulate(
        "gpt-oss-20b",
        8,
        512,
        scenarios=[],
        methods=["llep"],
        real=["deepseek-v3:runA"],
        routing_dir=_fake_routing(tmp_path),
    )
    layers = [r for r in res.rows if r["layer"]]
    whole = {r["method"]: r for r in res.rows if r["scenario"].endswith("/all-layers")}
    assert len(layers) == 2 * 2 and set(whole) == {"ep", "llep"}
    for m in ("ep", "llep"):
        assert whole[m]["makespan_s"] == pytest.approx(sum(r["makespan_s"] for r in layers if r["method"] == m))
        # each layer is rescaled to P * tokens_per_device * k slots of DeepSeek-V3 (k=8)
    assert whole["ep"]["speedup"] == 1.0


@pytest.mark.skipif(
    not (DEFAULT_ROUTING_DIR / "deepseek_v3_expert_counts.json").is_file(), reason="shared routing data not present"
)
def test_real_data_default_folder():
    model, layers = real_layers("deepseek-v3")
    assert model.experts == 256 and len(layers) == 58
    model, layers = real_layers("olmoe:c4")
    assert model.experts == 64 and len(layers) == 3


def test_cli_subcommand(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="moebalance")
    sub = parser.add_subparsers(dest="command")
    add_simulate_command(sub)
    assert "--tokens-per-device" in sub.choices["simulate"].format_help()
    args = parser.parse_args(
        [
            "simulate",
            "--model",
            "gpt-oss-20b",
            "--devices",
            "4",
            "--tokens-per-device",
            "256",
            "--scenarios",
            "80:1",
            "--methods",
            "llep,llep+",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "llep+" in out and "80:1" in out
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert {r["method"] for r in data["rows"]} == {"ep", "llep", "llep+"}
    assert (tmp_path / "simulate_speedup.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--devices", "0"])


def test_hardware_file_from_calibration(tmp_path):
    import json

    from moebalance.evaluation.simulate import Hardware, load_hardware

    f = tmp_path / "cal.json"
    f.write_text(
        json.dumps(
            {"hardware": {"device_flops": 1.3e10, "link_bandwidth": 4.5e11, "gemm_overhead": 0.0, "dtype_bytes": 4.0}}
        )
    )
    assert load_hardware(f) == Hardware(1.3e10, 4.5e11, 0.0, 4.0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"fit": {}}))
    with pytest.raises(ValueError, match="hardware_file"):
        load_hardware(bad)


def test_cli_reads_the_hardware_file(tmp_path):
    import json
    import subprocess
    import sys

    f = tmp_path / "cal.json"
    f.write_text(
        json.dumps(
            {"hardware": {"device_flops": 1.3e10, "link_bandwidth": 4.5e11, "gemm_overhead": 0.0, "dtype_bytes": 4.0}}
        )
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moebalance",
            "simulate",
            "--hardware-file",
            str(f),
            "--scenarios",
            "95:1",
            "--methods",
            "ep,llep",
            "--tokens-per-device",
            "2048",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "hardware from" in out.stdout and "llep" in out.stdout
