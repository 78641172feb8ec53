import numpy as np
import pytest

from moebalance.generate import KINDS, routing_problem, routing_scores


@pytest.mark.parametrize("kind", KINDS)
def test_scores_are_probabilities(kind):
    s = routing_scores(100, 8, kind=kind, seed=1)
    assert s.shape == (100, 8) and np.allclose(s.sum(1), 1.0) and (s > 0).all()


def test_skew_makes_imbalance_and_seed_is_reproducible():
    flat = routing_scores(2000, 16, kind="hot", imbalance=0.0, seed=0)
    hot = routing_scores(2000, 16, kind="hot", imbalance=1.0, seed=0)
    top = lambda s: np.bincount(s.argmax(1), minlength=16)
    assert top(hot).max() > 3 * top(flat).max()
    assert np.array_equal(hot, routing_scores(2000, 16, kind="hot", imbalance=1.0, seed=0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        routing_scores(10, 4, kind="pareto")
    with pytest.raises(ValueError, match="imbalance"):
        routing_scores(10, 4, imbalance=-1)
    with pytest.raises(ValueError, match="num_tokens"):
        routing_scores(0, 4)
    assert routing_problem(10, 4, 2, capacity_factor=2.0).capacity.tolist() == [10] * 4
