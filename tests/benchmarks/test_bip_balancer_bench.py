"""benchmarks/bip_balancer.py: the torch balancer step against the exact optimum, on a tiny stream."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("torch")

SPEC = importlib.util.spec_from_file_location(
    "bip_balancer_bench", Path(__file__).resolve().parents[2] / "benchmarks" / "bip_balancer.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def test_stream_measures_certified_gaps(tmp_path):
    res = bench.run(T=256, E=8, k=2, batches=4, burn_in=1, budgets=(1, 3))
    assert [r["iterations"] for r in res["rows"]] == [1, 3]
    for r in res["rows"]:
        # the certificate's bound is valid: never below the exact optimum of the batch
        assert -1e-9 <= r["gap_median"] <= r["gap_max"] < 1.0
        assert r["step_s"] > 0 and r["fast_cold_s"] > 0 and r["fast_warm_s"] > 0
        assert r["max_load_ratio_median"] > 0.5
    md = bench.render(res)
    assert "| 1 |" in md and "| 3 |" in md


def test_cli_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--k", "8", "--experts", "8"])
    assert "--k must be below --experts" in capsys.readouterr().err
