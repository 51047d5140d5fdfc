"""The eta_t stand-in against inclusive ttbar at generator level, from real Pythia events.

Hard process only (showers, MPI and hadronization off): the observables are defined on the
hard-process tops and the first leptons from the W decays, which the shower does not move, and
the run takes a few seconds. Every check is statistical, with a margin of ``SIGMAS`` standard
errors of this sample size.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.validation import (
    OPEN_TOP_THRESHOLD_GEV,
    generate_gen_sample,
    peak_position,
    summarize,
)

EVENTS = 3000
SIGMAS = 5.0


@pytest.fixture(scope="module")
def samples():
    """Summaries and observables of 3000 hard-process events of each sample."""
    gens = {name: generate_gen_sample(name, EVENTS, seed=3) for name in ("eta_t", "ttbar")}
    return {name: (gen, summarize(gen)) for name, gen in gens.items()}


def test_almost_every_event_complete(samples):
    for name, (gen, _) in samples.items():
        # A few per mille of tops decay to W s or W d and have no b quark.
        assert gen.num_events > 0.98 * EVENTS, name


def test_eta_t_mass_below_threshold(samples):
    _, eta_t = samples["eta_t"]
    margin = SIGMAS * eta_t.fraction_below_threshold_error
    assert eta_t.fraction_below_threshold - margin > 0.5
    assert eta_t.median_m_ttbar < OPEN_TOP_THRESHOLD_GEV


def test_eta_t_mass_peak_below_threshold(samples):
    gen, _ = samples["eta_t"]
    # 2 GeV bins: below the 2.8 GeV width of the stand-in, wide enough for 3000 events.
    peak = peak_position(gen.m_ttbar, 300.0, 400.0, 2.0)
    assert peak < OPEN_TOP_THRESHOLD_GEV


def test_ttbar_mass_above_threshold(samples):
    _, ttbar = samples["ttbar"]
    margin = SIGMAS * ttbar.fraction_below_threshold_error
    assert ttbar.fraction_below_threshold + margin < 0.5
    assert ttbar.median_m_ttbar > OPEN_TOP_THRESHOLD_GEV


def test_eta_t_lepton_dphi_smaller(samples):
    _, eta_t = samples["eta_t"]
    _, ttbar = samples["ttbar"]
    difference = ttbar.mean_dphi_ll - eta_t.mean_dphi_ll
    error = np.hypot(ttbar.mean_dphi_ll_error, eta_t.mean_dphi_ll_error)
    assert difference > SIGMAS * error


def test_eta_t_lepton_dphi_shape_differs(samples):
    eta_t, _ = samples["eta_t"]
    ttbar, _ = samples["ttbar"]
    # Fraction of events with the leptons within pi/2 in azimuth: larger for eta_t.
    near_eta_t = np.mean(eta_t.dphi_ll < np.pi / 2)
    near_ttbar = np.mean(ttbar.dphi_ll < np.pi / 2)
    error = np.sqrt(near_eta_t * (1 - near_eta_t) / eta_t.num_events
                    + near_ttbar * (1 - near_ttbar) / ttbar.num_events)
    assert near_eta_t - near_ttbar > SIGMAS * error


@pytest.mark.xfail(strict=True, reason=(
    "pythia8mc 8.317.2 decays the tops of HiggsBSM:gg2A3 without t tbar spin correlation: "
    "<cos phi> is 0.00 +- 0.01 instead of the singlet's +1/3"))
def test_eta_t_spin_singlet_correlation(samples):
    _, eta_t = samples["eta_t"]
    assert abs(eta_t.mean_cos_phi - 1.0 / 3.0) < SIGMAS * eta_t.mean_cos_phi_error
