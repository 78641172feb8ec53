"""Guards before allocation: absurd sizes, overflowing values and non-numbers get a ValueError
naming the argument before anything large is allocated; broken files get one line."""

from __future__ import annotations

import datetime
import json
import resource
import subprocess
import sys

import numpy as np
import pytest

from moebalance import _validate
from moebalance.errors import InfeasibleError
from moebalance.generate import routing_problem, routing_scores
from moebalance.io import load_problem
from moebalance.placement import CostModel, PlacementProblem
from moebalance.routing import RoutingProblem

S = np.array([[0.5, 0.2, 0.3], [0.1, 0.7, 0.2]])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(scores=S, k=1, capacity=10**30), "capacity"),
        (dict(scores=S, k=1, capacity=[1, 1, 10**30]), "capacity"),
        (dict(scores=S, k=1, capacity=np.array([1, 1, 2.0**80])), "capacity"),
        (dict(scores=S, k=1, capacity_factor=1e308), "capacity_factor"),
        (dict(scores=S, k=1, capacity_factor=float("inf")), "capacity_factor"),
        (dict(scores=S, k=1, capacity_factor="1.5"), "capacity_factor"),
        (dict(scores=S, k=1, capacity_factor=True), "capacity_factor"),
        (dict(scores=S, k=1, capacity_factor=1 + 0j), "capacity_factor"),
        (dict(scores=S, k="1"), "k"),
        (dict(scores=S, k=True), "k"),
        (dict(scores=S, k=1.5), "k"),
        (dict(scores=S, k=datetime.timedelta(1)), "k"),
        (dict(scores=S, k=np.timedelta64(1)), "k"),
        (dict(scores=S, k=np.bool_(True)), "k"),
        (dict(scores=S, k=1, capacity="2"), "capacity"),
        (dict(scores=S, k=1, capacity=datetime.timedelta(seconds=2)), "capacity"),
        (dict(scores=S.astype(complex), k=1), "scores"),
        (dict(scores=S > 0.3, k=1), "scores"),
        (dict(scores=[["0.5", "0.5"]], k=1), "scores"),
        (dict(scores=np.array([[1, 2]], dtype="timedelta64[s]"), k=1), "scores"),
        (dict(scores=S * 1e300, k=1), "scores"),
        (dict(scores="[[1, 2]]", k=1), "scores"),
    ],
)
def test_routing_refuses_with_the_argument_named(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as exc:
        RoutingProblem(**kwargs)
    assert not isinstance(exc.value, InfeasibleError)


@pytest.mark.parametrize(
    "args, kwargs, name",
    [
        (([10, 10], 10**9), {}, "num_devices"),
        (([10, 10], 2**40), {}, "num_devices"),
        (([10, 10], True), {}, "num_devices"),
        (([10, 10], "2"), {}, "num_devices"),
        (([2**62, 2**62, 2**62, 2**62], 2), {}, "expert_loads"),  # would wrap int64
        (([2**52, 2**52, 2**52, 2**52], 2), {}, "expert_loads"),  # sums past 2**53
        (([10, 10], 2), {"alpha": 1e308}, "alpha"),
        (([10, 10], 2), {"alpha": "1"}, "alpha"),
        (([10, 10], 2), {"alpha": True}, "alpha"),
        (([10, 10], 2), {"alpha": 1j}, "alpha"),
        (([10, 10], 2), {"alpha": np.timedelta64(1)}, "alpha"),
        (([10, 10], np.timedelta64(2)), {}, "num_devices"),
        (([10, 10], 2), {"imbalance_threshold": 1e308}, "imbalance_threshold"),
        (([10, 10], 2), {"imbalance_threshold": "1.3"}, "imbalance_threshold"),
        (([10, 10], 2), {"min_chunk": 10**30}, "min_chunk"),
        (([10, 10], 2), {"max_tokens_per_device": 10**30}, "max_tokens_per_device"),
        (([10, 10], 2), {"max_foreign_experts": datetime.timedelta(1)}, "max_foreign_experts"),
        (([True, False], 2), {}, "expert_loads"),
        (([1 + 1j, 2], 2), {}, "expert_loads"),
        (("12", 2), {}, "expert_loads"),
        ((np.array([1, 2], dtype="timedelta64[s]"), 2), {}, "expert_loads"),
        (([10, 10], 2), {"home": [0, 2**70]}, "home"),
    ],
)
def test_placement_refuses_with_the_argument_named(args, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as exc:
        PlacementProblem(*args, **kwargs)
    assert not isinstance(exc.value, InfeasibleError)


@pytest.mark.parametrize(
    "field, value",
    [
        ("token_time", 1e308),
        ("gemm_time", "1"),
        ("weight_time", True),
        ("token_transfer_time", 1j),
        ("token_time", datetime.timedelta(1)),
    ],
)
def test_cost_model_refuses(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        CostModel(**{field: value})


def test_huge_sizes_are_refused_before_allocation():
    start = _peak_mib()
    with pytest.raises(ValueError, match="`num_tokens`"):
        routing_scores(100_000_000, 64)  # 6.4e9 floats = 51 GB
    with pytest.raises(ValueError, match="`num_tokens`"):
        routing_problem(10**12, 8, 2)
    with pytest.raises(ValueError, match="`num_experts`"):
        routing_scores(10, 10**9)
    with pytest.raises(ValueError, match="`num_devices`"):
        PlacementProblem(np.zeros(2**17, dtype=np.int64), 2**12)  # [E, P] = 2**29 entries
    assert _peak_mib() - start < 200  # nothing of that size was allocated


def test_limits_admit_ordinary_large_problems():
    assert RoutingProblem(np.zeros((4096, 256)), 8).shape == (4096, 256)
    assert PlacementProblem(np.full(384, 2**40), 64).total_tokens == 384 * 2**40
    assert RoutingProblem(S, 1, capacity_factor=1e6).capacity.max() > 0
    assert PlacementProblem([10, 10], 2, alpha=1e6, imbalance_threshold=1e6).alpha == 1e6
    assert RoutingProblem(S * 1e12 - 3e11, 1).scores.max() == pytest.approx(7e11 - 3e11 + 2e11 - 2e11)


def test_check_elements_uses_exact_integers():
    _validate.check_elements("x", 2**13, 2**14)
    with pytest.raises(ValueError, match="`x`"):
        _validate.check_elements("x", 2**32, 2**32)  # 2**64 would wrap in int64


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "moebalance", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


def _one_error_line(out):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("moebalance: error:"), out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"kind": "placement", "expert_loads": [1, 2], "num_devices": 1000000000}', "num_devices"),
        ('{"kind": "routing", "scores": [[1, 2]], "k": 1, "capacity": 1000000000000000000000000000000}', "capacity"),
        ('{"kind": "placement", "expert_loads": [1, 2], "num_devices": 2, "alpha": 1e308}', "alpha"),
        ('{"kind": "placement", "expert_loads": [1, 2], "num_devices": 2, "alpha": "1"}', "alpha"),
        ('{"kind": "routing", "scores": [[1, 2]], "k": true}', "`k`"),
        ('{"kind": "routing", "scores": [[1, 1e400]], "k": 1}', "finite"),
        ("[" * 100_000 + "]" * 100_000, "nested"),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested"),
        ('{"kind": "routing", "scores": ' + "[" * 40 + "1" + "]" * 40 + ', "k": 1}', "nested"),
        ("not json", "cannot read"),
        ("\udcff", "cannot read"),
    ],
)
def test_cli_refuses_bad_json_in_one_line(tmp_path, content, needle):
    f = tmp_path / "p.json"
    f.write_text(content, errors="surrogateescape")
    line = _one_error_line(_cli("solve", str(f), cwd=tmp_path))
    assert needle in line


def test_cli_solve_of_a_90_byte_bomb_stays_small(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"kind": "placement", "expert_loads": [1, 2], "num_devices": 1000000000}')
    assert len(f.read_bytes()) < 90
    # VmHWM (this process's own peak): ru_maxrss would carry the forking pytest's peak across exec
    code = (
        "import re, sys; from moebalance.cli import main; rc = main(['solve', sys.argv[1]]); "
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
        "print(int(hwm) // 1024, rc)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, timeout=600)
    mib, rc = map(int, out.stdout.split())
    assert rc == 2 and mib < 500, out.stderr


def test_npy_renamed_npz_and_other_broken_files(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 3)))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    assert "not an .npz archive (it is a .npy array)" in _one_error_line(_cli("solve", "a.npz", cwd=tmp_path))
    (tmp_path / "b.npz").write_bytes(b"PK\x03\x04garbage")
    _one_error_line(_cli("solve", "b.npz", cwd=tmp_path))
    (tmp_path / "c.npz").write_bytes(b"")
    _one_error_line(_cli("solve", "c.npz", cwd=tmp_path))
    np.savez(tmp_path / "d.npz", scores=np.array([["a", "b"]]), k=np.array(1))
    assert "`scores`" in _one_error_line(_cli("solve", "d.npz", cwd=tmp_path))
    np.savez(tmp_path / "e.npz", scores=np.array([[object()]], dtype=object), k=np.array(1))
    _one_error_line(_cli("solve", "e.npz", cwd=tmp_path))  # object arrays need pickle: refused
    (tmp_path / "f.json").write_text(json.dumps({"kind": "routing", "scores": [[1, 2]], "k": 1, "extra": 1}))
    assert "unknown key" in _one_error_line(_cli("solve", "f.json", cwd=tmp_path))


def test_npz_zip_bomb_is_refused_from_its_directory(tmp_path):
    import zipfile

    f = tmp_path / "bomb.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("scores.npy", "w", force_zip64=True) as fh:
            fh.write(b"\x93NUMPY")
            chunk = bytes(1 << 20)
            for _ in range(2200):  # 2.2 GB of zeros, a few MB compressed
                fh.write(chunk)
    assert f.stat().st_size < 50 << 20
    with pytest.raises(ValueError, match="bytes uncompressed"):
        load_problem(f)


def test_gen_refuses_huge_sizes_in_one_line(tmp_path):
    assert "`num_tokens`" in _one_error_line(_cli("gen", "p.npz", "-T", "100000000", cwd=tmp_path))
    assert "`num_devices`" in _one_error_line(
        _cli("gen", "p.json", "--family", "placement", "-P", "1000000000", cwd=tmp_path)
    )
    assert "`tokens_per_device`" in _one_error_line(
        _cli("gen", "p.json", "--family", "placement", "-T", str(10**16), cwd=tmp_path)
    )
    assert not list(tmp_path.iterdir())
