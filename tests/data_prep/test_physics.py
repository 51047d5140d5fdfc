"""Four-vector helpers: rounding of m^2, pT = 0, NaN components, phi range."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.physics import (
    ETA_AT_ZERO_PT,
    finite_mask,
    phi_float32,
    to_pt_eta_phi_m,
    wrap_phi,
)


def test_rounded_photon_mass_is_zero():
    # A 50 GeV photon whose m^2 came out -3e-4 GeV^2 from float32 rounding.
    e = 50.0
    pz = np.sqrt(e * e + 3e-4)
    kin = to_pt_eta_phi_m(np.array([0.0]), np.array([0.0]) + 1e-9, np.array([pz]), np.array([e]))
    assert kin.m[0] == 0.0
    assert not kin.spacelike[0]


def test_spacelike_vector_flagged_not_clamped():
    # m^2 = 10^2 - (px^2 + pz^2) = -1 GeV^2
    px, pz, e = 6.0, np.sqrt(65.0), 10.0
    kin = to_pt_eta_phi_m(np.array([px]), np.array([0.0]), np.array([pz]), np.array([e]))
    assert kin.spacelike[0]
    assert kin.m[0] == pytest.approx(-1.0)
    assert np.isfinite(kin.m).all()


def test_zero_pt_gets_documented_eta():
    kin = to_pt_eta_phi_m(np.zeros(3), np.zeros(3), np.array([5.0, -5.0, 0.0]),
                          np.array([5.0, 5.0, 0.0]))
    assert kin.eta.tolist() == [ETA_AT_ZERO_PT, -ETA_AT_ZERO_PT, 0.0]
    assert np.isfinite(kin.phi).all()


def test_nan_component_is_dropped_by_mask():
    px = np.array([1.0, 2.0, 3.0])
    pz = np.array([0.0, np.nan, 1.0])
    mask = finite_mask(px, px, pz, px + 5)
    assert mask.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="four-vector 1"):
        to_pt_eta_phi_m(px, px, pz, px + 5)


def test_phi_range_float64_and_float32():
    angles = np.array([np.pi, -np.pi, 3 * np.pi, np.nextafter(np.pi, 0), -7.0, 0.0])
    wrapped = wrap_phi(angles)
    assert wrapped.min() >= -np.pi
    assert wrapped.max() < np.pi
    as_float32 = phi_float32(angles)
    assert as_float32.dtype == np.float32
    assert as_float32.min() >= -np.pi
    assert as_float32.max() < np.pi
