import math

import numpy as np
import pytest

from bumblebee_dist.features import (
    PT_FLOOR_GEV,
    FeatureStats,
    fixed_zero_slots,
    from_model,
    to_model,
)
from bumblebee_dist.tokens import BTAG, CLASS_TOKEN_PDG, ETA, MASS, PDG_MET, PHI, PT

STATS = FeatureStats(log_pt_mean=3.9, log_pt_std=0.8, eta_mean=0.1, eta_std=1.4, m_mean=4.0,
                     m_std=5.0)


def make_tokens(num_tokens: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pdg_id = rng.choice([11, -13, 5, 41, 40, 12, -14, -5], size=num_tokens).astype(np.int32)
    features = np.zeros((num_tokens, 5), dtype=np.float32)
    features[:, PT] = rng.uniform(1.0, 500.0, num_tokens)
    features[:, ETA] = rng.uniform(-2.5, 2.5, num_tokens)
    features[:, PHI] = rng.uniform(-np.pi, np.pi, num_tokens)
    features[:, MASS] = rng.uniform(0.0, 30.0, num_tokens)
    features[:, BTAG] = rng.integers(0, 2, num_tokens)
    features[fixed_zero_slots(pdg_id)] = 0.0
    return features, pdg_id


def test_round_trip_recovers_physics():
    features, pdg_id = make_tokens()
    back = from_model(to_model(features, pdg_id, STATS), pdg_id, STATS)
    np.testing.assert_allclose(back, features, rtol=1e-5, atol=1e-5)


def test_to_model_output_dtype_and_shape():
    features, pdg_id = make_tokens(10)
    out = STATS.to_model(features, pdg_id)
    assert out.dtype == np.float32
    assert out.shape == features.shape


def test_phi_and_btag_unchanged():
    features, pdg_id = make_tokens()
    out = STATS.to_model(features, pdg_id)
    np.testing.assert_array_equal(out[:, PHI], features[:, PHI])
    np.testing.assert_array_equal(out[:, BTAG], features[:, BTAG])


def test_fixed_zero_slots_stay_zero_in_model_space():
    pdg_id = np.array([PDG_MET, 12, -14, 11], dtype=np.int32)
    features = np.array([[35.0, 0, 1.0, 0, 0], [20.0, 1.0, 0.5, 0, 0], [20.0, 1.0, 0.5, 0, 0],
                         [20.0, 1.0, 0.5, 0.0005, 0]], dtype=np.float32)
    out = STATS.to_model(features, pdg_id)
    assert out[0, ETA] == 0.0
    assert out[0, MASS] == 0.0
    assert out[1, MASS] == 0.0
    assert out[2, MASS] == 0.0
    assert out[3, MASS] != 0.0


def test_from_model_forces_fixed_zeros():
    pdg_id = np.array([PDG_MET, 12], dtype=np.int32)
    prediction = np.full((2, 5), 0.7, dtype=np.float32)
    back = STATS.from_model(prediction, pdg_id)
    assert back[0, ETA] == 0.0
    assert back[0, MASS] == 0.0
    assert back[1, MASS] == 0.0
    assert back[1, ETA] != 0.0


def test_zero_pt_uses_floor():
    pdg_id = np.array([PDG_MET], dtype=np.int32)
    features = np.array([[0.0, 0.0, 0.3, 0.0, 0.0]], dtype=np.float32)
    out = STATS.to_model(features, pdg_id)
    expected = (math.log(PT_FLOOR_GEV) - STATS.log_pt_mean) / STATS.log_pt_std
    assert np.isfinite(out).all()
    assert out[0, PT] == pytest.approx(expected, rel=1e-6)
    back = STATS.from_model(out, pdg_id)
    assert back[0, PT] == pytest.approx(PT_FLOOR_GEV, rel=1e-5)


def test_from_model_wraps_phi_and_clips_pt():
    pdg_id = np.array([11], dtype=np.int32)
    prediction = np.array([[1e6, 0.0, 3 * np.pi / 2, 0.0, 0.0]], dtype=np.float32)
    back = STATS.from_model(prediction, pdg_id)
    assert np.isfinite(back).all()
    assert back[0, PHI] == pytest.approx(-np.pi / 2, abs=1e-6)


def test_class_token_passes_through():
    pdg_id = np.array([CLASS_TOKEN_PDG], dtype=np.int32)
    target = np.array([[1.0, 0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(STATS.to_model(target, pdg_id), target)
    np.testing.assert_array_equal(STATS.from_model(target, pdg_id), target)


def test_compute_standardizes_to_zero_mean_unit_std():
    features, pdg_id = make_tokens(2000)
    stats = FeatureStats.compute(features, pdg_id)
    out = stats.to_model(features, pdg_id)
    zeros = fixed_zero_slots(pdg_id)
    for column in (PT, ETA, MASS):
        values = out[~zeros[:, column], column]
        assert abs(values.mean()) < 1e-4
        assert values.std() == pytest.approx(1.0, rel=1e-4)


def test_compute_skips_fixed_zeros_and_class_tokens():
    pdg_id = np.array([11, 5, PDG_MET, 12, CLASS_TOKEN_PDG], dtype=np.int32)
    features = np.array([[10.0, 1.0, 0, 2.0, 0], [30.0, -1.0, 0, 4.0, 1], [50.0, 0, 0, 0, 0],
                         [20.0, 3.0, 0, 0, 0], [1.0, 0, 0, 0, 0]], dtype=np.float32)
    stats = FeatureStats.compute(features, pdg_id)
    assert stats.m_mean == pytest.approx(3.0)
    assert stats.m_std == pytest.approx(1.0)
    assert stats.eta_mean == pytest.approx(1.0)
    assert stats.log_pt_mean == pytest.approx(np.log([10.0, 30.0, 50.0, 20.0]).mean())


def test_manifest_round_trip():
    assert FeatureStats.from_manifest(STATS.to_manifest()) == STATS


def test_manifest_missing_entry_raises():
    layout = STATS.to_manifest()
    del layout["eta"]
    with pytest.raises(ValueError, match="'eta'"):
        FeatureStats.from_manifest(layout)


def test_zero_std_raises():
    layout = STATS.to_manifest()
    layout["m"]["std"] = 0.0
    with pytest.raises(ValueError, match="std > 0"):
        FeatureStats.from_manifest(layout)


def test_shape_mismatch_raises():
    features, pdg_id = make_tokens(5)
    with pytest.raises(ValueError, match="pdg_id must have shape"):
        STATS.to_model(features, pdg_id[:4])
    with pytest.raises(ValueError, match="features must have shape"):
        STATS.to_model(features[:, :4], pdg_id)
