"""benchmarks/hf_training.py: the --quick run writes its table, JSON and plots, and its figures agree with
the per-step data they summarise; the uniform-random floor on cases with a known answer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("hf_training", ROOT / "benchmarks" / "hf_training.py")
hf_training = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hf_training)


def test_random_floor_known_cases():
    assert hf_training.random_floor(1, 4, 1, trials=20)["mean"] == pytest.approx(3.0)  # one token: 1 vs 1/4
    assert hf_training.random_floor(64, 8, 8, trials=20)["mean"] == 0.0  # every token takes every expert
    small, large = (hf_training.random_floor(T, 16, 2, trials=200)["mean"] for T in (256, 16384))
    assert 0 < large < small  # more tokens: closer to uniform
    # the maximum of E counts ~ Binomial(T k, 1/E): within a few standard deviations of the mean load
    T, E, k = 16384, 16, 2
    sd = np.sqrt(T * k / E * (1 - 1 / E)) / (T * k / E)
    assert sd < large < 4 * sd


def test_quick_run_outputs_agree_with_their_data(tmp_path):
    assert hf_training.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "hf_training_quick.json").read_text())
    assert res["complete"] and {p.name for p in tmp_path.iterdir()} >= {
        "hf_training_quick.md",
        "hf_training_quick_maxvio.png",
        "hf_training_quick_loss.png",
    }
    runs = {r["balancer"]: r for r in res["runs"]}
    assert set(runs) == {"none", "aux", "loss_free", "bip"}
    for r in runs.values():
        v = np.asarray(r["max_vio"])
        assert v.shape == (12, 2) and (v >= 0).all() and (v <= 16 / 2 - 1 + 1e-9).all()
        assert r["avg_max_vio"] == pytest.approx(v.mean()) and r["sup_max_vio"] == pytest.approx(v.max())
        assert r["per_layer"]["first10_max_vio"] == pytest.approx(v[:10].mean(0).tolist())
        assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) and np.isfinite(r["loss"]).all()
    assert runs["aux"]["aux_kind"] == "model" and runs["aux"]["aux_coef"] > 0
    # bip fits its price on the batch it routes: the validation loads are far flatter than with no balancing
    assert runs["bip"]["val_max_vio_global"] < 0.5 * runs["none"]["val_max_vio_global"]
    # the capacity is enforced in training: no step of bip routes more than ceil(T k / E) = T k / E here
    assert runs["bip"]["sup_max_vio"] == 0.0 and runs["none"]["sup_max_vio"] > 1.0
    row = next(r for r in res["summary"] if r["balancer"] == "bip")
    assert row["sup_over_floor"] == pytest.approx(row["sup_max_vio"] / res["floors"]["16x2"]["batch"]["mean"])
    assert "| mixtral | 16 | 2 | bip |" in (tmp_path / "hf_training_quick.md").read_text()


def test_bad_arguments_exit_with_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        hf_training.main(["--experts", "16", "--top-k", "32", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert hf_training.main(["--quick", "--balancers", "nonesuch", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_loss_free_label_names_a_rate_other_than_the_default():
    """A loss_free run at another rate than enable's default for its router gets the rate in its label (e.g.
    DeepSeek-V3 runs at 1e-3, made before its default became 1e-2), so the two do not average together."""
    base = {"experts": 16, "top_k": 2, "balancer": "loss_free", "seed": 0, "sweep": False, "aux_coef": None}
    runs = []
    for arch, rate in (("deepseek_v3", 1e-3), ("deepseek_v3", 1e-2), ("mixtral", 1e-3)):
        v = [[1.0, 1.0]] * 12
        runs.append(
            dict(
                base,
                arch=arch,
                bias_update_rate=rate,
                max_vio=v,
                avg_max_vio=1.0,
                first10_max_vio=1.0,
                sup_max_vio=1.0,
                step0_max_vio=1.0,
                val_max_vio_global=1.0,
                train_loss_tail=1.0,
                val_loss=1.0,
                val_ppl=np.e,
                step_s=0.1,
                windows={"0-10": 1.0},
            )
        )
    floors = {"16x2": {"batch": {"mean": 0.2}, "val": {"mean": 0.1}}}
    labels = {(r["arch"], r["balancer"]) for r in hf_training.summarize(runs, floors)}
    assert labels == {("deepseek_v3", "loss_free(0.001)"), ("deepseek_v3", "loss_free"), ("mixtral", "loss_free")}
