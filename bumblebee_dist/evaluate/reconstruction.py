"""Top-pair reconstruction from a model's predicted gen particles.

With every gen particle masked, the pre-trained model predicts the gen leptons, neutrinos and b
quarks from the reco particles alone. Each top is built from the predicted b, the predicted
neutrino and the reco lepton of the matching charge (t -> W+ b -> l+ nu b, and the charge
conjugate), and compared with the same top built from the gen b, gen neutrino and gen lepton.

Residuals: m(ttbar) and neutrino pT relative (predicted / true - 1), neutrino eta as a
difference, neutrino phi as a difference wrapped into [-pi, pi).
"""

from __future__ import annotations

import numpy as np

from bumblebee_dist.evaluate.metrics import binned_resolution, resolution, wrap_phi
from bumblebee_dist.tokens import ETA, LEVEL_GEN, LEVEL_RECO, MASS, PHI, PT

# Roles of the tokens a top pair is built from; the top side uses positive charge leptons.
ROLES = ("gen_b", "gen_bbar", "gen_nu", "gen_nubar", "gen_lplus", "gen_lminus",
         "reco_lplus", "reco_lminus")
MTTBAR_EDGES = np.array([300.0, 360.0, 420.0, 500.0, 650.0, 1000.0, np.inf])


def _role_codes(pdg_id: np.ndarray, level: np.ndarray) -> np.ndarray:
    """Role index of each token (-1 for tokens that no top is built from)."""
    gen, reco = level == LEVEL_GEN, level == LEVEL_RECO
    conditions = (
        gen & (pdg_id == 5), gen & (pdg_id == -5),
        gen & np.isin(pdg_id, (12, 14)), gen & np.isin(pdg_id, (-12, -14)),
        gen & np.isin(pdg_id, (-11, -13)), gen & np.isin(pdg_id, (11, 13)),
        reco & np.isin(pdg_id, (-11, -13)), reco & np.isin(pdg_id, (11, 13)),
    )
    codes = np.full(pdg_id.shape, -1, dtype=np.int64)
    for role, condition in enumerate(conditions):
        codes[condition] = role
    return codes


def role_token_index(pdg_id: np.ndarray, level: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Token index of each role per event, (E, len(ROLES)) int64, -1 where the event lacks it.

    When an event has two tokens of one role (possible only for reco leptons in a malformed
    record), the first one is used.
    """
    codes = _role_codes(np.asarray(pdg_id), np.asarray(level))
    num_events = offsets.size - 1
    event_of_token = np.repeat(np.arange(num_events), np.diff(offsets))
    sentinel = np.iinfo(np.int64).max
    table = np.full((num_events, len(ROLES)), sentinel, dtype=np.int64)
    token = np.flatnonzero(codes >= 0)
    np.minimum.at(table, (event_of_token[token], codes[token]), token)
    table[table == sentinel] = -1
    return table


def four_momentum(features: np.ndarray) -> np.ndarray:
    """(..., 5) particle vectors (pT, eta, phi, m, b-tag) to (..., 4) (px, py, pz, E)."""
    pt, eta, phi = features[..., PT], features[..., ETA], features[..., PHI]
    mass = np.maximum(features[..., MASS], 0.0)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    return np.stack([px, py, pz, energy], axis=-1)


def invariant_mass(momentum: np.ndarray) -> np.ndarray:
    """Invariant mass of (..., 4) four-momenta; spacelike rounding gives 0, not NaN."""
    mass_squared = momentum[..., 3] ** 2 - np.sum(momentum[..., :3] ** 2, axis=-1)
    return np.sqrt(np.maximum(mass_squared, 0.0))


def ttbar_momenta(features: np.ndarray, table: np.ndarray, *, lepton_level: str) -> np.ndarray:
    """Four-momentum of the ttbar system per event from the token features.

    ``lepton_level`` "reco" uses the reco leptons, "gen" the gen leptons; b quarks and neutrinos
    always come from the gen slots of ``features`` (predicted or true).
    """
    roles = {name: column for column, name in enumerate(ROLES)}
    plus, minus = ("reco_lplus", "reco_lminus") if lepton_level == "reco" else ("gen_lplus", "gen_lminus")
    parts = ("gen_b", "gen_bbar", "gen_nu", "gen_nubar", plus, minus)
    momentum = np.zeros((table.shape[0], 4))
    for name in parts:
        momentum += four_momentum(features[table[:, roles[name]]])
    return momentum


def reconstruction_residuals(predicted: np.ndarray, true: np.ndarray, pdg_id: np.ndarray,
                             level: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Residuals of m(ttbar) and of the neutrino kinematics per event (NaN where undefined).

    ``predicted`` and ``true`` are (T, 5) physics-space particle vectors of the same tokens.
    Events that lack one of the roles (a malformed record) are dropped and counted in
    ``"num_incomplete"``.
    """
    table = role_token_index(pdg_id, level, offsets)
    complete = (table >= 0).all(axis=1)
    table = table[complete]
    mttbar_true = invariant_mass(ttbar_momenta(true, table, lepton_level="gen"))
    mttbar_predicted = invariant_mass(ttbar_momenta(predicted, table, lepton_level="reco"))
    neutrinos = table[:, [ROLES.index("gen_nu"), ROLES.index("gen_nubar")]].ravel()
    nu_true, nu_predicted = true[neutrinos], predicted[neutrinos]
    return {
        "mttbar_true": mttbar_true,
        "mttbar_relative": mttbar_predicted / mttbar_true - 1.0,
        "nu_pt_relative": nu_predicted[:, PT] / nu_true[:, PT] - 1.0,
        "nu_eta_difference": nu_predicted[:, ETA] - nu_true[:, ETA],
        "nu_phi_difference": wrap_phi(nu_predicted[:, PHI] - nu_true[:, PHI]),
        "num_incomplete": np.array(int((~complete).sum())),
    }


def summarize_residuals(residuals: dict[str, np.ndarray]) -> dict:
    """Bias and resolution of every residual, and m(ttbar) in bins of true m(ttbar)."""
    summary = {name: resolution(values).to_dict() for name, values in residuals.items()
               if name not in ("mttbar_true", "num_incomplete")}
    summary["mttbar_relative_binned"] = binned_resolution(
        residuals["mttbar_relative"], residuals["mttbar_true"], MTTBAR_EDGES)
    summary["num_incomplete"] = int(residuals["num_incomplete"])
    return summary
