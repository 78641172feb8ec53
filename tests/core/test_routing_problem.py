import numpy as np
import pytest
import torch

from moebalance import InfeasibleError, RoutingProblem


def test_default_capacity_is_ceil_of_factor():
    p = RoutingProblem(np.random.default_rng(0).random((10, 4)), 2, capacity_factor=1.1)
    assert p.capacity.tolist() == [6] * 4  # ceil(1.1 * 10 * 2 / 4) = ceil(5.5)
    assert p.capacity_factor == 1.1


def test_exact_multiple_not_rounded_up():
    p = RoutingProblem(np.zeros((8, 4)), 2)
    assert p.capacity.tolist() == [4, 4, 4, 4]


def test_torch_bf16_scores_are_kept_as_float64_numpy():
    s = torch.rand(6, 4, dtype=torch.bfloat16)
    p = RoutingProblem(s, 1)
    assert p.scores.dtype == np.float64 and isinstance(p.scores, np.ndarray)
    assert np.allclose(p.scores, s.double().numpy())


def test_immutable():
    p = RoutingProblem(np.zeros((4, 2)), 1)
    with pytest.raises(ValueError):
        p.scores[0, 0] = 1.0
    with pytest.raises(AttributeError):
        p.k = 2
    with pytest.raises(ValueError):
        p.capacity[0] = 9


def test_input_is_copied():
    s = np.zeros((4, 2))
    p = RoutingProblem(s, 1)
    s[0, 0] = 5
    assert p.scores[0, 0] == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scores=[[np.nan, 1.0]], k=1), "scores"),
        (dict(scores=[[np.inf, 1.0]], k=1), "scores"),
        (dict(scores=[1.0, 2.0], k=1), "scores"),
        (dict(scores=np.zeros((2, 2, 2)), k=1), "scores"),
        (dict(scores=[["a", "b"]], k=1), "scores"),
        (dict(scores=np.zeros((0, 3)), k=1), "scores"),
        (dict(scores=np.zeros((2, 3)), k=0), "`k`"),
        (dict(scores=np.zeros((2, 3)), k=4), "`k`"),
        (dict(scores=np.zeros((2, 3)), k=1.5), "`k`"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity=-1), "capacity"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity=1.5), "capacity"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity=[1, 1]), "capacity"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity=[1, -1, 1]), "capacity"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity=[1.0, 0.5, 1.0]), "capacity"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity_factor=0), "capacity_factor"),
        (dict(scores=np.zeros((2, 3)), k=1, capacity_factor=float("nan")), "capacity_factor"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingProblem(**kwargs)


def test_impossible_capacity_is_infeasible_error():
    with pytest.raises(InfeasibleError, match="capacity"):
        RoutingProblem(np.zeros((4, 3)), 2, capacity=2)  # 6 slots < 8
    # capacity above T cannot help: an expert takes each token at most once
    with pytest.raises(InfeasibleError):
        RoutingProblem(np.zeros((2, 3)), 2, capacity=[10, 0, 0])
    assert issubclass(InfeasibleError, ValueError)
