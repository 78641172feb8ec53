"""PlacementProblem and CostModel: construction, validation catalogue, immutability, files."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import moebalance as mb
from moebalance import CostModel, InfeasibleError, PlacementProblem


def test_defaults_and_views():
    p = PlacementProblem([5, 0, 3, 2, 7, 1], 3)
    assert p.kind == "placement" and p.sense == "min"
    assert p.shape == (6, 3)
    assert p.home.tolist() == [0, 0, 1, 1, 2, 2]
    assert p.native_loads.tolist() == [5, 5, 8]
    assert p.total_tokens == 18
    assert p.imbalance_ratio() == pytest.approx(8 / 6)
    assert p.cost == CostModel()
    assert (p.alpha, p.min_chunk, p.imbalance_threshold) == (1.0, 1024, 1.3)
    assert p.max_tokens_per_device is None and p.max_foreign_experts is None


def test_custom_home_allows_any_E():
    p = PlacementProblem([1, 2, 3, 4, 5], 2, home=[1, 0, 1, 0, 0])
    assert p.native_loads.tolist() == [11, 4]


def test_immutable():
    p = PlacementProblem([1, 2], 2)
    with pytest.raises(AttributeError):
        p.num_devices = 3
    with pytest.raises(ValueError):
        p.expert_loads[0] = 9
    with pytest.raises(ValueError):
        p.home[0] = 1
    c = CostModel()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.token_time = 2.0


def test_input_is_copied():
    loads = np.array([4, 4])
    p = PlacementProblem(loads, 2)
    loads[0] = 100
    assert p.expert_loads.tolist() == [4, 4]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(expert_loads=[1, -2], num_devices=2), "expert_loads"),
        (dict(expert_loads=[1.5, 2], num_devices=2), "expert_loads"),
        (dict(expert_loads=[1, float("nan")], num_devices=2), "expert_loads"),
        (dict(expert_loads=[[1, 2]], num_devices=1), "expert_loads"),
        (dict(expert_loads=[], num_devices=1), "expert_loads"),
        (dict(expert_loads=["a", "b"], num_devices=1), "expert_loads"),
        (dict(expert_loads=[1, 2], num_devices=0), "num_devices"),
        (dict(expert_loads=[1, 2], num_devices=1.5), "num_devices"),
        (dict(expert_loads=[1, 2, 3], num_devices=2), "num_devices"),
        (dict(expert_loads=[1, 2], num_devices=2, home=[0, 2]), "home"),
        (dict(expert_loads=[1, 2], num_devices=2, home=[0, -1]), "home"),
        (dict(expert_loads=[1, 2], num_devices=2, home=[0]), "home"),
        (dict(expert_loads=[1, 2], num_devices=2, cost="fast"), "cost"),
        (dict(expert_loads=[1, 2], num_devices=2, alpha=0.0), "alpha"),
        (dict(expert_loads=[1, 2], num_devices=2, alpha=float("nan")), "alpha"),
        (dict(expert_loads=[1, 2], num_devices=2, min_chunk=-1), "min_chunk"),
        (dict(expert_loads=[1, 2], num_devices=2, imbalance_threshold=float("nan")), "imbalance_threshold"),
        (dict(expert_loads=[1, 2], num_devices=2, imbalance_threshold=0), "imbalance_threshold"),
        (dict(expert_loads=[1, 2], num_devices=2, max_tokens_per_device=-1), "max_tokens_per_device"),
        (dict(expert_loads=[1, 2], num_devices=2, max_foreign_experts=1.5), "max_foreign_experts"),
    ],
)
def test_bad_input_names_argument(kwargs, name):
    loads = kwargs.pop("expert_loads")
    P = kwargs.pop("num_devices")
    with pytest.raises(ValueError, match=f"`{name}`"):
        PlacementProblem(loads, P, **kwargs)


@pytest.mark.parametrize("field", ["token_time", "gemm_time", "weight_time", "token_transfer_time"])
@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf"), "1", True])
def test_cost_model_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        CostModel(**{field: value})


def test_infeasible_limits():
    # 3 devices x 5 tokens cannot hold 16 tokens
    with pytest.raises(InfeasibleError, match="max_tokens_per_device"):
        PlacementProblem([8, 8, 0], 3, max_tokens_per_device=5)
    # no foreign expert allowed, but device 0 has 8 native tokens > 6
    with pytest.raises(InfeasibleError, match="max_foreign_experts"):
        PlacementProblem([8, 2], 2, max_tokens_per_device=6, max_foreign_experts=0)
    # device 0 must shed 6 tokens of experts holding 4 each (two experts), device 1 can host only one
    with pytest.raises(InfeasibleError, match="max_foreign_experts"):
        PlacementProblem([4, 4, 4, 0, 0, 0], 2, max_tokens_per_device=6, max_foreign_experts=1)
    # the same with two foreign slots is fine
    PlacementProblem([4, 4, 4, 0, 0, 0], 2, max_tokens_per_device=6, max_foreign_experts=2)
    assert issubclass(InfeasibleError, ValueError)


def test_round_trip_json():
    p = PlacementProblem(
        [3, 1, 4, 1, 5],
        2,
        home=[0, 1, 1, 0, 1],
        cost=CostModel(1.0, 2.0, 3.0, 0.5),
        max_tokens_per_device=9,
        max_foreign_experts=2,
        alpha=1.1,
        min_chunk=3,
        imbalance_threshold=None,
    )
    d = json.loads(json.dumps(p.to_dict()))
    assert d["kind"] == "placement"
    q = PlacementProblem.from_dict(d)
    assert q.to_dict() == p.to_dict()
    assert q.imbalance_threshold is None and q.home.tolist() == [0, 1, 1, 0, 1]
    # default home stays implicit
    r = PlacementProblem.from_dict(PlacementProblem([1, 2, 3, 4], 2).to_dict())
    assert r.home.tolist() == [0, 0, 1, 1] and r.to_dict()["home"] is None


def test_from_dict_errors():
    with pytest.raises(ValueError, match="kind"):
        PlacementProblem.from_dict({"kind": "routing", "expert_loads": [1], "num_devices": 1})
    with pytest.raises(ValueError, match="unknown key"):
        PlacementProblem.from_dict({"expert_loads": [1], "num_devices": 1, "bogus": 1})
    with pytest.raises(ValueError, match="num_devices"):
        PlacementProblem.from_dict({"expert_loads": [1]})
    with pytest.raises(ValueError, match="`gemm_time`"):
        PlacementProblem.from_dict({"expert_loads": [1], "num_devices": 1, "cost": {"gemm_time": float("nan")}})
    with pytest.raises(ValueError, match="unknown `cost`"):
        PlacementProblem.from_dict({"expert_loads": [1], "num_devices": 1, "cost": {"flops": 1.0}})


def test_from_shapes_hand_computed():
    # 6*2*3/36 = 1 s of compute per token; token in + out = 2 rows * 2 * 2 bytes / 8 B/s = 1 s;
    # weights 3*2*3*2 bytes / 8 B/s = 4.5 s
    c = CostModel.from_shapes(hidden=2, ffn=3, dtype_bytes=2, device_flops=36, link_bandwidth=8, gemm_overhead=0.25)
    assert (c.token_time, c.gemm_time, c.weight_time, c.token_transfer_time) == (2.0, 0.25, 4.5, 0.0)
    c2 = CostModel.from_shapes(2, 3, 2, 36, 8, 0.25, dispatch=False, foreign_token_hops=1.0)
    assert (c2.token_time, c2.token_transfer_time) == (1.0, 1.0)
    with pytest.raises(ValueError, match="`device_flops`"):
        CostModel.from_shapes(2, 3, 2, 0, 8, 0.25)
    with pytest.raises(ValueError, match="`link_bandwidth`"):
        CostModel.from_shapes(2, 3, 2, 36, float("nan"), 0.25)
    with pytest.raises(ValueError, match="`hidden`"):
        CostModel.from_shapes(0, 3, 2, 36, 8, 0.25)


def test_lazy_names_resolve():
    assert mb.PlacementProblem is PlacementProblem and mb.CostModel is CostModel
    assert math.isclose(PlacementProblem([2, 1], 2).imbalance_ratio(), 2 / 1.5)
