"""The pixel-space MMD^2 (training.analysis.mmd), the regime study's third quality proxy: the estimator in closed
form and against a float64 double loop, its median bandwidth, and its behaviour on the toy's data."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from training.analysis.mmd import PixelMMD, median_bandwidth, mmd2_unbiased
from training.toy.data import render, sample_captions


def test_closed_form_two_points_each():
    """x = {0, 1}, y = {0, 2}, h = 1: xx = e^-1/2, yy = e^-2, xy = (1 + e^-2 + 2 e^-1/2) / 4."""
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [2.0]])
    e = math.exp
    expected = e(-0.5) + e(-2.0) - 2 * (1 + e(-2.0) + 2 * e(-0.5)) / 4
    assert mmd2_unbiased(x, y, 1.0) == pytest.approx(expected, rel=1e-12)


def test_matches_a_double_loop_and_the_precomputed_reference_term():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randn(9, 5, generator=g, dtype=torch.float64) + 0.3
    h = 1.7

    def k(a, b):
        return math.exp(-float((a - b).square().sum()) / (2 * h * h))

    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(7), 2)) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(9), 2)) / (9 * 8)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 9)
    assert mmd2_unbiased(x, y, h) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert mmd2_unbiased(x, y, h, k_yy_mean=yy) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert mmd2_unbiased(x[torch.randperm(7)], y, h) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_median_bandwidth():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2
    assert median_bandwidth(x) == 2.0


def test_toy_data_scores_near_zero_and_noise_far_from_it():
    g = torch.Generator().manual_seed(1234)
    data = render(sample_captions(1024, g), 16, g)
    mmd = PixelMMD(data)
    g2 = torch.Generator().manual_seed(7)
    fresh = render(sample_captions(256, g2), 16, g2)
    floor, faded, noise = mmd(fresh), mmd(fresh * 0.8 + 0.1), mmd(torch.rand(256, 3, 16, 16, generator=g2))
    assert abs(floor) < 0.01 and faded > 10 * abs(floor) and noise > faded


def test_bad_input_is_a_one_line_error():
    with pytest.raises(ValueError, match="same D"):
        mmd2_unbiased(torch.zeros(3, 2), torch.zeros(3, 4), 1.0)
    with pytest.raises(ValueError, match="at least two"):
        mmd2_unbiased(torch.zeros(1, 2), torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2_unbiased(torch.zeros(2, 2), torch.zeros(3, 2), 0.0)
