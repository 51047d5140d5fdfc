"""Physics features to model space and back: the one place both directions live.

Shapes: T tokens, F = 5 features in the order of ``tokens.FEATURE_NAMES`` (pT, eta, phi, m, b-tag).

| feature | physics space        | model space                                          |
|---------|----------------------|------------------------------------------------------|
| pT      | GeV, >= 0            | (log(max(pT, PT_FLOOR_GEV)) - mean) / std            |
| eta     | pseudorapidity       | (eta - mean) / std                                   |
| phi     | rad, in [-pi, pi)    | unchanged                                            |
| m       | GeV                  | (m - mean) / std                                     |
| b-tag   | 0 or 1               | unchanged                                            |

Fixed zeros stay exactly 0 in model space: the eta and m slots of the missing transverse
momentum (PDG id 40) and the m slot of the neutrinos. Standardizing them would turn a constant 0
into a constant -mean/std that the model would have to learn for no physics content. So they are
left at 0 both ways, and ``from_model`` sets them back to 0 whatever the prediction contains.
They are also left out of the statistics. The class token (PDG id 100) carries a model-space target
vector already, so both directions pass its row through unchanged and the statistics skip it.

pT = 0 occurs (missing momentum can be close to 0), so log pT uses a floor of ``PT_FLOOR_GEV``.
A pT below the floor does not survive the round trip: it comes back as the floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from bumblebee_dist.tokens import (
    BTAG,
    CLASS_TOKEN_PDG,
    ETA,
    MASS,
    NUM_FEATURES,
    PDG_MET,
    PDG_NEUTRINOS,
    PHI,
    PT,
)

# 0.1 GeV lies far below any detector resolution on pT or missing momentum (several GeV), so
# flooring there loses nothing measurable, and log(0.1) keeps pT = 0 within about 8 standard
# deviations of a typical log pT distribution instead of at -inf.
PT_FLOOR_GEV = 0.1
# No object of a 13 TeV collision has a transverse momentum above the collision energy. The
# inverse clips predicted log pT there, so exp() never overflows float32.
PT_CEILING_GEV = 13_000.0

STANDARDIZED = ("log_pt", "eta", "m")


def _check_std(name: str, mean: float, std: float) -> None:
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(
            f"feature_stats[{name!r}] must have a finite mean and a finite std > 0, got "
            f"mean={mean!r}, std={std!r}; recompute the statistics over the train split"
        )


@dataclass(frozen=True)
class FeatureStats:
    """Mean and standard deviation of log pT, eta and m over the train split."""

    log_pt_mean: float
    log_pt_std: float
    eta_mean: float
    eta_std: float
    m_mean: float
    m_std: float

    def __post_init__(self) -> None:
        for name in STANDARDIZED:
            _check_std(name, getattr(self, f"{name}_mean"), getattr(self, f"{name}_std"))

    @classmethod
    def from_manifest(cls, feature_stats: Mapping[str, Any]) -> "FeatureStats":
        """Build from the manifest's ``feature_stats``: ``{"log_pt": {"mean", "std"}, ...}``."""
        values = {}
        for name in STANDARDIZED:
            entry = feature_stats.get(name)
            if not isinstance(entry, Mapping) or "mean" not in entry or "std" not in entry:
                raise ValueError(
                    f"feature_stats[{name!r}] is missing or lacks 'mean'/'std', got {entry!r}; "
                    f"expected keys {list(STANDARDIZED)}, each {{'mean': float, 'std': float}}"
                )
            values[f"{name}_mean"] = float(entry["mean"])
            values[f"{name}_std"] = float(entry["std"])
        return cls(**values)

    def to_manifest(self) -> dict[str, dict[str, float]]:
        """Return the manifest's ``feature_stats`` layout; ``from_manifest`` reads it back."""
        return {
            name: {"mean": getattr(self, f"{name}_mean"), "std": getattr(self, f"{name}_std")}
            for name in STANDARDIZED
        }

    @classmethod
    def compute(cls, features_raw: np.ndarray, pdg_id: np.ndarray) -> "FeatureStats":
        """Compute the statistics from physics-space tokens, (T, F) features and (T,) PDG ids.

        Fixed-zero slots and class tokens are left out (see the module docstring). The standard
        deviation is the population one (ddof = 0), accumulated in float64.
        """
        features = _as_features(features_raw, pdg_id)
        pdg_id = np.asarray(pdg_id)
        particle = pdg_id != CLASS_TOKEN_PDG
        zeros = fixed_zero_slots(pdg_id)
        columns = {
            "log_pt": _log_pt(features[particle, PT]),
            "eta": features[particle & ~zeros[:, ETA], ETA],
            "m": features[particle & ~zeros[:, MASS], MASS],
        }
        values = {}
        for name, column in columns.items():
            if column.size == 0:
                raise ValueError(f"cannot compute feature_stats[{name!r}]: no token carries it")
            values[f"{name}_mean"] = float(column.mean())
            values[f"{name}_std"] = float(column.std())
        return cls(**values)

    def to_model(self, features_raw: np.ndarray, pdg_id: np.ndarray) -> np.ndarray:
        """Map (T, F) physics features to (T, F) float32 model features."""
        features = _as_features(features_raw, pdg_id)
        out = features.copy()
        out[:, PT] = (_log_pt(features[:, PT]) - self.log_pt_mean) / self.log_pt_std
        out[:, ETA] = (features[:, ETA] - self.eta_mean) / self.eta_std
        out[:, MASS] = (features[:, MASS] - self.m_mean) / self.m_std
        return _finish(out, features, pdg_id)

    def from_model(self, features_model: np.ndarray, pdg_id: np.ndarray) -> np.ndarray:
        """Map (T, F) model features (targets or predictions) back to (T, F) float32 physics.

        phi is wrapped into [-pi, pi), predicted log pT is clipped to the floor and ceiling in GeV,
        and fixed-zero slots are set to 0.
        """
        features = _as_features(features_model, pdg_id)
        out = features.copy()
        log_pt = features[:, PT] * self.log_pt_std + self.log_pt_mean
        out[:, PT] = np.exp(np.clip(log_pt, math.log(PT_FLOOR_GEV), math.log(PT_CEILING_GEV)))
        out[:, ETA] = features[:, ETA] * self.eta_std + self.eta_mean
        out[:, PHI] = wrap_phi(features[:, PHI])
        out[:, MASS] = features[:, MASS] * self.m_std + self.m_mean
        return _finish(out, features, pdg_id)


def fixed_zero_slots(pdg_id: np.ndarray) -> np.ndarray:
    """Return a (T, F) bool array, True at slots fixed at 0: MET's eta and m, neutrinos' m."""
    pdg_id = np.asarray(pdg_id)
    met = pdg_id == PDG_MET
    slots = np.zeros((pdg_id.shape[0], NUM_FEATURES), dtype=bool)
    slots[:, ETA] = met
    slots[:, MASS] = met | np.isin(pdg_id, PDG_NEUTRINOS)
    return slots


def wrap_phi(phi: np.ndarray) -> np.ndarray:
    """Wrap angles in radians into [-pi, pi)."""
    return np.mod(np.asarray(phi, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi


def to_model(features_raw: np.ndarray, pdg_id: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """Map (T, F) physics features to model space with ``stats``; see ``FeatureStats.to_model``."""
    return stats.to_model(features_raw, pdg_id)


def from_model(features_model: np.ndarray, pdg_id: np.ndarray, stats: FeatureStats) -> np.ndarray:
    """Map (T, F) model features back to physics; see ``FeatureStats.from_model``."""
    return stats.from_model(features_model, pdg_id)


def _log_pt(pt: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(pt, PT_FLOOR_GEV))


def _as_features(features: np.ndarray, pdg_id: np.ndarray) -> np.ndarray:
    """Return ``features`` as float64 (T, F) after checking it against ``pdg_id``."""
    features = np.asarray(features, dtype=np.float64)
    pdg_shape = np.shape(pdg_id)
    if features.ndim != 2 or features.shape[1] != NUM_FEATURES:
        raise ValueError(f"features must have shape (T, {NUM_FEATURES}), got {features.shape}")
    if pdg_shape != (features.shape[0],):
        raise ValueError(
            f"pdg_id must have shape ({features.shape[0]},) to match features, got {pdg_shape}"
        )
    return features


def _finish(out: np.ndarray, original: np.ndarray, pdg_id: np.ndarray) -> np.ndarray:
    """Restore fixed zeros, pass class tokens and b-tag through, cast to float32."""
    pdg_id = np.asarray(pdg_id)
    out[fixed_zero_slots(pdg_id)] = 0.0
    out[:, BTAG] = original[:, BTAG]
    class_token = pdg_id == CLASS_TOKEN_PDG
    out[class_token] = original[class_token]
    return out.astype(np.float32)
