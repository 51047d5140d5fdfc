"""Top-pair reconstruction residuals on hand-built events."""

import numpy as np
import pytest

from bumblebee_dist.evaluate.baselines import reco_feature_matrix
from bumblebee_dist.evaluate.reconstruction import (four_momentum, invariant_mass,
                                                    reconstruction_residuals, role_token_index)

# One dileptonic event: reco e+, reco mu-, two jets, MET, then the six gen particles.
PDG = np.array([-11, 13, 5, 41, 40, -11, 13, 12, -14, 5, -5])
LEVEL = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
FEATURES = np.array([
    [60.0, 0.3, 0.5, 0.0, 0.0], [45.0, -0.8, -2.0, 0.1, 0.0],
    [90.0, 0.1, 2.5, 10.0, 1.0], [40.0, 1.5, -0.5, 6.0, 0.0], [70.0, 0.0, 1.0, 0.0, 0.0],
    [60.0, 0.3, 0.5, 0.0, 0.0], [45.0, -0.8, -2.0, 0.1, 0.0],
    [50.0, 0.6, 1.2, 0.0, 0.0], [35.0, -1.1, -1.3, 0.0, 0.0],
    [85.0, 0.1, 2.4, 4.8, 1.0], [55.0, 1.4, -0.6, 4.8, 1.0],
])


def _two_events():
    pdg = np.concatenate([PDG, PDG])
    level = np.concatenate([LEVEL, LEVEL])
    features = np.concatenate([FEATURES, FEATURES])
    offsets = np.array([0, PDG.size, 2 * PDG.size])
    return features, pdg, level, offsets


def test_role_table_finds_each_particle():
    features, pdg, level, offsets = _two_events()
    table = role_token_index(pdg, level, offsets)
    assert table.shape == (2, 8)
    # gen_b, gen_bbar, gen_nu, gen_nubar, gen_l+, gen_l-, reco_l+, reco_l-
    assert table[0].tolist() == [9, 10, 7, 8, 5, 6, 0, 1]
    assert table[1].tolist() == [20, 21, 18, 19, 16, 17, 11, 12]


def test_perfect_prediction_has_zero_residuals():
    features, pdg, level, offsets = _two_events()
    residuals = reconstruction_residuals(features, features, pdg, level, offsets)
    assert np.allclose(residuals["mttbar_relative"], 0.0, atol=1e-12)
    assert np.allclose(residuals["nu_pt_relative"], 0.0)
    assert np.allclose(residuals["nu_phi_difference"], 0.0)
    assert residuals["mttbar_true"][0] > 2 * 172.5 * 0.5


def test_neutrino_shift_appears_in_residuals():
    features, pdg, level, offsets = _two_events()
    predicted = features.copy()
    predicted[7, 0] *= 1.1  # neutrino pT of the first event
    predicted[8, 2] = np.pi - 0.05  # anti-neutrino phi, crossing the -pi/pi boundary
    predicted[19, 2] = -np.pi + 0.05
    residuals = reconstruction_residuals(predicted, features, pdg, level, offsets)
    assert residuals["nu_pt_relative"][0] == pytest.approx(0.1)
    assert residuals["nu_phi_difference"][1] == pytest.approx(np.pi - 0.05 + 1.3 - 2 * np.pi)
    assert abs(residuals["nu_phi_difference"][3]) < np.pi
    assert residuals["mttbar_relative"][0] != 0.0


def test_incomplete_event_is_counted_not_used():
    features, pdg, level, offsets = _two_events()
    pdg = pdg.copy()
    pdg[8] = 41  # first event loses its anti-neutrino
    level = level.copy()
    level[8] = 1
    residuals = reconstruction_residuals(features, features, pdg, level, offsets)
    assert int(residuals["num_incomplete"]) == 1
    assert residuals["mttbar_relative"].size == 1


def test_invariant_mass_of_massive_particle_at_rest_direction():
    vector = np.array([[30.0, 1.2, 0.4, 80.4, 0.0]])
    assert invariant_mass(four_momentum(vector))[0] == pytest.approx(80.4)


def test_reco_feature_matrix_layout():
    features, pdg, level, offsets = _two_events()
    matrix = reco_feature_matrix(features, pdg, level, offsets, num_jets=3)
    # 2 leptons x 7 + 3 jets x 7 + MET 3 + jet count 1
    assert matrix.shape == (2, 2 * 7 + 3 * 7 + 3 + 1)
    assert np.array_equal(matrix[0], matrix[1])
    assert matrix[0, 0] == 60.0  # leading lepton pT
    assert matrix[0, 5] == 1.0  # PDG 11 is e-, so the leading -11 has charge +1
    assert matrix[0, 14 + 5] == 1.0  # first jet is b-tagged
    assert matrix[0, 14 + 7 + 5] == 0.0  # second jet is not
    assert matrix[0, -1] == 2.0  # two jets
