import json

import numpy as np
import pytest

from moebalance import RoutingProblem
from moebalance.io import load_problem, problem_from_dict, save_problem


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_roundtrip(tmp_path, suffix):
    p = RoutingProblem(np.random.default_rng(0).random((5, 3)), 2, capacity=[4, 3, 4])
    q = load_problem(save_problem(p, tmp_path / f"p{suffix}"))
    assert np.array_equal(p.scores, q.scores) and q.k == 2 and q.capacity.tolist() == [4, 3, 4]


def test_capacity_factor_key(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"kind": "routing", "scores": [[1, 2], [3, 4]], "k": 1, "capacity_factor": 2.0}))
    assert load_problem(f).capacity.tolist() == [2, 2]


def test_pickled_npz_is_refused(tmp_path):
    f = tmp_path / "evil.npz"
    np.savez(f, scores=np.array([object()], dtype=object), k=1)
    with pytest.raises(ValueError, match="evil.npz"):
        load_problem(f)


@pytest.mark.parametrize(
    "content, match",
    [
        ("not json", "cannot read"),
        (json.dumps({"kind": "routing", "k": 1}), "scores"),
        (json.dumps({"kind": "routing", "scores": [[1]], "k": 1, "extra": 1}), "unknown key"),
        (json.dumps({"kind": "banana"}), "kind"),
        (json.dumps([1, 2]), "kind"),
        (json.dumps({"kind": "routing", "scores": [[1, None]], "k": 1}), "scores"),
    ],
)
def test_bad_files(tmp_path, content, match):
    f = tmp_path / "p.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_problem(f)


def test_missing_and_wrong_suffix(tmp_path):
    with pytest.raises(ValueError, match="not a file"):
        load_problem(tmp_path / "nope.json")
    f = tmp_path / "p.txt"
    f.write_text("{}")
    with pytest.raises(ValueError, match=".npz or .json"):
        load_problem(f)


def test_problem_from_dict_defaults_to_routing():
    assert problem_from_dict({"scores": [[1.0, 0.0]], "k": 1}).kind == "routing"
