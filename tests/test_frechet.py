"""The one Frechet distance, against closed forms."""

import numpy as np
import pytest

from teachers.frechet import frechet_distance, frechet_distance_of_features, moments


def test_frechet_distance_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
    # commuting (diagonal) covariances: sum over dimensions of the 1-D case
    d = frechet_distance([0, 0, 0], np.diag([1.0, 4.0, 9.0]), [1, 0, -1], np.diag([4.0, 4.0, 1.0]))
    assert d == pytest.approx(2.0 + (1 + 0 + 4), rel=1e-12)
    sigma = np.array([[2.0, 0.5], [0.5, 1.0]])
    assert abs(frechet_distance([1, 2], sigma, [1, 2], sigma)) < 1e-12
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance([0, 0], np.eye(2), [0], np.eye(1))


def test_features_of_one_gaussian_score_better_against_themselves_than_against_a_shifted_one():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((400, 3)), rng.standard_normal((400, 3))
    mu, cov = moments(a)
    assert mu.shape == (3,) and cov.shape == (3, 3)
    assert frechet_distance_of_features(a, b) < 0.1 < frechet_distance_of_features(a, b + 1.0)
    assert frechet_distance_of_features(a, b + 1.0) == pytest.approx(3.0, rel=0.1)
