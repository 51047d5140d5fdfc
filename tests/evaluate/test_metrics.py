"""Metrics: AUROC with bootstrap uncertainty, resolution conventions."""

import json

import numpy as np
import pytest

from bumblebee_dist.evaluate.metrics import (auroc_with_uncertainty, binned_resolution, resolution,
                                             wrap_phi)


def test_auroc_separated_classes_is_one():
    labels = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0, 0.4, 50), np.linspace(0.6, 1, 50)])
    result = auroc_with_uncertainty(labels, scores, num_bootstrap=50)
    assert result.auroc == 1.0
    assert result.num_events == 100
    assert result.num_signal == 50


def test_auroc_random_scores_near_half_within_uncertainty():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 4000)
    scores = rng.normal(size=4000)
    result = auroc_with_uncertainty(labels, scores, num_bootstrap=100)
    # Expected bootstrap spread for 4000 events is about 0.009.
    assert 0.005 < result.uncertainty < 0.015
    assert abs(result.auroc - 0.5) < 4 * result.uncertainty


def test_auroc_known_shift_matches_normal_formula():
    rng = np.random.default_rng(4)
    signal, background = rng.normal(1.0, 1.0, 20000), rng.normal(0.0, 1.0, 20000)
    labels = np.concatenate([np.ones(20000), np.zeros(20000)])
    result = auroc_with_uncertainty(labels, np.concatenate([signal, background]), num_bootstrap=20)
    # Two unit Gaussians one sigma apart: AUROC = Phi(1 / sqrt 2) = 0.7602.
    assert result.auroc == pytest.approx(0.7602, abs=0.01)


def test_auroc_rejects_single_class_and_nan():
    with pytest.raises(ValueError, match="both classes"):
        auroc_with_uncertainty(np.ones(10), np.arange(10.0))
    with pytest.raises(ValueError, match="not finite"):
        auroc_with_uncertainty(np.array([0, 1]), np.array([0.1, np.nan]))


def test_resolution_of_gaussian_is_sigma():
    rng = np.random.default_rng(5)
    result = resolution(rng.normal(0.2, 0.1, 100000))
    assert result.bias == pytest.approx(0.2, abs=0.002)
    assert result.resolution == pytest.approx(0.1, abs=0.002)


def test_resolution_ignores_non_finite_and_handles_empty():
    result = resolution(np.array([np.nan, 1.0, np.inf]))
    assert result.num_events == 1
    empty = resolution(np.array([]))
    assert empty.num_events == 0
    assert np.isnan(empty.resolution)


def test_binned_resolution_uses_bin_edges():
    values = np.array([0.0, 0.0, 1.0, 1.0])
    residual = np.array([0.1, 0.1, -0.3, -0.3])
    rows = binned_resolution(residual, values, np.array([0.0, 0.5, 1.5]))
    assert [row["num_events"] for row in rows] == [2, 2]
    assert rows[0]["bias"] == pytest.approx(0.1)
    assert rows[1]["bias"] == pytest.approx(-0.3)


def test_wrap_phi_range():
    wrapped = wrap_phi(np.array([3.5 * np.pi, -np.pi, np.pi, 0.1]))
    assert np.all(wrapped >= -np.pi)
    assert np.all(wrapped < np.pi)
    assert wrapped[0] == pytest.approx(-0.5 * np.pi)
    assert wrapped[3] == pytest.approx(0.1)


def test_open_bin_edge_written_as_null():
    rows = binned_resolution(np.array([0.1, 0.2]), np.array([10.0, 2000.0]),
                             np.array([0.0, 1000.0, np.inf]))
    assert rows[-1]["high"] is None
    assert rows[-1]["low"] == 1000.0
    json.loads(json.dumps(rows, allow_nan=False))  # strict JSON: no Infinity
