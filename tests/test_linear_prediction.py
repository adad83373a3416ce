"""bench.linear_prediction: the lagged design matrix and the discretised Laplace coder."""

import numpy as np

from bench.linear_prediction import LEVELS, lagged, laplace_bits
from media import mu_law_encode


def test_lagged_rows_hold_the_previous_samples_newest_first():
    X, y = lagged(np.arange(10.0), 3)
    assert X.shape == (7, 3) and list(X[0]) == [2, 1, 0] and list(y) == list(range(3, 10))


def test_a_predictable_signal_costs_few_bits_and_noise_about_eight():
    rng = np.random.default_rng(0)
    tone = mu_law_encode((0.5 * np.sin(2 * np.pi * 440 * np.arange(12000) / 12000)).astype(np.float32))
    X, y = lagged(LEVELS[tone], 8)
    weights = np.linalg.lstsq(X, y, rcond=None)[0]
    assert laplace_bits(tone[8:], X @ weights) < 2.5
    noise = rng.integers(0, 256, 12000).astype(np.uint8)
    assert laplace_bits(noise, np.zeros(12000)) > 7.0  # a uniform code over 256 levels is 8 bits
    assert laplace_bits(noise[:100], LEVELS[noise[:100]]) < 0.01  # exact predictions: almost free
