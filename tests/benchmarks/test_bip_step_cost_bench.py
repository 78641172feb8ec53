"""benchmarks/bip_step_cost.py: its tables on a tiny configuration (the plumbing, not the timings)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SPEC = importlib.util.spec_from_file_location(
    "bip_step_cost_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "bip_step_cost.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_step_table_is_paired_per_round_and_summarised(tmp_path, capsys):
    rows = bench.step_costs([("mixtral", 8, 2)], 2, 8, 3)
    (row,) = rows
    assert set(row["step_s"]) == {"none", "bip", "bip_topk", "bip_lagged"}
    assert all(v > 0 for v in row["step_s"].values()) and row["rounds"] == 3
    for b in ("bip", "bip_topk", "bip_lagged"):
        assert -1 < row[f"{b}_overhead"] < 10  # a ratio minus one, not a time
    fits = bench.fit_scaling([(256, 8, 2)], 2)
    assert fits[0]["fit_s"] > 0 and fits[0]["capacity_s"] > 0
    out = tmp_path / "cost.json"
    assert bench.main(["--repeats", "2", "--rounds", "1", "--out", str(out), "--dry-run"]) == 0
    assert "<= 10% in every run" in capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing


def test_summary_of_runs(monkeypatch, tmp_path):
    """--repeats runs the table that many times; the summary holds each overhead's median and range."""
    calls = []

    def fake_steps(configs, batch, seq, rounds):
        calls.append(rounds)
        o = 0.05 * len(calls)
        return [
            {
                "arch": a,
                "experts": E,
                "top_k": k,
                "step_s": {"none": 0.01},
                "bip_overhead": o,
                "bip_topk_overhead": o / 2,
                "bip_lagged_overhead": o / 2,
            }
            for a, E, k in configs
        ]

    monkeypatch.setattr(bench, "step_costs", fake_steps)
    monkeypatch.setattr(bench, "fit_scaling", lambda sizes, repeats: [])
    out = tmp_path / "cost.json"
    assert bench.main(["--repeats", "3", "--rounds", "7", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert calls == [7, 7, 7] and len(doc["runs"]) == 3
    s = doc["summary"][0]
    assert s["bip_overhead"] == pytest.approx({"median": 0.10, "min": 0.05, "max": 0.15})
    assert s["bip_within_10pct"] is False and s["none_ms"] == [10.0, 10.0, 10.0]
