"""Every reader (problem, solution and trace files) turns a malformed file into one ValueError that names the
file and the field, never another exception, never pickle, never a silently changed value."""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moebalance.integrations._hf_trace import LoadTrace, read_trace

from moebalance.io import (
    MAX_HEADER_BYTES,
    load_problem,
    load_solution,
    problem_text,
    read_npz,
    save_problem,
    save_solution,
)
from moebalance.placement import PlacementProblem
from moebalance.registry import solve
from moebalance.replication import ReplicationProblem
from moebalance.routing import RoutingProblem

PROBLEMS = {
    "routing": RoutingProblem([[0.5, 0.1, 0.9], [0.2, 0.8, 0.3]], 2, capacity=[2, 1, 2]),
    "placement": PlacementProblem([40, 3, 0, 9], 2, alpha=1.5, imbalance_threshold=None),
    "replication": ReplicationProblem(
        [[[5.0, 1.0, 0.0, 2.0]], [[4.0, 0.0, 3.0, 2.0]]], 6, num_gpus=2, old_phy2log=[[0, 1, 2, 3, 0, 0]], max_moves=2
    ),
}
TRACE = LoadTrace(np.array([[[3, 1, 0, 2]], [[0, 4, 2, 0]]]), np.array([3, 3]), 2, ("model.layers.0.mlp",), "mixtral")


def _loads_as(path: Path, reader):
    try:
        return reader(path)
    except ValueError as exc:
        text = str(exc)
        assert "\n" not in text and path.name in text, text
        return exc


# ---- fixed hostile files, one per field and fault ----------------------------------------------------------
HOSTILE_JSON = [
    # (family, key, bad value, the word the message must carry)
    ("routing", "k", 2.5, "`k`"),
    ("routing", "k", [2], "`k`"),
    ("routing", "k", -1, "`k`"),
    ("routing", "k", "2", "`k`"),
    ("routing", "scores", [[1, 2], [3]], "`scores`"),
    ("routing", "scores", [1, 2, 3], "`scores`"),
    ("routing", "capacity", [1.5, 1, 1], "`capacity`"),
    ("routing", "capacity", [-1, 5, 5], "`capacity`"),
    ("routing", "capacity", {"a": 1}, "capacity"),
    ("placement", "expert_loads", [1, -2, 3, 4], "`expert_loads`"),
    ("placement", "expert_loads", [1.5, 2, 3, 4], "`expert_loads`"),
    ("placement", "num_devices", [2], "`num_devices`"),
    ("placement", "num_devices", 2.5, "`num_devices`"),
    ("placement", "cost", [1, 2], "cost"),
    ("placement", "alpha", "1.0", "alpha"),
    ("replication", "weight", [[[1, -1, 0, 0]]], "`weight`"),
    ("replication", "weight", "weights", "`weight`"),
    ("replication", "weight", [[1, 2], [3]], "`weight`"),
    ("replication", "num_replicas", 6.5, "`num_replicas`"),
    ("replication", "num_replicas", [6], "`num_replicas`"),
    ("replication", "num_gpus", 0, "`num_gpus`"),
    ("replication", "old_phy2log", [[0, 1, 2, 3, 0]], "`old_phy2log`"),
    ("replication", "old_phy2log", [[0, 1, 2, 3, 0, 9]], "`old_phy2log`"),
    ("replication", "max_moves", -1, "`max_moves`"),
    ("replication", "max_moves", 1.5, "`max_moves`"),
    ("replication", "bogus", 1, "bogus"),
]


@pytest.mark.parametrize("suffix", [".json", ".npz"])
@pytest.mark.parametrize("family, key, bad, needle", HOSTILE_JSON)
def test_a_bad_field_is_named_with_the_file(tmp_path, suffix, family, key, bad, needle):
    d = PROBLEMS[family].to_dict()
    d[key] = bad
    f = tmp_path / f"bad{suffix}"
    if suffix == ".json":
        f.write_text(json.dumps(d))
    else:
        arrays, meta = {}, {}
        for name, v in d.items():
            try:
                a = np.asarray(v)
                ok = isinstance(v, list) and a.dtype != object
            except ValueError:  # ragged
                ok = False
            (arrays if ok else meta).__setitem__(name, a if ok else v)
        np.savez(f, meta_json=np.array(json.dumps(meta)), **arrays)
    with pytest.raises(ValueError) as info:
        load_problem(f)
    text = str(info.value)
    assert text.startswith("bad" + suffix + ": ") and needle in text and "\n" not in text, text


@pytest.mark.parametrize("family", sorted(PROBLEMS))
def test_replication_and_every_family_load_from_both_formats(tmp_path, family):
    p = PROBLEMS[family]
    for suffix in (".npz", ".json"):
        q = load_problem(save_problem(p, tmp_path / f"p{suffix}"))
        assert type(q) is type(p) and q.to_dict() == p.to_dict()


def _npy_bytes(header: bytes, payload: bytes = b"") -> bytes:
    pad = (-(10 + len(header) + 1)) % 64
    header = header + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def _npz_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_header_promising_terabytes_is_refused_before_allocating(tmp_path):
    f = _npz_with(
        tmp_path / "big.npz",
        {
            "scores.npy": _npy_bytes(b"{'descr': '<f8', 'fortran_order': False, 'shape': (1048576, 1048576), }"),
            "meta_json.npy": _npy_of(np.array('{"k": 1}')),
        },
    )
    with pytest.raises(ValueError, match=r"big\.npz: `scores` is truncated"):
        load_problem(f)


def _npy_of(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_huge_header_is_refused(tmp_path):
    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1,), 'x': '" + b"a" * (2 * MAX_HEADER_BYTES) + b"'}"
    f = _npz_with(tmp_path / "hdr.npz", {"scores.npy": _npy_bytes(header, b"\0" * 8)})
    with pytest.raises(ValueError, match=r"hdr\.npz: .*header"):
        read_npz(f)


@pytest.mark.parametrize(
    "arr, needle",
    [
        (np.array([object()], dtype=object), "pickle"),
        (np.zeros(2, dtype=[("a", "<i8"), ("b", "<f8")]), "records"),
    ],
)
def test_object_and_record_arrays_are_not_read(tmp_path, arr, needle):
    f = _npz_with(
        tmp_path / "o.npz",
        {
            "scores.npy": _npy_bytes(
                f"{{'descr': {np.lib.format.dtype_to_descr(arr.dtype)!r}, 'fortran_order': False, 'shape': (2,), }}".encode(),
                b"\0" * 64,
            )
        },
    )
    with pytest.raises(ValueError, match=f"o.npz: `scores`.*{needle}"):
        read_npz(f)


def test_stray_members_and_duplicate_keys_are_refused(tmp_path):
    f = _npz_with(tmp_path / "s.npz", {"../evil.txt": b"hi"})
    with pytest.raises(ValueError, match="s.npz: unexpected archive member"):
        read_npz(f)
    f = _npz_with(tmp_path / "d.npz", {"k.npy": _npy_of(np.array(1)), "meta_json.npy": _npy_of(np.array('{"k": 2}'))})
    with pytest.raises(ValueError, match="d.npz: key.*k.*both"):
        load_problem(f)
    g = tmp_path / "dup.json"
    g.write_text('{"kind": "routing", "scores": [[1, 2]], "k": 1, "k": 2}')
    with pytest.raises(ValueError, match="dup.json: .*'k' appears twice"):
        load_problem(g)


# ---- traces -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, bad, needle",
    [
        ("top_k", 2.5, "`top_k`"),  # not truncated to 2
        ("top_k", [2], "`top_k`"),
        ("top_k", 0, "`top_k`"),
        ("tokens", [3.5, 3], "`tokens`"),
        ("tokens", [3], "`tokens`"),
        ("tokens", [-3, 3], "`tokens`"),
        ("loads", [[[3, 1, 0, 2]], [[0, 4, 2, -0.5]]], "`loads`"),
        ("loads", [[[3, 1, 0, 2]], [[0, 4, 2, -1]]], "`loads`"),
        ("loads", [[3, 1, 0, 2], [0, 4, 2, 0]], "`loads`"),
        ("loads", [[[3, 1, 0, 2]], [[0, 4, 2]]], "`loads`"),
        ("loads", [[[3, 1, 0, 2]], [[0, 4, 2, 1]]], "add up"),
        ("loads", [[[2**70, 1, 0, 2]], [[0, 4, 2, 0]]], "`loads`"),
        ("layers", "model.layers.0.mlp", "`layers`"),
        ("layers", [1], "`layers`"),
        ("layers", ["a", "b"], "`layers`"),
        ("model_type", 3, "`model_type`"),
        ("extra", 1, "extra"),
    ],
)
def test_trace_fields_are_checked_not_cast(tmp_path, key, bad, needle):
    d = TRACE.to_dict()
    d[key] = bad
    f = tmp_path / "t.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError) as info:
        read_trace(f)
    text = str(info.value)
    assert text.startswith("t.json: ") and needle in text and "\n" not in text, text


def test_trace_round_trips_in_both_formats(tmp_path):
    for suffix in (".npz", ".json"):
        t = read_trace(TRACE.save(tmp_path / f"t{suffix}"))
        assert np.array_equal(t.loads, TRACE.loads) and t.loads.dtype == np.int64
        assert t.tokens.tolist() == [3, 3] and t.top_k == 2 and type(t.top_k) is int
        assert t.layers == TRACE.layers and t.model_type == "mixtral"


def test_trace_npz_with_a_fractional_top_k_array(tmp_path):
    f = tmp_path / "t.npz"
    np.savez(f, kind=np.array("expert_loads"), loads=TRACE.loads, tokens=TRACE.tokens, top_k=np.array(2.5))
    with pytest.raises(ValueError, match=r"t\.npz: `top_k` must be an integer"):
        read_trace(f)
    np.savez(
        f, kind=np.array("expert_loads"), loads=TRACE.loads.astype(np.float32), tokens=TRACE.tokens, top_k=np.array(2)
    )
    assert read_trace(f).loads.dtype == np.int64  # whole floats are integers: read exactly


# ---- solutions ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(PROBLEMS))
def test_solutions_round_trip(tmp_path, family):
    sol = solve(PROBLEMS[family], "auto")
    back = load_solution(save_solution(sol, tmp_path / "s.json"))
    assert type(back) is type(sol) and back.status == sol.status and back.method == sol.method
    assert np.array_equal(back.assignment, sol.assignment) and back.objective == sol.objective
    assert back.to_dict() == json.loads(json.dumps(sol.to_dict()))


@pytest.mark.parametrize(
    "key, bad, needle",
    [
        ("status", "great", "`status`"),
        ("objective", "1", "`objective`"),
        ("assignment", [[0.5, 1]], "`assignment`"),
        ("assignment", 3, "`assignment`"),
        ("feasible", "yes", "`feasible`"),
        ("wall_time", -1, "`wall_time`"),
        ("kind", "banana", "`kind`"),
        ("kind", [], "`kind`"),
        ("method", None, "`method`"),
        ("extra", 1, "extra"),
        ("assignment", [[0, 1], [1]], "`assignment`"),
        ("bias", ["a", "b"], "`bias`"),
        ("objective", float("nan"), "`objective`"),
    ],
)
def test_solution_fields_are_checked(tmp_path, key, bad, needle):
    f = save_solution(solve(PROBLEMS["routing"], "mcf"), tmp_path / "s.json")
    d = json.loads(f.read_text())
    d[key] = bad
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"s.json: .*{needle}"):
        load_solution(f)


# ---- properties: damaged files give a ValueError or load correctly ------------------------------------------
def _files() -> dict[str, tuple[bytes, str, object]]:
    out = {}
    for family, p in PROBLEMS.items():
        for suffix in (".npz", ".json"):
            out[f"{family}{suffix}"] = (problem_text(p, suffix), suffix, load_problem)
    with tempfile.TemporaryDirectory() as d:
        for suffix in (".npz", ".json"):
            out[f"trace{suffix}"] = (TRACE.save(Path(d) / f"t{suffix}").read_bytes(), suffix, read_trace)
        out["solution.json"] = (
            save_solution(solve(PROBLEMS["replication"], "eplb"), Path(d) / "s.json").read_bytes(),
            ".json",
            load_solution,
        )
    return out


FILES = _files()


def _check_damaged(data: bytes, suffix: str, reader) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"damaged{suffix}"
        f.write_bytes(data)
        got = _loads_as(f, reader)  # anything but a ValueError naming the file propagates and fails
        if isinstance(got, ValueError):
            return
        if reader is load_problem:  # what loads is a valid problem, and it round-trips identical
            again = load_problem(save_problem(got, Path(d) / f"again{suffix}"))
            assert again.to_dict() == got.to_dict()
        elif reader is read_trace:
            assert got.loads.dtype == np.int64 and (got.loads >= 0).all()
            assert (got.loads.sum(axis=2) == got.tokens[:, None] * got.top_k).all()


@pytest.mark.property
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=st.sampled_from(sorted(FILES)), data=st.data())
def test_truncated_files_give_a_value_error(name, data):
    raw, suffix, reader = FILES[name]
    cut = data.draw(st.integers(0, len(raw) - 1))
    _check_damaged(raw[:cut], suffix, reader)


@pytest.mark.property
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=st.sampled_from(sorted(FILES)), data=st.data())
def test_flipped_bytes_give_a_value_error_or_a_valid_file(name, data):
    raw, suffix, reader = FILES[name]
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    _check_damaged(bytes(buf), suffix, reader)


hostile_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=12,
)


@pytest.mark.property
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=st.sampled_from(sorted(n for n in FILES if n.endswith(".json"))), data=st.data())
def test_any_value_in_any_field_gives_a_value_error_or_a_valid_file(name, data):
    raw, suffix, reader = FILES[name]
    d = json.loads(raw)
    key = data.draw(st.sampled_from(sorted(d) + ["extra"]))
    d[key] = data.draw(hostile_values)
    _check_damaged(json.dumps(d).encode(), suffix, reader)


_dtypes = st.sampled_from(["<i8", "<u8", "<i1", "<f8", "<f4", "<f2", "?", "<U3", "S2", "<c16", "<m8[s]", "<M8[D]"])


@pytest.mark.property
@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(name=st.sampled_from(sorted(n for n in FILES if n.endswith(".npz"))), data=st.data())
def test_any_array_under_any_key_gives_a_value_error_or_a_valid_file(name, data):
    from hypothesis.extra.numpy import array_shapes, arrays

    raw, suffix, reader = FILES[name]
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        members = {k: z[k] for k in z.files}
    key = data.draw(st.sampled_from(sorted(members) + ["extra"]))
    members[key] = data.draw(arrays(_dtypes, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
    buf = io.BytesIO()
    np.savez(buf, **members)
    _check_damaged(buf.getvalue(), suffix, reader)


# ---- recorded routing data (the simulator's --real) ---------------------------------------------------------
@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prefill_in4096": [[1, 2.5]]}', "integers"),
        ('{"prefill_in4096": [[1, -2]]}', ">= 0"),
        ('{"prefill_in4096": [[1, [2]]]}', "list of integers"),
        ('{"prefill_in4096": 3}', "list of layers"),
        ("[1, 2]", "JSON object"),
        ('{"prefill_in4096": [], "prefill_in4096": []}', "twice"),
        ('{"prefill_in4096": [[1, 2]', "cannot read"),
    ],
)
def test_recorded_routing_files_are_checked(tmp_path, content, needle):
    from moebalance.evaluation.simulate import real_layers

    (tmp_path / "deepseek_v3_expert_counts.json").write_text(content)
    with pytest.raises(ValueError) as info:
        real_layers("deepseek-v3", tmp_path)
    text = str(info.value)
    assert "deepseek_v3_expert_counts.json" in text and needle in text and "\n" not in text, text


def test_recorded_olmoe_files_are_checked(tmp_path):
    from moebalance.evaluation.simulate import real_layers

    f = tmp_path / "olmoe_mixtral_expert_counts.json"
    for content, needle in [
        ('{"olmoe": {"expert_counts": {"c4": {"0": [1.5]}}}}', "integers"),
        ('{"olmoe": 3}', "expert_counts"),
        ('{"olmoe": {"expert_counts": {"c4": {"x": [1]}}}}', "layer numbers"),
    ]:
        f.write_text(content)
        with pytest.raises(ValueError, match=needle):
            real_layers("olmoe", tmp_path)
