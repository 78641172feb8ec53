"""moebalance.evaluation.study: the corpus split, balancer specs, configuration checks, the noise floor, and a smoke run of
the whole study (tiny sizes, a few steps) with its outputs and command line."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from moebalance.evaluation import study
from moebalance.evaluation.study import StudyConfig, StudyResult, noise_floor, parse_balancer, run_study, stdlib_corpus


def _tree(tmp_path):
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_bytes(b"THIRD PARTY " * 50)
    files = {}
    for i in range(30):
        rel = f"pkg/m{i}.py" if i % 2 else f"m{i}.py"
        data = f"# module {i}\n".encode() + bytes([65 + i]) * (40 + i)
        (root / rel).write_bytes(data)
        files[rel] = data
    return root, files


def test_corpus_split_is_deterministic_and_disjoint(tmp_path):
    root, files = _tree(tmp_path)
    train, val, info = stdlib_corpus(10_000, 10_000, root=root, val_every=3)
    train2, val2, _ = stdlib_corpus(10_000, 10_000, root=root, val_every=3)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    want_val = [r for r in files if zlib.crc32(r.encode()) % 3 == 0]
    assert 0 < len(want_val) < len(files)
    assert info["val_files"] == len(want_val) and info["train_files"] == len(files) - len(want_val)
    assert info["files_seen"] == len(files)  # site-packages skipped
    tb, vb = train.tobytes(), val.tobytes()
    for rel, data in files.items():
        assert (data in vb) == (rel in want_val) and (data in tb) == (rel not in want_val)
    assert b"THIRD PARTY" not in tb + vb
    assert train.size == sum(len(files[r]) for r in files if r not in want_val)


def test_corpus_budget_cuts_and_errors(tmp_path):
    root, _ = _tree(tmp_path)
    train, val, _ = stdlib_corpus(100, 60, root=root, val_every=3)
    assert train.size == 100 and val.size == 60
    with pytest.raises(ValueError, match="root"):
        stdlib_corpus(100, 100, root=tmp_path / "missing")
    with pytest.raises(ValueError, match="train_bytes"):
        stdlib_corpus(0, 100, root=root)


def test_real_stdlib_corpus_is_found():
    train, val, info = stdlib_corpus(4096, 2048)
    assert train.size == 4096 and val.size == 2048 and info["train_files"] >= 1 and info["val_files"] >= 1


def test_parse_balancer():
    assert parse_balancer("none") == ("none", {"balancer": "none"})
    assert parse_balancer("aux_loss:0.1") == ("aux_loss(0.1)", {"balancer": "aux_loss", "aux_loss_coeff": 0.1})
    assert parse_balancer("loss_free:1e-3") == (
        "loss_free(u=0.001)",
        {"balancer": "loss_free", "bias_update_rate": 0.001},
    )
    assert parse_balancer("bip_same_batch")[1] == {"balancer": "bip"}
    assert parse_balancer("bip")[1] == {"balancer": "bip_lagged"}
    for bad in ("aux_loss", "loss_free:0", "loss_free:x", "bip:2", "greedy", "aux_loss:-1"):
        with pytest.raises(ValueError, match="balancer"):
            parse_balancer(bad)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(steps=0), "steps"),
        (dict(top_k=(3,), experts=(2,)), "top_k"),
        (dict(balancers=("bogus",)), "balancer"),
        (dict(val_tokens=10), "val_tokens"),
        (dict(lr=-1.0), "lr"),
        (dict(n_heads=5), "n_heads"),
        (dict(experts=()), "experts"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        StudyConfig.quick(**kw)


def test_noise_floor():
    assert noise_floor(100, 4, 4) == 0.0  # k = E: every expert gets every token
    big, small = noise_floor(20000, 16, 2, draws=8), noise_floor(500, 16, 2, draws=8)
    assert 0 < big < small
    # a multinomial's max over E experts: about sqrt(2 ln E / mean) above the mean
    mean = 20000 * 2 / 16
    assert 0.5 < big / np.sqrt(2 * np.log(16) / mean) < 1.5


def test_quick_study_end_to_end(tmp_path):
    cfg = StudyConfig.quick(experts=(4,), top_k=(2,), steps=5, batch_size=2, seq_len=16, val_tokens=128)
    result = run_study(cfg, progress=False)
    runs = {r["balancer"]: r for r in result.runs}
    assert list(runs) == ["none", "aux_loss(0.01)", "aux_loss(0.1)", "loss_free(u=0.001)", "bip", "bip_same_batch"]
    for r in result.runs:
        assert len(r["loss"]) == len(r["avg_max_vio"]) == 5 and np.isfinite(r["loss"]).all()
        assert r["avg_max_vio"] == pytest.approx(np.mean(r["max_vio_layers"], axis=1).tolist())
        assert r["sup_max_vio"] == max(r["avg_max_vio"])
        assert r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) and r["val_tokens"] == 128
        assert 0 <= r["max_vio_global"] <= 4 / 2 - 1 + 1e-9  # at most E/k - 1
    # same weights and batch, zero prices at step 0: only bip_same_batch routes the first batch differently
    first = {name: (r["loss"][0], r["avg_max_vio"][0]) for name, r in runs.items()}
    for name in ("aux_loss(0.01)", "aux_loss(0.1)", "loss_free(u=0.001)", "bip"):
        assert first[name] == first["none"]
    assert runs["bip_same_batch"]["avg_max_vio"][0] <= runs["none"]["avg_max_vio"][0]

    paths = study.write_outputs(result, tmp_path, "s")
    assert [p.name for p in paths] == ["s.json", "s.md", "s_maxvio.png", "s_loss.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    back = StudyResult.from_dict(json.loads(paths[0].read_text()))
    assert back.runs[0]["loss"] == result.runs[0]["loss"]
    md = paths[1].read_text()
    assert "| E | k | balancer |" in md and "2408.15664" in md and "2502.15451" in md and "s_maxvio.png" in md
    with pytest.raises(ValueError, match="balancer-study"):
        StudyResult.from_dict({"runs": []})


def test_command_line(tmp_path, capsys):
    args = [
        "--quick",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--balancers",
        "none,bip",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--val-tokens",
        "64",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert study.main(args) == 0
    out = capsys.readouterr().out
    assert "| 4 | 2 | bip |" in out and (tmp_path / "balancer_study_quick.json").is_file()
    assert study.main(["--quick", "--balancers", "magic", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("balancer_study: error:") and "balancer" in err and "\n" not in err


def test_study_subcommand_registers(tmp_path):
    import argparse

    parser = argparse.ArgumentParser(prog="moebalance")
    study.add_study_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "study",
            "--quick",
            "--experts",
            "4",
            "--top-k",
            "1",
            "--steps",
            "2",
            "--balancers",
            "loss_free:0.01",
            "--out",
            str(tmp_path),
        ]
    )
    cfg = study.config_from_args(args)
    assert (cfg.experts, cfg.top_k, cfg.steps, cfg.balancers) == ((4,), (1,), 2, ("loss_free:0.01",))
    assert cfg.d_model == StudyConfig.quick().d_model and args.func is study.run_study_command
